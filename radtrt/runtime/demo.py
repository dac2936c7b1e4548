"""First-run demo material: a tiny random-weight model and a synthetic frontal radiograph.

Until the embedded default model exists this shows the pipeline end to end on any machine; the
report is meaningless by construction and the CLI says so.
"""

from __future__ import annotations

from pathlib import Path

from radtrt.imaging.synthetic import synthetic_chest, write_radiograph
from radtrt.model.loading import LoadedModel, save_toolkit
from radtrt.model.tiny import random_model, train_tiny_tokenizer


def make_demo(out: Path, seed: int = 0) -> tuple[Path, Path]:
    """(model dir, study file), reusing what an earlier demo run left in ``out``."""
    model_dir = out / "tiny-random-model"
    if not (model_dir / "config.json").is_file():
        save_toolkit(LoadedModel(random_model(seed=seed), train_tiny_tokenizer(), "tiny-random-demo",
                                 {"layout": "random", "seed": seed}), model_dir)
    study = out / "synthetic-study" / "frontal_pa.dcm"
    if not study.is_file():
        write_radiograph(study, synthetic_chest(seed=seed), modality="DX", view_position="PA")
    return model_dir, study

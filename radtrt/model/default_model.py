"""The embedded default model: a small LLaVA-Rad-architecture model trained on phantoms.

Shipped with radtrt in ``radtrt/assets/default-model/`` (toolkit layout, float16 safetensors,
a few MB) so ``radtrt infer STUDY`` works without ``--model``. It was trained by
``tools/train_default_model.sh`` with radtrt's own commands: phantoms -> tokenizer -> init ->
stage 0 trunk (finding classification) -> stage 0 decoder (reports) -> stage 1 -> stage 2. It
describes phantoms (``radtrt data phantoms``) only: it has never seen a real radiograph and its
reports on real images are meaningless.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from radtrt.errors import RadtrtError, fail

if TYPE_CHECKING:
    import torch

    from radtrt.model.loading import LoadedModel

ASSET_NAME = "default-model"
REBUILD = "tools/train_default_model.sh"
REMEDY = f"reinstall radtrt, rebuild it with {REBUILD}, or pass --model"


def default_model_dir(console: Console | None = None) -> Path:
    """Directory of the default model in radtrt's toolkit layout (``load_model`` reads it). Its config.json is
    parsed and its weights' header read (milliseconds): doctor called a damaged copy fine, and infer then failed
    without saying that reinstalling or rebuilding it is the remedy."""
    path = Path(str(files("radtrt") / "assets" / ASSET_NAME))
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        fail(f"the embedded default model is missing from this installation ({path})", remedy=REMEDY)
    problem = _damage(path)
    if problem:
        fail(f"the embedded default model of this installation is damaged ({problem})", remedy=REMEDY)
    if console is not None:
        console.print("model: radtrt's embedded default model (trained on synthetic phantoms only; "
                      "its reports on real radiographs are meaningless)", highlight=False, soft_wrap=True)
    return path


def _damage(path: Path) -> str | None:
    """What reading the default model's config.json and weights header refuses, or None."""
    from radtrt.model.io import read_json, safetensors_header

    try:
        read_json(path / "config.json")
        safetensors_header(path / "model.safetensors")
    except RadtrtError as e:  # said with the remedy by the caller
        return str(e)
    return None


def load_default_model(*, dtype: "torch.dtype | None" = None, device: str = "cpu",
                       console: Console | None = None) -> "LoadedModel":
    """``load_model`` of the default model, whose failure (damage the header check cannot see: a hand-edited
    config value, weights that are not finite) names the remedy, as a missing or damaged copy does."""
    import torch

    from radtrt.model.loading import MEMORY_REMEDY, load_model

    path = default_model_dir(console)
    try:
        return load_model(path, dtype=dtype or torch.float32, device=device)
    except RadtrtError as e:
        if e.remedy == MEMORY_REMEDY:  # too little memory: no damage a reinstall mends, and its own remedy stands
            raise
        fail(f"the embedded default model of this installation does not load ({e})", remedy=REMEDY)

"""F1-RadGraph (partial reward) through the ``radgraph`` package, from local weights only.

The released evaluator scores F1-RadGraph with ``radgraph``'s ``F1RadGraph(reward_level="partial")`` on
the ``radgraph`` model (``radgraph.tar.gz`` of StanfordAIMI/RRG_scorers), averaging the per-report
reward. The package downloads that archive, and the BERT it names, from the hub when they are missing;
radtrt refuses to start unless both are already local, so nothing is fetched at run time.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from radtrt.errors import fail
from radtrt.model.io import read_json
from radtrt.evaluation.bootstrap import BootstrapConfig, Estimate, bootstrap_mean

PACKAGE = "the radgraph package (pip install 'radgraph>=0.1,<=0.1.18')"
WHAT_TO_PROVIDE = (f"F1-RadGraph needs {PACKAGE} and local weights: "
                   "--radgraph-dir DIR holding radgraph/config.json, radgraph/vocabulary/ and radgraph/weights.th "
                   "(the extracted radgraph.tar.gz of StanfordAIMI/RRG_scorers)")


# where radgraph's config.json names its BERT: ``RadGraph.__init__`` reads the tokenizer's name from the first and the
# embedder's from the second, and would fetch either from the hub when it is not local
_BERT_NAMES = (("dataset_reader", "token_indexers", "bert", "model_name"),
               ("model", "embedder", "token_embedders", "bert", "model_name"))


@dataclass(frozen=True)
class RadGraphConfig:
    """``model_dir`` is radgraph's ``model_cache_dir``: it holds one folder per model type."""

    model_dir: Path
    model_type: str = "radgraph"
    reward_level: str = "partial"

    def check(self) -> None:
        """Refuse, before any metric runs, a missing package or weights (naming only what is missing): the package
        was noticed only once the other metrics had run."""
        folder = self.model_dir / self.model_type
        missing = [f"{self.model_type}/{name}" for name in ("config.json", "vocabulary", "weights.th")
                   if not (folder / name).exists()]
        needs = [] if importlib.util.find_spec("radgraph") is not None else [PACKAGE]
        if missing:
            needs.append(f"{', '.join(missing)} in --radgraph-dir {self.model_dir} (the extracted radgraph.tar.gz "
                         f"of StanfordAIMI/RRG_scorers)")
        if needs:
            fail("F1-RadGraph needs " + " and ".join(needs))
        config = read_json(folder / "config.json")
        for where in _BERT_NAMES:  # radgraph loads its tokenizer by one and its embedder by the other
            bert: object = config
            try:
                for key in where:
                    bert = bert[key]  # type: ignore[index]
            except (KeyError, TypeError):
                fail(f"{folder / 'config.json'} does not name the BERT the RadGraph model uses ({'.'.join(where)})")
            if not isinstance(bert, str) or not bert:  # a number there was a TypeError traceback
                fail(f"{folder / 'config.json'}: {'.'.join(where)} must be a name or a folder, got {bert!r}")
            if not Path(bert).is_dir() and os.environ.get("HF_HUB_OFFLINE") != "1":
                fail(f"the RadGraph model uses the BERT '{bert}', which is not a local directory: point "
                     f"{'.'.join(where)} in {folder / 'config.json'} at a local copy, or set HF_HUB_OFFLINE=1 with "
                     f"it in the Hugging Face cache")


def radgraph_rewards(predictions: Sequence[str], references: Sequence[str], cfg: RadGraphConfig) -> np.ndarray:
    """Per-report F1-RadGraph at ``cfg.reward_level``."""
    cfg.check()
    try:
        from radgraph import F1RadGraph
    except ImportError as e:  # installed (check found it) but broken: its weights are not the problem
        fail(f"F1-RadGraph needs {PACKAGE}, and importing it failed ({e})")
    scorer = F1RadGraph(reward_level=cfg.reward_level, model_type=cfg.model_type, model_cache_dir=str(cfg.model_dir))
    rewards = scorer(refs=list(references), hyps=list(predictions))[1]
    # "partial" gives one F1 per report; some versions give (f1, precision, recall).
    return np.array([r[0] if isinstance(r, (tuple, list)) else r for r in rewards], dtype=np.float64)


def f1_radgraph(predictions: Sequence[str], references: Sequence[str], cfg: RadGraphConfig,
                bootstrap: BootstrapConfig) -> Estimate:
    return bootstrap_mean(radgraph_rewards(predictions, references, cfg), bootstrap)

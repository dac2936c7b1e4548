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

from rich.console import Console

from radtrt.errors import fail

ASSET_NAME = "default-model"
REBUILD = "tools/train_default_model.sh"


def default_model_dir(console: Console | None = None) -> Path:
    """Directory of the default model in radtrt's toolkit layout (``load_model`` reads it)."""
    path = Path(str(files("radtrt") / "assets" / ASSET_NAME))
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        fail(f"the embedded default model is missing from this installation ({path}); reinstall radtrt, "
             f"rebuild it with {REBUILD}, or pass --model")
    if console is not None:
        console.print("model: radtrt's embedded default model (trained on synthetic phantoms only; "
                      "its reports on real radiographs are meaningless)", highlight=False, soft_wrap=True)
    return path

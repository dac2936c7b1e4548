"""What a finished run leaves behind, besides its checkpoint and log.

* ``RUN/model/``: the trained model in radtrt's toolkit layout (``load_model`` reads it; the next
  stage starts from it). Stage 1 records the ``plain`` template, stage 2 ``v1``; stage 2's LoRA is
  merged with ``checkpoints.merge_lora``, the release loader's own merge.
* ``RUN/lora/`` (stage 2): ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT key
  names; with the run's ``init_model`` as base this is what ``release_export`` publishes.
* ``RUN/vision_head.safetensors`` + ``.json`` (trunk pretraining): the classifier and its labels.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from radtrt.errors import fail, shell_quote
from radtrt.model.io import save_tensors
from radtrt.model.loading import LoadedModel, save_toolkit
from radtrt.outputs import new_dir_built_aside, write_text
from radtrt.training.config import TrainConfig
from radtrt.training.objectives import VisionClassifier

if TYPE_CHECKING:
    from peft import PeftModel

MODEL_DIR = "model"
LORA_DIR = "lora"
VISION_HEAD = "vision_head"
CONV_TEMPLATE = {"stage1": "plain", "stage2": "v1"}


LORA_FILES = ("adapter_config.json", "adapter_model.safetensors")  # all that write_outputs puts in RUN/lora


def _file_manager_metadata(name: str) -> bool:
    """Files macOS Finder and Windows Explorer drop into a folder someone merely opened: deleting them loses
    nothing, and refusing them stopped a resume over a folder its user had only looked at."""
    return name in (".DS_Store", "Thumbs.db", "desktop.ini") or name.startswith("._")


def check_leftover_lora(run_dir: Path) -> None:
    """Refuse a ``RUN/lora``, left by a run stopped between writing it and its model, that holds anything but the
    files radtrt writes (resume checks it before training). Why: resume deleted the whole folder with
    ``shutil.rmtree``, whatever a user had put in it; elsewhere radtrt deletes only what carries its marker."""
    lora_dir = run_dir / LORA_DIR
    if not (lora_dir.exists() or lora_dir.is_symlink()):
        return
    if lora_dir.is_symlink() or not lora_dir.is_dir():
        problem = f"{lora_dir} is not a folder radtrt wrote"
    else:
        foreign = sorted(p.name for p in lora_dir.iterdir()
                         if not (p.name in LORA_FILES or _file_manager_metadata(p.name))
                         or p.is_symlink() or not p.is_file())
        problem = f"{lora_dir} holds {foreign[0]}, which radtrt did not write" if foreign else None
    if problem is not None:
        fail(f"{problem}; it is in the way of the LoRA adapter this run writes: move it away, then run: radtrt "
             f"train resume {shell_quote(str(run_dir))}")


def remove_leftover_lora(run_dir: Path) -> None:
    """Remove the files radtrt wrote in ``RUN/lora`` and the folder, refusing one that holds anything else."""
    check_leftover_lora(run_dir)
    lora_dir = run_dir / LORA_DIR
    if lora_dir.is_dir():
        for path in lora_dir.iterdir():  # what the check above let through: radtrt's files, file managers' litter
            path.unlink()
        lora_dir.rmdir()


def model_name(cfg: TrainConfig, init_name: str) -> str:
    return cfg.model_name or f"{init_name}+{cfg.stage}"


def write_outputs(cfg: TrainConfig, run_dir: Path, loaded: LoadedModel, objective: nn.Module,
                  peft_lm: "PeftModel | None", steps: int) -> Path:
    """Write the stage's outputs and return the toolkit model directory. A stage-2 run stopped after its ``lora/``
    and before its ``model/`` removes ``lora/`` again: a finished run holds it, and a script checking for it was
    misled by an unfinished one (the resume writes both)."""
    try:
        return _write_outputs(cfg, run_dir, loaded, objective, peft_lm, steps)
    except BaseException:
        if peft_lm is not None and not (run_dir / MODEL_DIR).exists():
            remove_leftover_lora(run_dir)
        raise


def _write_outputs(cfg: TrainConfig, run_dir: Path, loaded: LoadedModel, objective: nn.Module,
                   peft_lm: "PeftModel | None", steps: int) -> Path:
    llava = loaded.model
    if peft_lm is not None:
        from radtrt.training.lora import adapter_config, adapter_state, merged_decoder_state

        lora_dir = run_dir / LORA_DIR
        if not (run_dir / MODEL_DIR).exists():
            remove_leftover_lora(run_dir)  # from a resume of a run stopped while writing its outputs
        base_name = Path(cfg.init_model).name
        with new_dir_built_aside(lora_dir, "LoRA adapter folder") as work:
            (work / "adapter_config.json").write_text(json.dumps(adapter_config(peft_lm, base_name), indent=2))
            save_tensors(adapter_state(peft_lm), work / "adapter_model.safetensors", metadata={"format": "pt"})
        merged = merged_decoder_state(peft_lm, base_name)
        peft_lm.unload()  # plain Linear layers again, holding the base weights
        llava.language_model.load_state_dict(merged, strict=True)
    if isinstance(objective, VisionClassifier):
        save_tensors({k: v.detach().cpu() for k, v in objective.head.state_dict().items()},
                     run_dir / f"{VISION_HEAD}.safetensors")
        write_text(run_dir / f"{VISION_HEAD}.json", json.dumps({"labels": objective.label_names}, indent=2),
                   "vision head labels")
    if cfg.stage in CONV_TEMPLATE:
        llava.cfg = dataclasses.replace(llava.cfg, conv_template=CONV_TEMPLATE[cfg.stage])
    source = {"layout": "radtrt-training", "stage": cfg.stage, "init_model": loaded.name,
              "manifest": Path(cfg.manifest).name, "steps": steps, "seed": cfg.seed}
    out = save_toolkit(LoadedModel(llava.cpu(), loaded.tokenizer, model_name(cfg, loaded.name), source),
                       run_dir / MODEL_DIR)
    return out

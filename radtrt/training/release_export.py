"""Publish a trained model in the official LLaVA-Rad release layout (``radtrt convert --to llava-rad``).

``OUT/llava-rad/``: ``config.json``, ``adapter_config.json`` + ``adapter_model.bin`` (PEFT LoRA),
``non_lora_trainables.bin`` (projector), the open_clip JSON + checkpoint (trunk).
``OUT/base-lm/``: the base decoder (Hugging Face LLaMA layout) and its tokenizer.
The released loader (``llava/model/builder.py``: base LM + non_lora_trainables + PeftModel merge)
and radtrt's ``load_model(OUT/llava-rad, OUT/base-lm)`` both read it.

* A stage-2 run directory is exported as trained: its LoRA adapter over its ``init_model``'s
  decoder as the base. The base is re-read from ``init_model`` and the merge is checked to equal
  the run's merged model bit for bit, so a changed or missing init model is caught, not shipped.
* Any other model (a toolkit directory, another stage's run, a ``LoadedModel``) has no separate
  adapter: its decoder becomes the base and the adapter is the identity (``lora_B = 0``, PEFT's
  initial state), because the released LLaVA-Rad loading path always applies an adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from radtrt.errors import fail, shell_quote
from radtrt.model import checkpoints as ck
from radtrt.model.io import load_tensors, read_json
from radtrt.outputs import check_new_dir, new_dir_built_aside
from radtrt.model.loading import (RELEASE_BASE_DIR, RELEASE_DIR, LoadedModel, base_fingerprint, check_generates,
                                  decoder_weight_names, load_model)
from radtrt.model.release import adapter_config_json, write_base_lm, write_release
from radtrt.training.config import TrainConfig
from radtrt.training.checkpoint import state_path
from radtrt.training.loop import CONFIG_FILE, run_config
from radtrt.training.outputs import LORA_DIR, MODEL_DIR


IDENTITY_RANK = 1


def identity_adapter(decoder: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """PEFT-named LoRA weights whose update is exactly zero (A = 0, B = 0)."""
    out = {}
    for layer in range(num_layers):
        for module in ck.LORA_TARGETS:
            part = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            weight = decoder[f"model.layers.{layer}.{part}.{module}.weight"]
            prefix = f"base_model.model.model.layers.{layer}.{part}.{module}"
            out[f"{prefix}.lora_A.weight"] = weight.new_zeros(IDENTITY_RANK, weight.shape[1])
            out[f"{prefix}.lora_B.weight"] = weight.new_zeros(weight.shape[0], IDENTITY_RANK)
    return out


def _write(out_dir: Path, loaded: LoadedModel, base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor],
           adapter_config: dict, base_name: str) -> tuple[Path, Path]:
    check_generates(loaded, f"model {loaded.name}")  # a release no infer can run is not written
    model, cfg = loaded.model, loaded.model.cfg
    base_dir = write_base_lm(out_dir / RELEASE_BASE_DIR, cfg, base, loaded.tokenizer)
    release_dir = write_release(out_dir / RELEASE_DIR, cfg, trunk=_cpu(model.vision_tower.state_dict()),
                                projector=_cpu(model.mm_projector.state_dict()), lora=lora,
                                adapter_config=adapter_config, base_name=base_name, model_name=loaded.name,
                                base_fingerprint=base_fingerprint(decoder_weight_names(cfg), base))
    return release_dir, base_dir


def _cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def _export_merged(loaded: LoadedModel, out_dir: Path, base_name: str) -> tuple[Path, Path]:
    decoder = _cpu(loaded.model.language_model.state_dict())
    lora = identity_adapter(decoder, loaded.model.cfg.decoder.num_hidden_layers)
    return _write(out_dir, loaded, decoder, lora, adapter_config_json(IDENTITY_RANK, IDENTITY_RANK, 0.0, base_name),
                  base_name)


def _export_lora_run(run_dir: Path, cfg: TrainConfig, out_dir: Path, base_name: str | None) -> tuple[Path, Path]:
    merged = load_model(run_dir / MODEL_DIR)
    init_dir = Path(cfg.init_model)
    if not init_dir.is_dir():
        fail(f"the stage-2 run's base model {init_dir} is gone; the release layout needs it as base-lm "
             f"(or export {run_dir / MODEL_DIR} instead, with an identity adapter)")
    init = load_model(init_dir, Path(cfg.init_base_model) if cfg.init_base_model else None)
    base = _cpu(init.model.language_model.state_dict())
    adapter = load_tensors(run_dir / LORA_DIR / "adapter_model.safetensors")
    adapter_cfg = read_json(run_dir / LORA_DIR / "adapter_config.json")
    check = ck.merge_lora(base, adapter, adapter_cfg)
    for name, value in merged.model.language_model.state_dict().items():
        if not torch.equal(check[name], value.cpu()):
            fail(f"the base model {init_dir} is not the one {run_dir} was trained from (weight '{name}' differs "
                 f"after merging the adapter)")
    name = base_name or adapter_cfg.get("base_model_name_or_path") or init_dir.name
    adapter_cfg = {**adapter_cfg, "base_model_name_or_path": name}
    return _write(out_dir, merged, base, adapter, adapter_cfg, name)


def export_release(source: LoadedModel | Path, out_dir: Path, *, base_name: str | None = None) -> tuple[Path, Path]:
    """Write ``out_dir/llava-rad`` and ``out_dir/base-lm``; returns (release dir, base-LM dir).

    ``source``: a training run directory (``radtrt train ... -o RUN``), a model directory
    ``load_model`` reads, or an already loaded model.
    """
    check_new_dir(out_dir)
    write: Callable[[Path], tuple[Path, Path]]
    if isinstance(source, LoadedModel):
        loaded = source
        write = lambda work: _export_merged(loaded, work, base_name or f"{loaded.name}-base")  # noqa: E731
    else:
        if not source.is_dir():
            fail(f"not a directory: {source}")
        run_cfg = None
        if (source / CONFIG_FILE).is_file():
            run_cfg = TrainConfig.from_dict(read_json(source / CONFIG_FILE), str(source / CONFIG_FILE))
        elif state_path(source).is_file():  # train_config.json deleted: the checkpoint holds the same config
            # (without this, the run was said to be "not a model: give RUN/model", which exported an identity
            # adapter over the merged decoder instead of the trained LoRA)
            run_cfg = run_config(source)
        if run_cfg is not None:
            if not (source / MODEL_DIR / "config.json").is_file():
                fail(f"training run {source} has not finished (no {MODEL_DIR}/); " + (
                    f"resume it first; run: radtrt train resume {shell_quote(str(source))}" if state_path(source).is_file() else
                    "it has no checkpoint to resume from either: delete it and start the run again"))
        if run_cfg is not None and run_cfg.stage == "stage2" and (source / LORA_DIR).is_dir():
            run, cfg = source, run_cfg
            write = lambda work: _export_lora_run(run, cfg, work, base_name)  # noqa: E731
        else:
            loaded = load_model(source / MODEL_DIR if run_cfg is not None else source)
            write = lambda work: _export_merged(loaded, work, base_name or f"{loaded.name}-base")  # noqa: E731
    with new_dir_built_aside(out_dir, "release folder") as work:  # a failure leaves no half-written release
        release, base = write(work)
    return out_dir / release.relative_to(work), out_dir / base.relative_to(work)

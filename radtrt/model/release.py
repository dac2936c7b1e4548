"""Write the official LLaVA-Rad release layout (the inverse of ``loading._load_release``).

Used to build release-layout fixtures of any size and, with training, to publish checkpoints that
the released LLaVA-Rad loader reads: a release directory (config, LoRA adapter, projector, open_clip
JSON + checkpoint) next to a base-LM directory (Hugging Face LLaMA weights + tokenizer).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

from radtrt.errors import fail
from radtrt.model import checkpoints as ck
from radtrt.model.config import LlavaRadConfig
from radtrt.model.io import save_tensors
from radtrt.model.loading import (DEFAULT_VISION_CKPT, DEFAULT_VISION_JSON, RELEASE_BASE_KEY, RELEASE_NAME_KEY,
                                  RELEASE_TEMPLATE_KEY)
from radtrt.model.tokenizer import LlamaSPTokenizer
from radtrt.outputs import make_dir

VISION_TOWER_NAME = "biomedclip_cxr_518"


def release_config_json(cfg: LlavaRadConfig, base_name: str, model_name: str | None = None,
                        base_fingerprint: list[str | None] | None = None) -> dict[str, Any]:
    return {
        **cfg.decoder.to_hf(),
        "_name_or_path": base_name,
        "model_type": "llava",
        "architectures": ["LlavaLlamaForCausalLM"],
        "mm_vision_tower": VISION_TOWER_NAME,
        "mm_vision_tower_config": DEFAULT_VISION_JSON,
        "mm_vision_tower_checkpoint": DEFAULT_VISION_CKPT,
        "mm_projector_type": cfg.projector_type,
        "mm_hidden_size": cfg.vision.embed_dim,
        "mm_vision_select_layer": cfg.mm_vision_select_layer,
        "mm_vision_select_feature": cfg.mm_vision_select_feature,
        "image_aspect_ratio": "square",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
        "use_cache": True,
        # radtrt's own key: the official loader ignores it, and a release without it (LLaVA-Rad's own) is read as
        # v1. Why: a stage-1 model (plain template) came back from 'convert --to llava-rad' as v1, and generated
        # other tokens from bit-identical weights.
        RELEASE_TEMPLATE_KEY: cfg.conv_template,
        # radtrt's too: the model's name came back from a round trip as "llava-rad", the release layout's
        **({RELEASE_NAME_KEY: model_name} if model_name else {}),
        # and the base decoder's weights (model/fingerprint.py), checked when the release is loaded
        **({RELEASE_BASE_KEY: base_fingerprint} if base_fingerprint and any(base_fingerprint) else {}),
    }


def adapter_config_json(r: int, alpha: int, dropout: float, base_name: str,
                        targets: tuple[str, ...] = ck.LORA_TARGETS) -> dict[str, Any]:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
            "target_modules": list(targets), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "base_model_name_or_path": base_name, "modules_to_save": None}


def write_base_lm(out_dir: Path, cfg: LlavaRadConfig, decoder: dict[str, torch.Tensor],
                  tokenizer: LlamaSPTokenizer) -> Path:
    """A Hugging Face LLaMA directory (what ``--base-model`` points at). A tied ``lm_head`` is left out, as Hugging
    Face saves one (safetensors refuses two names for one tensor: "Some tensors share memory", exit 2)."""
    if cfg.decoder.tie_word_embeddings:
        decoder = {k: v for k, v in decoder.items() if k != "lm_head.weight"}
    make_dir(out_dir)
    with _write_failures(out_dir, "base-LM folder"):
        (out_dir / "config.json").write_text(json.dumps(cfg.decoder.to_hf(), indent=2))
        save_tensors(decoder, out_dir / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save(out_dir)
    return out_dir


def write_release(out_dir: Path, cfg: LlavaRadConfig, *, trunk: dict[str, torch.Tensor],
                  projector: dict[str, torch.Tensor], lora: dict[str, torch.Tensor] | None,
                  adapter_config: dict[str, Any] | None, base_name: str,
                  extra_open_clip: dict[str, torch.Tensor] | None = None, model_name: str | None = None,
                  base_fingerprint: list[str | None] | None = None) -> Path:
    """The release directory; ``lora`` uses PEFT key names (``base_model.model.model.layers...lora_A.weight``)."""
    make_dir(out_dir)
    with _write_failures(out_dir, "release folder"):
        (out_dir / "config.json").write_text(json.dumps(release_config_json(cfg, base_name, model_name, base_fingerprint),
                                                         indent=2))
        (out_dir / DEFAULT_VISION_JSON).write_text(json.dumps(cfg.vision.to_open_clip(), indent=2))
        torch.save({"state_dict": {**ck.trunk_to_open_clip(trunk), **(extra_open_clip or {})}},
                   out_dir / DEFAULT_VISION_CKPT)
        torch.save(ck.projector_to_non_lora(projector), out_dir / "non_lora_trainables.bin")
        if lora is not None and adapter_config is not None:
            (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
            torch.save(lora, out_dir / "adapter_model.bin")
    return out_dir


@contextlib.contextmanager
def _write_failures(out_dir: Path, what: str) -> Iterator[None]:
    """A full disk as one line: ``torch.save`` reports it as a RuntimeError from its C++ zip writer
    ("[enforce fail at inline_container.cc...] file write failed"), plain writes as OSError."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        # the zip writer's "unexpected pos 8128 vs 8016" says nothing of the disk: its free space does
        room = f"; {shutil.disk_usage(out_dir).free / 1e6:.0f} MB free there" if out_dir.is_dir() else ""
        fail(f"cannot write {what} {out_dir} ({e.strerror if isinstance(e, OSError) and e.strerror else reason}"
             f"{room})")

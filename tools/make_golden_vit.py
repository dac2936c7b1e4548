#!/usr/bin/env python
"""Generate the vision-tower golden files from the upstream timm / open_clip code.

Run ONCE with a separate environment that has timm + open_clip installed (never
needed by radtrt at runtime):

    /work/goldenvenv/bin/python tools/make_golden_vit.py

Writes (relative to the repo root):

  tests/golden/vit_dinov2_tiny.safetensors
      A tiny DINOv2-family timm ViT (same architecture family as timm's
      ``vit_base_patch14_dinov2``) with every parameter randomised, an input batch
      and the per-block outputs exactly as LLaVA-Rad's ``VisionTower.forward``
      computes them.  Tensors:
        pixel_values        [2,3,56,56]           float32 input
        pre_blocks          [2,17,32]             patch_embed -> _pos_embed -> patch_drop -> norm_pre
        block_outputs       [depth,2,17,32]       output of each block (float32 model)
        block_outputs_f64   [depth,2,17,32]       same, model + input run in float64 (tolerance gauge)
        hidden_states       [depth+1,2,17,32]     LLaVA-Rad VisionTower hidden_states (pre_blocks + blocks)
        selected_features   [2,16,32]             hidden_states[-2][:, 1:]  (mm_vision_select_layer=-2, 'patch')
        features_normed     [2,17,32]             model.forward_features(px) (final LayerNorm applied)
        state.<timm key>    ...                   the timm state_dict (e.g. state.blocks.0.ls1.gamma)
      Metadata (safetensors header ``__metadata__``): ``config`` = json of the
      hyper-parameters, versions and the timm create kwargs.

  tests/golden/vit_dinov2_base_shapes.json
      Parameter names/shapes of the REAL-size trunk exactly as open_clip builds it
      for a ``vision_cfg`` with ``timm_model_name: vit_base_patch14_dinov2.lvd142m``
      (captured by intercepting ``timm.create_model`` during open_clip model
      construction), plus a sample of the full open_clip state-dict keys.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

import timm
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("GOLDEN_OUT", ROOT / "tests" / "golden"))

SEED = 20240607

TINY_CREATE_KWARGS = dict(
    pretrained=False,
    img_size=56,
    embed_dim=32,
    depth=3,
    num_heads=2,
    num_classes=0,
)


# --------------------------------------------------------------------------- tiny ViT
def randomize_(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Overwrite every parameter with non-trivial seeded random values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = p.shape

            def rn(std, mean=0.0):
                return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean

            if name in ("cls_token", "pos_embed"):
                v = rn(0.5)
            elif name == "patch_embed.proj.weight":
                fan_in = shape[1] * shape[2] * shape[3]
                v = rn(1.5 / fan_in ** 0.5)
            elif name.endswith(".gamma"):  # LayerScale
                v = rn(0.4, 0.2)
            elif ("norm" in name) and name.endswith(".weight"):  # LayerNorm weights
                v = rn(0.25, 1.0)
            elif name.endswith(".bias"):
                v = rn(0.2)
            elif name.endswith(".weight") and p.ndim == 2:  # Linear weights
                v = rn(1.0 / shape[1] ** 0.5)
            else:
                raise RuntimeError(f"unhandled parameter {name} {tuple(shape)}")
            p.copy_(v)


def llava_rad_hidden_states(model, px):
    """Mirror llava/model/multimodal_encoder/open_clip_encoder/open_clip_encoder.py
    VisionTower.forward (plus patch_drop, which is an identity in eval mode)."""
    x = model.patch_embed(px)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    states = [x]
    for blk in model.blocks:
        x = blk(x)
        states.append(x)
    return states


def make_tiny():
    torch.manual_seed(SEED)
    model = timm.create_model("vit_base_patch14_dinov2", **TINY_CREATE_KWARGS)
    model.eval()
    gen = torch.Generator().manual_seed(SEED)
    randomize_(model, gen)

    # sanity: architecture is what we claim it is
    blk0 = model.blocks[0]
    assert model.patch_embed.patch_size == (14, 14)
    assert model.patch_embed.proj.bias is not None
    assert model.cls_token is not None and model.reg_token is None
    assert not model.no_embed_class and not model.dynamic_img_size
    assert isinstance(model.norm_pre, torch.nn.Identity)
    assert model.pos_embed.shape == (1, 17, 32)
    assert blk0.attn.qkv.bias is not None
    assert isinstance(blk0.attn.q_norm, torch.nn.Identity)
    assert blk0.mlp.fc1.out_features == 4 * 32
    assert type(blk0.mlp.act) is torch.nn.GELU and blk0.mlp.act.approximate == "none"
    assert abs(blk0.norm1.eps - 1e-6) < 1e-12 and abs(model.norm.eps - 1e-6) < 1e-12
    assert hasattr(blk0.ls1, "gamma") and hasattr(blk0.ls2, "gamma")
    assert isinstance(model.head, torch.nn.Identity)

    gen_in = torch.Generator().manual_seed(SEED + 1)
    px = torch.randn(2, 3, 56, 56, generator=gen_in, dtype=torch.float32)

    with torch.no_grad():
        states = llava_rad_hidden_states(model, px)
        feats = model.forward_features(px)
        m64 = __import__("copy").deepcopy(model).double()
        states64 = llava_rad_hidden_states(m64, px.double())
        feats64 = m64.forward_features(px.double())

    # forward_features = same pipeline + final norm
    assert torch.allclose(model.norm(states[-1]), feats, atol=1e-6)

    hidden = torch.stack(states)  # [depth+1, B, T, C]
    tensors = {
        "pixel_values": px.contiguous(),
        "pre_blocks": states[0].contiguous(),
        "block_outputs": torch.stack(states[1:]).contiguous(),
        "block_outputs_f64": torch.stack(states64[1:]).contiguous(),
        "hidden_states": hidden.contiguous(),
        "selected_features": states[-2][:, 1:].contiguous(),
        "features_normed": feats.contiguous(),
        "features_normed_f64": feats64.contiguous(),
    }
    for k, v in model.state_dict().items():
        tensors["state." + k] = v.detach().clone().contiguous()

    blk = model.blocks[0]
    config = {
        "model": "timm vit_base_patch14_dinov2 (tiny overrides)",
        "timm_create_model": {"model_name": "vit_base_patch14_dinov2", **TINY_CREATE_KWARGS},
        "img_size": 56,
        "patch_size": 14,
        "in_chans": 3,
        "embed_dim": 32,
        "depth": 3,
        "num_heads": 2,
        "head_dim": 16,
        "mlp_ratio": 4.0,
        "mlp_hidden": blk.mlp.fc1.out_features,
        "init_values": 1e-5,
        "qkv_bias": True,
        "proj_bias": True,
        "class_token": True,
        "reg_tokens": 0,
        "no_embed_class": False,
        "pos_embed": "learn",
        "num_prefix_tokens": int(model.num_prefix_tokens),
        "pre_norm": False,
        "final_norm": True,
        "global_pool": model.global_pool,
        "num_classes": 0,
        "eps": float(blk.norm1.eps),
        "act": "GELU(approximate='none')",
        "layer_scale": True,
        "seq_len": 17,
        "batch": 2,
        "seed": SEED,
        "note": ("LayerScale gammas were re-randomised after construction, so init_values only "
                 "documents the architecture. block_outputs[i] = output of blocks[i]; "
                 "hidden_states[0] = pre_blocks (what LLaVA-Rad's VisionTower returns as "
                 "hidden_states); selected_features = hidden_states[-2][:, 1:]."),
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
        "attention_impl_fused": bool(getattr(blk.attn, "fused_attn", False)),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "vit_dinov2_tiny.safetensors"
    save_file(tensors, str(path), metadata={"config": json.dumps(config, sort_keys=True)})
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    err = (tensors["block_outputs"].double() - tensors["block_outputs_f64"]).abs().max().item()
    print(f"  max |f32 - f64| over block outputs: {err:.3e}")
    return config


# --------------------------------------------------------------------------- open_clip / real trunk
# A config in the shape of LLaVA-Rad's biomedclipcxr_518.json.  The real file lives only on the
# HF hub (microsoft/llava-rad) and could not be read here; the vision_cfg keys follow
# LLaVA-Rad's open_clip_encoder/README.md example (timm_pool "", timm_proj "linear"),
# with the DINOv2 trunk name and 518 image size.
MIMIC_CFG_HF_TEXT = {
    "embed_dim": 512,
    "vision_cfg": {
        "timm_model_name": "vit_base_patch14_dinov2.lvd142m",
        "timm_model_pretrained": False,
        "timm_pool": "",
        "timm_proj": "linear",
        "image_size": 518,
    },
    "text_cfg": {
        "hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
        "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
        "hf_proj_type": "mlp",
        "hf_pooler_type": "cls_last_hidden_state_pooler",
        "context_length": 256,
    },
}
MIMIC_CFG_NATIVE_TEXT = {
    "embed_dim": 512,
    "vision_cfg": dict(MIMIC_CFG_HF_TEXT["vision_cfg"]),
    # native (non-HF) text tower: buildable offline; irrelevant to the visual keys
    "text_cfg": {"context_length": 77, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 1},
}


class CaptureCreate:
    def __init__(self):
        self.calls = []
        self._orig = None

    def __enter__(self):
        import open_clip.timm_model as tm
        self._tm = tm
        self._orig = tm.timm.create_model

        def wrapped(model_name, *args, **kwargs):
            self.calls.append({"model_name": model_name, "args": list(args), "kwargs": dict(kwargs)})
            return self._orig(model_name, *args, **kwargs)

        tm.timm.create_model = wrapped
        return self

    def __exit__(self, *exc):
        self._tm.timm.create_model = self._orig
        return False


def jsonable(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    return repr(v)


def make_shapes():
    import open_clip
    from open_clip.factory import _MODEL_CONFIGS

    result = {
        "timm_version": timm.__version__,
        "open_clip_version": getattr(open_clip, "__version__", None) or __import__("open_clip.version").version.__version__,
        "torch_version": torch.__version__,
        "mimicked_model_config": MIMIC_CFG_HF_TEXT,
        "mimicked_model_config_note": (
            "The real biomedclipcxr_518.json is only on the HF hub (microsoft/llava-rad, "
            "downloaded at runtime by LLaVA-Rad's OpenCLIPVisionTower) and was not readable "
            "here; this config mimics it (vision_cfg keys per LLaVA-Rad's open_clip_encoder "
            "README example)."),
    }

    build_log = []
    model = None
    calls = []
    for label, cfg in (("hf_text_tower", MIMIC_CFG_HF_TEXT), ("native_text_tower", MIMIC_CFG_NATIVE_TEXT)):
        name = f"golden-biomedclipcxr_518-{label}"
        _MODEL_CONFIGS[name] = cfg
        try:
            with CaptureCreate() as cap:
                # same path LLaVA-Rad uses (create_model_from_pretrained -> create_model);
                # pretrained=None so nothing is downloaded.
                model = open_clip.create_model(name, pretrained=None)
            calls = cap.calls
            build_log.append({"config": label, "ok": True})
            break
        except Exception as e:  # noqa: BLE001
            build_log.append({"config": label, "ok": False,
                              "error": f"{type(e).__name__}: {str(e)[:500]}"})
            calls = []
            model = None
    result["open_clip_build_attempts"] = build_log

    if model is not None:
        sd_keys = list(model.state_dict().keys())
        vis_keys = [k for k in sd_keys if k.startswith("visual.")]
        result["open_clip_visual_keys_sample"] = vis_keys[:20]
        result["open_clip_state_dict_keys_first20"] = sd_keys[:20]
        result["open_clip_visual_non_trunk_keys"] = [k for k in vis_keys if not k.startswith("visual.trunk.")]
        result["trunk_key_prefix"] = "visual.trunk."
        result["open_clip_timm_create_model_calls"] = jsonable(calls)
        trunk = model.visual.trunk
        result["trunk_attrs"] = {
            "global_pool": trunk.global_pool,
            "num_classes": trunk.num_classes,
            "img_size": list(trunk.patch_embed.img_size),
            "grid_size": list(trunk.patch_embed.grid_size),
            "num_prefix_tokens": int(trunk.num_prefix_tokens),
            "head": type(trunk.head).__name__,
            "fc_norm": type(trunk.fc_norm).__name__,
            "norm_pre": type(trunk.norm_pre).__name__,
            "dynamic_img_size": bool(trunk.dynamic_img_size),
            "ls_gamma_init": float(trunk.blocks[0].ls1.gamma.detach().flatten()[0]),
            "eps": float(trunk.blocks[0].norm1.eps),
        }
        kw = dict(calls[0]["kwargs"]) if calls else {}
        timm_name = calls[0]["model_name"] if calls else "vit_base_patch14_dinov2.lvd142m"
    else:
        kw = {"pretrained": False}
        timm_name = "vit_base_patch14_dinov2.lvd142m"
        trunk = None

    result["timm_create_kwargs"] = {"model_name": timm_name, **jsonable(kw)}

    # Build the real-size trunk directly via timm with exactly those kwargs, and check it
    # matches open_clip's trunk parameter-for-parameter.
    direct = timm.create_model(timm_name, **kw)
    sd = direct.state_dict()
    result["params"] = {k: list(v.shape) for k, v in sd.items()}
    result["n_params"] = int(sum(v.numel() for v in sd.values()))
    if trunk is not None:
        tsd = trunk.state_dict()
        same = list(tsd.keys()) == list(sd.keys()) and all(tsd[k].shape == sd[k].shape for k in sd)
        result["direct_timm_matches_open_clip_trunk"] = bool(same)
    # With an explicit img_size=518 (the config's image_size) — the same shapes?
    d518 = timm.create_model(timm_name, pretrained=False, img_size=518, num_classes=0)
    result["explicit_img_size_518_same_shapes"] = all(
        list(v.shape) == result["params"].get(k) for k, v in d518.state_dict().items()
    ) and len(d518.state_dict()) == len(sd)

    # What open_clip's TimmModel passes to timm.create_model for other pool/proj settings
    # (the real biomedclipcxr_518.json values could not be read).
    from open_clip.timm_model import TimmModel
    variants = []
    for pool, proj in (("", "linear"), ("token", "linear"), ("", "none"), ("token", "none"), ("avg", "")):
        try:
            with CaptureCreate() as cap:
                tmod = TimmModel("vit_base_patch14_dinov2.lvd142m", embed_dim=512, image_size=518,
                                 pool=pool, proj=proj, pretrained=False)
            variants.append({"timm_pool": pool, "timm_proj": proj,
                             "create_model_calls": jsonable(cap.calls),
                             "trunk_global_pool": tmod.trunk.global_pool,
                             "trunk_head": repr(tmod.trunk.head),
                             "trunk_img_size": list(tmod.trunk.patch_embed.img_size),
                             "head": repr(tmod.head)})
        except Exception as e:  # noqa: BLE001
            variants.append({"timm_pool": pool, "timm_proj": proj, "error": f"{type(e).__name__}: {e}"})
    result["timm_model_pool_proj_variants"] = variants

    path = OUT / "vit_dinov2_base_shapes.json"
    path.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    print("  open_clip build:", build_log)
    print("  timm.create_model kwargs from open_clip:", result["timm_create_kwargs"])
    return result


if __name__ == "__main__":
    make_tiny()
    make_shapes()

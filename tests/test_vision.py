"""The project's DINOv2 trunk against golden tensors produced once from timm (tools/make_golden_vit.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from radtrt.errors import RadtrtError
from radtrt.model.config import TRUNK_OVERRIDES_KEY, VisionConfig, preset
from radtrt.model.vision import VisionTransformer

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def golden() -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(GOLDEN / "vit_dinov2_tiny.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["config"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return meta, tensors


def _trunk(meta: dict, tensors: dict[str, torch.Tensor]) -> VisionTransformer:
    cfg = VisionConfig.from_open_clip({"vision_cfg": {
        "timm_model_name": "vit_base_patch14_dinov2.lvd142m", "image_size": meta["img_size"],
        TRUNK_OVERRIDES_KEY: {"img_size": meta["img_size"], "embed_dim": meta["embed_dim"], "depth": meta["depth"],
                              "num_heads": meta["num_heads"]}}})
    trunk = VisionTransformer(cfg).eval()
    trunk.load_state_dict({k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}, strict=True)
    return trunk


def test_hidden_states_match_timm(golden) -> None:  # type: ignore[no-untyped-def]
    meta, t = golden
    trunk = _trunk(meta, t)
    with torch.no_grad():
        states = trunk.hidden_states(t["pixel_values"])
    assert len(states) == meta["depth"] + 1
    for got, ref in zip(states, t["hidden_states"]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_llava_feature_selection_matches_timm(golden) -> None:  # type: ignore[no-untyped-def]
    meta, t = golden
    trunk = _trunk(meta, t)
    with torch.no_grad():
        feats = trunk.select_features(t["pixel_values"], -2, "patch")
        with_cls = trunk.select_features(t["pixel_values"], -2, "cls_patch")
    torch.testing.assert_close(feats, t["selected_features"], rtol=1e-5, atol=1e-5)
    assert with_cls.shape[1] == feats.shape[1] + 1
    # the final norm is never applied: the selected state differs from timm's normed features
    assert not torch.allclose(with_cls, t["features_normed"], atol=1e-3)


def test_real_size_parameters_match_timm_names_and_shapes() -> None:
    ref = json.loads((GOLDEN / "vit_dinov2_base_shapes.json").read_text())
    cfg = VisionConfig.from_open_clip(ref["mimicked_model_config"])
    with torch.device("meta"):
        trunk = VisionTransformer(cfg)
    ours = {k: list(v.shape) for k, v in trunk.state_dict().items()}
    assert ours == ref["params"]
    assert cfg == preset("llava-rad").vision and cfg.num_patches == 1369


def test_unknown_trunk_is_refused() -> None:
    with pytest.raises(RadtrtError, match="unsupported vision trunk"):
        VisionConfig.from_open_clip({"vision_cfg": {"timm_model_name": "convnext_base", "image_size": 224}})


def test_open_clip_json_roundtrip_and_size_mismatch() -> None:
    tiny = preset("tiny").vision
    assert VisionConfig.from_open_clip(tiny.to_open_clip()) == tiny
    assert preset("llava-rad").vision.to_open_clip()["vision_cfg"] == {
        "timm_model_name": "vit_base_patch14_dinov2.lvd142m", "timm_model_pretrained": False, "timm_pool": "",
        "timm_proj": "linear", "image_size": 518}
    with pytest.raises(RadtrtError, match="takes 518 px"):
        VisionConfig.from_open_clip({"vision_cfg": {"timm_model_name": "vit_base_patch14_dinov2", "image_size": 224}})


def test_wrong_image_size_is_rejected() -> None:
    trunk = VisionTransformer(preset("tiny").vision)
    with pytest.raises(ValueError, match="56x56"):
        trunk.hidden_states(torch.zeros(1, 3, 70, 70))

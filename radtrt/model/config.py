"""Configs for the three parts of LLaVA-Rad, as dataclasses with named presets.

The real sizes and a ``tiny`` preset come from the same code path, so the tests exercise exactly
what runs at 7B scale. Vision configs are derived from the open_clip model JSON the release ships
(``timm_model_name`` + ``image_size``) instead of being hard-coded to ViT-B.
"""

from __future__ import annotations

import dataclasses
import math
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from radtrt.errors import fail

if TYPE_CHECKING:
    from radtrt.imaging.preprocess import PreprocessConfig

# Architecture of the timm DINOv2 trunks open_clip can name (timm's vision_transformer.py model
# functions). open_clip calls ``timm.create_model(timm_model_name, pretrained=False)`` with no size
# arguments, so the trunk's input size is timm's default for the name (518 for DINOv2), and this
# table is the whole contract between the JSON and the trunk.
TIMM_TRUNKS: dict[str, dict[str, Any]] = {
    "vit_small_patch14_dinov2": dict(img_size=518, patch_size=14, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch14_dinov2": dict(img_size=518, patch_size=14, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch14_dinov2": dict(img_size=518, patch_size=14, embed_dim=1024, depth=24, num_heads=16),
}
# A radtrt-only key in ``vision_cfg`` that overrides trunk sizes; open_clip does not know it. Used by
# the tiny test models and the small embedded default model, never by the official release.
TRUNK_OVERRIDES_KEY = "radtrt_trunk_overrides"

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    """A DINOv2-style ViT trunk (LayerScale, class token, learned position embedding)."""

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    init_values: float | None = 1e-5  # LayerScale present when not None
    eps: float = 1e-6
    timm_model_name: str = "vit_base_patch14_dinov2.lvd142m"

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @classmethod
    def from_open_clip(cls, model_cfg: dict[str, Any]) -> "VisionConfig":
        """Build from an open_clip model config (the release's ``biomedclipcxr_518.json``)."""
        vision_cfg = model_cfg.get("vision_cfg", model_cfg)
        name = vision_cfg.get("timm_model_name")
        if not name:
            fail("open_clip vision config has no 'vision_cfg.timm_model_name'; only timm trunks are supported")
        arch = TIMM_TRUNKS.get(name.split(".")[0])
        if arch is None:
            fail(f"unsupported vision trunk '{name}'; supported: {', '.join(sorted(TIMM_TRUNKS))}")
        kwargs = dict(arch, timm_model_name=name)
        kwargs.update(vision_cfg.get(TRUNK_OVERRIDES_KEY, {}))
        cfg = cls(**kwargs)
        image_size = vision_cfg.get("image_size", cfg.img_size)
        if isinstance(image_size, (list, tuple)):
            if len(set(image_size)) != 1:
                fail(f"non-square image_size {image_size} is not supported")
            image_size = image_size[0]
        if int(image_size) != cfg.img_size:
            fail(f"open_clip config preprocesses to {image_size} px but its trunk '{name}' takes {cfg.img_size} px")
        return cfg

    def to_open_clip(self) -> dict[str, Any]:
        """The open_clip model config JSON that describes this trunk (inverse of from_open_clip)."""
        base = VisionConfig.from_open_clip({"vision_cfg": {"timm_model_name": self.timm_model_name}})
        overrides = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                     if f.name != "timm_model_name" and getattr(self, f.name) != getattr(base, f.name)}
        vision_cfg: dict[str, Any] = {
            "timm_model_name": self.timm_model_name,
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": self.img_size,
        }
        if overrides:
            vision_cfg[TRUNK_OVERRIDES_KEY] = overrides
        return {"embed_dim": 512, "vision_cfg": vision_cfg}


@dataclass(frozen=True)
class DecoderConfig:
    """A LLaMA-architecture decoder (Vicuna v1.5 for LLaVA-Rad), with Hugging Face's field names."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "DecoderConfig":
        """Parse a Hugging Face LLaMA ``config.json`` (also the LLaVA-Rad one, which extends it)."""
        if hf.get("rope_scaling"):
            fail(f"rope_scaling {hf['rope_scaling']} is not supported (Vicuna v1.5 has none)")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            fail("LLaMA variants with attention/MLP biases are not supported")
        if hf.get("hidden_act", "silu") != "silu":  # it ran as SiLU, the only activation radtrt's LLaMA has
            fail(f"hidden_act {hf['hidden_act']!r} is not supported (LLaMA and Vicuna use 'silu')")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in names and v is not None}
        if isinstance(kwargs.get("eos_token_id"), list):
            if not kwargs["eos_token_id"]:
                fail("LLaMA config.json is malformed: eos_token_id is an empty list")
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        kwargs.setdefault("num_key_value_heads", hf.get("num_attention_heads", cls.num_attention_heads))
        try:
            return cls(**kwargs)
        except TypeError as e:  # a field of the wrong kind in a user's config.json
            fail(f"LLaMA config.json is malformed: {e}")

    def to_hf(self) -> dict[str, Any]:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                "torch_dtype": "float32", **dataclasses.asdict(self)}


@dataclass(frozen=True)
class LlavaRadConfig:
    """The whole model: trunk, LLaVA feature selection, projector, decoder, prompt template."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    projector_type: str = "mlp2x_gelu"
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    conv_template: str = "v1"
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches + (0 if self.mm_vision_select_feature == "patch" else 1)

    @property
    def preprocessing(self) -> "PreprocessConfig":
        """This model's image transform: every path to the model (the pipeline, the benchmarks, Triton's
        preprocessing) takes it from here, so none can drift from the others."""
        from radtrt.imaging.preprocess import PreprocessConfig

        return PreprocessConfig(image_size=self.vision.img_size, mean=self.image_mean, std=self.image_std)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, remedy: str = "re-run 'radtrt convert'",
                  where: str = "radtrt model config") -> "LlavaRadConfig":
        """``where``: the file, named in the refusal (a folder's config.json, a bundle's model_config.json)."""
        if not isinstance(d, dict):
            fail(f"{where} is malformed (not a JSON object)", remedy=remedy)
        try:
            rest = {k: v for k, v in d.items() if k not in ("vision", "decoder")}
            for key in ("image_mean", "image_std"):
                if key in rest:
                    rest[key] = tuple(rest[key])
            cfg = cls(vision=VisionConfig(**d["vision"]), decoder=DecoderConfig(**d["decoder"]), **rest)
        except (KeyError, TypeError) as e:
            fail(f"{where} is malformed ({type(e).__name__}: {e})", remedy=remedy)
        problem = config_problem(cfg)
        if problem:
            fail(f"{where} is malformed ({problem})", remedy=remedy)
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


CONV_TEMPLATES = ("v1", "plain")  # model/prompt.py's build_prompt
_SCALAR_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str}
_COUNTS = ("depth", "num_heads", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
_MAX_COUNT, _MAX_SIZE = 1024, 2**20  # Vicuna-7B: 32 layers, 32 heads; widths, vocabulary and positions <= 32000
_POSITIVE = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "vocab_size", "hidden_size",
             "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "max_position_embeddings")


def config_problem(cfg: LlavaRadConfig) -> str | None:
    """What in a config read from a file would break model construction, or None (pure).

    Why: a hand-edited ``config.json`` with a string size, a zero or negative count, or heads that do not
    divide the width otherwise fails deep inside torch with a traceback."""
    for part in (cfg.vision, cfg.decoder):
        for f in dataclasses.fields(part):
            value, kind = getattr(part, f.name), _SCALAR_TYPES.get(str(f.type))
            if kind is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
                return f"{f.name} = {value!r} is not a {f.type}"
            if f.name in _POSITIVE and value <= 0:
                return f"{f.name} = {value} must be positive"
            if str(f.type) == "float" and not (math.isfinite(value) and value > 0):  # eps, rope_theta: NaN gave
                return f"{f.name} = {value} must be a positive finite number"          # empty reports, exit 0
    v, d = cfg.vision, cfg.decoder
    for part in (v, d):  # a size of 10**12 overflowed torch's storage, a depth of 10**9 built layers for ever
        for name in _POSITIVE:
            limit = _MAX_COUNT if name in _COUNTS else _MAX_SIZE
            if getattr(part, name, 0) > limit:
                return f"{name} = {getattr(part, name)} is above {limit}"
    if not (isinstance(v.mlp_ratio, (int, float)) and 0 < v.mlp_ratio <= 64):
        return f"vision mlp_ratio = {v.mlp_ratio!r} must be a positive number"
    if v.init_values is not None and (isinstance(v.init_values, bool) or not isinstance(v.init_values, (int, float))):
        return f"vision init_values = {v.init_values!r} must be a number or null"
    if isinstance(cfg.mm_vision_select_layer, bool) or not isinstance(cfg.mm_vision_select_layer, int) \
            or not -(v.depth + 1) <= cfg.mm_vision_select_layer <= v.depth:  # LLaVA indexes the depth + 1 hidden states
        return f"mm_vision_select_layer = {cfg.mm_vision_select_layer!r} is not a hidden state of a {v.depth}-block trunk"
    if cfg.mm_vision_select_feature not in ("patch", "cls_patch"):
        return f"mm_vision_select_feature = {cfg.mm_vision_select_feature!r} is not 'patch' or 'cls_patch'"
    for key in ("image_mean", "image_std"):
        values = getattr(cfg, key)
        if not (isinstance(values, tuple) and len(values) == 3
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values)):
            return f"{key} = {values!r} is not three numbers"
    if any(x <= 0 for x in cfg.image_std):
        return f"image_std = {cfg.image_std} must be positive"
    if v.embed_dim % v.num_heads or v.img_size < v.patch_size:
        return f"vision embed_dim {v.embed_dim} / num_heads {v.num_heads} / img_size {v.img_size} do not fit"
    if v.img_size % v.patch_size:  # the patch convolution dropped the last rows and columns of every image, exit 0
        return f"vision img_size {v.img_size} is not a multiple of patch_size {v.patch_size}"
    for name in ("bos_token_id", "eos_token_id"):  # an end token outside the vocabulary is never generated
        if isinstance(getattr(d, name), bool) or not isinstance(getattr(d, name), int) \
                or not 0 <= getattr(d, name) < d.vocab_size:
            return f"{name} = {getattr(d, name)!r} is not a token of the {d.vocab_size}-token vocabulary"
    if cfg.conv_template not in CONV_TEMPLATES:  # accepted, then written into a release radtrt itself refused
        return f"conv_template = {cfg.conv_template!r} is not one of {', '.join(CONV_TEMPLATES)}"
    if d.hidden_size % d.num_attention_heads or d.num_attention_heads % d.num_key_value_heads:
        return (f"decoder hidden_size {d.hidden_size}, num_attention_heads {d.num_attention_heads} and "
                f"num_key_value_heads {d.num_key_value_heads} do not divide")
    return None


def tiny_vision() -> VisionConfig:
    return VisionConfig(img_size=56, patch_size=14, embed_dim=32, depth=3, num_heads=2)


def tiny_decoder(vocab_size: int = 512) -> DecoderConfig:
    return DecoderConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


PRESETS: dict[str, LlavaRadConfig] = {
    # The released model: BiomedCLIP-CXR DINOv2 ViT-B/14 at 518 px + Vicuna-7B v1.5.
    "llava-rad": LlavaRadConfig(),
    # Mid-size decoder used by the CPU benchmarks (12 x 1024, 220M params) with the real trunk.
    "mid": LlavaRadConfig(decoder=DecoderConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                                                num_attention_heads=16, num_key_value_heads=16)),
    "tiny": LlavaRadConfig(vision=tiny_vision(), decoder=tiny_decoder()),
    # The embedded default model's architecture (radtrt/assets/default-model), trained on phantoms only.
    "phantom": LlavaRadConfig(
        vision=VisionConfig(img_size=112, patch_size=14, embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0,
                            init_values=0.1, timm_model_name="vit_small_patch14_dinov2.lvd142m"),
        decoder=DecoderConfig(vocab_size=1024, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)),
}


def preset(name: str) -> LlavaRadConfig:
    if name not in PRESETS:
        fail(f"unknown model preset '{name}'; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]

"""TensorRT-LLM LLaMA checkpoints (``config.json`` + ``rank0.safetensors``); the ``trtllm-build`` step on the
target GPU is ``radtrt.exporter.trtllm_build``.

Written without TensorRT-LLM installed, following the names and layouts of TensorRT-LLM's own LLaMA
converter (``tensorrt_llm/models/llama/convert.py``, ``convert_utils.py``, ``quantization/layers.py``):

* every mode: ``transformer.vocab_embedding.weight``, ``transformer.ln_f.weight``, ``lm_head.weight``;
  per layer ``input_layernorm`` / ``post_layernorm`` weights, fused ``attention.qkv`` (q, k, v rows),
  ``attention.dense`` (o_proj), ``mlp.fc`` (gate_proj), ``mlp.gate`` (up_proj), ``mlp.proj`` (down_proj);
* ``fp16``: float weights ``[out, in]``;
* ``w8a8_sq`` (quant_algo ``W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN``): int8 weights ``[out, in]``,
  ``per_channel_scale`` ``[1, out]`` fp32, ``{input,post}_layernorm.scale_to_int`` ``[1]`` = 1.0 (per-token
  activation scales are computed at run time), ``attention.dense.smoother`` / ``mlp.proj.smoother``
  ``[1, in]`` fp32, smoothing of qkv and fc/gate folded into the RMSNorm weights. GPU-independent.
* ``w8a16`` (quant_algo ``W8A16``): TensorRT-LLM stores int8 weights ``[in, out]`` *already rearranged for
  the mixed-GEMM kernels of the GPU that converts them* (``symmetric_quantize_last_axis_of_batched_matrix``
  interleaves per architecture), plus ``per_channel_scale`` ``[out]`` in the model dtype. That layout is
  GPU-specific, so radtrt writes a *plain* checkpoint (row-major int8 ``[in, out]`` + scales, marked
  ``weight_layout: plain`` in ``radtrt_checkpoint.json``) and ``prepare_checkpoint_for_host`` applies
  TensorRT-LLM's own C++ op ``torch.ops.trtllm.preprocess_weights_for_mixed_gemm`` on the target GPU
  before ``trtllm-build`` (``trtllm-build`` leaves int8 W8A16 weights as they are: its
  ``weight_only_quantize_dict`` only quantizes weights whose dtype is not int8).
* INT8 KV cache (kv_cache_quant_algo ``INT8``): ``attention.kv_cache_scaling_factor`` ``[1]`` fp32 =
  absmax / 127 per layer (TensorRT-LLM derives it from the q/k/v output maxima; radtrt does the same
  unless explicit per-layer scales are given).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from radtrt import __version__
from radtrt.errors import fail
from radtrt.exporter.quant import DEFAULT_ALPHA, ActivationStats, fold_into_norm, quantize_per_channel, smooth
from radtrt.model.config import DecoderConfig
from radtrt.model.io import load_tensors, read_json, save_tensors, sha256_file
from radtrt.outputs import check_new_dir, new_dir_built_aside

QUANT_ALGO = {"fp16": None, "w8a16": "W8A16", "w8a8_sq": "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"}
META = "radtrt_checkpoint.json"
META_FORMAT = "radtrt-trtllm-checkpoint"
BUILD_STAMP = "build.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# HF LLaMA module -> TensorRT-LLM module, per layer (convert.py's param_name_map).
LINEARS = {"self_attn.o_proj": "attention.dense", "mlp.gate_proj": "mlp.fc", "mlp.up_proj": "mlp.gate",
           "mlp.down_proj": "mlp.proj"}


def mode_tag(mode: str, int8_kv: bool) -> str:
    """Precision part of engine keys and checkpoint folder names: ``w8a16``, ``w8a8_sq-kv8`` ..."""
    if mode not in QUANT_ALGO:
        fail(f"unknown TensorRT-LLM decoder mode '{mode}' (fp16, w8a16, w8a8_sq)")
    return mode + ("-kv8" if int8_kv else "")


def split_mode_tag(tag: str) -> tuple[str, bool]:
    """``mode_tag``'s inverse: ``w8a8_sq-kv8`` -> (``w8a8_sq``, True); anything else is refused."""
    mode, dash, kv = tag.partition("-")
    if kv not in ("", "kv8") or (dash and not kv):
        fail(f"unknown --trt-decoder '{tag}' (a mode tag: fp16, w8a16, w8a8_sq, each optionally with -kv8)")
    mode_tag(mode, kv == "kv8")  # an unknown mode: its own line
    return mode, kv == "kv8"


def decoder_mode(precision: str, int8_decoder: str | None = None) -> str:
    """CLI ``--precision`` (+ ``--int8-decoder``) -> decoder mode: int8 means weight-only unless SmoothQuant
    is asked for, since weight-only INT8 runs on every target (V100 included)."""
    if precision in ("fp16", "fp32"):
        return "fp16"
    if precision != "int8":
        fail(f"unknown precision '{precision}' (fp32, fp16, int8)")
    if int8_decoder in (None, "weight-only", "w8a16"):
        return "w8a16"
    if int8_decoder in ("smoothquant", "w8a8_sq"):
        return "w8a8_sq"
    fail(f"unknown --int8-decoder '{int8_decoder}' (weight-only, smoothquant)")


def trtllm_config(cfg: DecoderConfig, mode: str, *, int8_kv: bool = False, dtype: str = "float16") -> dict[str, Any]:
    """``config.json`` of a TensorRT-LLM LLaMA checkpoint (fields of PretrainedConfig + LLaMAConfig)."""
    mode_tag(mode, int8_kv)
    if dtype not in DTYPES:
        fail(f"unsupported checkpoint dtype '{dtype}' ({', '.join(DTYPES)})")
    return {
        "architecture": "LlamaForCausalLM", "dtype": dtype, "logits_dtype": "float32",
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "head_size": cfg.head_dim, "intermediate_size": cfg.intermediate_size, "hidden_act": "silu",
        "norm_epsilon": cfg.rms_norm_eps, "position_embedding_type": "rope_gpt_neox",
        "rotary_base": cfg.rope_theta, "rotary_scaling": None, "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_parallel_embedding": False, "embedding_sharding_dim": 0,
        "attn_bias": False, "mlp_bias": False, "residual_mlp": False, "disable_weight_only_quant_plugin": False,
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
        "quantization": {"quant_algo": QUANT_ALGO[mode], "kv_cache_quant_algo": "INT8" if int8_kv else None},
    }


def kv_cache_scales(stats: ActivationStats, cfg: DecoderConfig) -> dict[int, float]:
    """TensorRT-LLM's INT8 KV recipe: per layer, max of the q/k/v projection output maxima / 127."""
    scales = {}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        amax = max(float(stats.output_absmax(p + n).max()) for n in ("q_proj", "k_proj", "v_proj"))
        scales[i] = max(amax, 1e-6) / 127.0
    return scales


def _w(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in state:
        fail(f"decoder weight '{name}' is missing")
    return state[name].detach().float().cpu()  # converted on the CPU, one weight at a time


def _linear(q: torch.Tensor, mode: str, dtype: torch.dtype, prefix: str) -> dict[str, torch.Tensor]:
    """One linear (``q`` = fp32 ``[out, in]``) in fp16 or plain weight-only INT8 form."""
    if mode == "fp16":
        return {prefix + "weight": q.to(dtype).contiguous()}
    qw = quantize_per_channel(q, scale_dtype=dtype)  # TensorRT-LLM keeps weight-only scales in the model dtype
    return {prefix + "weight": qw.q.t().contiguous(), prefix + "per_channel_scale": qw.scale.contiguous()}


def _sq_linear(w: torch.Tensor, prefix: str, smoother: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    qw = quantize_per_channel(w)
    out = {prefix + "weight": qw.q.contiguous(), prefix + "per_channel_scale": qw.scale[None].contiguous()}
    if smoother is not None:
        out[prefix + "smoother"] = smoother[None].float().contiguous()
    return out


def _layer(state: dict[str, torch.Tensor], i: int, mode: str, dtype: torch.dtype,
           stats: ActivationStats | None, alpha: float) -> dict[str, torch.Tensor]:
    p, t = f"model.layers.{i}.", f"transformer.layers.{i}."
    qkv = [_w(state, f"{p}self_attn.{n}_proj.weight") for n in "qkv"]
    ln1, ln2 = _w(state, p + "input_layernorm.weight"), _w(state, p + "post_attention_layernorm.weight")
    if mode != "w8a8_sq":
        out = _linear(torch.cat(qkv), mode, dtype, t + "attention.qkv.")
        for hf, trt in LINEARS.items():
            out |= _linear(_w(state, f"{p}{hf}.weight"), mode, dtype, f"{t}{trt}.")
        return out | {t + "input_layernorm.weight": ln1.to(dtype), t + "post_layernorm.weight": ln2.to(dtype)}
    assert stats is not None
    def one() -> torch.Tensor:  # per-token scaling: the norms' static scale is unused; one tensor each
        return torch.tensor([1.0], dtype=torch.float32)

    # q/k/v share their input: one smoother over all three, folded into input_layernorm.
    smoothed, s = smooth(qkv, stats.input_absmax(p + "self_attn.q_proj"), alpha)
    out = _sq_linear(torch.cat(smoothed), t + "attention.qkv.")
    out |= {t + "input_layernorm.weight": fold_into_norm(ln1, s).to(dtype), t + "input_layernorm.scale_to_int": one()}
    # o_proj has no norm before it: its smoother is applied to the activations at run time.
    (o,), s = smooth([_w(state, p + "self_attn.o_proj.weight")], stats.input_absmax(p + "self_attn.o_proj"), alpha)
    out |= _sq_linear(o, t + "attention.dense.", smoother=s)
    # gate_proj (fc) and up_proj (gate) share their input: one smoother, folded into post_layernorm.
    (fc, gate), s = smooth([_w(state, p + "mlp.gate_proj.weight"), _w(state, p + "mlp.up_proj.weight")],
                           stats.input_absmax(p + "mlp.gate_proj"), alpha)
    out |= _sq_linear(fc, t + "mlp.fc.") | _sq_linear(gate, t + "mlp.gate.")
    out |= {t + "post_layernorm.weight": fold_into_norm(ln2, s).to(dtype), t + "post_layernorm.scale_to_int": one()}
    (proj,), s = smooth([_w(state, p + "mlp.down_proj.weight")], stats.input_absmax(p + "mlp.down_proj"), alpha)
    return out | _sq_linear(proj, t + "mlp.proj.", smoother=s)


def convert_decoder_weights(state: dict[str, torch.Tensor], cfg: DecoderConfig, mode: str, *,
                            smoothquant_stats: ActivationStats | None = None, alpha: float = DEFAULT_ALPHA,
                            int8_kv: bool = False, kv_scales: dict[int, float] | None = None,
                            dtype: str = "float16") -> dict[str, torch.Tensor]:
    """HF LLaMA state dict -> TensorRT-LLM checkpoint tensors (pure; see the module docstring)."""
    mode_tag(mode, int8_kv)
    if mode == "w8a8_sq" and smoothquant_stats is None:
        fail("SmoothQuant needs calibration statistics (per-channel activation maxima of each linear layer)")
    if int8_kv and kv_scales is None:
        if smoothquant_stats is None:
            fail("an INT8 KV cache needs calibration: per-layer KV scales or statistics with q/k/v output maxima")
        kv_scales = kv_cache_scales(smoothquant_stats, cfg)
    torch_dtype = DTYPES[dtype]
    out = {"transformer.vocab_embedding.weight": _w(state, "model.embed_tokens.weight").to(torch_dtype),
           "transformer.ln_f.weight": _w(state, "model.norm.weight").to(torch_dtype),
           "lm_head.weight": _w(state, "lm_head.weight" if "lm_head.weight" in state
                                else "model.embed_tokens.weight").to(torch_dtype)}
    for i in range(cfg.num_hidden_layers):
        out |= _layer(state, i, mode, torch_dtype, smoothquant_stats, alpha)
        if int8_kv:
            assert kv_scales is not None
            if i not in kv_scales:
                fail(f"INT8 KV scales are missing layer {i}")
            out[f"transformer.layers.{i}.attention.kv_cache_scaling_factor"] = torch.tensor([kv_scales[i]],
                                                                                            dtype=torch.float32)
    return out


def _decoder_of(source: Any) -> tuple[dict[str, torch.Tensor], DecoderConfig]:
    lm = source.model.language_model if hasattr(source, "model") and hasattr(source.model, "language_model") else source
    if not hasattr(lm, "cfg") or not isinstance(lm.cfg, DecoderConfig):
        fail("write_trtllm_checkpoint needs a LoadedModel or a radtrt LlamaForCausalLM")
    return lm.state_dict(), lm.cfg


def write_trtllm_checkpoint(source: Any, out_dir: Path, mode: str = "fp16", *,
                            smoothquant_stats: ActivationStats | None = None, alpha: float = DEFAULT_ALPHA,
                            int8_kv: bool = False, kv_scales: dict[int, float] | None = None,
                            dtype: str = "float16", bundle_weights: str | None) -> Path:
    """Write ``config.json``, ``rank0.safetensors`` and ``radtrt_checkpoint.json`` into ``out_dir``.

    ``source`` is a ``LoadedModel`` or the merged ``LlamaForCausalLM``. No TensorRT-LLM needed.
    ``bundle_weights``: the fingerprint of the model the bundle's graphs hold (``BUNDLE_FINGERPRINT``), kept with
    the weights' hash so that a checkpoint copied in from another bundle is never built or served as this one's;
    required (None only for a checkpoint outside any bundle), as an engine built from a checkpoint without it is
    refused by the runtime.
    """
    state, cfg = _decoder_of(source)
    check_new_dir(out_dir, "checkpoint directory")
    tensors = convert_decoder_weights(state, cfg, mode, smoothquant_stats=smoothquant_stats, alpha=alpha,
                                      int8_kv=int8_kv, kv_scales=kv_scales, dtype=dtype)
    meta = {"format": META_FORMAT, "format_version": 1, "mode": mode, "int8_kv": int8_kv, "dtype": dtype,
            "weight_layout": "plain" if mode == "w8a16" else "trtllm",
            "needs_host_preprocessing": mode == "w8a16", "smoothquant_alpha": alpha if mode == "w8a8_sq" else None,
            "calibration": smoothquant_stats.identity if smoothquant_stats else None,
            "written_by": f"radtrt {__version__}", "num_tensors": len(tensors), "bundle_weights": bundle_weights}
    with new_dir_built_aside(out_dir, "checkpoint directory") as work:  # an interrupted write leaves no half
        save_tensors(tensors, work / "rank0.safetensors")
        meta["rank0_sha256"] = sha256_file(work / "rank0.safetensors")
        (work / "config.json").write_text(json.dumps(trtllm_config(cfg, mode, int8_kv=int8_kv, dtype=dtype), indent=2))
        (work / META).write_text(json.dumps(meta, indent=2))
    return out_dir


def read_checkpoint_meta(ckpt: Path) -> dict[str, Any]:
    """``radtrt_checkpoint.json`` of a checkpoint radtrt wrote (one line when it is not one)."""

    if not (ckpt / META).is_file():
        fail(f"{ckpt} is not a radtrt TensorRT-LLM checkpoint (no {META}); move it away or delete it")
    meta = read_json(ckpt / META)
    if meta.get("format") != META_FORMAT:
        fail(f"{ckpt / META} is not a radtrt checkpoint description")
    return meta


def read_checkpoint(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, radtrt_checkpoint.json, tensors) of a checkpoint radtrt wrote."""
    for name in ("config.json", META, "rank0.safetensors"):
        if not (ckpt / name).is_file():
            fail(f"{ckpt} is not a radtrt TensorRT-LLM checkpoint (no {name})")
    meta = read_checkpoint_meta(ckpt)
    return read_json(ckpt / "config.json"), meta, load_tensors(ckpt / "rank0.safetensors")

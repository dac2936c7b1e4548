"""TensorRT-LLM checkpoint writer, host preparation and trtllm-build command lines, without TensorRT-LLM.

The strongest check maps each checkpoint back to an HF LLaMA state dict (the inverse of TensorRT-LLM's
converter layout) and compares the logits of the tiny decoder: a swapped or mis-transposed tensor
would move them by ~5% on this tiny model (measured), while quantization moves them by ~0.3%.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from radtrt.errors import RadtrtError
from radtrt.exporter.gpu import GpuInfo
from radtrt.exporter.quant import ActivationStats
from radtrt.exporter.trtllm import (convert_decoder_weights, decoder_mode, read_checkpoint, trtllm_config,
                                    write_trtllm_checkpoint)
from radtrt.exporter.trtllm_build import (BuildLimits, build_decoder_engine, check_decoder_engine, find_decoder_engine,
                                          mixed_gemm_preprocessor, prepare_checkpoint_for_host, trtllm_build_command)
from radtrt.model.config import preset
from radtrt.model.decoder import LlamaForCausalLM
from radtrt.model.tiny import random_model

V100 = GpuInfo("Tesla V100-SXM2-32GB", (7, 0), "12.4", "10.4.0", "0.14.0")
A100 = GpuInfo("NVIDIA A100-SXM4-80GB", (8, 0), "12.8", "10.9.0", "0.18.2")
ORIN = GpuInfo("Orin", (8, 7), "12.6", "10.3.0", "0.12.0")


@functools.cache
def tiny_lm() -> LlamaForCausalLM:
    return random_model(preset("tiny"), seed=3).language_model.eval()


@functools.cache
def tiny_stats() -> ActivationStats:
    """Per-channel input/output maxima of every linear layer, captured with hooks on random inputs."""
    lm = tiny_lm()
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def hook(name: str, _m: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        x, y = args[0].abs().flatten(0, -2).amax(0), out.abs().flatten(0, -2).amax(0)
        inputs[name] = torch.maximum(inputs[name], x) if name in inputs else x
        outputs[name] = torch.maximum(outputs[name], y) if name in outputs else y

    handles = [m.register_forward_hook(functools.partial(hook, n)) for n, m in lm.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    with torch.no_grad():
        _logits(lm, torch.randn(3, 12, lm.cfg.hidden_size, generator=torch.Generator().manual_seed(9)))
    for h in handles:
        h.remove()
    return ActivationStats(inputs, outputs, description="tiny random calibration")


def _logits(lm: LlamaForCausalLM, x: torch.Tensor) -> torch.Tensor:
    t = x.shape[1]
    mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None].expand(x.shape[0], 1, t, t)
    return lm(x, torch.arange(t).expand(x.shape[0], t), mask)


def hf_state_from_checkpoint(t: dict[str, torch.Tensor], mode: str) -> dict[str, torch.Tensor]:
    """Inverse of the converter: effective float HF weights a TensorRT-LLM engine would compute with."""
    cfg = tiny_lm().cfg
    kv = cfg.num_key_value_heads * cfg.head_dim

    def lin(name: str) -> torch.Tensor:
        w = t[name + ".weight"]
        if mode == "fp16":
            return w.float()
        scale = t[name + ".per_channel_scale"].float().reshape(-1, 1)
        if mode == "w8a16":  # int8 [in, out], scale [out]
            return w.t().float() * scale
        deq = w.float() * scale  # SmoothQuant int8 [out, in]
        smoother = t.get(name + ".smoother")
        return deq / smoother.reshape(1, -1) if smoother is not None else deq

    sd = {"model.embed_tokens.weight": t["transformer.vocab_embedding.weight"].float(),
          "model.norm.weight": t["transformer.ln_f.weight"].float(), "lm_head.weight": t["lm_head.weight"].float()}
    for i in range(cfg.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"transformer.layers.{i}."
        wq, wk, wv = lin(q + "attention.qkv").split([cfg.hidden_size, kv, kv])
        sd |= {p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk, p + "self_attn.v_proj.weight": wv,
               p + "self_attn.o_proj.weight": lin(q + "attention.dense"), p + "mlp.gate_proj.weight": lin(q + "mlp.fc"),
               p + "mlp.up_proj.weight": lin(q + "mlp.gate"), p + "mlp.down_proj.weight": lin(q + "mlp.proj"),
               p + "input_layernorm.weight": t[q + "input_layernorm.weight"].float(),
               p + "post_attention_layernorm.weight": t[q + "post_layernorm.weight"].float()}
    return sd


@pytest.mark.parametrize("mode,tolerance", [("fp16", 0.002), ("w8a16", 0.012), ("w8a8_sq", 0.012)])
def test_checkpoint_maps_back_to_the_same_decoder(mode: str, tolerance: float) -> None:
    lm = tiny_lm()
    tensors = convert_decoder_weights(lm.state_dict(), lm.cfg, mode, smoothquant_stats=tiny_stats())
    rebuilt = LlamaForCausalLM(lm.cfg)
    rebuilt.load_state_dict(hf_state_from_checkpoint(tensors, mode), strict=True)
    x = torch.randn(2, 9, lm.cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, got = _logits(lm, x), _logits(rebuilt.eval(), x)
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert rel < tolerance, f"{mode}: relative logit error {rel:.4f}"
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def _expected_names(mode: str, layers: int) -> set[str]:
    names = {"transformer.vocab_embedding.weight", "transformer.ln_f.weight", "lm_head.weight"}
    for i in range(layers):
        t = f"transformer.layers.{i}."
        names |= {t + "input_layernorm.weight", t + "post_layernorm.weight"}
        for lin in ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj"):
            names.add(f"{t}{lin}.weight")
            if mode != "fp16":
                names.add(f"{t}{lin}.per_channel_scale")
        if mode == "w8a8_sq":
            names |= {t + "input_layernorm.scale_to_int", t + "post_layernorm.scale_to_int",
                      t + "attention.dense.smoother", t + "mlp.proj.smoother"}
    return names


@pytest.mark.parametrize("mode", ["fp16", "w8a16", "w8a8_sq"])
def test_names_shapes_and_dtypes(mode: str) -> None:
    lm = tiny_lm()
    cfg = lm.cfg
    t = convert_decoder_weights(lm.state_dict(), cfg, mode, smoothquant_stats=tiny_stats())
    assert set(t) == _expected_names(mode, cfg.num_hidden_layers)
    d, inter, qkv = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size + 2 * cfg.num_key_value_heads * cfg.head_dim
    assert t["transformer.vocab_embedding.weight"].shape == (cfg.vocab_size, d)
    assert t["lm_head.weight"].dtype == torch.float16 and t["transformer.ln_f.weight"].dtype == torch.float16
    shapes = {"attention.qkv": (qkv, d), "attention.dense": (d, d), "mlp.fc": (inter, d), "mlp.gate": (inter, d),
              "mlp.proj": (d, inter)}
    for lin, (out_f, in_f) in shapes.items():
        w = t[f"transformer.layers.1.{lin}.weight"]
        if mode == "fp16":
            assert w.dtype == torch.float16 and w.shape == (out_f, in_f)
        elif mode == "w8a16":  # TensorRT-LLM's weight-only layout: [in, out] int8, scale [out] in the model dtype
            assert w.dtype == torch.int8 and w.shape == (in_f, out_f)
            scale = t[f"transformer.layers.1.{lin}.per_channel_scale"]
            assert scale.dtype == torch.float16 and scale.shape == (out_f,)
        else:  # SmoothQuant: [out, in] int8, fp32 scales [1, out]
            assert w.dtype == torch.int8 and w.shape == (out_f, in_f)
            scale = t[f"transformer.layers.1.{lin}.per_channel_scale"]
            assert scale.dtype == torch.float32 and scale.shape == (1, out_f)
    if mode == "w8a8_sq":
        assert t["transformer.layers.0.attention.dense.smoother"].shape == (1, d)
        assert t["transformer.layers.0.mlp.proj.smoother"].shape == (1, inter)
        assert t["transformer.layers.0.input_layernorm.scale_to_int"].tolist() == [1.0]


def test_w8a16_weights_dequantize_within_half_a_step() -> None:
    lm = tiny_lm()
    t = convert_decoder_weights(lm.state_dict(), lm.cfg, "w8a16")
    w = lm.state_dict()["model.layers.0.mlp.down_proj.weight"]
    q, scale = t["transformer.layers.0.mlp.proj.weight"], t["transformer.layers.0.mlp.proj.per_channel_scale"]
    err = (q.t().float() * scale.float()[:, None] - w).abs()
    assert (err <= 0.5 * scale.float()[:, None] * (1 + 1e-6)).all()


def test_config_json_and_metadata(tmp_path: Path) -> None:
    lm = tiny_lm()
    ckpt = write_trtllm_checkpoint(lm, tmp_path / "ckpt", "w8a16", int8_kv=True, smoothquant_stats=tiny_stats(),
                                   bundle_weights=None)
    config, meta, tensors = read_checkpoint(ckpt)
    assert json.loads((ckpt / "config.json").read_text()) == trtllm_config(lm.cfg, "w8a16", int8_kv=True)
    assert config["architecture"] == "LlamaForCausalLM" and config["dtype"] == "float16"
    assert config["quantization"] == {"quant_algo": "W8A16", "kv_cache_quant_algo": "INT8"}
    assert (config["num_key_value_heads"], config["head_size"], config["position_embedding_type"]) == (2, 16,
                                                                                                      "rope_gpt_neox")
    assert config["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1}
    assert config["rotary_base"] == lm.cfg.rope_theta and config["norm_epsilon"] == lm.cfg.rms_norm_eps
    assert meta["weight_layout"] == "plain" and meta["needs_host_preprocessing"] is True
    assert meta["calibration"].startswith("tiny random calibration; statistics sha256 ")
    # the same images with other report texts give other maxima under the same description: told apart
    same = tiny_stats()
    other = ActivationStats({k: v * 2 for k, v in same.inputs.items()}, same.outputs, same.description)
    assert other.description == same.description and other.identity != same.identity
    # INT8 KV: TensorRT-LLM's recipe, max of the q/k/v output maxima / 127, per layer
    stats = tiny_stats()
    expect = max(float(stats.outputs[f"model.layers.1.self_attn.{n}"].max()) for n in ("q_proj", "k_proj", "v_proj"))
    scale = tensors["transformer.layers.1.attention.kv_cache_scaling_factor"]
    assert scale.dtype == torch.float32 and scale.shape == (1,)
    assert float(scale) == pytest.approx(expect / 127)
    sq = trtllm_config(lm.cfg, "w8a8_sq")["quantization"]
    assert sq == {"quant_algo": "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "kv_cache_quant_algo": None}
    with pytest.raises(RadtrtError, match="not empty"):
        write_trtllm_checkpoint(lm, ckpt, "fp16", bundle_weights=None)


def test_refusals_without_calibration() -> None:
    lm = tiny_lm()
    with pytest.raises(RadtrtError, match="SmoothQuant needs calibration"):
        convert_decoder_weights(lm.state_dict(), lm.cfg, "w8a8_sq")
    with pytest.raises(RadtrtError, match="INT8 KV cache needs calibration"):
        convert_decoder_weights(lm.state_dict(), lm.cfg, "fp16", int8_kv=True)
    explicit = convert_decoder_weights(lm.state_dict(), lm.cfg, "fp16", int8_kv=True, kv_scales={0: 0.5, 1: 0.25})
    assert float(explicit["transformer.layers.1.attention.kv_cache_scaling_factor"]) == 0.25
    partial = ActivationStats({"model.layers.0.self_attn.q_proj": torch.ones(64)})
    with pytest.raises(RadtrtError, match="no input maxima for 'model.layers.0.self_attn.o_proj'"):
        convert_decoder_weights(lm.state_dict(), lm.cfg, "w8a8_sq", smoothquant_stats=partial)
    with pytest.raises(RadtrtError, match="unknown TensorRT-LLM decoder mode"):
        convert_decoder_weights(lm.state_dict(), lm.cfg, "int4")
    assert decoder_mode("int8") == "w8a16" and decoder_mode("int8", "smoothquant") == "w8a8_sq"
    assert decoder_mode("fp16") == "fp16"


def test_host_preparation_applies_the_vendor_preprocessing(tmp_path: Path) -> None:
    lm = tiny_lm()
    plain = write_trtllm_checkpoint(lm, tmp_path / "plain", "w8a16", bundle_weights=None)
    calls = []

    def fake(w: torch.Tensor) -> torch.Tensor:  # stands in for TensorRT-LLM's preprocess_weights_for_mixed_gemm
        calls.append(tuple(w.shape))
        return w.flip(0).contiguous()

    prepared = prepare_checkpoint_for_host(plain, tmp_path / "host", A100, preprocess=fake)
    _, meta, before = read_checkpoint(plain)
    _, meta2, after = read_checkpoint(prepared)
    assert len(calls) == 5 * lm.cfg.num_hidden_layers  # every quantized linear, nothing else
    fc = "transformer.layers.0.mlp.fc.weight"
    assert torch.equal(after[fc], before[fc].flip(0))
    assert torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    assert meta2["weight_layout"] == "trtllm-mixed-gemm-sm80" and meta2["prepared_for"]["name"] == A100.name
    with pytest.raises(RadtrtError, match="already in TensorRT-LLM's layout"):
        prepare_checkpoint_for_host(prepared, tmp_path / "again", A100, preprocess=fake)


def test_mixed_gemm_preprocessor_prefers_the_cpp_op() -> None:
    """The C++ op (every version, Volta included) beats the Python function, which in 0.12-0.14-era sources
    is a transpose-only helper ``(weight, quant_mode)`` and later a port asserting sm >= 75."""
    calls: list[tuple] = []

    def op(w: torch.Tensor, quant: torch.dtype, act: torch.dtype) -> torch.Tensor:
        calls.append(("op", quant, act))
        return w

    def transpose_only(weight: torch.Tensor, quant_mode: torch.dtype) -> torch.Tensor:  # 0.12-0.14 helper
        calls.append(("helper", quant_mode))
        return weight.T.reshape(weight.shape)

    def port(tensor: torch.Tensor, quant_mode: torch.dtype, act_dtype: torch.dtype, sm_: int = -1,
             do_weight_interleave: bool = True) -> torch.Tensor:  # 1.x Python port
        calls.append(("port", quant_mode, act_dtype))
        return tensor

    w = torch.zeros(64, 32, dtype=torch.int8)
    for py_fn in (transpose_only, port, None):
        calls.clear()
        mixed_gemm_preprocessor(op, py_fn, (7, 0))(w)
        assert calls == [("op", torch.int8, torch.float16)]
    mixed_gemm_preprocessor(None, port, (8, 0))(w)
    assert calls[-1] == ("port", torch.int8, torch.float16)

    def older_op(w: torch.Tensor, quant: torch.dtype) -> torch.Tensor:  # registered before the activation type
        calls.append(("older op", quant))
        return w

    mixed_gemm_preprocessor(older_op, port, (7, 0), op_arity=2)(w)
    assert calls[-1] == ("older op", torch.int8)
    with pytest.raises(RadtrtError, match="takes 5 arguments"):
        mixed_gemm_preprocessor(op, port, (8, 0), op_arity=5)
    with pytest.raises(RadtrtError, match="needs sm75 or newer"):
        mixed_gemm_preprocessor(None, port, (7, 0))
    with pytest.raises(RadtrtError, match="transpose-only helper"):
        mixed_gemm_preprocessor(None, transpose_only, (8, 0))
    with pytest.raises(RadtrtError, match="provides no preprocess_weights_for_mixed_gemm"):
        mixed_gemm_preprocessor(None, None, (8, 0))


def test_build_command_lines_per_target(tmp_path: Path) -> None:
    limits = BuildLimits.for_llava(1369, max_batch=8)
    assert (limits.max_input_len, limits.max_seq_len, limits.max_multimodal_len) == (1881, 2137, 10952)
    cmd = trtllm_build_command(tmp_path / "ckpt", tmp_path / "engine", A100, limits)
    assert cmd == ["trtllm-build", "--checkpoint_dir", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "engine"),
                   "--max_batch_size", "8", "--max_input_len", "1881", "--max_seq_len", "2137",
                   "--max_num_tokens", "15048", "--max_multimodal_len", "10952", "--gemm_plugin", "float16",
                   "--gpt_attention_plugin", "float16", "--remove_input_padding", "enable", "--workers", "1"]
    v100 = trtllm_build_command(tmp_path / "c", tmp_path / "e", V100, BuildLimits.for_llava(1369, max_batch=1),
                                gather_generation_logits=True)
    assert v100[v100.index("--max_multimodal_len") + 1] == "1369"
    assert v100[-1] == "--gather_generation_logits" and "--context_fmha" not in v100  # V100 has fused kernels
    t4 = trtllm_build_command(tmp_path / "c", tmp_path / "e", GpuInfo("Tesla T4", (7, 5)), limits)
    assert t4[-2:] == ["--context_fmha", "disable"]  # sm75 has none: the runner asserts
    assert "--context_fmha" not in trtllm_build_command(tmp_path / "c", tmp_path / "e", ORIN, limits)
    bf16 = trtllm_build_command(tmp_path / "c", tmp_path / "e", A100, limits, dtype="bfloat16")
    assert bf16[bf16.index("--gemm_plugin") + 1] == "bfloat16" and bf16[bf16.index("--gpt_attention_plugin") + 1] \
        == "bfloat16"  # the plugins follow the checkpoint dtype
    with pytest.raises(RadtrtError, match="unsupported checkpoint dtype"):
        trtllm_build_command(tmp_path / "c", tmp_path / "e", A100, limits, dtype="float32")
    with pytest.raises(RadtrtError, match="4096 positions"):
        BuildLimits.for_llava(1369, max_text_tokens=3000)
    with pytest.raises(RadtrtError, match="no room"):
        BuildLimits(1, 1369, 2000, 1369).check(4096)


def test_default_limits_fit_a_decoder_with_few_positions() -> None:
    """The embedded default model (64 image tokens, 512 positions) was asked for 832 and could never be built."""
    small = BuildLimits.for_llava(64, max_position_embeddings=512)
    assert small.max_seq_len == 512 and 64 < small.max_input_len < 512
    assert BuildLimits.for_llava(1369) == BuildLimits(8, 1369 + 512, 1369 + 512 + 256, 1369)  # LLaVA-Rad: unchanged
    assert BuildLimits.for_llava(64, max_new_tokens=256, max_position_embeddings=512).max_input_len == 64 + 192


def _fake_trtllm_build(bin_dir: Path) -> None:
    """A stand-in ``trtllm-build`` on PATH: writes the engine config the real one would."""
    bin_dir.mkdir()
    script = bin_dir / "trtllm-build"
    script.write_text("#!/bin/sh\nwhile [ $# -gt 0 ]; do [ \"$1\" = --output_dir ] && out=$2; shift; done\n"
                      "mkdir -p \"$out\"\n"
                      "echo '{\"pretrained_config\": {\"dtype\": \"float16\"}}' > \"$out/config.json\"\n"
                      "echo 'serialized engine' > \"$out/rank0.engine\"\n"
                      "echo built\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_engine_build_flow_refusal_and_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lm = tiny_lm()
    bundle = tmp_path / "bundle"
    sq = write_trtllm_checkpoint(lm, bundle / "trtllm" / "checkpoint-w8a8_sq", "w8a8_sq",
                                 smoothquant_stats=tiny_stats(), bundle_weights=None)
    limits = BuildLimits(2, 100, 200, 16)

    def must_not_run(*_a: object, **_k: object) -> None:
        raise AssertionError("trtllm-build must not start for a refused mode")

    with pytest.raises(RadtrtError, match="SmoothQuant W8A8 needs sm75 or newer; Tesla V100-SXM2-32GB is sm70"):
        build_decoder_engine(bundle, sq, V100, limits, run=must_not_run)

    _fake_trtllm_build(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    plain = write_trtllm_checkpoint(lm, bundle / "trtllm" / "checkpoint-w8a16", "w8a16", bundle_weights="f00d")
    engine = build_decoder_engine(bundle, plain, V100, limits, preprocess=lambda w: w.clone())
    assert (engine / "config.json").is_file() and (engine.parent / "checkpoint" / "rank0.safetensors").is_file()
    stamp = json.loads((engine.parent / "build.json").read_text())
    # the engine keeps the weights its checkpoint was written from: one copied in from another bundle is refused
    ours = {"model": {"weights_fingerprint_fp16": "f00d"}}
    check_decoder_engine(engine, stamp, ours, bundle)
    with pytest.raises(RadtrtError, match="was not built from the weights of the model .* delete its folder"):
        check_decoder_engine(engine, stamp, {"model": {"weights_fingerprint_fp16": "beef"}}, bundle)
    # the stamp vouches for the engine's files: one changed, truncated or missing is named, not handed to the
    # C++ loader (whose RuntimeError was a traceback naming no file)
    assert set(stamp["engine_files"]) == {p.name for p in engine.iterdir()} and "config.json" in stamp["engine_files"]
    rank0 = engine / "rank0.engine"
    original = rank0.read_bytes()
    rank0.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size: only the hash tells
    check_decoder_engine(engine, stamp, ours, bundle, hashes=False)
    with pytest.raises(RadtrtError, match=f"engine file {rank0} is missing or does not match its stamp .*rebuild "
                                          f"it with: radtrt export --bundle {bundle} --model MODEL --target trtllm "
                                          f"--precision int8$"):
        check_decoder_engine(engine, stamp, ours, bundle)
    rank0.write_bytes(original[:-1])
    with pytest.raises(RadtrtError, match="does not match its stamp"):
        check_decoder_engine(engine, stamp, ours, bundle, hashes=False)
    rank0.unlink()
    with pytest.raises(RadtrtError, match="is missing or does not match"):
        check_decoder_engine(engine, stamp, ours, bundle, hashes=False)
    rank0.write_bytes(original)
    with pytest.raises(RadtrtError, match="records no engine files .*rebuild it with"):
        check_decoder_engine(engine, {k: v for k, v in stamp.items() if k != "engine_files"}, ours, bundle)
    assert stamp["gpu"]["name"] == V100.name and stamp["command"][0] == "trtllm-build"
    assert stamp["command"][stamp["command"].index("--checkpoint_dir") + 1] == str(engine.parent / "checkpoint")
    found, _ = find_decoder_engine(bundle, V100, "w8a16")
    assert found == engine
    # a rebuild that fails halfway leaves no stamp vouching for the torn engine (the old one was accepted)
    with pytest.raises(RadtrtError, match="trtllm-build failed"):
        build_decoder_engine(bundle, plain, V100, limits, preprocess=lambda w: w.clone(),
                             run=lambda cmd, **_: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(RadtrtError, match="has no TensorRT-LLM w8a16 decoder engine"):
        find_decoder_engine(bundle, V100, "w8a16")
    assert build_decoder_engine(bundle, plain, V100, limits, preprocess=lambda w: w.clone()) == engine
    # a bundle from when keys held the CUDA version: the folder of a build under CUDA 12.2 stays beside the
    # rebuild under 12.4, which must be the one found (it sorts after the old folder)
    legacy = engine.parent.with_name(engine.parent.name.replace("_w8a16", "_cuda12.2_w8a16"))
    shutil.copytree(engine.parent, legacy)
    old_stamp = json.loads((legacy / "build.json").read_text())
    old_stamp["gpu"]["cuda"], old_stamp["built"] = "12.2", "2020-01-01T00:00:00Z"
    (legacy / "build.json").write_text(json.dumps(old_stamp))
    assert min(p.name for p in legacy.parent.iterdir() if p.name.startswith("tesla")) == legacy.name
    assert find_decoder_engine(bundle, V100, "w8a16")[0] == engine
    shutil.rmtree(legacy)
    assert stamp["command"][stamp["command"].index("--gemm_plugin") + 1] == "float16"
    other = GpuInfo("Tesla V100-SXM2-32GB", (7, 0), "12.4", "10.4.0", "0.13.0")
    with pytest.raises(RadtrtError, match="was built for .*TensorRT-LLM 0.14.0.*this host has .*TensorRT-LLM 0.13.0"):
        find_decoder_engine(bundle, other, "w8a16")
    with pytest.raises(RadtrtError, match="has no TensorRT-LLM fp16 decoder engine"):
        find_decoder_engine(bundle, V100, "fp16")
    # a bfloat16 checkpoint gets bfloat16 GEMM/attention plugins on the real command line
    bf16 = write_trtllm_checkpoint(lm, bundle / "trtllm" / "checkpoint-fp16-bf16", "fp16", dtype="bfloat16",
                                   bundle_weights=None)
    bf16_engine = build_decoder_engine(bundle, bf16, A100, limits)
    bf16_cmd = json.loads((bf16_engine.parent / "build.json").read_text())["command"]
    assert bf16_cmd[bf16_cmd.index("--gpt_attention_plugin") + 1] == "bfloat16"


def test_a_bundle_that_does_not_record_its_model_is_not_taken_as_this_one(tmp_path: Path) -> None:
    """A manifest without the model's config hash or weight fingerprint passed the check: a TensorRT-LLM
    checkpoint of one model could be put beside the graphs of another."""
    from test_trt_vision import make_fake_bundle

    from radtrt.exporter.targets import check_same_model

    bundle = make_fake_bundle(tmp_path)  # its manifest names the model only
    with pytest.raises(RadtrtError, match="--model has another configuration than the model"):
        check_same_model(bundle, random_model(preset("tiny"), seed=0))

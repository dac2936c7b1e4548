"""``gqa.float_prompt_attention``: the prompt step of an int8-cache attention runs in fp32.

One hand-built ``GroupQueryAttention`` layer (8 query heads sharing 2 KV heads, rotary on), run by ONNX
Runtime three ways on the same weights: an fp32 cache (the reference), an int8 cache as exported, and
the int8 cache with the rewrite. The rewrite must give the fp32 prompt output exactly, fill the cache
with the bytes the int8 node itself writes, and keep decode steps appending in place.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from radtrt.exporter.gqa import SEQLENS, TOTAL, float_prompt_attention

HEADS, KV, D, WIDTH, MAX_POS = 8, 2, 16, 32, 64
PROMPT, STEPS, CACHE = 11, 3, 20


def _layer(cache: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((WIDTH, (HEADS + 2 * KV) * D)) * 0.3).astype(np.float32)
    freqs = np.arange(MAX_POS)[:, None] / 10000.0 ** (np.arange(0, D, 2) / D)
    inits = [numpy_helper.from_array(weight, "qkv_weight"),
             numpy_helper.from_array(np.cos(freqs).astype(np.float32), "cos"),
             numpy_helper.from_array(np.sin(freqs).astype(np.float32), "sin")]
    inputs = ["qkv", "", "", "past_key.0", "past_value.0", SEQLENS, TOTAL, "cos", "sin"]
    quant = {}
    if cache == TensorProto.INT8:
        # per cached channel, generous enough that nothing clips at this weight scale
        inits += [numpy_helper.from_array(np.full(KV * D, 0.05, np.float32), "k_scale"),
                  numpy_helper.from_array(np.linspace(0.02, 0.06, KV * D).astype(np.float32), "v_scale")]
        inputs += ["", "", "", "k_scale", "v_scale"]
        quant = {"k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL", "kv_cache_bit_width": 8}
    nodes = [helper.make_node("MatMul", ["inputs_embeds", "qkv_weight"], ["qkv"]),
             helper.make_node("GroupQueryAttention", inputs, ["attn", "present_key.0", "present_value.0"], name="gqa.0",
                              domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV, do_rotary=1, **quant)]
    kv_shape = [1, KV, "max", D]
    graph = helper.make_graph(
        nodes, "layer",
        [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, [1, "t", WIDTH]),
         helper.make_tensor_value_info(SEQLENS, TensorProto.INT32, [1]),
         helper.make_tensor_value_info(TOTAL, TensorProto.INT32, []),
         helper.make_tensor_value_info("past_key.0", cache, kv_shape),
         helper.make_tensor_value_info("past_value.0", cache, kv_shape)],
        [helper.make_tensor_value_info("attn", TensorProto.FLOAT, [1, "t", HEADS * D]),
         helper.make_tensor_value_info("present_key.0", cache, kv_shape),
         helper.make_tensor_value_info("present_value.0", cache, kv_shape)],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def _run(model: onnx.ModelProto, dtype: type) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """Prompt, then decode steps, through one pair of cache buffers bound as both past and present (as
    ``radtrt.runtime.ort`` binds them). Returns each step's output, the caches and the buffers' addresses."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    caches = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, KV, CACHE, D), dtype)) for _ in range(2)]
    addresses = [c.data_ptr() for c in caches]
    outs = []
    for length, total in [(PROMPT, PROMPT)] + [(1, PROMPT + i + 1) for i in range(STEPS)]:
        binding = session.io_binding()
        binding.bind_cpu_input("inputs_embeds", rng.standard_normal((1, length, WIDTH)).astype(np.float32))
        binding.bind_cpu_input(SEQLENS, np.array([total - 1], np.int32))
        binding.bind_cpu_input(TOTAL, np.array(total, np.int32))
        binding.bind_output("attn", "cpu")
        for name, cache in zip(("key", "value"), caches):
            binding.bind_ortvalue_input(f"past_{name}.0", cache)
            binding.bind_ortvalue_output(f"present_{name}.0", cache)
        session.run_with_iobinding(binding)
        outs.append(binding.get_outputs()[0].numpy().copy())
    return outs, [c.numpy().copy() for c in caches], [c.data_ptr() for c in caches] + addresses


@pytest.fixture(scope="module")
def runs() -> dict[str, tuple[list[np.ndarray], list[np.ndarray], list[int]]]:
    rewritten = _layer(TensorProto.INT8)
    assert float_prompt_attention(rewritten) == 1
    onnx.checker.check_model(rewritten)
    return {"fp32": _run(_layer(TensorProto.FLOAT), np.float32), "int8": _run(_layer(TensorProto.INT8), np.int8),
            "rewritten": _run(rewritten, np.int8)}


def test_prompt_output_is_the_fp32_attentions(runs: dict) -> None:
    fp32, int8, rewritten = (runs[k][0][0] for k in ("fp32", "int8", "rewritten"))
    np.testing.assert_array_equal(rewritten, fp32)
    assert np.abs(int8 - fp32).max() > 0  # the int8-cache node attends over quantized keys/values


def test_prompt_cache_holds_the_bytes_the_int8_node_writes(runs: dict) -> None:
    """Compared after the decode steps too: each step's new slot is the same token's quantized keys/values."""
    for ours, theirs in zip(runs["rewritten"][1], runs["int8"][1]):
        assert np.abs(ours[:, :, :PROMPT]).sum() > 0
        np.testing.assert_array_equal(ours, theirs)
        assert not ours[:, :, PROMPT + STEPS:].any()  # slots past the sequence stay zero


def test_decode_steps_match_the_int8_node_and_append_in_place(runs: dict) -> None:
    fp32, int8, rewritten = (runs[k][0][1:] for k in ("fp32", "int8", "rewritten"))
    for ours, theirs, reference in zip(rewritten, int8, fp32):
        np.testing.assert_array_equal(ours, theirs)
        # coarse fixed scales (steps of 0.02-0.06 on keys/values of magnitude ~2): measured 6% of the output's range
        assert np.abs(ours - reference).max() < 0.1 * np.abs(reference).max()
    addresses = runs["rewritten"][2]
    assert addresses[:2] == addresses[2:]


def test_graph_shape_and_float_caches_left_alone() -> None:
    rewritten = _layer(TensorProto.INT8)
    float_prompt_attention(rewritten)
    branch = next(n for n in rewritten.graph.node if n.op_type == "If")
    branches = {a.name: a.g for a in branch.attribute}
    prompt = [n for n in branches["then_branch"].node if n.op_type == "GroupQueryAttention"]
    decode = [n for n in branches["else_branch"].node if n.op_type == "GroupQueryAttention"]
    assert len(prompt) == len(decode) == 1
    assert not any(a.name == "kv_cache_bit_width" for a in prompt[0].attribute) and prompt[0].input[3] == ""
    assert {a.name: helper.get_attribute_value(a) for a in decode[0].attribute}["kv_cache_bit_width"] == 8
    assert list(branch.output) == ["attn", "present_key.0", "present_value.0"]
    untouched = _layer(TensorProto.FLOAT)
    before = untouched.SerializeToString()
    assert float_prompt_attention(untouched) == 0 and untouched.SerializeToString() == before

"""Fused attention for the ONNX Runtime decoder: each layer's attention as ``GroupQueryAttention``.

Why: the exported attention (score blocks, mask, softmax, two matrix products, rotary) runs as ~15
small nodes per layer; ONNX Runtime's ``GroupQueryAttention`` (com.microsoft) does the same in one
kernel that applies the rotary embedding itself and appends the new keys/values to a cache buffer in
place. Measured on the 2-core CPU at the mid-size config (1,529-token prompt, fp32): prefill 1.43x and
decode 1.10x faster than the exported graph, tokens identical. Its cache can also be INT8: in an INT8
decoder the fp32 cache is what a decode step reads most after the weights (153 MB per step at a
1,560-token context, as much as 0.8x the INT8 weights), and GQA reads an INT8 cache with per-channel
scales in the same kernel.

How: a rewrite of the exported graph (fp32 or fp16), before any weight quantization. For each layer,
the outputs of ``q_proj``/``k_proj``/``v_proj`` (found by the exporter's module name scopes) feed one
``GroupQueryAttention`` node whose output replaces the input of ``o_proj``; everything the old
attention used (rotary, masks, positions) becomes dead and is removed. The q/k/v projections become
one packed projection (GQA's packed-QKV input) and gate/up one projection and a Split: 4 weight
products per layer instead of 7, each with ONNX Runtime's fixed per-node cost. The cache contract changes:

  inputs   ``inputs_embeds [B,T,H]``, ``seqlens_k [B]`` int32 (tokens in the cache after this step,
           minus one), ``total_sequence_length`` int32 scalar, ``past_key.i`` / ``past_value.i``
           ``[B,KV,MAX,D]`` in the cache's type (float32, float16 or int8);
  outputs  ``logits [B,V]``, ``present_key.i`` / ``present_value.i``: the same buffers, written in place
           when the runtime binds past and present to one ``OrtValue`` (``radtrt.runtime.ort``).

Positions come from the cache slot (GQA derives them from ``seqlens_k``), so every sequence starts at
slot 0: the runtime batches studies whose prompts have the same length (no left padding). ONNX
Runtime's CUDA kernel takes fp16/bf16 queries only, so on its CUDA provider an fp32 or INT8 bundle's
attention runs on the CPU (the runtime says so); ``radtrt export --attention plain`` keeps the
exported graph. INT8 scales: per layer and cached channel, K from the calibration's ``k_proj`` output
maxima bounded through the rotation (``|k'_j| <= sqrt(k_j^2 + k_{j+D/2}^2)``), V from ``v_proj``'s
(divided by the SmoothQuant factors folded into ``v_proj``); symmetric, ``absmax / 127``. An int8-cache
graph then gets ``float_prompt_attention`` (after quantization): the prompt step attends in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from radtrt.errors import fail
from radtrt.exporter.external import InMemory, TensorStore, rewrite_graph_file
from radtrt.exporter.onnx import DECODER_ROOT, module_of
from radtrt.exporter.quant import ActivationStats
from radtrt.model.config import DecoderConfig

SEQLENS, TOTAL = "seqlens_k", "total_sequence_length"
ATTENTION_KINDS = ("fused", "plain")
DEFAULT_ATTENTION = "fused"
# ONNX Runtime's CPU GroupQueryAttention applies the rotary embedding only to heads whose size is a multiple of 16
# ("head_size shall be a multiple of 16"): LLaVA-Rad's 128 is, other LLaMA shapes (head_dim 8, 24, 40) are not
GQA_HEAD_DIM_MULTIPLE = 16

CACHE_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int8": TensorProto.INT8}
# names ``float_prompt_attention`` adds
IS_PROMPT, SCALE_SHAPE, SCALAR_SHAPE = "is_prompt_step", "prompt_kv_scale_shape", "prompt_scalar_shape"
PAD_BEFORE, PAD_LAST, INT8_MIN, INT8_MAX = "prompt_pad_before", "prompt_pad_last", "prompt_int8_min", "prompt_int8_max"
KV_QUANT_ATTRIBUTES = ("k_quant_type", "v_quant_type", "kv_cache_bit_width")


def check_fused_attention_fits(cfg: DecoderConfig) -> None:
    """Refuse, before anything is exported, a decoder whose heads the fused kernel cannot run: the graph was written,
    then the export's own check died inside ONNX Runtime in a traceback."""
    if cfg.head_dim % GQA_HEAD_DIM_MULTIPLE:
        fail(f"fused attention (ONNX Runtime's GroupQueryAttention) needs a head size that is a multiple of "
             f"{GQA_HEAD_DIM_MULTIPLE}; this decoder's is {cfg.head_dim}: export it with --attention plain")


@dataclass(frozen=True)
class KVScales:
    """Per layer, one symmetric scale per cached channel (``[KV * D]``, GQA's ``PER_CHANNEL``)."""

    key: list[np.ndarray]
    value: list[np.ndarray]


@dataclass(frozen=True)
class FusedAttention:
    """How to rewrite the attention: the cache's element type, and its scales when that is int8."""

    cache: str = "float32"
    scales: KVScales | None = None

    def __post_init__(self) -> None:
        if self.cache not in CACHE_TYPES:
            fail(f"unknown KV-cache type '{self.cache}' ({', '.join(CACHE_TYPES)})")
        if (self.cache == "int8") != (self.scales is not None):
            fail("an INT8 KV cache needs its calibration scales, and only an INT8 cache takes scales")


def kv_scales(stats: ActivationStats, cfg: DecoderConfig, value_divisors: list[torch.Tensor] | None = None) -> KVScales:
    """Per-channel symmetric INT8 scales of the rotated keys and of the values, from calibration maxima."""
    half = cfg.head_dim // 2
    keys, values = [], []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        k = stats.output_absmax(p + "k_proj").reshape(cfg.num_key_value_heads, cfg.head_dim)
        pair = (k[:, :half] ** 2 + k[:, half:] ** 2).sqrt()  # the rotation mixes channel j with j + D/2
        bound = torch.cat([pair, pair], dim=1).reshape(-1)
        v = stats.output_absmax(p + "v_proj")
        if value_divisors is not None:
            v = v / value_divisors[i]
        keys.append((bound.clamp(min=1e-6) / 127.0).numpy().astype(np.float32))
        values.append((v.clamp(min=1e-6) / 127.0).numpy().astype(np.float32))
    return KVScales(keys, values)


def _rotary_caches(cfg: DecoderConfig, dtype: type[np.floating]) -> tuple[np.ndarray, np.ndarray]:
    """``[max_positions, D/2]`` cos and sin, as ``radtrt.model.decoder.Rotary`` computes them (in fp32,
    then cast to the activations' type, as the model casts its fp32 tables)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim))
    freqs = torch.arange(cfg.max_position_embeddings).float()[:, None] * inv_freq
    return freqs.cos().numpy().astype(dtype), freqs.sin().numpy().astype(dtype)


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes, inputs and initializers nothing reaches from the outputs."""
    producer = {o: n for n in graph.node for o in n.output}
    needed, stack, keep = set(), [o.name for o in graph.output], set()
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producer.get(name)
        if node is not None and id(node) not in keep:
            keep.add(id(node))
            stack.extend(i for i in node.input if i)
    nodes = [n for n in graph.node if id(n) in keep]
    del graph.node[:]
    graph.node.extend(nodes)
    for field in (graph.input, graph.initializer, graph.value_info):
        kept = [x for x in field if x.name in needed]
        del field[:]
        field.extend(kept)


def _pack(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], name: str, store: TensorStore) -> tuple[str, list[int]]:
    """One MatMul in place of several that read the same input: their weights side by side, so a decode
    step runs one larger matrix-vector product instead of several small ones (each ONNX Runtime node has
    a fixed dispatch cost). Returns the packed output and each original's width, in order."""
    weights = {i.name: i for i in graph.initializer}
    if any(n.input[0] != nodes[0].input[0] or n.input[1] not in weights for n in nodes):
        fail(f"{name}: the projections to pack do not share one input and constant weights")
    arrays = [store.read(weights[n.input[1]]) for n in nodes]
    graph.initializer.append(store.add(np.concatenate(arrays, axis=1), name + ".weight"))
    node = helper.make_node("MatMul", [nodes[0].input[0], name + ".weight"], [name + ".out"], name=name)
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=repr(["lm." + name]))
    graph.node.append(node)
    return node.output[0], [a.shape[1] for a in arrays]


def _pack_mlp_input(graph: onnx.GraphProto, by_module: dict[str, onnx.NodeProto], prefix: str,
                    store: TensorStore) -> None:
    """``gate_proj`` and ``up_proj`` as one MatMul and a Split that yields their original outputs."""
    gate, up = by_module.get(prefix + "gate_proj"), by_module.get(prefix + "up_proj")
    if gate is None or up is None:
        fail(f"no {prefix}gate_proj/up_proj MatMul in the decoder graph (has the exporter changed its name scopes?)")
    packed, widths = _pack(graph, [gate, up], prefix + "gate_up_proj", store)
    graph.initializer.append(numpy_helper.from_array(np.array(widths, np.int64), prefix + "gate_up_split"))
    graph.node.append(helper.make_node("Split", [packed, prefix + "gate_up_split"], [gate.output[0], up.output[0]],
                                       name=prefix + "gate_up_split", axis=-1))
    graph.node.remove(gate)
    graph.node.remove(up)


def to_fused_attention(model: onnx.ModelProto, cfg: DecoderConfig, fused: FusedAttention,
                       store: TensorStore | None = None) -> onnx.ModelProto:
    """The decoder graph with every layer's attention as one ``GroupQueryAttention`` node fed by one packed
    q/k/v projection, and gate/up as one projection (in place). ``store``: where weights are read and the
    packed ones put (default: inside the protobuf)."""
    store = store or InMemory()
    graph = model.graph
    by_module: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        if node.op_type == "MatMul":
            by_module.setdefault(module_of(node, DECODER_ROOT), node)
    embeds = next((i for i in graph.input if i.name == "inputs_embeds"), None)
    if embeds is None:
        fail("the decoder graph has no inputs_embeds input: not a radtrt decoder export")
    act_type = embeds.type.tensor_type.elem_type
    cos, sin = _rotary_caches(cfg, helper.tensor_dtype_to_np_dtype(act_type).type)
    graph.initializer.extend([numpy_helper.from_array(cos, "gqa_cos_cache"), numpy_helper.from_array(sin, "gqa_sin_cache")])
    old_outputs = {o.name for o in graph.output if o.name != "logits"}
    new_outputs = []
    layers = cfg.num_hidden_layers
    quant: dict[str, Any] = ({"k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL", "kv_cache_bit_width": 8}
                             if fused.scales is not None else {})
    for i in range(layers):
        p = f"model.layers.{i}.self_attn."
        proj = {n: by_module.get(p + n + "_proj") for n in ("q", "k", "v", "o")}
        missing = [n for n, node in proj.items() if node is None]
        if missing:
            fail(f"layer {i}: no {'/'.join(m + '_proj' for m in missing)} MatMul in the decoder graph (has the exporter "
                 f"changed its name scopes?)")
        qkv, _ = _pack(graph, [proj["q"], proj["k"], proj["v"]], f"model.layers.{i}.self_attn.qkv_proj", store)
        inputs = [qkv, "", "", f"past_key.{i}", f"past_value.{i}", SEQLENS, TOTAL, "gqa_cos_cache", "gqa_sin_cache"]
        if fused.scales is not None:
            ks, vs = f"gqa_k_scale.{i}", f"gqa_v_scale.{i}"
            graph.initializer.extend([numpy_helper.from_array(fused.scales.key[i], ks),
                                      numpy_helper.from_array(fused.scales.value[i], vs)])
            inputs += ["", "", "", ks, vs]
        gqa = helper.make_node(
            "GroupQueryAttention", inputs, [f"attn_out.{i}", f"present_key.{i}", f"present_value.{i}"],
            name=f"gqa.{i}", domain="com.microsoft", num_heads=cfg.num_attention_heads,
            kv_num_heads=cfg.num_key_value_heads, do_rotary=1, **quant)
        graph.node.append(gqa)
        proj["o"].input[0] = f"attn_out.{i}"
        new_outputs += [f"present_key.{i}", f"present_value.{i}"]
        _pack_mlp_input(graph, by_module, f"model.layers.{i}.mlp.", store)
    kv_type = CACHE_TYPES[fused.cache]
    kv_shape: list[Any] = ["batch", cfg.num_key_value_heads, "max_sequence", cfg.head_dim]
    kept_outputs = [o for o in graph.output if o.name not in old_outputs]
    del graph.output[:]
    graph.output.extend(kept_outputs + [helper.make_tensor_value_info(n, kv_type, kv_shape) for n in new_outputs])
    graph_inputs = [embeds]
    graph_inputs += [helper.make_tensor_value_info(SEQLENS, TensorProto.INT32, ["batch"]),
                     helper.make_tensor_value_info(TOTAL, TensorProto.INT32, [])]
    graph_inputs += [helper.make_tensor_value_info(f"past_{kv}.{i}", kv_type, kv_shape)
                     for i in range(layers) for kv in ("key", "value")]
    del graph.input[:]
    graph.input.extend(graph_inputs)
    _prune(graph)
    _topological_sort(graph)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def _topological_sort(graph: onnx.GraphProto) -> None:
    """The GQA nodes were appended; put every node after its inputs' producers."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            fail("the attention rewrite left a cycle or a dangling input in the decoder graph")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def rewrite_attention(path: Path, cfg: DecoderConfig, fused: FusedAttention) -> None:
    """``to_fused_attention`` on an exported graph file, its weights kept on disk: the packed ones and the
    untouched ones go to a new data file that then replaces the old ones (``rewrite_graph_file``)."""
    rewrite_graph_file(path, path, lambda model, store: to_fused_attention(model, cfg, fused, store))


def describe(graph: onnx.GraphProto) -> dict[str, str]:
    """The manifest's record of a decoder graph's attention: fused or plain, and its cache's type."""
    types = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    return {"attention": "fused" if SEQLENS in types else "plain",
            "kv_cache": helper.tensor_dtype_to_np_dtype(types["past_key.0"]).name}


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Inputs and outputs of a decoder with fused attention, in the order the runtime binds them."""
    past = [f"past_{kv}.{i}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present_{kv}.{i}" for i in range(num_layers) for kv in ("key", "value")]
    return ["inputs_embeds", SEQLENS, TOTAL, *past], ["logits", *present]


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _float_prompt_branch(node: onnx.NodeProto, tag: str) -> onnx.GraphProto:
    """The prompt step of an int8-cache GQA node: fp32 attention over the prompt's own keys/values (no past),
    which are then quantized with the node's scales into a cache as long as the bound one, zeros after."""
    qkv, seqlens, total, cos, sin = node.input[0], node.input[5], node.input[6], node.input[7], node.input[8]
    past_key, scales = node.input[3], {"k": node.input[12], "v": node.input[13]}
    n = lambda name: f"prompt_{name}.{tag}"  # noqa: E731 (names unique across the layers' branches)
    attention = helper.make_node("GroupQueryAttention", [qkv, "", "", "", "", seqlens, total, cos, sin],
                                 [n("attn"), n("key"), n("value")], domain=node.domain)
    attention.attribute.extend(a for a in node.attribute if a.name not in KV_QUANT_ATTRIBUTES)
    nodes = [attention,
             helper.make_node("Shape", [past_key], [n("max")], start=2, end=3),
             helper.make_node("Shape", [n("key")], [n("len")], start=2, end=3),
             helper.make_node("Sub", [n("max"), n("len")], [n("rest")]),
             helper.make_node("Concat", [PAD_BEFORE, n("rest"), PAD_LAST], [n("pads")], axis=0)]
    outputs = [helper.make_tensor_value_info(n("attn"), TensorProto.FLOAT, None)]
    for kv, values in (("k", n("key")), ("v", n("value"))):
        nodes += [helper.make_node("Reshape", [scales[kv], SCALE_SHAPE], [n(kv + "_scale")]),
                  helper.make_node("Div", [values, n(kv + "_scale")], [n(kv + "_steps")]),
                  helper.make_node("Round", [n(kv + "_steps")], [n(kv + "_round")]),  # half to even, as GQA's own
                  helper.make_node("Clip", [n(kv + "_round"), INT8_MIN, INT8_MAX], [n(kv + "_clip")]),
                  helper.make_node("Cast", [n(kv + "_clip")], [n(kv + "_int8")], to=TensorProto.INT8),
                  helper.make_node("Pad", [n(kv + "_int8"), n("pads")], [n(kv + "_cache")])]
        outputs.append(helper.make_tensor_value_info(n(kv + "_cache"), TensorProto.INT8, None))
    return helper.make_graph(nodes, f"prompt_attention.{tag}", [], outputs)


def float_prompt_attention(model: onnx.ModelProto) -> int:
    """Run the prompt step's attention in fp32 in a graph whose KV cache is int8 (in place; returns the
    number of attention nodes changed).

    Why: ONNX Runtime's CPU ``GroupQueryAttention`` reads an int8 cache by dequantizing as it goes, which
    costs little for one new token but is slow over a whole prompt: at the mid-size config (1,529-token
    prompt) the int8-cache attention took 4.4 s of a 6.2 s prefill against 1.1 s in fp32, so the cache
    that makes each decode step faster made a report slower end to end. When a step's tokens are the
    whole sequence (nothing cached yet), each layer now runs an fp32 GQA over the prompt's own keys and
    values and writes them to the cache quantized with the same scales and rounding (layer 0's cache
    measured byte-identical); later steps take the unchanged int8 node. Each layer's choice is an ONNX
    ``If``, whose outputs ONNX Runtime allocates in the caller's bound buffers, so the decode branch still
    appends in place (measured: prefill 5.0 -> 2.2 s, decode 12.8 -> 12.0 ms/token)."""
    graph = model.graph
    targets = [node for node in graph.node
               if node.op_type == "GroupQueryAttention" and _attrs(node).get("kv_cache_bit_width") == 8]
    if not targets:
        return 0
    if not any(i.name == "inputs_embeds" for i in graph.input):
        fail("the decoder graph has no inputs_embeds input: not a radtrt decoder export")
    dims = {i.name: list(i.dims) for i in graph.initializer}
    kv_heads = _attrs(targets[0])["kv_num_heads"]
    width = dims.get(targets[0].input[12], [0])
    if len(width) != 1 or width[0] % kv_heads:
        fail("the int8 KV-cache attention has no per-channel key scales: not a radtrt decoder export")
    head_dim = width[0] // kv_heads
    graph.initializer.extend([
        numpy_helper.from_array(np.zeros(6, np.int64), PAD_BEFORE), numpy_helper.from_array(np.zeros(1, np.int64), PAD_LAST),
        numpy_helper.from_array(np.array([1, kv_heads, 1, head_dim], np.int64), SCALE_SHAPE),
        numpy_helper.from_array(np.array(-128, np.float32), INT8_MIN), numpy_helper.from_array(np.array(127, np.float32), INT8_MAX),
        numpy_helper.from_array(np.array([], np.int64), SCALAR_SHAPE)])
    condition = [helper.make_node("Shape", ["inputs_embeds"], ["step_length64"], name="step_length", start=1, end=2),
                 helper.make_node("Cast", ["step_length64"], ["step_length32"], name="step_length_int32", to=TensorProto.INT32),
                 helper.make_node("Reshape", ["step_length32", SCALAR_SHAPE], ["step_length"], name="step_length_scalar"),
                 helper.make_node("Equal", ["step_length", TOTAL], [IS_PROMPT], name="is_prompt_step")]
    nodes = list(graph.node)
    for node in targets:
        tag = node.name or node.output[0]
        decode_outputs = [f"decode_{o}" for o in node.output]
        decode = helper.make_node(node.op_type, list(node.input), decode_outputs, domain=node.domain)
        decode.attribute.extend(node.attribute)
        decode_graph = helper.make_graph(
            [decode], f"decode_attention.{tag}", [],
            [helper.make_tensor_value_info(decode_outputs[0], TensorProto.FLOAT, None)]
            + [helper.make_tensor_value_info(o, TensorProto.INT8, None) for o in decode_outputs[1:]])
        branch = helper.make_node("If", [IS_PROMPT], list(node.output), name=f"{tag}.prompt_or_decode",
                                  then_branch=_float_prompt_branch(node, tag),
                                  else_branch=decode_graph)
        nodes[nodes.index(node)] = branch
    del graph.node[:]
    graph.node.extend(condition + nodes)
    return len(targets)


def rewrite_prompt_attention(path: Path) -> int:
    """``float_prompt_attention`` on a graph file; its weights stay where they are (only nodes and a few
    small constants change)."""
    model = onnx.load(str(path), load_external_data=False)
    changed = float_prompt_attention(model)
    if changed:
        onnx.save(model, str(path))
    return changed

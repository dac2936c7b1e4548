"""Decoder INT8 as ONNX graphs ONNX Runtime's CPU provider runs with integer kernels.

Two methods, same I/O contract as the fp32 ``decoder.onnx`` (``radtrt.exporter.onnx``; fp32 KV
buffers, ``--attention plain``) or of its fused-attention rewrite (``radtrt.exporter.gqa``, fp32 or INT8 cache); input
embeddings and logits stay fp32:

* ``weight-only``: every linear layer's weight as INT8 in ``MatMulNBits`` (bits 8, symmetric, one
  scale per output channel per 128 input channels; per-channel over the whole input is not offered
  by the quantizer for this op). No calibration needed. At ``accuracy_level`` 4 ONNX Runtime
  computes it with int8 dot products (activations quantized per 128-wide block of each row, on the
  fly); at level 0/1 it dequantizes to fp32 and measured 8-10x slower than fp32 here. Written one weight
  at a time (``radtrt.exporter.streamed_quant``: ``MatMulNBitsQuantizer``'s graph, its own block packing).
* ``smoothquant`` (W8A8): SmoothQuant (Xiao et al.) with the calibration statistics -- q/k/v folded
  into ``input_layernorm``, gate/up into ``post_attention_layernorm``, down_proj into up_proj's rows,
  o_proj into v_proj's rows (one factor per KV head channel), not lm_head (measured worse) -- all
  exact in float, applied to the exported fp32 graph's weights one at a time (no smoothed copy of the
  decoder in memory, which at 4 bytes a parameter is 27 GB for Vicuna-7B); then ``quantize_dynamic``'s graph
  (written one weight at a time by ``radtrt.exporter.streamed_quant`` for the fused attention):
  INT8 per-channel weights (7-bit range, see ``REDUCE_RANGE``), activations quantized per call
  (``DynamicQuantizeLinear``, uint8 with a zero point), i.e. per token at decode (T=1) and per tensor
  over the prompt at prefill; ``MatMulInteger``-family kernels.

``lm_head`` policy: INT8 by default (unsmoothed), ``--fp32-lm-head`` to keep it float. At the
mid-size config it is 15% of the decoder's weights: fp32 it costs decode speed (its bytes are read
every token) and the bundle-size target; on the trained phantom model it cost 83% -> 87% identical
reports (60 held-out studies, within their noise). The embedding table is not in this graph (the
bundle stores it INT8 per row, ``radtrt.exporter.bundle``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from radtrt.errors import fail
from radtrt.exporter.int8_vision import quiet_quantizer
from radtrt.exporter.onnx import export_decoder
from radtrt.exporter.quant import DEFAULT_ALPHA, ORT_REDUCE_RANGE, ActivationStats, smoothing_scales
from radtrt.model.decoder import LlamaForCausalLM

DECODER_METHODS = ("weight-only", "smoothquant")
NBITS_BLOCK = 128
NBITS_ACCURACY_LEVEL = 4  # int8 compute: the only fast MatMulNBits path on this CPU
REDUCE_RANGE = ORT_REDUCE_RANGE  # 7-bit weights for the dynamic W8A8 path (why: radtrt.exporter.quant)


def lm_head_node(model: onnx.ModelProto, output: str = "logits") -> str:
    """Name of the MatMul computing the logits: walk back from the output along first inputs."""
    producer = {o: n for n in model.graph.node for o in n.output}
    name = output
    for _ in range(64):
        node = producer.get(name)
        if node is None:
            break
        if node.op_type in ("MatMul", "Gemm"):
            return node.name
        name = node.input[0]
    fail("could not find the lm_head MatMul in the decoder graph (has the exporter changed?)")


def quantize_weight_only(fp32_model: Path, out: Path, *, lm_head: bool = True, progress: Any = None) -> dict[str, Any]:
    from radtrt.exporter.streamed_quant import quantize_nbits8

    exclude = set() if lm_head else {lm_head_node(onnx.load(str(fp32_model), load_external_data=False))}
    quantize_nbits8(fp32_model, out, exclude=exclude, block_size=NBITS_BLOCK, accuracy_level=NBITS_ACCURACY_LEVEL,
                    progress=progress)
    return {"method": "weight-only", "op": "MatMulNBits (com.microsoft)", "bits": 8, "block_size": NBITS_BLOCK,
            "symmetric": True, "accuracy_level": NBITS_ACCURACY_LEVEL,
            "compute": "int8 dot products, activations quantized per 128-wide block on the fly"}


@dataclass(frozen=True)
class Smoothing:
    """SmoothQuant's factors for one decoder, by Hugging Face module / parameter name (``model.layers.0...``).

    ``inputs[m]`` multiplies module m's weight per input channel, ``outputs[m]`` divides it per output
    channel (v_proj takes o_proj's factors, up_proj down_proj's) and ``norms[p]`` divides RMSNorm weight p:
    the decoder then computes the same function in exact arithmetic. The cached values come out divided by
    ``outputs[v_proj]``, which the INT8 KV cache's value scales must follow.
    """

    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    norms: dict[str, torch.Tensor]

    def weight(self, module: str, w_in_out: np.ndarray) -> np.ndarray:
        """A ``[in, out]`` weight (an ONNX MatMul's B) smoothed in fp32: times the input factors, then over the
        output ones, the order and arithmetic of ``quant.smooth`` on the ``[out, in]`` layout."""
        w = np.asarray(w_in_out, dtype=np.float32)
        if module in self.inputs:
            w = w * self.inputs[module].numpy()[:, None]
        if module in self.outputs:
            w = w / self.outputs[module].numpy()[None, :]
        return w

    def value_divisors(self, num_layers: int) -> list[torch.Tensor]:
        return [self.outputs[f"model.layers.{i}.self_attn.v_proj"] for i in range(num_layers)]


@torch.no_grad()
def smoothing_factors(lm: LlamaForCausalLM, stats: ActivationStats, alpha: float = DEFAULT_ALPHA) -> Smoothing:
    """The factors for q/k/v (into ``input_layernorm``), gate/up (into ``post_attention_layernorm``), down
    (into up_proj's rows) and o (into v_proj's rows, one factor per KV head channel), all from the
    unsmoothed weights and the calibration maxima. Computed, not applied: the export smooths the exported
    graph's weights one at a time (``smooth_graph_file``) instead of holding a smoothed copy of the decoder.

    lm_head is not smoothed (as in TensorRT-LLM's SmoothQuant): folding factors into the final norm
    made the INT8 lm_head worse, not better (identical reports 77% vs 83% unsmoothed, 60 held-out
    phantoms, trained phantom model).
    """
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    norms: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(lm.model.layers):
        p, attn, mlp = f"model.layers.{i}.", layer.self_attn, layer.mlp
        s = smoothing_scales(stats.input_absmax(p + "self_attn.q_proj"),
                             [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], alpha)
        inputs |= {p + f"self_attn.{n}_proj": s for n in "qkv"}
        norms[p + "input_layernorm.weight"] = s
        s = smoothing_scales(stats.input_absmax(p + "mlp.gate_proj"), [mlp.gate_proj.weight, mlp.up_proj.weight], alpha)
        inputs |= {p + "mlp.gate_proj": s, p + "mlp.up_proj": s}
        norms[p + "post_attention_layernorm.weight"] = s
        # down_proj's input is silu(gate) * up: dividing up's rows by s divides it exactly
        s = smoothing_scales(stats.input_absmax(p + "mlp.down_proj"), [mlp.down_proj.weight], alpha)
        inputs[p + "mlp.down_proj"], outputs[p + "mlp.up_proj"] = s, s
        s_kv, s_full = _o_proj_factors(attn, stats.input_absmax(p + "self_attn.o_proj"), alpha, lm.cfg.num_key_value_heads)
        inputs[p + "self_attn.o_proj"], outputs[p + "self_attn.v_proj"] = s_full, s_kv
    return Smoothing(inputs, outputs, norms)


def _o_proj_factors(attn: Any, act_absmax: torch.Tensor, alpha: float, n_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """o_proj's input is probs @ V per query head; query heads sharing a KV head must share factors.
    Returns (per KV channel, for v_proj's rows; per o_proj input channel)."""
    out_features, width = attn.o_proj.weight.shape
    head_dim = attn.head_dim
    group = width // (n_kv * head_dim)
    act = act_absmax.float().view(n_kv, group, head_dim).amax(1).reshape(-1)
    w = attn.o_proj.weight.abs().view(out_features, n_kv, group, head_dim).amax(2).reshape(out_features, -1)
    s_kv = smoothing_scales(act, [w], alpha)  # [n_kv * head_dim]
    return s_kv, s_kv.view(n_kv, 1, head_dim).expand(n_kv, group, head_dim).reshape(-1)


def smooth_graph_file(path: Path, smoothing: Smoothing, progress: Any = None) -> None:
    """Apply ``smoothing`` to an exported (plain-attention) fp32 decoder graph in place, one weight at a time
    (``external.rewrite_graph_file``): linear weights and RMSNorm weights found by their nodes' module scopes.
    Refuses a graph missing any module or norm the factors name.

    The exporter merges equal initializers: the norms of a decoder whose norms were never trained (all ones,
    as ``train init`` makes them and stages 1 and 2 leave them) are one tensor under the first norm's name,
    which every norm's node reads. A smoothed norm is therefore written as a tensor of its own and only its
    node is pointed at it."""
    from radtrt.exporter.external import rewrite_graph_file
    from radtrt.exporter.onnx import DECODER_ROOT, module_of
    from radtrt.progress import progress_callback

    def edit(model: onnx.ModelProto, store: Any) -> None:
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        targets = [(n, module_of(n, DECODER_ROOT)) for n in graph.node if n.op_type == "MatMul"]
        targets = [(n, m) for n, m in targets if m in smoothing.inputs or m in smoothing.outputs]
        weights = [n.input[1] for n, _ in targets]
        norm_nodes: dict[str, tuple[onnx.NodeProto, int]] = {}  # norm module -> (its Mul, the weight's input slot)
        width = [len(s) for s in smoothing.norms.values()][:1]  # the hidden size: a norm weight's only dimension
        for node in graph.node:
            slots = [i for i, name in enumerate(node.input) if name in inits and list(inits[name].dims) == width]
            if node.op_type == "Mul" and len(slots) == 1:
                norm_nodes.setdefault(module_of(node, DECODER_ROOT), (node, slots[0]))
        missing = sorted((set(smoothing.inputs) | set(smoothing.outputs)) - {m for _, m in targets})
        missing += [f"{DECODER_ROOT}.{n}" for n in smoothing.norms if n.removesuffix(".weight") not in norm_nodes]
        if missing:  # checked before any weight is read: at 7B the rewrite is tens of GB
            fail(f"cannot smooth the decoder graph: no {missing[0]} in it (has the exporter changed its names?)")
        if any(w not in inits for w in weights) or len(set(weights)) != len(weights):
            fail("the decoder graph's linear layers do not each have a constant weight of their own "
                 "(has the exporter changed?)")
        smoothed: dict[str, onnx.TensorProto] = {}  # written to the new data file as made: one weight in memory
        tick = progress_callback(progress, f"SmoothQuant: {len(targets)} weight matrices", len(targets))
        for done, (node, module) in enumerate(targets, 1):
            smoothed[node.input[1]] = store.add(smoothing.weight(module, store.read(inits[node.input[1]])), node.input[1])
            if tick:
                tick(done)
        readers = Counter(name for node in graph.node for name in node.input if name in inits)
        for name, s in smoothing.norms.items():
            node, slot = norm_nodes[name.removesuffix(".weight")]
            source, key = node.input[slot], f"{DECODER_ROOT}.{name}"
            if readers[source] > 1 or source != key:  # shared: a tensor of its own, under a name not taken
                key = key if key not in inits and key not in smoothed else f"{key}.smoothed"
                readers[source] -= 1
                node.input[slot] = key
            smoothed[key] = store.add(np.asarray(store.read(inits[source]), dtype=np.float32) / s.numpy(), key)
        for name, tensor in smoothed.items():
            if name in inits:
                graph.initializer.remove(inits[name])
            graph.initializer.append(tensor)
        for name, count in readers.items():  # a merged norm every reader of which now has its own
            if count == 0 and name not in smoothed:
                graph.initializer.remove(inits[name])

    rewrite_graph_file(path, path, edit)


def quantize_smoothquant(lm: LlamaForCausalLM, stats: ActivationStats, out: Path, work: Path, *,
                         alpha: float = 0.5, lm_head: bool = True, cache: str | None = "float32",
                         progress: Any = None) -> dict[str, Any]:
    """Smooth, export fp32 to ``work``, then dynamic W8A8 into ``out``.

    ``cache``: the fused attention's KV-cache type (``float32`` or ``int8``), or None for the plain graph."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from radtrt.exporter.gqa import FusedAttention, kv_scales, rewrite_attention
    from radtrt.exporter.streamed_quant import quantize_w8a8

    smoothing = smoothing_factors(lm, stats, alpha)
    fp32 = work / "decoder-smoothed-fp32.onnx"
    export_decoder(lm, fp32)  # the plain graph: every linear node still carries its module's name scope
    smooth_graph_file(fp32, smoothing, progress)
    if cache is not None:  # then the fused attention, over the smoothed weights
        # smoothing o_proj divided v_proj's rows by its factors: the cached values are divided too
        scales = kv_scales(stats, lm.cfg, smoothing.value_divisors(lm.cfg.num_hidden_layers)) if cache == "int8" else None
        rewrite_attention(fp32, lm.cfg, FusedAttention(cache, scales))
    exclude = [] if lm_head else [lm_head_node(onnx.load(str(fp32), load_external_data=False))]
    if cache is not None:  # every MatMul has a constant weight: the same graph, streamed (radtrt.exporter.streamed_quant)
        quantize_w8a8(fp32, out, exclude=set(exclude), reduce_range=REDUCE_RANGE, progress=progress)
    else:
        with quiet_quantizer():
            quantize_dynamic(str(fp32), str(out), per_channel=True, reduce_range=REDUCE_RANGE,
                             weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"], nodes_to_exclude=exclude,
                             use_external_data_format=True)
    return {"method": "smoothquant", "alpha": alpha, "op": "DynamicQuantizeLinear + MatMulInteger (ONNX Runtime "
            "fuses them into DynamicQuantizeMatMul)", "weights": "int8 symmetric per output channel",
            "activations": "uint8 dynamic: per token at decode, per tensor over the prompt at prefill",
            "reduce_range": REDUCE_RANGE,
            "smoothed": "q/k/v, gate/up, down (into up_proj), o (into v_proj); lm_head quantized unsmoothed"
                        if lm_head else "q/k/v, gate/up, down (into up_proj), o (into v_proj); lm_head fp32"}

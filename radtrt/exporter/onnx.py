"""The two ONNX graphs of a bundle and their I/O contract.

vision.onnx: ``pixel_values [B,3,S,S]`` -> ``image_embeds [B,N,H]`` (trunk, feature selection and
projector fused; dynamic batch).

decoder.onnx: one prefill or decode step over caller-owned KV buffers (``SplitCache``):
  inputs  ``inputs_embeds [B,T,H]``, ``position_ids [B,T]`` int64, ``past_mask [B,S]`` bool (which
          buffer slots hold real keys), ``new_mask [B,T]`` bool (which new tokens are real, for
          left-padded prefill), ``past_key.i`` / ``past_value.i`` ``[B,KV,S,D]``;
  outputs ``logits [B,V]`` (last position only: generation never needs the others), ``key.i`` /
          ``value.i`` ``[B,KV,T,D]`` (the new tokens' keys/values, which the runtime writes into its
          buffers).
Past buffers are inputs that the graph only reads, so ONNX Runtime can bind one preallocated buffer
per layer for the whole generation instead of concatenating a growing cache at every step. This is the
``--attention plain`` contract; bundles use fused attention by default, a rewrite of this graph with
its own cache contract (``radtrt.exporter.gqa``).
"""

from __future__ import annotations

import ast
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
from onnx import numpy_helper
import torch
from torch import nn

from radtrt.model.decoder import LlamaForCausalLM, SplitCache
from radtrt.model.llava_rad import LlavaRad

if TYPE_CHECKING:
    from radtrt.exporter.gqa import FusedAttention

OPSET = 18
# Bumped whenever the exported graphs change for the same model and options (1: plain attention;
# 2: fused attention by default; 3: packed projections; 4: RMSNorm written for ONNX Runtime's fusion;
# 5: the vision GELUs ordered for ONNX Runtime's fusion; 6: with an int8 KV cache, the prompt step attends in fp32).
# Recorded in the manifest; the bench's cached random-model bundles are rebuilt when it differs.
GRAPH_REVISION = 6
VISION_INPUTS = ["pixel_values"]
VISION_OUTPUTS = ["image_embeds"]
# The wrappers' attribute holding the exported model: the first part of every name scope in the graphs.
VISION_ROOT, DECODER_ROOT = "model", "lm"


def module_of(node: onnx.NodeProto, root: str) -> str:
    """The innermost PyTorch module ``node`` was exported from, named relative to the wrapper's ``root``
    (``VISION_ROOT``, ``DECODER_ROOT``), from the dynamo exporter's name scopes; '' when it has none.
    Why: the exporter names most weights ``val_N``; the scopes are what ties a node to its module."""
    prefix = root + "."
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s for s in ast.literal_eval(prop.value) if s.startswith(prefix)]
            return scopes[-1].removeprefix(prefix) if scopes else ""
    return ""


def decoder_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_{kv}.{i}" for i in range(num_layers) for kv in ("key", "value")]
    new = [f"{kv}.{i}" for i in range(num_layers) for kv in ("key", "value")]
    return ["inputs_embeds", "position_ids", "past_mask", "new_mask", *past], ["logits", *new]


class VisionForOnnx(nn.Module):
    def __init__(self, model: LlavaRad) -> None:
        super().__init__()
        self.model = model  # VISION_ROOT

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.mm_projector(self.model.image_features(pixel_values))


def step_mask(past_mask: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
    """``[B,1,T,S+T]``: every real past slot, causal among the new tokens, a token always sees itself."""
    t = new_mask.shape[1]
    idx = torch.arange(t, device=new_mask.device)
    causal = idx[None, :] <= idx[:, None]
    own = idx[None, :] == idx[:, None]
    new_ok = (causal[None] & new_mask[:, None, :]) | own[None]
    past_ok = past_mask[:, None, :].expand(-1, t, -1)
    return torch.cat([past_ok, new_ok], dim=-1)[:, None]


class DecoderForOnnx(nn.Module):
    def __init__(self, lm: LlamaForCausalLM) -> None:
        super().__init__()
        self.lm = lm  # DECODER_ROOT

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, past_mask: torch.Tensor,
                new_mask: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = SplitCache([(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)])
        logits = self.lm(inputs_embeds, position_ids, step_mask(past_mask, new_mask), cache, last_only=True)
        return (logits[:, -1], *[t for kv in cache.new for t in kv])


def decoder_example(lm: LlamaForCausalLM, batch: int = 2, new: int = 3, past: int = 4,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    cfg = lm.cfg
    g = torch.Generator().manual_seed(0)
    kv = [torch.randn(batch, cfg.num_key_value_heads, past, cfg.head_dim, generator=g).to(dtype)
          for _ in range(2 * cfg.num_hidden_layers)]
    return (torch.randn(batch, new, cfg.hidden_size, generator=g).to(dtype),
            torch.arange(past, past + new).expand(batch, -1).contiguous(),
            torch.ones(batch, past, dtype=torch.bool), torch.ones(batch, new, dtype=torch.bool), *kv)


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: list[str], outputs: list[str],
            dynamic_shapes: tuple) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # the exporter's own chatter, by name; any other warning (a tracer's, constant folding's) may mean a wrong
        # graph, and is shown
        warnings.filterwarnings("ignore", r"# The axis name: .* will not be used", UserWarning)
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
        program = torch.onnx.export(module.eval(), args, dynamo=True, input_names=inputs, output_names=outputs,
                                    dynamic_shapes=dynamic_shapes, opset_version=OPSET, optimize=True,
                                    verbose=False)
    program.save(str(path), external_data=True)


def export_vision(model: LlavaRad, path: Path, dtype: torch.dtype = torch.float32) -> None:
    size = model.cfg.vision.img_size
    batch = torch.export.Dim("batch", min=1, max=256)
    example = (torch.randn(2, 3, size, size, dtype=dtype),)
    _export(VisionForOnnx(model), example, path, VISION_INPUTS, VISION_OUTPUTS, ({0: batch},))
    graph_only = onnx.load(str(path), load_external_data=False)  # the weights stay where they are
    if gelus_for_fusion(graph_only.graph):
        onnx.save(graph_only, str(path))


def export_decoder(lm: LlamaForCausalLM, path: Path, dtype: torch.dtype = torch.float32,
                   fused: "FusedAttention | None" = None) -> None:
    """The step graph above; with ``fused``, rewritten so each layer's attention is one fused node."""
    batch = torch.export.Dim("batch", min=1, max=256)
    seq = torch.export.Dim("seq", min=1, max=32768)
    past = torch.export.Dim("past", min=0, max=32768)
    inputs, outputs = decoder_io_names(lm.cfg.num_hidden_layers)
    kv_shape = {0: batch, 2: past}
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: past}, {0: batch, 1: seq},
               tuple(kv_shape for _ in range(2 * lm.cfg.num_hidden_layers)))  # *past is one varargs entry
    _export(DecoderForOnnx(lm), decoder_example(lm, dtype=dtype), path, inputs, outputs, dynamic)
    graph_only = onnx.load(str(path), load_external_data=False)  # the weights stay where they are
    if rms_norms_as_division(graph_only.graph):
        onnx.save(graph_only, str(path))
    if fused is not None:
        from radtrt.exporter.gqa import rewrite_attention

        rewrite_attention(path, lm.cfg, fused)


def _links(graph: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    """Each value's producing node and its consuming nodes."""
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers


def rms_norms_as_division(graph: onnx.GraphProto) -> int:
    """Rewrite each RMSNorm's ``x * Reciprocal(Sqrt(mean(x^2) + eps))`` as ``x / Sqrt(...)``; returns how many.

    Why: the model computes ``x * rsqrt(...)`` exactly as transformers does (so the PyTorch reference stays
    bit-identical to it), which the exporter writes as Sqrt + Reciprocal + Mul; ONNX Runtime's
    SimplifiedLayerNormFusion recognizes the division form only, and then runs each norm as one
    ``SimplifiedLayerNormalization`` node instead of six (mid-size config, fp32, 25 norms per token, one
    interleaved A/B of 5 runs on the 2-core CPU: decode 1.05x, prefill 1.08x). Only the exact pattern is
    touched: Pow(x, 2) -> ReduceMean -> Add -> Sqrt -> Reciprocal -> Mul with x.
    """
    producer, consumers = _links(graph)
    rewritten = []
    for recip in graph.node:
        if recip.op_type != "Reciprocal":
            continue
        chain = [producer.get(recip.input[0])]
        for op in ("Sqrt", "Add", "ReduceMean", "Pow"):
            node = chain[-1]
            if node is None or node.op_type != op:
                break
            chain.append(producer.get(node.input[0]) if op != "Pow" else node)
        else:
            x = chain[-1].input[0]
            users = consumers.get(recip.output[0], [])
            if len(users) == 1 and users[0].op_type == "Mul" and x in users[0].input:
                mul = users[0]
                mul.op_type = "Div"
                del mul.input[:]
                mul.input.extend([x, chain[0].output[0]])
                rewritten.append(recip)
    for recip in rewritten:
        graph.node.remove(recip)
    return len(rewritten)


def _scalar(graph: onnx.GraphProto, name: str) -> float | None:
    """Value of a one-element constant initializer, or None."""
    for init in graph.initializer:
        if init.name == name:
            value = numpy_helper.to_array(init)
            return float(value.reshape(-1)[0]) if value.size == 1 else None
    return None


def gelus_for_fusion(graph: onnx.GraphProto) -> int:
    """Reorder each exact GELU ``x * (0.5 * (1 + erf(x / sqrt2)))`` as ``(x * (1 + erf(x / sqrt2))) * 0.5``;
    returns how many.

    Why: that is how the exporter writes ``F.gelu``, and ONNX Runtime's GeluFusion only knows the second
    order, so the ViT's GELUs ran as five elementwise nodes each instead of one ``Gelu``. Multiplying by
    0.5 is exact in floating point, so the two orders give bit-identical results and the graph stays
    standard ONNX (TensorRT reads it as before). Touched only where the factor is exactly 0.5 and the
    chain Div -> Erf -> Add -> Mul(0.5) -> Mul(x) has no other consumers.
    """
    producer, consumers = _links(graph)
    count = 0
    for erf in graph.node:
        div = producer.get(erf.input[0]) if erf.op_type == "Erf" else None
        if div is None or div.op_type != "Div":
            continue
        x = div.input[0]
        chain = [erf]
        for op in ("Add", "Mul", "Mul"):
            users = consumers.get(chain[-1].output[0], [])
            if len(users) != 1 or users[0].op_type != op:
                break
            chain.append(users[0])
        else:
            _, add, half, outer = chain
            inner = add.output[0]
            factor = next((i for i in half.input if i != inner), None)
            if factor is None or _scalar(graph, factor) != 0.5 or x not in outer.input or half.output[0] not in outer.input:
                continue
            for node, old, new in ((half, factor, x), (outer, x, factor)):
                swapped = [new if i == old else i for i in node.input]
                del node.input[:]
                node.input.extend(swapped)
            count += 1
    return count

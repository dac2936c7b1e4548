"""``radtrt export``: a self-describing bundle directory with verified hashes.

Layout: ``vision.onnx``, ``decoder.onnx`` (+ ``.data`` external weights), ``embed_tokens.safetensors``
(the token-embedding table: the decoder graph takes embeddings, so image and text are spliced on
the host), ``tokenizer.model`` + ``tokenizer_config.json``, ``model_config.json`` and
``manifest.json``. A bundle is built in ``OUT.partial`` and renamed at the end, so an interrupted
export never leaves something that looks like a bundle.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from radtrt import __version__
from radtrt.errors import fail
from radtrt.exporter.gqa import (ATTENTION_KINDS, CACHE_TYPES, DEFAULT_ATTENTION, SEQLENS, FusedAttention,
                                 check_fused_attention_fits, describe as describe_attention)
from radtrt.exporter.onnx import GRAPH_REVISION, OPSET, export_decoder, export_vision
from radtrt.model.config import LlavaRadConfig
from radtrt.model.fingerprint import config_sha256, weights_fingerprint
from radtrt.model.io import read_json, save_tensors, sha256_file
from radtrt.model.llava_rad import LlavaRad
from radtrt.model.loading import LoadedModel
from radtrt.model.prompt import QUERY, QUERY_WITH_INDICATION, SYSTEM_V1
from radtrt.model.tokenizer import LlamaSPTokenizer
from radtrt.outputs import WORK_MARKER, check_new_dir, new_dir_built_aside

REEXPORT = "re-export the bundle"  # the remedy of a damaged bundle, apart: the demo has its own

BUNDLE_FORMAT = "radtrt-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_CONFIG = "model_config.json"
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}


@dataclass
class ExportStep:
    name: str
    seconds: float



def tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    return {"radtrt": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The ONNX exporter logs a warning per torchvision op it cannot register; we never use them."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_bundle(loaded: LoadedModel, out: Path, *, precision: str = "fp32", progress: Any = None,
                  int8: Any = None, attention: str = DEFAULT_ATTENTION) -> dict[str, Any]:
    """Export, check against PyTorch, hash, and write the manifest; returns the manifest.

    ``attention``: ``fused`` (one ``GroupQueryAttention`` per layer, ``radtrt.exporter.gqa``) or ``plain``
    (the exported graph); an INT8 export takes it from ``int8.attention``.

    ``int8`` (an ``onnx_int8.Int8Plan``) is required for ``precision="int8"``: calibration data and the
    decoder method. The export check of an INT8 bundle also runs the parity gate on held-out samples.
    """
    if attention not in ATTENTION_KINDS:
        fail(f"unknown --attention '{attention}' ({', '.join(ATTENTION_KINDS)})")
    if precision not in (*PRECISIONS, "int8"):
        fail(f"precision '{precision}' is not available for ONNX export (available: {', '.join(PRECISIONS)}, int8)")
    if precision == "int8":
        if int8 is None:
            fail("INT8 export needs calibration data: pass --calibration-data DIR|MANIFEST|CALIB_FILE, or "
                 "'--calibration-data phantom' for synthetic phantoms")
        int8.check_ready()
    if (int8.attention if precision == "int8" else attention) == "fused":
        check_fused_attention_fits(loaded.model.cfg.decoder)
    check_new_dir(out, "bundle directory")
    dtype = PRECISIONS.get(precision, torch.float32)
    identity = {"config_sha256": config_sha256(loaded.model), BUNDLE_FINGERPRINT: bundle_fingerprint(loaded.model)}
    model = loaded.model.to(dtype).eval()
    with new_dir_built_aside(out, "bundle directory") as work:
        return _export_into(work, loaded, model, precision, dtype, int8, attention, progress, identity)


def _export_into(work: Path, loaded: LoadedModel, model: LlavaRad, precision: str, dtype: torch.dtype, int8: Any,
                 attention: str, progress: Any, identity: dict[str, str]) -> dict[str, Any]:
    """Every file of the bundle and its checked manifest, in ``work``."""
    from radtrt.exporter.check import check_bundle_against_torch

    task = progress.add_task("export", total=None) if progress else None

    def describe(text: str) -> None:
        if progress:
            progress.update(task, description=text)

    timings = []
    int8_result = None
    with _quiet_exporter():
        if precision == "int8":
            from radtrt.exporter.onnx_int8 import build_int8

            t0 = time.perf_counter()
            int8_result = build_int8(loaded, work, int8, progress=progress, step=describe)
            timings.append(ExportStep("INT8 calibration and graphs", time.perf_counter() - t0))
        else:
            fused = FusedAttention("float16" if precision == "fp16" else "float32") if attention == "fused" else None
            for name, fn in (("vision.onnx", lambda: export_vision(model, work / "vision.onnx", dtype)),
                             ("decoder.onnx", lambda: export_decoder(model.language_model, work / "decoder.onnx",
                                                                     dtype, fused))):
                describe(f"exporting {name}")
                t0 = time.perf_counter()
                fn()
                timings.append(ExportStep(name, time.perf_counter() - t0))
        describe("writing the embedding table, tokenizer, config")
        _write_side_files(loaded, work, dtype, int8_table=int8 is not None and int8.embeddings == "int8")
    manifest = _manifest(loaded, work, precision, timings, identity)
    if int8_result is not None:
        manifest["int8"] = int8_result.int8
        manifest["calibration"] = int8_result.calibration
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2))
    describe("checking ONNX Runtime against PyTorch")
    manifest["export_check"] = check_bundle_against_torch(work, model)
    if int8_result is not None and int8.parity_samples:  # --parity-samples 0: no step shown for a gate not run
        from radtrt.exporter.onnx_int8 import int8_parity

        describe("INT8 parity gate on held-out samples")
        manifest["export_check"]["int8_parity"] = int8_parity(loaded, work, int8_result, int8, progress=progress)
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if progress:
        progress.remove_task(task)
    return manifest


def _write_side_files(loaded: LoadedModel, work: Path, dtype: torch.dtype, *, int8_table: bool = False) -> None:
    table = loaded.model.language_model.model.embed_tokens.weight.detach().to(dtype).cpu()
    if int8_table:  # INT8 rows with one fp32 scale each; the runtime dequantizes once at load
        from radtrt.exporter.quant import quantize_per_channel

        q = quantize_per_channel(table.float())
        save_tensors({"weight_int8": q.q, "scale": q.scale}, work / "embed_tokens.safetensors")
    else:
        save_tensors({"weight": table}, work / "embed_tokens.safetensors")
    loaded.tokenizer.save(work)
    (work / MODEL_CONFIG).write_text(loaded.model.cfg.to_json())


def _manifest(loaded: LoadedModel, work: Path, precision: str, timings: list[ExportStep],
              identity: dict[str, str]) -> dict[str, Any]:
    import onnx

    cfg = loaded.model.cfg
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(work.iterdir()) if p.is_file() and p.name not in (MANIFEST, WORK_MARKER)}
    graphs, protos = {}, {}
    for name in ("vision.onnx", "decoder.onnx"):
        proto = protos[name] = onnx.load(str(work / name), load_external_data=False)
        onnx.checker.check_model(str(work / name))  # path form: checks external-data models too
        graphs[name] = {
            "inputs": {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input},
            "outputs": {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output},
        }
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # the model's hash is its weights' fingerprint in ``identity``; a "weights_sha256" here was only the
        # embedding table's file hash, which "files" holds anyway
        "model": {"name": loaded.name, "source": loaded.source, **identity},
        "precision": precision,
        "opset": OPSET,
        "graph_revision": GRAPH_REVISION,
        "graphs": graphs,
        "decoder": {"num_layers": cfg.decoder.num_hidden_layers, "num_kv_heads": cfg.decoder.num_key_value_heads,
                    "head_dim": cfg.decoder.head_dim, "hidden_size": cfg.decoder.hidden_size,
                    "vocab_size": cfg.decoder.vocab_size, "eos_token_id": loaded.tokenizer.eos_token_id,
                    **describe_attention(protos["decoder.onnx"].graph)},
        "vision": {"image_size": cfg.vision.img_size, "num_image_tokens": cfg.num_image_tokens},
        "preprocess": {"image_size": cfg.vision.img_size, "resize": "shortest-edge bicubic (PIL)",
                       "crop": "center", "mean": list(cfg.image_mean), "std": list(cfg.image_std),
                       "dicom": "modality LUT, VOI LUT/window, MONOCHROME1 inversion, 8-bit, histogram equalization"},
        "prompt": {"template": cfg.conv_template, "system": SYSTEM_V1, "query": QUERY,
                   "query_with_indication": QUERY_WITH_INDICATION, "image_token_index": -200},
        "export_check": None,
        "export_seconds": {s.name: round(s.seconds, 2) for s in timings},
        "calibration": None,
        "tools": tool_versions(),
        "files": files,
    }


BUNDLE_FINGERPRINT = "weights_fingerprint_fp16"
# what every bundle holds besides the manifest (and ``*.onnx.data`` where a graph keeps its weights outside)
REQUIRED_FILES = ("vision.onnx", "decoder.onnx", "embed_tokens.safetensors", MODEL_CONFIG, "tokenizer.model",
                  "tokenizer_config.json")  # its 'legacy' and space clean-up change the report's text


def bundle_fingerprint(model: LlavaRad) -> str:
    """The weights' fingerprint at float16 resolution: the same for the model as loaded and after an fp16
    export's in-place cast, different for another fine-tune (``check_same_model``)."""
    return weights_fingerprint(model, dtype=torch.float16)


def read_manifest(bundle: Path, *, verify: bool = True) -> dict[str, Any]:
    """The manifest of a bundle, after checking its format version and every file's sha256."""
    if not bundle.is_dir():
        fail(f"{bundle} is a file, not a bundle folder" if bundle.exists() else f"bundle directory not found: {bundle}")
    path = bundle / MANIFEST
    if not path.is_file():
        model = (bundle / "config.json").is_file() and (bundle / "model.safetensors").is_file()
        fail(f"{bundle} is not a radtrt bundle (no {MANIFEST})" + (
            ": it is a model folder, which --model takes (a bundle is what 'radtrt export' writes)" if model else ""))
    manifest = read_json(path)
    if manifest.get("format") != BUNDLE_FORMAT:
        fail(f"{bundle} is not a radtrt bundle (format {manifest.get('format')!r})")
    version, revision = manifest.get("format_version"), manifest.get("graph_revision")
    if not _whole(version):  # a string '1' was "format version '1' ... reads version 1: re-export it"
        fail(f"{path} is damaged (format version {version!r} is not an integer)", remedy=REEXPORT)
    if version != BUNDLE_FORMAT_VERSION:  # a newer one cannot be re-exported by this radtrt alone
        fail(f"bundle {bundle} has format version {version!r} (written by {_written_by(manifest)}); this radtrt "
             f"{__version__} reads version {BUNDLE_FORMAT_VERSION}",
             remedy="re-export it" if version < BUNDLE_FORMAT_VERSION else "upgrade radtrt or re-export it with this one")
    if _whole(revision) and revision > GRAPH_REVISION:  # older revisions still run: their graphs are plain ONNX
        fail(f"bundle {bundle} was exported by a newer radtrt ({_written_by(manifest)}, graph revision "
             f"{revision}; this radtrt {__version__} knows up to {GRAPH_REVISION})",
             remedy="upgrade radtrt or re-export it with this one")
    # older: no revision at all, or an older one from before the decoder's attention was recorded. A current
    # revision without it is a damaged manifest (below): "exported by an older radtrt (graph revision 6; this
    # radtrt writes 6)" said otherwise
    decoder = manifest.get("decoder")
    if "graph_revision" not in manifest or (_whole(revision) and revision < GRAPH_REVISION
                                            and isinstance(decoder, dict) and "attention" not in decoder):
        fail(f"bundle {bundle} was exported by an older radtrt ({_written_by(manifest)}, graph revision "
             f"{revision!r}; this radtrt writes {GRAPH_REVISION})", remedy="re-export it")
    problem = manifest_problem(manifest)
    if problem:
        fail(f"{path} is damaged ({problem})", remedy=REEXPORT)
    if verify:
        unlisted = [name for name in REQUIRED_FILES if name not in manifest["files"]]
        unlisted += [p.name for p in sorted(bundle.glob("*.onnx.data")) if p.name not in manifest["files"]]
        if unlisted:  # an unlisted file escaped the hash check below
            fail(f"{path} does not list {unlisted[0]} among the bundle's files (damaged or edited?)",
                 remedy=REEXPORT)
        for name, meta in manifest["files"].items():
            f = bundle / name
            if not f.is_file():  # a device or a folder there (a link to /dev/zero, say) was called missing
                fail(f"bundle {bundle} is missing {name}" if not f.exists() else
                     f"bundle file {f} is not a regular file (a device, a folder, or a link to one)", remedy=REEXPORT)
            if f.stat().st_size != meta["bytes"] or sha256_file(f) != meta["sha256"]:
                fail(f"bundle file {f} does not match its manifest hash (corrupt or modified)", remedy=REEXPORT)
    if (bundle / MODEL_CONFIG).is_file():  # hashed above; the manifest itself is not, so it is checked against it
        cfg = LlavaRadConfig.from_dict(read_json(bundle / MODEL_CONFIG), remedy=REEXPORT, where=f"{bundle / MODEL_CONFIG}")
        problem = manifest_mismatch(manifest, cfg)
        if problem:
            fail(f"{path} does not match the bundle's {MODEL_CONFIG} ({problem})", remedy=REEXPORT)
    return manifest


def _written_by(manifest: dict[str, Any]) -> str:
    tools = manifest.get("tools")
    version = tools.get("radtrt") if isinstance(tools, dict) else None
    return f"radtrt {version}" if isinstance(version, str) else "an unknown radtrt"


def manifest_mismatch(manifest: dict[str, Any], cfg: LlavaRadConfig) -> str | None:
    """Where the manifest's description of the graphs disagrees with the model they were exported from,
    or with the graphs' recorded inputs (pure). The runtime sizes its KV buffers and binds its inputs from
    these fields, so an edited one ended in an ONNX Runtime binding traceback."""
    dec = manifest["decoder"]
    expected = {("decoder", "num_layers"): cfg.decoder.num_hidden_layers,
                ("decoder", "num_kv_heads"): cfg.decoder.num_key_value_heads,
                ("decoder", "head_dim"): cfg.decoder.head_dim, ("decoder", "hidden_size"): cfg.decoder.hidden_size,
                ("decoder", "vocab_size"): cfg.decoder.vocab_size, ("vision", "image_size"): cfg.vision.img_size,
                ("vision", "num_image_tokens"): cfg.num_image_tokens}
    for (section, key), value in expected.items():
        if manifest[section].get(key) != value:
            return f"{section}.{key} is {manifest[section].get(key)!r}, the model's is {value}"
    if dec.get("attention") not in ATTENTION_KINDS or dec.get("kv_cache") not in CACHE_TYPES:
        return f"decoder attention {dec.get('attention')!r} / kv_cache {dec.get('kv_cache')!r} unknown"
    inputs = manifest.get("graphs", {}).get("decoder.onnx", {}).get("inputs")
    if isinstance(inputs, dict):
        layers = cfg.decoder.num_hidden_layers
        if f"past_key.{layers - 1}" not in inputs or f"past_key.{layers}" in inputs:
            return f"the decoder graph's inputs are not those of {layers} layers"
        if (SEQLENS in inputs) != (dec["attention"] == "fused"):
            return f"decoder attention {dec['attention']!r} but the graph's inputs say otherwise"
    return None


def _whole(value: Any) -> bool:
    """An integer in JSON (not a bool, which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


_KINDS = {int: "a whole number", str: "a string", dict: "an object"}
# Every field of a section that radtrt reads, with the type it must have: checked here, in one place, so a damaged
# one is one line naming it, not an AttributeError or TypeError wherever it is read first. Each is (type, required):
# an optional one is checked when present.
_SECTIONS: dict[str, dict[str, tuple[type, bool]]] = {
    "model": {"name": (str, True), "config_sha256": (str, False), BUNDLE_FINGERPRINT: (str, False)},
    "vision": {"image_size": (int, True), "num_image_tokens": (int, True)},
    "decoder": {"num_layers": (int, True), "num_kv_heads": (int, True), "head_dim": (int, True),
                "hidden_size": (int, True), "vocab_size": (int, True), "attention": (str, True),
                "kv_cache": (str, True)},
}


def _field_problem(where: str, value: Any, kind: type) -> str | None:
    ok = _whole(value) if kind is int else isinstance(value, kind)
    return None if ok else f"{where} is {value!r}, not {_KINDS[kind]}"


def manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What makes a manifest of the current format unusable, or None (pure): the structure of every section the
    code reads (``_SECTIONS``, the file list, the graphs' descriptions).

    Why: the runtime reads these fields without further checks, and a manifest without its file list
    would silently skip the hash check of every file."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "no file list"
    for name, meta in files.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("bytes"), int) or not isinstance(meta.get("sha256"), str):
            return f"no size and sha256 for {name}"
    if manifest.get("precision") not in (*PRECISIONS, "int8"):
        return f"unknown precision {manifest.get('precision')!r}"
    if (manifest["precision"] == "int8") != isinstance(manifest.get("int8"), dict):  # reports name the precision
        return f"precision {manifest['precision']!r} " + ("without" if manifest["precision"] == "int8" else "with") \
            + " an INT8 quantization record"
    problem = _field_problem("graph_revision", manifest.get("graph_revision"), int)
    if problem:
        return problem
    for key, fields in _SECTIONS.items():
        section = manifest.get(key)
        if not isinstance(section, dict):
            return f"no '{key}' section" if section is None else f"its '{key}' section is not an object"
        for name, (kind, required) in fields.items():
            if name not in section:
                if required:
                    return f"no {key}.{name}"
                continue
            problem = _field_problem(f"{key}.{name}", section[name], kind)
            if problem:
                return problem
    graphs = manifest.get("graphs", {})  # a description only (the runtime reads the graphs), but read when there
    if not isinstance(graphs, dict):
        return "its 'graphs' section is not an object"
    for name, graph in graphs.items():
        if not isinstance(graph, dict):
            return f"graphs[{name!r}] is not an object"
        for part in ("inputs", "outputs"):
            if part in graph and not isinstance(graph[part], (dict, list)):
                return f"graphs[{name!r}].{part} is {graph[part]!r}, not a list of names"
    return None


def load_embedding_table(bundle: Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The token-embedding table as the runtime uses it (an INT8 bundle's INT8 rows dequantized to fp32);
    ``shape`` (vocabulary, hidden size) is checked when given."""
    table = _embedding_table(bundle)
    if table.dtype not in (np.float32, np.float16) or table.ndim != 2 or (shape is not None and table.shape != shape):
        fail(f"{bundle}/embed_tokens.safetensors holds a {table.dtype} table of shape {table.shape}, not the model's "
             f"{shape or '2-D float'} one", remedy=REEXPORT)
    return table


def _embedding_table(bundle: Path) -> np.ndarray:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(bundle / "embed_tokens.safetensors")
    except (SafetensorError, OSError, ValueError) as e:
        fail(f"{bundle}/embed_tokens.safetensors is truncated or corrupt ({e})", remedy=REEXPORT)
    if "weight" in tensors:
        return tensors["weight"]
    if {"weight_int8", "scale"} <= set(tensors):
        return tensors["weight_int8"].astype(np.float32) * tensors["scale"].astype(np.float32)[:, None]
    fail(f"{bundle}/embed_tokens.safetensors holds neither 'weight' nor 'weight_int8' + 'scale'", remedy=REEXPORT)


def read_bundle_side(folder: Path) -> tuple[LlavaRadConfig, LlamaSPTokenizer]:
    """The model config and tokenizer a bundle (or a Triton model folder holding its side files) carries: what
    the runtime, the benchmarks and Triton's preprocessing build their prompts and transforms from."""
    return (LlavaRadConfig.from_dict(read_json(folder / MODEL_CONFIG), remedy="export the bundle again",
                                     where=f"{folder / MODEL_CONFIG}"),
            LlamaSPTokenizer.from_dir(folder))

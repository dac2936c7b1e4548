"""Open the backends a benchmark compares, each as a full ``Pipeline`` plus what the report needs.

A "side" is one backend as the user would run it (same pipeline, same tokenizer and config loading as
``radtrt infer``), and the facts the report derives numbers from: the bytes a decode step reads, the
resident memory after loading, how long loading took, and the thread setting.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radtrt.benchmarks.assets import Assets
from radtrt.benchmarks.bandwidth import bundle_decoder_weight_bytes, torch_decoder_weight_bytes
from radtrt.benchmarks.machine import current_rss_mb
from radtrt.errors import fail
from radtrt.outputs import resolved
from radtrt.threads import set_threads
from radtrt.exporter.bundle import BUNDLE_FINGERPRINT, MANIFEST, REEXPORT
from radtrt.runtime.pipeline import Pipeline

BACKENDS = ("onnxruntime", "torch", "transformers", "tensorrt")


@dataclass
class Side:
    pipeline: Pipeline
    weight_bytes: int  # decoder bytes read per decode step
    load_seconds: float
    rss_added_mb: float | None  # resident memory this backend's loading added (shared weights count once)
    settings: dict[str, Any] = field(default_factory=dict)
    kv_dtype_bytes: int = 4  # the KV cache's element size (1 for an --int8-kv-cache bundle)
    label: str | None = None  # set when two sides share a backend (two bundles)

    @property
    def name(self) -> str:
        return self.label or self.pipeline.backend.name


def _torch_side(kind: str, assets: Assets, base_model: Path | None, device: str,
                cache: dict[str, Any]) -> tuple[Pipeline, int, dict[str, Any]]:
    import torch

    from radtrt.model.loading import load_model
    from radtrt.runtime.backends import TorchBackend, resolve_device

    if assets.model_dir is None:
        fail(f"the {kind} backend needs --model DIR (the model directory the bundle was exported from), "
             f"or use --random-model")
    device = resolve_device(device)
    if "loaded" not in cache:  # torch and transformers sides share one copy of the weights
        cache["loaded"] = load_model(assets.model_dir, base_model, dtype=torch.float32, device=device)
    loaded = cache["loaded"]
    if kind == "torch":
        backend: Any = TorchBackend(loaded.model, device)
    else:
        from radtrt.benchmarks.hf_backend import TransformersBackend

        backend = TransformersBackend(loaded.model, device)
    pipeline = Pipeline(backend, loaded.tokenizer, loaded.model.cfg, model_name=loaded.name)
    settings = {"device": device, "threads": torch.get_num_threads(), "dtype": "float32", "kv_dtype_bytes": 4}
    return pipeline, torch_decoder_weight_bytes(loaded.model.language_model), settings


def _ort_side(assets: Assets, provider: str, threads: int | None, spin: bool) -> tuple[Pipeline, int, dict[str, Any]]:
    from radtrt.exporter.bundle import read_bundle_side
    from radtrt.runtime.ort import OrtBackend

    if assets.bundle is None:
        fail("the onnxruntime backend needs --bundle DIR (what 'radtrt export' wrote), or use --random-model")
    backend = OrtBackend(assets.bundle, provider=provider, threads=threads, spin=spin)
    cfg, tokenizer = read_bundle_side(assets.bundle)
    pipeline = Pipeline(backend, tokenizer, cfg, model_name=backend.manifest["model"]["name"])
    settings = {"provider": provider, "threads": threads if threads else "onnxruntime default (physical cores)",
                "spinning threads": "on" if spin else "off",
                "bundle": str(assets.bundle),
                "attention": f"{'fused' if backend.fused else 'plain'}, {backend.kv_dtype} KV cache",
                "kv_dtype_bytes": backend.kv_dtype.itemsize}
    return pipeline, bundle_decoder_weight_bytes(assets.bundle / "decoder.onnx"), settings


def _trt_side(assets: Assets, decoder: str | None) -> tuple[Pipeline, int, dict[str, Any]]:
    """The bundle's TensorRT vision engine and TensorRT-LLM decoder engine, as ``radtrt infer --backend tensorrt``
    opens them; a decode step reads the decoder engine's weights, so its engine files are the floor's bytes."""
    from radtrt.exporter.bundle import read_bundle_side
    from radtrt.runtime.tensorrt import TensorRTBackend

    if assets.bundle is None:
        fail("the tensorrt backend needs --bundle DIR holding engines built for this GPU ('radtrt export --bundle "
             "DIR --target tensorrt' and '--target trtllm')")
    backend = TensorRTBackend(assets.bundle, decoder=decoder)
    cfg, tokenizer = read_bundle_side(assets.bundle)
    pipeline = Pipeline(backend, tokenizer, cfg, model_name=backend.manifest["model"]["name"])
    settings = {"bundle": str(assets.bundle), "engines": f"vision + decoder {backend.precision}",
                "decoder engine max batch": backend.limits["max_batch"],
                "kv_dtype_bytes": 1 if backend.decoder_stamp.get("int8_kv") else 2}
    return pipeline, sum(p.stat().st_size for p in backend.decoder_dir.glob("*.engine")), settings


def open_sides(kinds: list[str], assets: Assets, *, base_model: Path | None = None, device: str = "cpu",
               ort_provider: str = "cpu", threads: int | None = None, vs_bundle: Path | None = None,
               ort_spin: bool = False, trt_decoder: str | None = None) -> list[Side]:
    """Open each backend in turn; ``threads`` also sets torch's intra-op threads for the whole process.

    ``vs_bundle``: a second ONNX Runtime side on another bundle of the same model (INT8 against fp32,
    say); the two are then named by precision (or by folder when their precisions match)."""

    if vs_bundle is not None:
        if kinds != ["onnxruntime"]:
            fail("--vs-bundle compares two bundles under onnxruntime: use it with --backend onnxruntime and "
                 "without --vs-backend")
        if assets.bundle is None:
            fail("--vs-bundle needs --bundle (or --random-model) for the first side")
        if vs_bundle.exists() and assets.bundle.exists() and resolved(vs_bundle) == resolved(assets.bundle):
            fail(f"--vs-bundle {vs_bundle} is the same bundle as {assets.bundle}: compare two different bundles")
        sides = open_sides(kinds, assets, ort_provider=ort_provider, threads=threads, ort_spin=ort_spin)
        sides += open_sides(kinds, dataclasses.replace(assets, bundle=vs_bundle), ort_provider=ort_provider,
                            threads=threads, ort_spin=ort_spin)
        _label_bundle_sides(sides)
        _check_same_model(sides)
        prints = [s.pipeline.backend.manifest["model"].get(BUNDLE_FINGERPRINT) for s in sides]
        for bundle, fingerprint in zip((assets.bundle, vs_bundle), prints):
            if fingerprint is None:  # the manifest is not hashed: deleting the field skipped the check below
                fail(f"{bundle / MANIFEST} has no model.{BUNDLE_FINGERPRINT} (damaged, or exported by an older "
                     f"radtrt), so the two bundles cannot be checked to hold one model", remedy=REEXPORT)
        if prints[0] != prints[1]:
            fail(f"the two bundles were exported from different weights ({assets.bundle}, {vs_bundle}); "
                 f"compare bundles exported from one model")
        return sides

    for kind in kinds:
        if kind not in BACKENDS:
            fail(f"unknown backend '{kind}' for the bench ({', '.join(BACKENDS)})")
    if len(set(kinds)) != len(kinds):
        fail(f"the backends to compare must differ (got {' and '.join(kinds)})")
    set_threads(threads)
    cache: dict[str, Any] = {}
    sides = []
    for kind in kinds:
        t0, rss0 = time.perf_counter(), current_rss_mb()
        if kind == "onnxruntime":
            pipeline, weight_bytes, settings = _ort_side(assets, ort_provider, threads, ort_spin)
        elif kind == "tensorrt":
            pipeline, weight_bytes, settings = _trt_side(assets, trt_decoder)
        else:
            pipeline, weight_bytes, settings = _torch_side(kind, assets, base_model, device, cache)
        rss1 = current_rss_mb()
        added = rss1 - rss0
        kv_bytes = settings.pop("kv_dtype_bytes")
        sides.append(Side(pipeline, weight_bytes, time.perf_counter() - t0, added, settings, kv_bytes))
    _check_same_model(sides)
    if "loaded" in cache and {"onnxruntime", "tensorrt"} & set(kinds) and assets.bundle is not None:
        from radtrt.exporter.targets import check_same_model

        check_same_model(assets.bundle, cache["loaded"].model)  # same config, other fine-tune: meaningless parity
    return sides


def distinct_suffixes(paths: list[Path]) -> list[str]:
    """The fewest trailing parts of each path, as typed (made absolute, links kept: a link named fp32-current
    is labelled so, not by its target), that tell them apart: runs/a/bundle and runs/b/bundle are "a/bundle"
    and "b/bundle" (their folder names alone collided, and the run was refused)."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    for n in range(1, max(len(x) for x in parts) + 1):
        suffixes = ["/".join(x[-n:]).lstrip("/") or "/" for x in parts]
        if len(set(suffixes)) == len(suffixes):
            return suffixes
    fail(f"{' and '.join(map(str, paths))} are the same folder: compare two different bundles")


def _label_bundle_sides(sides: list[Side]) -> None:
    precisions = [s.pipeline.backend.precision for s in sides]
    by_folder = len(set(precisions)) < len(precisions)
    folders = distinct_suffixes([Path(s.settings["bundle"]) for s in sides]) if by_folder else precisions
    for side, what in zip(sides, folders):
        side.label = f"{side.pipeline.backend.name} {what}"


def _check_same_model(sides: list[Side]) -> None:
    """Comparing two different models would print meaningless ratios; refuse mismatched configs."""
    if len(sides) < 2:
        return
    first = sides[0].pipeline.cfg
    for other in sides[1:]:
        if other.pipeline.cfg != first:
            if other.label is not None:
                fail(f"the two bundles hold different models ({sides[0].name}: {sides[0].settings['bundle']}, "
                     f"{other.name}: {other.settings['bundle']}); compare bundles exported from one model")
            fail(f"{sides[0].name} and {other.name} load different model configs; the --model directory must be "
                 f"the one the --bundle was exported from")

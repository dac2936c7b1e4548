"""The TensorRT vision engine: built from a bundle's ``vision.onnx``, keyed and stamped per GPU.

Layout inside the bundle: ``tensorrt/<engine key>/vision.engine`` + ``engine.json`` (the stamp: GPU
name, compute capability, TensorRT and CUDA versions, precision, ONNX and engine sha256, profile),
and ``tensorrt/timing_<gpu>_<sm>_trt<version>.cache`` shared by the builds of one GPU + TensorRT.

Precision follows the graph (``plan_vision_build``):
* Q/DQ INT8 graph: strongly typed (explicit quantization; implicit INT8 calibration is deprecated
  since TensorRT 10.1 and removed in 11).
* fp16 graph (LayerNorm and softmax already cast to fp32 by the exporter): strongly typed, so those
  casts are kept exactly - the fix for fp16 ViT overflow. TensorRT 8.6-9 (no strong typing here): FP16
  flag with normalization and softmax layers pinned to fp32 under OBEY_PRECISION_CONSTRAINTS.
* fp32 graph: strongly typed fp32, or, when fp16 is requested, the pinned FP16 build above (TensorRT
  10.x only: the precision flags are deprecated since 10.12 and removed in 11, where every network is
  strongly typed).

Strongly typed builds set no precision builder flag: TensorRT 10 does not allow FP16/INT8/BF16/FP8 flags
with a strongly typed network (trtexec switches them off with a warning); the graph's dtypes decide.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from radtrt import __version__
from radtrt.errors import RadtrtError, fail, shell_quote
from radtrt.exporter.bundle import read_manifest, sha256_file
from radtrt.exporter.gpu import (
    GpuInfo,
    check_tensorrt,
    refuse_missing_engine,
    engine_key,
    gpu_stamp,
    import_vendor,
    loaded_tensorrt_problem,
    newest_first,
    parse_version,
    read_stamp,
    same_gpu,
    stamp_mismatch,
    timing_cache_name,
)
from radtrt.outputs import make_dir, replaced_atomically, write_text

ENGINE_FILE = "vision.engine"
STAMP_FILE = "engine.json"
STAMP_FORMAT = "radtrt-tensorrt-engine"
VISION_STAMP_KEYS = ("precision", "gpu", "onnx", "engine_sha256", "input", "output", "profile")  # what is read
ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 3: "int8", 7: "int64"}
FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX")
STRONG_TYPING = (10, 0)  # first GA with NetworkDefinitionCreationFlag.STRONGLY_TYPED (9.x: TensorRT-LLM only)
ALWAYS_STRONG = (11, 0)  # weak typing and the precision builder flags removed; STRONGLY_TYPED a no-op
NORMALIZATION_LAYER = (8, 6)  # trt.LayerType.NORMALIZATION (ONNX LayerNormalization) first in 8.6


@dataclass(frozen=True)
class OnnxInfo:
    """The vision graph's I/O contract and whether it is explicitly quantized."""

    input_name: str
    input_dtype: str
    input_shape: tuple[int | str, ...]
    output_name: str
    output_dtype: str
    output_shape: tuple[int | str, ...]
    has_qdq: bool

    @property
    def image_size(self) -> int:
        size = self.input_shape[-1]
        if not isinstance(size, int) or self.input_shape[-2] != size or len(self.input_shape) != 4:
            fail(f"vision graph input {self.input_name} has shape {self.input_shape}; expected [batch, 3, S, S]")
        return size


def inspect_onnx(path: Path) -> OnnxInfo:
    """Read names, dtypes and shapes without loading the (external) weights."""
    import onnx
    from google.protobuf.message import DecodeError

    try:  # the hash check passes a graph damaged before the manifest was written (or re-hashed by hand)
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError) as e:
        fail(f"{path} is not a readable ONNX graph ({type(e).__name__}: {e}): export the bundle again")
    graph = proto.graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        fail(f"{path.name} must have one input and one output, has {len(graph.input)} and {len(graph.output)}")

    def describe(value: Any) -> tuple[str, tuple[int | str, ...]]:
        t = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim)
        return ONNX_DTYPES.get(t.elem_type, f"onnx-type-{t.elem_type}"), dims

    (in_dtype, in_shape), (out_dtype, out_shape) = describe(graph.input[0]), describe(graph.output[0])
    qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)
    return OnnxInfo(graph.input[0].name, in_dtype, in_shape, graph.output[0].name, out_dtype, out_shape, qdq)


@dataclass(frozen=True)
class VisionBuildPlan:
    """How TensorRT is asked to honour the graph's precision (pure, so it is tested without TensorRT)."""

    precision: str  # engine label: fp32 | fp16 | int8
    strongly_typed: bool
    builder_flags: tuple[str, ...]  # trt.BuilderFlag names
    fp32_layer_types: tuple[str, ...]  # trt.LayerType names pinned to fp32 (weakly typed builds only)
    note: str


def buildable_vision_precisions(tensorrt_version: str) -> list[str]:
    """The engine precisions ``plan_vision_build`` accepts from some bundle under this TensorRT (``radtrt
    doctor``): asked of the planner itself, so the two never disagree. Its refusals are the answer here."""
    bundles = {"fp32": [("float32", False)], "fp16": [("float16", False), ("float32", False)],
               "int8": [("float32", True)]}
    found = []
    for wanted, graphs in bundles.items():
        for dtype, qdq in graphs:
            try:
                plan_vision_build(OnnxInfo("pixel_values", dtype, (), "image_embeds", dtype, (), qdq),
                                  tensorrt_version, wanted)
            except RadtrtError:
                continue
            found.append(wanted)
            break
    return found


def plan_vision_build(onnx: OnnxInfo, tensorrt_version: str, requested: str | None = None) -> VisionBuildPlan:
    """Strongly typed wherever the graph's dtypes already say what we want; the weakly typed FP16 build
    (norm/softmax pinned to fp32) only for an fp16 engine from an fp32 graph, or where strong typing is
    missing. Refusals come before the (long) build."""
    version = parse_version(tensorrt_version)
    strong = version >= STRONG_TYPING
    graph = "int8" if onnx.has_qdq else {"float16": "fp16", "float32": "fp32"}.get(onnx.input_dtype)
    if graph is None:
        fail(f"vision graph input dtype {onnx.input_dtype} is not supported for TensorRT (fp32, fp16, Q/DQ int8)")
    wanted = requested or graph
    if wanted not in ("fp32", "fp16", "int8"):
        fail(f"unknown TensorRT vision precision '{wanted}' (fp32, fp16, int8)")
    if wanted == "int8" and graph != "int8":
        fail("an INT8 vision engine needs the bundle's Q/DQ-quantized vision.onnx (export with --precision int8); "
             "TensorRT's implicit INT8 calibration is deprecated and not used")
    if graph == "int8":
        if wanted != "int8":  # strong typing keeps every Q/DQ node: the engine would be int8, not what was asked
            fail(f"this bundle's vision graph is Q/DQ INT8; an {wanted} vision engine needs a bundle exported "
                 f"without --precision int8")
        if not strong:
            fail(f"the vision graph is Q/DQ INT8, which radtrt builds strongly typed: needs TensorRT 10 or newer, "
                 f"found {tensorrt_version}")
        return VisionBuildPlan("int8", True, (), (), "strongly typed: Q/DQ nodes and graph dtypes fix every precision")
    if wanted == graph:
        note = ("strongly typed: the graph's fp32 LayerNorm/softmax casts are kept" if graph == "fp16"
                else "strongly typed fp32")
        if strong:
            return VisionBuildPlan(graph, True, (), (), note)
        if graph == "fp32":
            return VisionBuildPlan("fp32", False, (), (), "fp32 (TensorRT < 10: no strong typing)")
    if wanted == "fp32":
        fail("this bundle's vision graph is fp16; an fp32 engine needs an fp32 bundle")
    if version >= ALWAYS_STRONG:
        fail(f"TensorRT {tensorrt_version} builds strongly typed only (the FP16 builder flag was removed in 11); "
             f"for an fp16 engine export an fp16 bundle")
    if version < NORMALIZATION_LAYER:
        fail(f"TensorRT {tensorrt_version} has no normalization layer to keep in fp32, so an fp16 vision engine "
             f"would overflow in LayerNorm; needs TensorRT 8.6 or newer")
    note = "weakly typed fp16 with normalization and softmax layers pinned to fp32"
    if version >= (10, 12):
        note += " (precision flags deprecated since TensorRT 10.12; an fp16 bundle builds strongly typed)"
    return VisionBuildPlan("fp16", False, ("FP16", "OBEY_PRECISION_CONSTRAINTS"), FP32_LAYER_TYPES, note)


def network_flag_names(tensorrt_version: str, strongly_typed: bool) -> tuple[str, ...]:
    """``trt.NetworkDefinitionCreationFlag`` names for ``create_network``: EXPLICIT_BATCH before 10
    (deprecated and ignored from 10.0), STRONGLY_TYPED on 10.x, nothing on 11+ (always strongly typed;
    the flag is deprecated there and its value moved from 1 to 0)."""
    version = parse_version(tensorrt_version)
    if version >= ALWAYS_STRONG:
        return ()
    if strongly_typed:
        if version < STRONG_TYPING:
            fail(f"a strongly typed build needs TensorRT 10 or newer, found {tensorrt_version}")
        return ("STRONGLY_TYPED",)
    return ("EXPLICIT_BATCH",) if version < STRONG_TYPING else ()


def vision_profile(onnx: OnnxInfo, max_batch: int, opt_batch: int | None = None) -> dict[str, list[int]]:
    """Optimization profile over the dynamic batch: 1 .. max_batch. TensorRT picks its kernels for the opt shape,
    and ``infer`` and ``bench latency`` run one study at a time by default, so opt defaults to 1 (it was max_batch:
    a single image ran on kernels chosen for eight)."""
    if max_batch < 1:
        fail("max batch size must be at least 1")
    opt = 1 if opt_batch is None else opt_batch
    if not 1 <= opt <= max_batch:
        fail(f"optimum batch {opt} must be within 1..{max_batch}")
    size = onnx.image_size
    return {"min": [1, 3, size, size], "opt": [opt, 3, size, size], "max": [max_batch, 3, size, size]}


def trtexec_command(onnx_path: Path, engine_path: Path, onnx: OnnxInfo, plan: VisionBuildPlan,
                    profile: dict[str, list[int]], timing_cache: Path) -> list[str]:
    """The equivalent ``trtexec`` build (for reproducing or profiling a build outside radtrt). For the
    weakly typed fallback it is approximate: trtexec pins layers by name, not by layer type."""
    shape = {k: f"{onnx.input_name}:{'x'.join(map(str, v))}" for k, v in profile.items()}
    cmd = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}", f"--minShapes={shape['min']}",
           f"--optShapes={shape['opt']}", f"--maxShapes={shape['max']}", f"--timingCacheFile={timing_cache}"]
    if plan.strongly_typed:
        cmd.append("--stronglyTyped")
    if "FP16" in plan.builder_flags:
        cmd.append("--fp16")
    return cmd


def attach_timing_cache(config: Any, cached: bytes) -> str | None:
    """Give ``config`` the saved timing cache, or a fresh one when it cannot be used; returns why it was
    not used (for the log), or None.

    The cache is only a speed-up, so it never fails a build: ``create_timing_cache`` returns None for an
    unreadable blob, and ``set_timing_cache(..., ignore_mismatch=False)`` returns False for a cache whose
    device properties differ from this GPU's (its header is checked; ignoring that risks wrong tactics).
    An empty blob makes an empty cache that the build fills."""
    why = None
    if cached:
        try:
            cache = config.create_timing_cache(cached)
        except (RuntimeError, TypeError, ValueError):  # a binding that raises instead of returning None
            cache = None
        if cache is None:
            why = "cannot be read"
        elif not config.set_timing_cache(cache, ignore_mismatch=False):
            why = "was made on another device"
        else:
            return None
    if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
        fail("TensorRT refused an empty timing cache (see its log above)")
    return None if why is None else f"the timing cache {why}; starting a fresh one"


def _build_serialized(onnx_path: Path, onnx: OnnxInfo, plan: VisionBuildPlan, profile: dict[str, list[int]],
                      cache_path: Path, workspace_bytes: int, tensorrt_version: str) -> bytes:
    """TensorRT Python API build (lazy import: TensorRT exists only on GPU hosts)."""
    trt = import_vendor("tensorrt", "TensorRT")

    problem = loaded_tensorrt_problem(tensorrt_version, trt.__version__)
    if problem:
        fail(problem)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    for name in network_flag_names(trt.__version__, plan.strongly_typed):
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the file
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        fail(f"TensorRT cannot parse {onnx_path.name}: {errors[0] if errors else 'unknown error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    for flag in plan.builder_flags:  # empty for strongly typed plans: TensorRT rejects precision flags there
        config.set_flag(getattr(trt.BuilderFlag, flag))
    pinned = {getattr(trt.LayerType, t) for t in plan.fp32_layer_types}
    for i in range(network.num_layers):  # weakly typed only: strongly typed networks reject these setters
        layer = network.get_layer(i)
        if layer.type in pinned:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(onnx.input_name, profile["min"], profile["opt"], profile["max"])
    config.add_optimization_profile(opt_profile)
    note = attach_timing_cache(config, cache_path.read_bytes() if cache_path.is_file() else b"")
    if note:
        logger.log(trt.Logger.WARNING, f"{note} ({cache_path})")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        fail("TensorRT could not build the vision engine (its log above says why)")
    make_dir(cache_path.parent, "engine folder")  # a bundle's first engine: tensorrt/ is made here
    with replaced_atomically(cache_path) as tmp:  # never leave a torn cache behind
        tmp.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


def read_vision_manifest(bundle: Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The bundle manifest, with only the vision graph's files (and ``extra``) hash-checked: hashing a
    7B decoder to build a vision engine would cost a minute for nothing."""
    manifest = read_manifest(bundle, verify=False)
    for name, meta in manifest.get("files", {}).items():
        if name.startswith("vision.onnx") or name in extra:
            path = bundle / name
            if not path.is_file() or path.stat().st_size != meta["bytes"] or sha256_file(path) != meta["sha256"]:
                fail(f"bundle file {path} is missing or does not match its manifest hash: re-export the bundle")
    return manifest


def build_vision_engine(bundle: Path, gpu: GpuInfo, *, precision: str | None = None, max_batch: int = 8,
                        opt_batch: int | None = None, workspace_gib: float = 4.0) -> Path:
    """Build (or rebuild) this GPU's vision engine in the bundle; returns the engine directory."""
    manifest = read_vision_manifest(bundle)
    check_tensorrt(gpu)
    assert gpu.tensorrt is not None
    onnx_path = bundle / "vision.onnx"
    onnx = inspect_onnx(onnx_path)
    plan = plan_vision_build(onnx, gpu.tensorrt, precision)
    profile = vision_profile(onnx, max_batch, opt_batch)
    out = bundle / "tensorrt" / engine_key(gpu, plan.precision)
    # first: a rebuild that fails or is interrupted must not leave the old stamp vouching for another engine
    (out / STAMP_FILE).unlink(missing_ok=True)
    cache = bundle / "tensorrt" / timing_cache_name(gpu)
    t0 = time.perf_counter()
    engine = _build_serialized(onnx_path, onnx, plan, profile, cache, int(workspace_gib * 2**30), gpu.tensorrt)
    # the folder only once there is an engine to put in it: a failed first build left an empty engine folder
    fresh = not out.is_dir()
    make_dir(out, "engine folder")
    try:  # the engine, then the stamp that vouches for it
        with replaced_atomically(out / ENGINE_FILE) as tmp:
            tmp.write_bytes(engine)
        onnx_sha = manifest["files"]["vision.onnx"]["sha256"]
        stamp = {"format": STAMP_FORMAT, "format_version": 1, "component": "vision", "precision": plan.precision,
                 "gpu": gpu_stamp(gpu), "onnx": {"file": "vision.onnx", "sha256": onnx_sha},
                 "engine_sha256": sha256_file(out / ENGINE_FILE), "input": onnx.input_name,
                 "output": onnx.output_name, "profile": profile, "plan": asdict(plan), "timing_cache": cache.name,
                 "trtexec_equivalent": trtexec_command(onnx_path, out / ENGINE_FILE, onnx, plan, profile, cache),
                 "build_seconds": round(time.perf_counter() - t0, 1),
                 "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "radtrt": __version__}
        write_text(out / STAMP_FILE, json.dumps(stamp, indent=2), "TensorRT engine stamp")
    except BaseException:
        if fresh:  # no engine folder without its stamp
            shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def _build_command(bundle: Path) -> str:
    # without --bundle it would make a new bundle; the command last and bare, as its quoted path nested in quotes
    # ('radtrt export --bundle '/a/my bundle' ...') did not paste
    return f"radtrt export --bundle {shell_quote(str(bundle))} --target tensorrt"


def vision_engine_problem(engine: Path, stamp: dict[str, Any], manifest: dict[str, Any], bundle: Path) -> str | None:
    """Why this host's vision engine cannot run the bundle (damaged, or built from another export of its
    vision.onnx), or None: what ``find_vision_engine`` refuses, asked apart by ``--backend auto``."""
    build = _build_command(bundle)
    if not engine.is_file() or sha256_file(engine) != stamp["engine_sha256"]:
        return f"TensorRT engine {engine} is missing or does not match its stamp (corrupt): rebuild it with: {build}"
    if stamp["onnx"]["sha256"] != manifest["files"].get("vision.onnx", {}).get("sha256"):
        return f"TensorRT engine {engine} was built from another export of vision.onnx: rebuild it with: {build}"
    return None


def this_hosts_vision_engine(bundle: Path, gpu: GpuInfo, precision: str | None = None
                             ) -> tuple[tuple[Path, dict[str, Any]] | None, list[tuple[str, bool]]]:
    """(the engine file and stamp this host would run, unverified, or None; for each engine built elsewhere, why it
    does not fit and whether it was built for this GPU model)."""
    root = bundle / "tensorrt"
    mismatches, fitting = [], []
    for path in sorted(root.glob(f"*/{STAMP_FILE}")) if root.is_dir() else []:
        stamp = read_stamp(path, STAMP_FORMAT, VISION_STAMP_KEYS)
        if stamp is None or (precision and stamp["precision"] != precision):
            continue
        mismatch = stamp_mismatch(stamp, gpu)
        if mismatch:
            mismatches.append((mismatch, same_gpu(stamp, gpu)))
        else:
            fitting.append((path, stamp))
    if not fitting:
        return None, mismatches
    # the first precision in order (as before), and of it the newest build: an older folder of the same
    # engine may remain (see newest_first); min keeps the first, so the newest, of equal precisions
    path, stamp = min(newest_first(fitting), key=lambda f: str(f[1].get("precision")))
    return (path.parent / ENGINE_FILE, stamp), mismatches


def find_vision_engine(bundle: Path, gpu: GpuInfo, precision: str | None = None,
                       manifest: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """This host's engine (verified against its stamp, its hash and the bundle's ONNX), or one line
    naming the machine the existing engine was built for."""
    manifest = manifest or read_manifest(bundle, verify=False)
    build = _build_command(bundle)
    chosen, mismatches = this_hosts_vision_engine(bundle, gpu, precision)
    if chosen is not None:
        problem = vision_engine_problem(*chosen, manifest, bundle)
        if problem:
            fail(problem)
        return chosen
    refuse_missing_engine("TensorRT", f"{precision} vision engine" if precision else "vision engine", bundle,
                          mismatches, installed=gpu.tensorrt is not None, build=build)

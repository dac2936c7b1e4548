"""GPU, compute capability and library versions; engine keys and stamps; what each GPU can run.

Why a module of its own: a TensorRT or TensorRT-LLM engine is only valid for the GPU and library
versions that built it, and several vendor rules must be checked *before* a long build:

* TensorRT supports Volta (V100, sm70) up to 10.4 (support ended with 10.4).
* TensorRT-LLM supports V100 up to 0.14, with weight-only INT8/INT4 only there (no SmoothQuant,
  AWQ/GPTQ or FP8); Jetson Orin (sm87) only through the ``v0.12.0-jetson`` branch (JetPack 6.1);
  FP8 needs Ada (sm89) or newer.

Everything here is pure over a ``GpuInfo`` so the rules and keys are tested on CPU machines; only
``detect_gpu`` and ``library_version`` look at the host.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

from radtrt.errors import fail

# Decoder quantization modes radtrt writes, plus the ones it only has to refuse correctly.
DECODER_MODES = ("fp16", "w8a16", "w8a8_sq")
MODE_LABELS = {"fp16": "FP16", "w8a16": "INT8 weight-only (W8A16)", "w8a8_sq": "SmoothQuant W8A8",
               "w4a16_awq": "AWQ INT4", "fp8": "FP8"}
# Oldest compute capability whose TensorRT-LLM kernels run each mode. SmoothQuant and AWQ need the
# INT8/INT4 tensor-core GEMMs of Turing+ (none on sm70); FP8 needs Ada/Hopper.
MODE_MIN_SM = {"fp16": (7, 0), "w8a16": (7, 0), "w8a8_sq": (7, 5), "w4a16_awq": (7, 5), "fp8": (8, 9)}
VOLTA = (7, 0)
XAVIER = (7, 2)
ORIN = (8, 7)
LAST_TENSORRT_FOR_VOLTA = (10, 4)
LAST_TRTLLM_FOR_VOLTA = (0, 14)
ORIN_TRTLLM = (0, 12)


def parse_version(text: str) -> tuple[int, ...]:
    """Leading numeric release of a version string: '10.3.0.26' -> (10, 3, 0, 26), '1.0.0rc4' -> (1, 0, 0)."""
    numbers = []
    for part in text.split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        numbers.append(int(match.group()))
        if match.end() != len(part):
            break
    if not numbers:
        fail(f"cannot read version '{text}'")
    return tuple(numbers)


def sm_tag(sm: tuple[int, int]) -> str:
    return f"sm{sm[0]}{sm[1]}"


@dataclass(frozen=True)
class GpuInfo:
    """One GPU and the library versions that would build or run engines for it."""

    name: str
    sm: tuple[int, int]
    cuda: str | None = None  # CUDA runtime of the installed PyTorch (torch.version.cuda)
    tensorrt: str | None = None
    tensorrt_llm: str | None = None
    memory_gib: float | None = None
    # why the installed TensorRT (its package metadata says ``tensorrt``) does not import here, e.g. libnvinfer
    # missing: the version alone made doctor call it buildable and auto pick it, then ``import tensorrt`` raised.
    # Not part of an engine's identity, so neither compared nor stamped.
    tensorrt_error: str | None = field(default=None, compare=False)

    @property
    def sm_tag(self) -> str:
        return sm_tag(self.sm)

    def describe(self, *, trtllm: bool = False) -> str:
        parts = [f"{self.name} ({self.sm_tag})", f"TensorRT {self.tensorrt or 'not installed'}"]
        if trtllm:
            parts.append(f"TensorRT-LLM {self.tensorrt_llm or 'not installed'}")
        parts.append(f"CUDA {self.cuda or 'unknown'}")
        return ", ".join(parts)


def library_version(module: str) -> str | None:
    """Installed version of a vendor library, or None when it is not installed.

    Read from the distribution metadata first, because importing TensorRT-LLM initializes MPI and
    CUDA; TensorRT installed from JetPack's apt packages may have no metadata, so it is imported.
    """
    for dist in (module, module.replace("_", "-")):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    if module != "tensorrt":
        return None
    try:
        return getattr(importlib.import_module(module), "__version__", None)
    except ImportError:
        return None


def import_problem(module: str) -> str | None:
    """Why ``module`` does not import (its first line), or None: an install can have its package metadata and
    still fail to load (TensorRT's wheel without libnvinfer raises ImportError, a ctypes load OSError)."""
    try:
        importlib.import_module(module)
    except (ImportError, OSError) as e:
        return (str(e).splitlines() or [type(e).__name__])[0]
    return None


def import_vendor(module: str, label: str) -> ModuleType:
    """``module`` imported, or one line naming the vendor library that does not load here and why, where the bare
    import ended in an ImportError traceback (a wheel whose shared libraries are missing)."""
    try:
        return importlib.import_module(module)
    except (ImportError, OSError) as e:
        fail(f"{label} does not import here ({(str(e).splitlines() or [type(e).__name__])[0]}): reinstall it "
             f"(see 'radtrt doctor')")


def detect_gpu(device: int = 0) -> GpuInfo | None:
    """The host's GPU as PyTorch sees it, with the installed TensorRT/TensorRT-LLM versions."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device)
    tensorrt = library_version("tensorrt")
    # TensorRT is imported to prove it loads (TensorRT-LLM, which needs it, is not: importing it starts MPI and
    # prints a banner; its own failures are caught where it is imported, by ``import_vendor``)
    return GpuInfo(name=props.name, sm=(props.major, props.minor), cuda=torch.version.cuda,
                   tensorrt=tensorrt, tensorrt_llm=library_version("tensorrt_llm"),
                   memory_gib=round(props.total_memory / 2**30, 1),
                   tensorrt_error=import_problem("tensorrt") if tensorrt else None)


def require_gpu(gpu: GpuInfo | None) -> GpuInfo:
    if gpu is None:
        fail("no CUDA GPU is visible to PyTorch here; TensorRT and TensorRT-LLM engines are built and run on "
             "the target GPU (see 'radtrt doctor')")
    return gpu


# --- compatibility rules ---------------------------------------------------------------------------

def tensorrt_problem(gpu: GpuInfo) -> str | None:
    """Why TensorRT cannot build/run engines for this GPU, or None."""
    if gpu.tensorrt is None:
        return "TensorRT is not installed (pip package 'tensorrt', or JetPack on Jetson)"
    if gpu.tensorrt_error:
        return f"TensorRT {gpu.tensorrt} is installed but does not import ({gpu.tensorrt_error}): reinstall it"
    if gpu.sm < VOLTA:
        return f"{gpu.name} ({gpu.sm_tag}) predates Volta; radtrt's TensorRT path needs sm70 or newer"
    if gpu.sm == VOLTA and parse_version(gpu.tensorrt)[:2] > LAST_TENSORRT_FOR_VOLTA:
        return (f"TensorRT {gpu.tensorrt} does not support Volta ({gpu.name}, sm70): Volta support ended with "
                f"TensorRT 10.4; install TensorRT 10.4 or older")
    return None


def trtllm_problem(gpu: GpuInfo, mode: str, *, int8_kv: bool = False) -> str | None:
    """Why TensorRT-LLM cannot build/run the decoder in ``mode`` on this GPU, or None."""
    if mode not in MODE_MIN_SM:
        fail(f"unknown decoder mode '{mode}' (known: {', '.join(MODE_MIN_SM)})")
    if gpu.tensorrt_llm is None:
        return "TensorRT-LLM is not installed"
    if gpu.tensorrt_error:  # TensorRT-LLM loads TensorRT
        return f"TensorRT-LLM needs TensorRT, and TensorRT {gpu.tensorrt} does not import ({gpu.tensorrt_error})"
    version = parse_version(gpu.tensorrt_llm)
    if gpu.sm < VOLTA or gpu.sm == XAVIER:
        return f"TensorRT-LLM does not support {gpu.name} ({gpu.sm_tag})"
    if gpu.sm == ORIN and version[:2] != ORIN_TRTLLM:
        return (f"on Jetson Orin TensorRT-LLM runs only from the v0.12.0-jetson branch (JetPack 6.1); "
                f"found TensorRT-LLM {gpu.tensorrt_llm}")
    if gpu.sm == VOLTA and version[:2] > LAST_TRTLLM_FOR_VOLTA:
        return (f"TensorRT-LLM {gpu.tensorrt_llm} does not support V100 (sm70): V100 support ended with "
                f"TensorRT-LLM 0.14; install 0.14 or older")
    need = MODE_MIN_SM[mode]
    if gpu.sm < need:
        hint = " (use --precision int8 without --int8-decoder smoothquant: weight-only INT8 runs here)" \
            if mode == "w8a8_sq" else ""
        return f"{MODE_LABELS[mode]} needs {sm_tag(need)} or newer; {gpu.name} is {gpu.sm_tag}{hint}"
    if int8_kv and mode == "fp8":
        return "an INT8 KV cache cannot be combined with FP8"
    return None


def loaded_tensorrt_problem(recorded: str | None, loaded: str) -> str | None:
    """Why the imported ``tensorrt`` module (``trt.__version__``) is not the TensorRT that ``recorded``
    names (``GpuInfo.tensorrt``, read from package metadata, or an engine stamp), or None.

    Engines and timing caches are only valid for the exact TensorRT release that made them, and pip's
    ``tensorrt`` metapackage metadata can disagree with the ``tensorrt_cuXX`` bindings actually imported
    (e.g. after upgrading only the bindings). Compared on the releases' common length, because official
    wheels report major.minor.patch while other installs may add the build number."""
    if recorded is None:
        return f"TensorRT {loaded} is imported but no TensorRT version was recorded for it"
    a, b = parse_version(recorded), parse_version(loaded)
    n = min(len(a), len(b), 4)
    if a[:n] != b[:n]:
        return (f"the imported tensorrt module is version {loaded}, but TensorRT {recorded} was expected (installed "
                f"package metadata or the engine's stamp): reinstall one TensorRT release")
    return None


def check_tensorrt(gpu: GpuInfo) -> None:
    problem = tensorrt_problem(gpu)
    if problem:
        fail(problem)


def check_trtllm(gpu: GpuInfo, mode: str, *, int8_kv: bool = False) -> None:
    problem = trtllm_problem(gpu, mode, int8_kv=int8_kv)
    if problem:
        fail(problem)


# --- engine keys and stamps ------------------------------------------------------------------------

def sanitize(text: str) -> str:
    """A GPU name as a folder-name component: 'Tesla V100-SXM2-32GB' -> 'tesla-v100-sxm2-32gb'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def _version_tag(version: str | None) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", version) if version else "none"


def engine_key(gpu: GpuInfo, precision: str, *, trtllm: bool = False) -> str:
    """Folder name of an engine: GPU, sm, library versions and precision, e.g.
    ``tesla-v100-sxm2-32gb_sm70_trt10.4.0_fp16``; TensorRT-LLM engines add ``trtllm<version>``.

    Exactly what ``stamp_mismatch`` compares, so one folder holds the one engine a host can use and a
    rebuild replaces it. The CUDA version is left out for the reason it is not compared (the stamp still
    records it): with it, a rebuild after a CUDA update made a second folder beside the old engine."""
    parts = [sanitize(gpu.name), gpu.sm_tag]
    if trtllm:
        parts.append(f"trtllm{_version_tag(gpu.tensorrt_llm)}")
    parts += [f"trt{_version_tag(gpu.tensorrt)}", sanitize(precision)]
    return "_".join(parts)


def timing_cache_name(gpu: GpuInfo) -> str:
    """TensorRT timing caches are valid per GPU and TensorRT version, across precisions."""
    return f"timing_{sanitize(gpu.name)}_{gpu.sm_tag}_trt{_version_tag(gpu.tensorrt)}.cache"


def gpu_stamp(gpu: GpuInfo) -> dict[str, Any]:
    """What an engine's JSON stamp records about the machine that built it."""
    d = asdict(gpu)
    del d["tensorrt_error"]  # this host's state, not what the engine was built for
    d["sm"] = list(gpu.sm)
    return d


def stamp_gpu(stamp: dict[str, Any], where: Path | str = "an engine stamp") -> GpuInfo:
    try:
        g = stamp["gpu"]
        return GpuInfo(name=g["name"], sm=(int(g["sm"][0]), int(g["sm"][1])), cuda=g.get("cuda"),
                       tensorrt=g.get("tensorrt"), tensorrt_llm=g.get("tensorrt_llm"), memory_gib=g.get("memory_gib"))
    except (KeyError, TypeError, IndexError, ValueError) as e:
        fail(f"{where} is malformed ({e!r}); rebuild the engine")


def read_stamp(path: Path, fmt: str, keys: tuple[str, ...]) -> dict[str, Any] | None:
    """An engine stamp radtrt wrote, checked for what the lookups read; None for a file of another format (not
    radtrt's: passed over, where it made every run on the bundle fail). A damaged stamp of ours is one line
    naming it, not a KeyError traceback from whichever lookup read it first."""
    from radtrt.model.io import read_json

    stamp = read_json(path)
    if stamp.get("format") != fmt:
        return None
    missing = [key for key in keys if key not in stamp]
    if missing:
        fail(f"engine stamp {path} is malformed (no '{missing[0]}'); rebuild the engine")
    stamp_gpu(stamp, f"engine stamp {path}")
    return stamp


def refuse_missing_engine(vendor: str, what: str, bundle: Path, mismatches: list[tuple[str, bool]], *,
                          installed: bool, build: str, has: str = "") -> NoReturn:
    """The one line for a bundle without an engine this host runs (the vision engine's and the decoder's): one
    built elsewhere (``mismatches``: why, and whether for this GPU model), or none at all. Before ``vendor``'s
    library is ``installed`` no rebuild can help, and installing it runs an engine of this GPU model only (a
    V100's never runs on an Orin)."""
    if mismatches and not installed:
        mismatch, same = next((m for m in mismatches if m[1]), mismatches[0])
        fail(f"the {vendor} {what} in {bundle} was {mismatch}: " + (
            f"install {vendor} on this host (the version it was built with), or rebuild the engine once it is "
            "installed" if same else f"install {vendor} on this host, then rebuild it here with: {build}"))
    if mismatches:
        fail(f"the {vendor} {what} in {bundle} was {mismatches[0][0]}: rebuild it on this host with: {build}")
    fail(f"bundle {bundle} has no {vendor} {what}{has}; build one with: {build}")


def stamp_mismatch(stamp: dict[str, Any], gpu: GpuInfo, *, trtllm: bool = False) -> str | None:
    """One line naming both machines when an engine does not fit this one (GPU model, sm, TensorRT, and
    for TensorRT-LLM engines its version); None when it fits. CUDA minor versions are not compared:
    an engine is bound to the TensorRT build, not to the PyTorch CUDA runtime."""
    built = stamp_gpu(stamp)
    same = (built.name == gpu.name and built.sm == gpu.sm and built.tensorrt == gpu.tensorrt
            and (not trtllm or built.tensorrt_llm == gpu.tensorrt_llm))
    if same:
        return None
    return f"built for {built.describe(trtllm=trtllm)}; this host has {gpu.describe(trtllm=trtllm)}"


def same_gpu(stamp: dict[str, Any], gpu: GpuInfo) -> bool:
    """Whether an engine was built for this GPU model and compute capability (its libraries aside): only then can
    installing the libraries it was built with make it run here."""
    built = stamp_gpu(stamp)
    return built.name == gpu.name and built.sm == gpu.sm


def newest_first(found: list[tuple[Path, dict[str, Any]]]) -> list[tuple[Path, dict[str, Any]]]:
    """(stamp path, stamp) pairs of engines that all fit one host, the most recent build first.

    Bundles written while ``engine_key`` still held the CUDA version can have two folders for one engine
    (the rebuild after a CUDA update went to a new folder); the rebuild is the one to use, not whichever
    folder sorts first. The stamp's ``built`` time survives copying a bundle; the stamp file's mtime
    breaks ties within its second (and orders stamps that lack it)."""
    return sorted(found, key=lambda f: (str(f[1].get("built") or ""), f[0].stat().st_mtime_ns), reverse=True)


# --- radtrt doctor ---------------------------------------------------------------------------------

def capability_lines(gpu: GpuInfo | None, *, tritonserver: str | None = None) -> list[str]:
    """What of the TensorRT path can run on this host, and why not (pure; ``doctor_lines`` detects)."""
    if gpu is None:
        lines = ["TensorRT path: no CUDA GPU visible to PyTorch, so no TensorRT vision engine or TensorRT-LLM "
                 "decoder can be built or run here (CPU hosts use --backend onnxruntime or torch)"]
    else:
        mem = f", {gpu.memory_gib} GiB" if gpu.memory_gib else ""
        lines = [f"TensorRT path on {gpu.name} ({gpu.sm_tag}{mem}, CUDA {gpu.cuda or 'unknown'}):"]
        problem = tensorrt_problem(gpu)
        if problem is None:
            from radtrt.exporter.tensorrt import buildable_vision_precisions

            buildable = "/".join(buildable_vision_precisions(str(gpu.tensorrt)))
            lines.append(f"  vision engine (TensorRT {gpu.tensorrt}): {buildable} buildable"
                         + ("" if "int8" in buildable else " (INT8 Q/DQ engines need TensorRT 10 or newer)"))
        else:
            lines.append(f"  vision engine: no ({problem})")
        for mode in DECODER_MODES:
            why = trtllm_problem(gpu, mode)
            lines.append(f"  decoder {MODE_LABELS[mode]} (TensorRT-LLM {gpu.tensorrt_llm}): yes" if why is None
                         else f"  decoder {MODE_LABELS[mode]}: no ({why})")
        if trtllm_problem(gpu, "fp16") is None:
            lines.append("  INT8 KV cache: allowed with any decoder mode above (needs calibration scales)")
        lines.append("  --backend tensorrt: " + ("usable once the engines are built for this GPU"
                                                  if tensorrt_backend_possible(gpu) else "not usable here"))
    lines.append("Triton: " + (f"tritonserver at {tritonserver}" if tritonserver else
                               "tritonserver not on PATH (serve the 'radtrt export --target triton' repository "
                               "from NVIDIA's tritonserver container with the TensorRT-LLM backend)"))
    return lines


def tensorrt_backend_possible(gpu: GpuInfo | None) -> bool:
    """Whether this host can build and run both engines the tensorrt backend needs."""
    return gpu is not None and tensorrt_problem(gpu) is None and trtllm_problem(gpu, "fp16") is None


def doctor_lines() -> list[str]:
    """Lines for ``radtrt doctor`` about the TensorRT / TensorRT-LLM / Triton path on this host."""
    return capability_lines(detect_gpu(), tritonserver=shutil.which("tritonserver"))

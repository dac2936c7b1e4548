"""``radtrt doctor``: which backends can run here, and the reason when one cannot."""

from __future__ import annotations

import importlib
import platform

import torch


def _module_version(name: str) -> tuple[str | None, str]:
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        return None, f"not importable ({e.msg if hasattr(e, 'msg') else e})"
    except Exception as e:  # noqa: BLE001 - vendor stubs raise arbitrary errors on import; report, don't crash
        return None, f"import failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return getattr(module, "__version__", "unknown"), "ok"


def report() -> list[str]:
    lines = [f"python {platform.python_version()} on {platform.machine()} ({platform.system()})",
             f"torch {torch.__version__}: CUDA {'available' if torch.cuda.is_available() else 'not available'}"]
    for i in range(torch.cuda.device_count()):
        cap = torch.cuda.get_device_capability(i)
        lines.append(f"  GPU {i}: {torch.cuda.get_device_name(i)} (sm{cap[0]}{cap[1]})")
    version, status = _module_version("onnxruntime")
    version_ort = version
    if version:
        from radtrt.runtime.ort import available_providers, usable_providers

        try:
            built = available_providers()
            usable = usable_providers()
            failing = [p for p in built if p not in usable]
            lines.append(f"onnxruntime {version}: providers {', '.join(usable)}" + (
                f" (built in but not starting here: {', '.join(failing)})" if failing else ""))
        except Exception as e:  # noqa: BLE001 - a broken or stub install: report it, as for the imports above
            lines.append(f"onnxruntime {version}: cannot list its providers ({type(e).__name__}); reinstall it")
            version_ort = None
    else:
        lines.append(f"onnxruntime: {status}")
    version, status = _module_version("tensorrt")
    lines.append(f"TensorRT {version}" if version else f"TensorRT: {status}")
    from radtrt.exporter.gpu import doctor_lines, library_version

    # TensorRT-LLM's version comes from its package metadata: importing it starts MPI and CUDA and prints a banner
    # onto doctor's stdout (a broken MPI can abort the process outright); its import is tried where it is used
    trtllm = library_version("tensorrt_llm")
    lines.append(f"TensorRT-LLM {trtllm}" if trtllm else "TensorRT-LLM: not installed")

    lines.extend(doctor_lines())
    usable = ["torch" + (" (cpu, cuda)" if torch.cuda.is_available() else " (cpu)")]
    if version_ort:
        usable.append("onnxruntime")
    from radtrt.exporter.gpu import detect_gpu, tensorrt_backend_possible

    if tensorrt_backend_possible(detect_gpu()):  # the summary agreed with no "--backend tensorrt: usable" above
        usable.append("tensorrt (with engines built for this GPU)")
    lines.append("backends usable here: " + ", ".join(usable))
    from radtrt.errors import RadtrtError
    from radtrt.model.default_model import default_model_dir

    try:  # the folder to pass as --model where a command needs one (export, calibrate, bench)
        lines.append(f"embedded default model (phantoms only): {default_model_dir()}")
    except RadtrtError as e:
        lines.append(f"embedded default model: {e}")
    return lines

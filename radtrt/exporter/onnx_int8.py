"""INT8 bundle graphs: calibrate (or reuse a calibration), then the Q/DQ vision graph and an INT8 decoder.

``export_bundle(..., precision="int8", int8=Int8Plan(...))`` calls ``build_int8`` for the two graphs
instead of the float exports, and stores the embedding table as INT8 rows with a per-row scale
(dequantized to fp32 once at load: the table is a host-side lookup, so INT8 only saves bytes on
disk -- 98 MB at the mid-size config, where the bundle-size target needs it; each row is within half
a quantization step of fp32). Input embeddings and logits stay fp32. The calibration file travels
with the bundle (``calibration.safetensors``): ``radtrt export --target trtllm --bundle BUNDLE``
reuses its decoder statistics.

Attention: fused (ONNX Runtime's ``GroupQueryAttention``, ``radtrt.exporter.gqa``) over an fp32
cache by default, as in float bundles; ``--int8-kv-cache`` makes that cache int8 with per-channel
scales from the calibration (the prompt step still attends in fp32: ``gqa.float_prompt_attention``);
``--attention plain`` keeps the exported MatMul/Softmax graph (fp32 cache only). For TensorRT-LLM,
``--int8-kv-cache`` sets the engine's own INT8 cache.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from radtrt.errors import fail
from radtrt.exporter.gqa import ATTENTION_KINDS, DEFAULT_ATTENTION
from radtrt.exporter.quant import DEFAULT_ALPHA
from radtrt.exporter.targets import CALIBRATION_FILE
from radtrt.model.loading import LoadedModel

DEFAULT_PARITY_SAMPLES = 8
MAX_SAMPLES = 10_000


@dataclass(frozen=True)
class Int8Plan:
    """What the user asked for; ``calibration_data`` is a folder, manifest, calibration file or ``phantom``."""

    calibration_data: str | None
    decoder: str = "smoothquant"
    alpha: float = DEFAULT_ALPHA
    lm_head: bool = True
    n: int = 32
    embeddings: str = "int8"
    kv_cache: str = "fp32"
    attention: str = DEFAULT_ATTENTION
    parity_samples: int = DEFAULT_PARITY_SAMPLES
    parity_max_new_tokens: int = 64

    def __post_init__(self) -> None:
        from radtrt.exporter.int8_decoder import DECODER_METHODS

        if self.decoder not in DECODER_METHODS:
            fail(f"unknown --int8-decoder '{self.decoder}' ({', '.join(DECODER_METHODS)})")
        if not 0.0 <= self.alpha <= 1.0:
            fail(f"SmoothQuant alpha must be within [0, 1], got {self.alpha}")
        if self.kv_cache not in ("int8", "fp32"):
            fail(f"unknown KV-cache precision '{self.kv_cache}' (int8, fp32)")
        if self.attention not in ATTENTION_KINDS:
            fail(f"unknown --attention '{self.attention}' ({', '.join(ATTENTION_KINDS)})")
        if self.kv_cache == "int8" and self.attention != "fused":
            fail("--int8-kv-cache needs the fused attention (leave out --attention plain)")
        if self.embeddings not in ("int8", "fp32"):
            fail(f"unknown embedding-table precision '{self.embeddings}' (int8, fp32)")
        if self.n < 1 or self.parity_samples < 0:
            fail("the calibration sample count must be at least 1 and the parity sample count not negative")
        if max(self.n, self.parity_samples) > MAX_SAMPLES:  # phantoms would be generated without end
            fail(f"--calibration-n and --parity-samples are at most {MAX_SAMPLES} (a few dozen calibrate well)")

    def check_ready(self) -> None:
        """Before the model loads (minutes at 7B): what the export will read must be there."""
        if self.calibration_data is None:
            fail("INT8 export needs calibration data: pass --calibration-data DIR|MANIFEST|CALIB_FILE (chest X-ray "
                 "studies, or a 'radtrt calibrate' file), or '--calibration-data phantom' for synthetic phantoms")
        if not self.calibration_data.strip():  # Path("") is the current folder, which exists
            fail("--calibration-data is empty: name a studies folder, a JSONL manifest, a 'radtrt calibrate' file, "
                 "or 'phantom'")
        from radtrt.calibration.run import means_phantoms
        from radtrt.calibration.samples import check_samples

        data = Path(self.calibration_data)
        if means_phantoms(self.calibration_data, calibration_files=True):
            return
        if not data.exists():
            fail(f"calibration data not found: {self.calibration_data}")
        from radtrt.model.io import is_safetensors

        if not is_safetensors(data):  # a calibration file is checked when it loads
            check_samples(data, self.n, held_out=self.parity_samples)
        elif self.parity_samples:  # its held-out studies, as check_samples checks a folder's
            from radtrt.calibration.file import CalibrationFile
            from radtrt.calibration.run import check_heldout

            check_heldout(CalibrationFile.load(data), self.parity_samples)


@dataclass
class Int8Result:
    """The manifest's ``int8`` and ``calibration`` sections, and the calibration the graphs came from."""

    int8: dict[str, Any]
    calibration: dict[str, Any]
    calibration_run: Any  # radtrt.calibration.run.Calibration


def build_int8(loaded: LoadedModel, work: Path, plan: Int8Plan, *, progress: Any = None,
               step: Callable[[str], None] = lambda _: None) -> Int8Result:
    """Calibrate, write ``vision.onnx``, ``decoder.onnx`` and ``calibration.safetensors`` into ``work``."""
    from radtrt.calibration.run import resolve_calibration
    from radtrt.exporter.gqa import FusedAttention, kv_scales, rewrite_prompt_attention
    from radtrt.exporter.int8_decoder import quantize_smoothquant, quantize_weight_only
    from radtrt.exporter.int8_vision import quantize_vision
    from radtrt.exporter.onnx import export_decoder, export_vision

    plan.check_ready()
    model = loaded.model.float().eval()
    step("calibrating")
    calibration = resolve_calibration(loaded, plan.calibration_data, plan.n, progress=progress)
    calibration.file.without_paths().save(work / CALIBRATION_FILE)
    # the fp32 graphs to quantize (~27 GB at 7B) go inside ``work`` (OUT.partial), not beside it: a run killed
    # outright (the OOM killer, ``kill -9``) then leaves them where the next run's sweep of OUT.partial removes
    # them; a folder beside -o stayed for good, one more per killed run. Gone before the manifest is hashed.
    with tempfile.TemporaryDirectory(prefix=".radtrt-int8-", dir=work) as tmp_dir:
        tmp = Path(tmp_dir)
        step("exporting the fp32 vision graph to quantize")
        export_vision(model, tmp / "vision-fp32.onnx")
        step(f"quantizing vision.onnx (Q/DQ, ranges from {calibration.file.n} calibration images)")
        vision = quantize_vision(tmp / "vision-fp32.onnx", work / "vision.onnx", calibration.file.vision.inputs)
        cache = None if plan.attention == "plain" else ("int8" if plan.kv_cache == "int8" else "float32")
        if plan.decoder == "weight-only":
            step("exporting the fp32 decoder graph to quantize")
            fused = None if cache is None else FusedAttention(
                cache, kv_scales(calibration.file.decoder, model.cfg.decoder) if cache == "int8" else None)
            export_decoder(model.language_model, tmp / "decoder-fp32.onnx", fused=fused)
            step("quantizing decoder.onnx (weight-only INT8, MatMulNBits)")
            decoder = quantize_weight_only(tmp / "decoder-fp32.onnx", work / "decoder.onnx", lm_head=plan.lm_head,
                                           progress=progress)
        else:
            step(f"smoothing (alpha {plan.alpha}), exporting and quantizing decoder.onnx (W8A8)")
            decoder = quantize_smoothquant(model.language_model, calibration.file.decoder, work / "decoder.onnx", tmp,
                                           alpha=plan.alpha, lm_head=plan.lm_head, cache=cache, progress=progress)
        if cache == "int8":
            step("prompt attention in fp32, decode attention over the int8 cache")
            rewrite_prompt_attention(work / "decoder.onnx")
    int8 = {"vision_method": vision, "decoder_method": decoder,
            "alpha": plan.alpha if plan.decoder == "smoothquant" else None,
            "lm_head": "int8" if plan.lm_head else "fp32",
            "embeddings": ("int8 rows + fp32 per-row scale on disk, dequantized to fp32 at load" if plan.embeddings == "int8"
                           else "fp32"),
            "kv_cache": ("int8, per-channel symmetric scales from the calibration; the prompt step's attention in fp32, "
                         "its keys/values then quantized into the cache" if cache == "int8" else "fp32"),
            "image_embeds": "fp32 (a TensorRT/Triton fp16 deployment casts at its boundary)"}
    summary = calibration.file.summary() | {"file": CALIBRATION_FILE}
    if calibration.path is not None:
        summary["reused"] = True  # not its path or name: the bundle travels, and folders and files name patients
    return Int8Result(int8, summary, calibration)


def int8_parity(loaded: LoadedModel, bundle: Path, result: Int8Result, plan: Int8Plan, *,
                progress: Any = None) -> dict[str, Any] | None:
    """The parity gate on held-out samples (None when ``parity_samples`` is 0)."""
    from radtrt.calibration.parity import measure, summarize
    from radtrt.calibration.run import heldout_samples
    from radtrt.progress import progress_callback

    if plan.parity_samples == 0:
        return None
    samples, source = heldout_samples(loaded, result.calibration_run, plan.parity_samples, progress=progress)
    results = measure(bundle, loaded.model.float().eval(), loaded.tokenizer, samples,
                      max_new_tokens=plan.parity_max_new_tokens,
                      on_sample=progress_callback(progress, f"INT8 parity on {len(samples)} held-out samples", len(samples)))
    return summarize(results, source=source, max_new_tokens=plan.parity_max_new_tokens)

#!/usr/bin/env bash
# One run on a GPU host with TensorRT and TensorRT-LLM: build every precision this GPU allows
# (the TensorRT fp16 vision engine; TensorRT-LLM fp16, W8A16, SmoothQuant W8A8, with and without INT8 KV
# cache) and print the parity-vs-PyTorch and latency table, plus gpu_check.json. The INT8 (Q/DQ) vision
# engine is not built here: it comes from an INT8 bundle ('radtrt export --precision int8 ...', then
# 'radtrt export --target tensorrt --bundle THAT_BUNDLE').
#
#   benchmarks/gpu_check.sh [MODEL_DIR] [WORK_DIR]
#
# MODEL_DIR: a radtrt merged model ('radtrt convert'); without it a random-weight model with the
# real ViT-B/14 and a 12 x 1024 decoder ("mid") is used (parity and speed only: the text is noise).
# Exit code 2 on a refusal (no GPU; bad input, one 'radtrt: error:' line), 1 on a failure.
# Environment: STUDIES (what 'radtrt bench --studies' takes: a folder of studies or a phantom set;
# default 8 synthetic), MAX_BATCH (8), MAX_NEW_TOKENS (64),
# RUNS (3 timed runs per study), CALIB (a 'radtrt calibrate' file, or an ActivationStats .safetensors, for
# SmoothQuant / INT8 KV; default: maxima captured here from the reference on the studies - a stand-in, not a
# CXR calibration). A WORK_DIR from an earlier run is reused only for the same model and calibration.
# Then, where onnxruntime-gpu is installed: bench parity and latency of the fp16 bundle on ONNX Runtime's CUDA
# provider against PyTorch on the GPU (ort-cuda-parity.md, ort-cuda-latency.md).
set -euo pipefail

MODEL_DIR="${1:-}"
WORK_DIR="${2:-gpu-check}"
python -c "from radtrt.exporter.gpu import detect_gpu; import sys; sys.exit(detect_gpu() is None)" || {
  echo "gpu_check.sh: no CUDA GPU here (see 'radtrt doctor'); run it on the GPU host" >&2; exit 2; }
mkdir -p "$WORK_DIR"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv
radtrt doctor

MODEL_DIR="$MODEL_DIR" WORK_DIR="$WORK_DIR" python - <<'PY'
import functools
import json
import os
import statistics
import time
from pathlib import Path

import sys

import torch

from radtrt.errors import RadtrtError


def _one_line(kind, value, tb, hook=sys.excepthook):
    """radtrt's own refusals as the CLI prints them, not as tracebacks."""
    if issubclass(kind, RadtrtError):
        print(f"radtrt: error: {value}", file=sys.stderr)
        sys.stdout.flush()
        os._exit(2)  # the CLI's code for a refusal (bad input, a GPU or build this cannot run)
    else:
        hook(kind, value, tb)


sys.excepthook = _one_line

from radtrt.benchmarks.assets import study_paths
from radtrt.benchmarks.parity import cosine, first_divergence
from radtrt.exporter.bundle import BUNDLE_FINGERPRINT, export_bundle, read_manifest
from radtrt.exporter.gpu import detect_gpu, require_gpu, trtllm_problem
from radtrt.calibration.file import load_activation_stats
from radtrt.exporter.quant import DEFAULT_ALPHA, ActivationStats
from radtrt.exporter.targets import check_reusable_checkpoint, check_same_model
from radtrt.exporter.tensorrt import build_vision_engine
from radtrt.exporter.trtllm import mode_tag, write_trtllm_checkpoint
from radtrt.exporter.trtllm_build import BuildLimits, build_decoder_engine
from radtrt.model.config import preset
from radtrt.model.generate import greedy_generate
from radtrt.model.loading import LoadedModel, load_model, save_toolkit
from radtrt.model.tiny import random_model, train_tiny_tokenizer
from radtrt.runtime.backends import TorchBackend
from radtrt.runtime.pipeline import Pipeline
from radtrt.runtime.tensorrt import TensorRTBackend

work = Path(os.environ["WORK_DIR"]).resolve()
max_batch, max_new = int(os.environ.get("MAX_BATCH", 8)), int(os.environ.get("MAX_NEW_TOKENS", 64))
runs = int(os.environ.get("RUNS", 3))
gpu = require_gpu(detect_gpu())
print(f"GPU: {gpu.describe(trtllm=True)}", flush=True)

if os.environ["MODEL_DIR"]:
    loaded = load_model(Path(os.environ["MODEL_DIR"]))
else:
    loaded = LoadedModel(random_model(preset("mid"), seed=0), train_tiny_tokenizer(), "mid-random")
    if not (work / "model" / "config.json").is_file():  # an earlier run's: the same seeded weights
        save_toolkit(loaded, work / "model")
cfg = loaded.model.cfg
bundle = work / "bundle-fp16"
if (bundle / "manifest.json").is_file():
    check_same_model(bundle, loaded.model)  # an earlier run's WORK_DIR with another MODEL_DIR is refused
else:
    export_bundle(loaded, bundle, precision="fp16")  # also checks ONNX Runtime against PyTorch
weights = read_manifest(bundle, verify=False)["model"][BUNDLE_FINGERPRINT]  # kept by its TensorRT-LLM checkpoints
# read as 'radtrt bench --studies' reads it (the ONNX Runtime check below passes it there): a phantom set's
# manifest, hidden files and a synthetic set's records are not studies
studies = study_paths(Path(os.environ["STUDIES"]) if os.environ.get("STUDIES") else None, None, work, 8)

# CALIB is checked against the weights it was made from: before the in-place float16 cast below
stats = load_activation_stats(Path(os.environ["CALIB"]), loaded.model) if os.environ.get("CALIB") else None
reference = Pipeline(TorchBackend(loaded.model.to("cuda", torch.float16).eval(), "cuda"), loaded.tokenizer, cfg)
prepared = [reference.prepare(s) for s in studies]
lm = loaded.model.language_model

# --- calibration stand-in: per-channel maxima of each decoder linear over the studies' prompts ----
if stats is None:
    ins, outs = {}, {}
    def hook(name, _m, args, out):
        x, y = args[0].float().abs().flatten(0, -2).amax(0), out.float().abs().flatten(0, -2).amax(0)
        ins[name] = torch.maximum(ins[name], x) if name in ins else x
        outs[name] = torch.maximum(outs[name], y) if name in outs else y
    handles = [m.register_forward_hook(functools.partial(hook, n)) for n, m in lm.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    with torch.no_grad():
        for p in prepared:
            image = reference.backend.encode_images(p.pixels[None])[0]
            embeds = reference.backend.embed_prompt(p.prompt_ids, image)
            greedy_generate(lm, [embeds], eos_token_id=-1, max_new_tokens=1)
    for h in handles:
        h.remove()
    stats = ActivationStats({k: v.cpu() for k, v in ins.items()}, {k: v.cpu() for k, v in outs.items()},
                            description=f"gpu_check stand-in: {len(prepared)} studies")

# --- builds -------------------------------------------------------------------------------------
vision_precisions = ["fp16"]
build_vision_engine(bundle, gpu, max_batch=max_batch)
limits = BuildLimits.for_llava(cfg.num_image_tokens, max_batch=max_batch, max_new_tokens=max(max_new, 256),
                               max_position_embeddings=cfg.decoder.max_position_embeddings)
modes = [(m, kv) for m in ("fp16", "w8a16", "w8a8_sq") for kv in (False, True)]
built, skipped = [], []
for mode, kv in modes:
    why = trtllm_problem(gpu, mode, int8_kv=kv)
    if why:
        skipped.append((mode_tag(mode, kv), why))
        continue
    ckpt = bundle / "trtllm" / f"checkpoint-{mode_tag(mode, kv)}"
    if ckpt.is_dir():  # same model (checked above); same calibration and alpha, or refused
        check_reusable_checkpoint(ckpt, DEFAULT_ALPHA if mode == "w8a8_sq" else None, stats.identity, weights)
    else:
        write_trtllm_checkpoint(loaded.model.language_model, ckpt, mode, smoothquant_stats=stats, int8_kv=kv,
                                bundle_weights=weights)
    t0 = time.perf_counter()
    build_decoder_engine(bundle, ckpt, gpu, limits, gather_generation_logits=True)  # parity's logits
    print(f"built TensorRT-LLM {mode_tag(mode, kv)} in {time.perf_counter() - t0:.0f} s", flush=True)
    built.append((mode, kv, ckpt))

# --- parity and latency ---------------------------------------------------------------------------
def measure(pipeline, with_logits):
    rows = []
    for p in prepared:
        t0 = time.perf_counter()
        image = pipeline.backend.encode_images(p.pixels[None])[0]
        torch.cuda.synchronize()
        vision_ms = (time.perf_counter() - t0) * 1e3
        gen = pipeline.backend.generate([pipeline.backend.embed_prompt(p.prompt_ids, image)], max_new_tokens=max_new,
                                        eos_token_id=loaded.tokenizer.eos_token_id, keep_logits=with_logits)
        rows.append((image.float().cpu(), gen, vision_ms))
    return rows

def latency(pipeline):
    vis, pre, dec = [], [], []
    for _ in range(runs):
        for _image, gen, vision_ms in measure(pipeline, False):
            vis.append(vision_ms)
            pre.append(gen.prefill_ms)
            dec.append(gen.decode_ms / max(gen.decode_steps(max_new), 1))
    return statistics.median(vis), statistics.median(pre), statistics.median(dec)

ref_rows = measure(reference, True)
table = [{"vision": "torch fp16", "decoder": "torch fp16", "latency_ms": latency(reference)}]
def trt_pipeline(mode, kv, vp):
    backend = TensorRTBackend(bundle, decoder=mode_tag(mode, kv), vision_precision=vp, gpu=gpu, verify=False)
    return Pipeline(backend, loaded.tokenizer, cfg)

for mode, kv, ckpt in built:
    rows_of = {}
    for vp in vision_precisions:
        pipe = trt_pipeline(mode, kv, vp)
        rows = measure(pipe, True)
        exact = sum(r[1].token_ids == g[1].token_ids for r, g in zip(ref_rows, rows, strict=True)) / len(rows)
        div = [first_divergence(g[1].token_ids[0], r[1].token_ids[0]) for r, g in zip(ref_rows, rows, strict=True)]
        logit = max(float((g[1].first_logits - r[1].first_logits.cpu()).abs().max())
                    for r, g in zip(ref_rows, rows, strict=True))
        rows_of[vp] = {"vision": f"TensorRT {vp}", "decoder": f"TensorRT-LLM {mode_tag(mode, kv)}",
                       "exact_match": exact, "first_divergences": div, "first_logits_max_abs_diff": logit,
                       "vision_cosine_min": min(cosine(g[0], r[0]) for r, g in zip(ref_rows, rows, strict=True))}
        del pipe
        torch.cuda.empty_cache()
    # latency on the same engine built without its logits, which TensorRT-LLM before 1.0 copies at every
    # streamed step (the backend runs such an engine in one call, so no time to first token); it is the engine
    # left for serving
    t0 = time.perf_counter()
    build_decoder_engine(bundle, ckpt, gpu, limits, gather_generation_logits=False)
    print(f"rebuilt TensorRT-LLM {mode_tag(mode, kv)} without logits in {time.perf_counter() - t0:.0f} s", flush=True)
    for vp in vision_precisions:
        pipe = trt_pipeline(mode, kv, vp)
        table.append({**rows_of[vp], "latency_ms": latency(pipe)})
        del pipe
        torch.cuda.empty_cache()

print(f"\n## gpu_check: {gpu.describe(trtllm=True)}; {len(prepared)} studies, {max_new} new tokens, "
      f"model {loaded.name}; reference: PyTorch fp16 on the same GPU\n")
print("| vision | decoder | exact match | first divergence (per study) | first-logit max abs diff | "
      "vision cosine min | vision ms | prefill ms | decode ms/token |")
print("|---|---|---|---|---|---|---|---|---|")
for row in table:
    v, p, d = row["latency_ms"]
    print(f"| {row['vision']} | {row['decoder']} | {row.get('exact_match', 1.0):.0%} | "
          f"{row.get('first_divergences', '-')} | {row.get('first_logits_max_abs_diff', 0.0):.3g} | "
          f"{row.get('vision_cosine_min', 1.0):.5f} | {v:.1f} | {p:.1f} | {d:.2f} |")
for tag, why in skipped:
    print(f"- skipped TensorRT-LLM {tag}: {why}")
(work / "gpu_check.json").write_text(json.dumps({"gpu": gpu.describe(trtllm=True), "model": loaded.name,
                                                  "studies": len(prepared), "max_new_tokens": max_new,
                                                  "rows": table, "skipped": skipped}, indent=2, default=str))
print(f"\nwrote {work / 'gpu_check.json'}")
PY

# --- ONNX Runtime's CUDA provider on the same fp16 bundle (fused attention, KV cache kept on the GPU) ---
MODEL="${MODEL_DIR:-$WORK_DIR/model}"
STUDY_DIR="${STUDIES:-$WORK_DIR/studies}"
if python -c "import sys, onnxruntime as o; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
  radtrt bench parity --bundle "$WORK_DIR/bundle-fp16" --model "$MODEL" --backend onnxruntime --ort-provider cuda \
    --device cuda --studies "$STUDY_DIR" --max-new-tokens "${MAX_NEW_TOKENS:-64}" -o "$WORK_DIR/ort-cuda-parity.md"
  radtrt bench latency --bundle "$WORK_DIR/bundle-fp16" --model "$MODEL" --backend onnxruntime --ort-provider cuda \
    --vs-backend torch --device cuda --studies "$STUDY_DIR" --runs "${RUNS:-3}" \
    --max-new-tokens "${MAX_NEW_TOKENS:-64}" -o "$WORK_DIR/ort-cuda-latency.md"
else
  echo "ONNX Runtime here has no CUDAExecutionProvider (pip install onnxruntime-gpu): its CUDA check skipped"
fi

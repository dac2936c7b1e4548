#!/usr/bin/env python
"""INT8 vs fp32 bundle speed, measured in one run with the bundles interleaved (A,B,.. then ..,B,A).

  python tools/int8_speed.py vision  FP32_BUNDLE INT8_BUNDLE [...] [--runs 5] [--threads 2]
  python tools/int8_speed.py decoder FP32_BUNDLE INT8_BUNDLE [...] [--runs 3] [--new-tokens 64]

vision: seconds per image of ``vision.onnx`` on phantom pixels (and the cosine of each bundle's image
embeddings to the first bundle's). decoder: ``OrtBackend.generate`` on the real prompt shape (the
v1 prompt with the model's image tokens), EOS disabled so every run decodes exactly ``--new-tokens``;
prefill ms and decode tokens/s. Ratios are against the first bundle, from medians (and minima) of
this run. The machine's load average is printed before and after: on a shared machine, rerun when
it was high. `radtrt bench latency` measures one bundle per run; this compares bundles in one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def _phantom_pixels(image_size: int, n: int) -> list[torch.Tensor]:
    from radtrt.calibration.run import phantom_source
    from radtrt.data.manifest import read_manifest
    from radtrt.imaging.preprocess import preprocess
    from radtrt.imaging.study import load_study

    with phantom_source(n, 99) as manifest:
        return [preprocess(load_study(r.image_path(manifest.parent)).pixels_u8, image_size)
                for r in read_manifest(manifest)]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a64 @ b64 / np.linalg.norm(a64) / np.linalg.norm(b64))


def _report(names: list[str], times: list[list[float]], unit: str, scale: float = 1.0) -> None:
    base_med, base_min = statistics.median(times[0]), min(times[0])
    for name, t in zip(names, times):
        med, low = statistics.median(t), min(t)
        print(f"  {name:40s} median {med * scale:9.3f} {unit}  min {low * scale:9.3f} {unit}  "
              f"speed-up {base_med / med:5.2f}x (min {base_min / low:5.2f}x)")


def vision(bundles: list[Path], runs: int, threads: int | None) -> None:
    import onnxruntime as ort

    from radtrt.exporter.bundle import read_manifest

    size = read_manifest(bundles[0])["vision"]["image_size"]
    pixels = _phantom_pixels(size, 2)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sessions = [ort.InferenceSession(str(b / "vision.onnx"), opts, providers=["CPUExecutionProvider"]) for b in bundles]
    feeds = [{"pixel_values": p[None].numpy()} for p in pixels]
    outs = [[s.run(None, f)[0] for f in feeds] for s in sessions]  # also the warm-up
    for b, o in zip(bundles, outs):
        cos = [_cosine(x, y) for x, y in zip(o, outs[0])]
        print(f"  {b.name}: image-embedding cosine to {bundles[0].name}: min {min(cos):.5f}")
    times: list[list[float]] = [[] for _ in bundles]
    for r in range(runs):
        for i in (range(len(bundles)) if r % 2 == 0 else reversed(range(len(bundles)))):
            t0 = time.perf_counter()
            sessions[i].run(None, feeds[0])
            times[i].append(time.perf_counter() - t0)
    print(f"vision.onnx, one {size} px image, {runs} runs, threads {threads or 'ORT default'}:")
    _report([b.name for b in bundles], times, "s")


def decoder(bundles: list[Path], runs: int, new_tokens: int, threads: int | None) -> None:
    from radtrt.model.config import LlavaRadConfig
    from radtrt.model.io import read_json
    from radtrt.model.tokenizer import LlamaSPTokenizer
    from radtrt.runtime.ort import OrtBackend
    from radtrt.runtime.pipeline import Pipeline

    backends = [OrtBackend(b, threads=threads) for b in bundles]
    cfg = LlavaRadConfig.from_dict(read_json(bundles[0] / "model_config.json"))
    pipeline = Pipeline(backends[0], LlamaSPTokenizer.from_dir(bundles[0]), cfg)
    pixels = _phantom_pixels(cfg.vision.img_size, 1)[0]
    image = backends[0].encode_images(pixels[None])[0]
    embeds = [backends[0].embed_prompt(pipeline.prompt_ids(None), image)]
    print(f"prompt {embeds[0].shape[0]} positions ({cfg.num_image_tokens} image tokens), {new_tokens} new tokens")
    for b in backends:
        b.generate(embeds, max_new_tokens=2, eos_token_id=-1)  # warm-up
    prefill: list[list[float]] = [[] for _ in bundles]
    decode: list[list[float]] = [[] for _ in bundles]
    for r in range(runs):
        for i in (range(len(bundles)) if r % 2 == 0 else reversed(range(len(bundles)))):
            gen = backends[i].generate(embeds, max_new_tokens=new_tokens, eos_token_id=-1)
            prefill[i].append(gen.prefill_ms / 1e3)
            decode[i].append(gen.decode_ms / 1e3 / max(gen.n_decode_steps, 1))
    print(f"decoder.onnx prefill, {runs} runs, threads {threads or 'ORT default'}:")
    _report([b.name for b in bundles], prefill, "s")
    print("decoder.onnx decode, seconds per token (speed-up = tokens/s ratio):")
    _report([b.name for b in bundles], decode, "ms", 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["vision", "decoder"])
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})")
    if args.what == "vision":
        vision(args.bundles, args.runs, args.threads)
    else:
        decoder(args.bundles, args.runs, args.new_tokens, args.threads)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

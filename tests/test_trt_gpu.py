"""GPU-only: real TensorRT / TensorRT-LLM builds on the tiny model, against ONNX Runtime and PyTorch.

Marked ``gpu``; each test skips unless CUDA and the vendor library are present, so on CPU machines
the file is collected and skipped in milliseconds. ``benchmarks/gpu_check.sh`` runs the real-size
parity and latency table on a GPU host.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def gpu_tiny_model():  # noqa: ANN201
    """The tiny model with a decoder TensorRT-LLM's kernels accept (head size 64, dims multiples of 64)."""
    from radtrt.model.config import DecoderConfig, LlavaRadConfig, tiny_vision
    from radtrt.model.tiny import random_model

    decoder = DecoderConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return random_model(LlavaRadConfig(vision=tiny_vision(), decoder=decoder), seed=5)


@pytest.fixture(scope="module")
def fp16_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from radtrt.exporter.bundle import export_bundle
    from radtrt.model.loading import LoadedModel
    from radtrt.model.tiny import train_tiny_tokenizer

    out = tmp_path_factory.mktemp("gpu") / "bundle"
    export_bundle(LoadedModel(gpu_tiny_model(), train_tiny_tokenizer(), "gpu-tiny"), out, precision="fp16")
    return out


@needs_cuda
def test_vision_engine_matches_onnxruntime(fp16_bundle: Path) -> None:
    pytest.importorskip("tensorrt")
    from radtrt.exporter.gpu import detect_gpu
    from radtrt.exporter.tensorrt import build_vision_engine, find_vision_engine
    from radtrt.runtime.ort import OrtBackend
    from radtrt.runtime.tensorrt import TrtVisionEngine

    gpu = detect_gpu()
    assert gpu is not None
    build_vision_engine(fp16_bundle, gpu, max_batch=4)
    engine, stamp = find_vision_engine(fp16_bundle, gpu, "fp16")
    assert stamp["plan"]["strongly_typed"] and (fp16_bundle / "tensorrt" / stamp["timing_cache"]).is_file()
    pixels = torch.randn(5, 3, 56, 56, generator=torch.Generator().manual_seed(0))  # 4 + 1: split at the profile
    got = TrtVisionEngine(engine, stamp)(pixels).float().cpu()
    ref = OrtBackend(fp16_bundle, verify=False).encode_images(pixels).float()
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-2


@needs_cuda
def test_tensorrt_backend_matches_torch(fp16_bundle: Path) -> None:
    pytest.importorskip("tensorrt")
    pytest.importorskip("tensorrt_llm")
    from radtrt.exporter.bundle import BUNDLE_FINGERPRINT, read_manifest
    from radtrt.exporter.gpu import detect_gpu
    from radtrt.exporter.tensorrt import build_vision_engine
    from radtrt.exporter.trtllm import write_trtllm_checkpoint
    from radtrt.exporter.trtllm_build import BuildLimits, build_decoder_engine
    from radtrt.model.generate import greedy_generate
    from radtrt.runtime.tensorrt import TensorRTBackend

    gpu = detect_gpu()
    assert gpu is not None
    model = gpu_tiny_model().to("cuda", torch.float16).eval()
    build_vision_engine(fp16_bundle, gpu, max_batch=2)
    weights = read_manifest(fp16_bundle, verify=False)["model"][BUNDLE_FINGERPRINT]  # the engine is checked by it
    ckpt = write_trtllm_checkpoint(model.language_model, fp16_bundle / "trtllm" / "checkpoint-fp16", "fp16",
                                   bundle_weights=weights)
    build_decoder_engine(fp16_bundle, ckpt, gpu, BuildLimits.for_llava(16, max_batch=2, max_text_tokens=64,
                                                                       max_new_tokens=16, max_position_embeddings=512),
                         gather_generation_logits=True)
    backend = TensorRTBackend(fp16_bundle, decoder="fp16", gpu=gpu, verify=False)
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    prompt = [1, 31, 45, -200, 13, 101, 29]  # ids of the tiny 512-token vocabulary
    embeds = backend.embed_prompt(prompt, backend.encode_images(pixels)[0])
    got = backend.generate([embeds], max_new_tokens=8, eos_token_id=-1, keep_logits=True)
    with torch.no_grad():
        image = model.encode_images(pixels.to("cuda", torch.float16))[0]
        ref = greedy_generate(model.language_model, [model.embed_multimodal(prompt, image)], eos_token_id=-1,
                              max_new_tokens=8, keep_logits=True)
    assert got.first_logits is not None and ref.first_logits is not None
    err = (got.first_logits - ref.first_logits.cpu()).abs().max() / ref.first_logits.abs().max()
    assert float(err) < 2e-2
    assert got.token_ids[0][:4] == ref.token_ids[0][:4]

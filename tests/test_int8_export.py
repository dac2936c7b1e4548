"""INT8 bundles (tiny model): graphs, manifest, refusals, runtime, parity against the fp32 reference.

Stated bounds for the tiny random-weight model: image-embedding cosine >= 0.99 on held-out phantom
pixels (measured 0.996); first-step logits on a held-out prompt within 2% of the reference's logit
range (measured 0.1% weight-only, 0.7% SmoothQuant W8A8; 7.7% with full-range weights, whose
products saturate in ONNX Runtime's AVX2 kernels).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from typer.testing import CliRunner

from radtrt.calibration.file import CalibrationFile
from radtrt.calibration.samples import sample_list_hash
from radtrt.model.io import sha256_file
from radtrt.cli import app
from radtrt.errors import RadtrtError
from radtrt.exporter.bundle import read_manifest
from radtrt.exporter.int8_decoder import lm_head_node
from radtrt.exporter.onnx import VISION_ROOT, module_of
from radtrt.model.generate import greedy_generate
from radtrt.model.loading import load_model, save_toolkit

runner = CliRunner()
MIN_COSINE, MAX_LOGIT_REL, MAX_SQ_LOGIT_REL = 0.99, 0.02, 0.02


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random model without the conftest's random LoRA (whose large low-rank updates give
    activations unlike any trained model's); the shared tokenizer keeps prompts realistic."""
    from radtrt.model.loading import LoadedModel
    from radtrt.model.tiny import random_model, train_tiny_tokenizer

    loaded = LoadedModel(random_model(seed=0), train_tiny_tokenizer(), "tiny-random")
    return save_toolkit(loaded, tmp_path_factory.mktemp("m") / "model", dtype=torch.float32)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from radtrt.data.phantom_set import write_phantom_set

    return write_phantom_set(tmp_path_factory.mktemp("ph") / "set", 6, 7, rows=96, cols=80, formats=("png",)).parent


def _export(model_dir: Path, out: Path, *extra: str) -> Path:
    result = runner.invoke(app, ["export", "--model", str(model_dir), "-o", str(out), *extra])
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def bundle(model_dir: Path, phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-command INT8 export (default decoder: SmoothQuant W8A8), with a 2-study parity gate."""
    return _export(model_dir, tmp_path_factory.mktemp("b") / "b", "--precision", "int8", "--calibration-data",
                   str(phantoms), "--calibration-n", "3", "--parity-samples", "2")


@pytest.fixture(scope="module")
def weight_only(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The weight-only decoder graph alone (the library calls the export makes), lm_head left fp32."""
    from radtrt.exporter.int8_decoder import quantize_weight_only
    from radtrt.exporter.onnx import export_decoder

    out = tmp_path_factory.mktemp("w")
    export_decoder(load_model(model_dir).model.language_model, out / "fp32.onnx")
    info = quantize_weight_only(out / "fp32.onnx", out / "decoder.onnx", lm_head=False)
    assert info["bits"] == 8 and info["method"] == "weight-only"
    return out / "decoder.onnx"


def _ops(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _refused(args: list[str], match: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("radtrt: error:") and match in result.stderr
    assert "Traceback" not in result.stderr


def test_int8_without_calibration_data_is_refused_before_loading(tmp_path: Path) -> None:
    """One line, before any model is read (the model path does not even exist)."""
    _refused(["export", "--model", str(tmp_path / "no-model"), "--precision", "int8", "-o", str(tmp_path / "b")],
             "needs calibration data")
    _refused(["export", "--model", str(tmp_path / "no-model"), "--precision", "int8", "--calibration-data", "phantom",
              "--int8-decoder", "w4", "-o", str(tmp_path / "b")], "unknown --int8-decoder")


def test_calibration_studies_are_screened_before_loading(tmp_path: Path) -> None:
    """Too few samples, or a CT among them, failed the export after the model loaded (minutes at 7B)."""
    from radtrt.imaging.synthetic import synthetic_chest, write_radiograph

    data = tmp_path / "studies"
    write_radiograph(data / "a" / "pa.dcm", synthetic_chest(seed=1), view_position="PA", study_uid="1.2.3.1")
    write_radiograph(data / "b" / "pa.dcm", synthetic_chest(seed=2), view_position="PA", study_uid="1.2.3.2",
                     modality="CT")
    args = ["export", "--model", str(tmp_path / "no-model"), "--precision", "int8", "--calibration-data", str(data)]
    _refused([*args, "--calibration-n", "3", "-o", str(tmp_path / "o1")], "has 2 samples; 3 are needed")
    _refused([*args, "--calibration-n", "2", "-o", str(tmp_path / "o2")], "b: no usable image in folder: pa.dcm: ")
    # the first study calibrates; the second is read by the parity gate, after calibration and quantization
    _refused([*args, "--calibration-n", "1", "-o", str(tmp_path / "o3")], "b: no usable image in folder: pa.dcm: ")
    _refused([*args, "--calibration-n", "1", "--parity-samples", "0", "-o", str(tmp_path / "o3")],
             "model directory not found")
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


def test_the_fp32_graphs_to_quantize_lie_inside_the_work_folder(model_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed outright (the OOM killer) while the fp32 graphs existed left .radtrt-int8-XXXX beside -o (27 GB
    at 7B), which nothing removed; inside OUT.partial, the next run's sweep removes it."""
    import radtrt.exporter.onnx as onnx_export
    from radtrt.errors import fail

    out, seen = tmp_path / "out" / "b", {}

    def killed_here(model: Any, path: Path, *args: Any, **kwargs: Any) -> None:
        seen["path"], seen["beside"] = path, sorted(p.name for p in out.parent.iterdir())
        fail("stopped by the test")  # what a SIGKILL leaves is what is on disk now

    monkeypatch.setattr(onnx_export, "export_vision", killed_here)
    _refused(["export", "--model", str(model_dir), "--precision", "int8", "--calibration-data", "phantom",
              "--calibration-n", "1", "--parity-samples", "0", "-o", str(out)], "stopped by the test")
    assert seen["path"].is_relative_to(out.parent / "b.partial") and seen["beside"] == ["b.partial"]
    assert not out.parent.exists()  # nothing left: the parent folder this run made for -o is taken back too


def test_vision_graph_is_qdq_with_per_channel_weights_and_float_norms(bundle: Path) -> None:
    model = onnx.load(str(bundle / "vision.onnx"))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    matmul_weights = [n for n in weight_dq if consumers[n.output[0]][0].op_type == "MatMul"]
    blocks = 2  # tiny trunk: 3 blocks, hidden state -2 needs 2; qkv, proj, fc1, fc2 quantized in each
    assert len(matmul_weights) == 4 * blocks
    float_linears = sorted(module_of(n, VISION_ROOT) for n in model.graph.node if n.op_type == "MatMul"
                           and any(i in inits and inits[i].dtype.name == "float32" for i in n.input))
    assert float_linears == ["mm_projector.0", "mm_projector.2"]  # KEEP_FLOAT, by measurement
    for n in matmul_weights:
        w, scale = inits[n.input[0]], inits[n.input[1]]
        assert str(w.dtype) == "int8" and scale.shape == (w.shape[1],)  # one scale per output channel
        assert int(abs(w.astype("int32")).max()) == 64  # 7-bit range: no int16 saturation (ORT_REDUCE_RANGE)
        assert [a.i for a in n.attribute if a.name == "axis"] == [1]
        assert not inits[n.input[2]].any()  # symmetric: zero point 0
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":  # activations: int8, symmetric
            zp = inits[n.input[2]]
            assert str(zp.dtype) == "int8" and not zp.any()
        if n.op_type in ("LayerNormalization", "Softmax", "Erf"):  # computed in float: no DQ feeds them
            assert all(producer[i].op_type != "DequantizeLinear" for i in n.input if i in producer)
        if n.op_type == "Softmax":  # and the attention probabilities are never quantized
            assert all(c.op_type != "QuantizeLinear" for c in consumers.get(n.output[0], []))
    activation_matmuls = [n for n in model.graph.node if n.op_type == "MatMul"
                          and all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear"
                                  for i in n.input)]
    assert len(activation_matmuls) == 2 * blocks + len(float_linears)  # q@k, p@v and KEEP_FLOAT stay float


def _activation_scales(path: Path) -> dict[str, float]:
    """Module -> the scale of the QuantizeLinear feeding its activation input, in a Q/DQ vision graph."""
    model = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    by_dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in inits}
    scales = {}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Conv") and node.input[0] in by_dq:
            scales[module_of(node, VISION_ROOT)] = float(inits[by_dq[node.input[0]].input[1]])
    return scales


def test_vision_scales_come_from_the_calibration_file_and_match_onnx_runtime_calibration(
        bundle: Path, model_dir: Path, phantoms: Path, tmp_path: Path) -> None:
    """Each activation scale is the calibration's input absmax / 127, and ONNX Runtime's own MinMax
    calibration of the fp32 graph over the same images gives the same scales (to float rounding)."""
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    from radtrt.calibration.run import calibrate
    from radtrt.exporter.int8_vision import KEEP_FLOAT, VISION_OP_TYPES, activation_matmuls, float_modules
    from radtrt.exporter.onnx import export_vision

    mine = _activation_scales(bundle / "vision.onnx")
    calib = CalibrationFile.load(bundle / "calibration.safetensors")
    assert len(mine) == 1 + 4 * 2  # patch conv, then qkv, proj, fc1, fc2 of the 2 blocks in use
    for module, scale in mine.items():
        assert scale == pytest.approx(float(calib.vision.inputs[module].max()) / 127, rel=1e-6), module

    loaded = load_model(model_dir)
    pixels = [s.pixels for s in calibrate(loaded, phantoms, 3).samples]  # the bundle's calibration images

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"pixel_values": p[None].numpy()} for p in pixels])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    fp32 = tmp_path / "vision-fp32.onnx"
    export_vision(loaded.model.float().eval(), fp32)
    quantize_static(str(fp32), str(tmp_path / "ort.onnx"), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, reduce_range=True,
                    op_types_to_quantize=VISION_OP_TYPES,
                    nodes_to_exclude=activation_matmuls(fp32) + float_modules(fp32, KEEP_FLOAT),
                    calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                                   "OpTypesToExcludeOutputQuantization": VISION_OP_TYPES})
    theirs = _activation_scales(tmp_path / "ort.onnx")
    assert theirs.keys() == mine.keys()
    for module in mine:
        assert mine[module] == pytest.approx(theirs[module], rel=1e-5), module


def test_vision_quantization_refuses_a_calibration_without_its_modules(bundle: Path, model_dir: Path,
                                                                       tmp_path: Path) -> None:
    from radtrt.exporter.int8_vision import quantize_vision
    from radtrt.exporter.onnx import export_vision

    fp32 = tmp_path / "vision-fp32.onnx"
    export_vision(load_model(model_dir).model.float().eval(), fp32)
    inputs = dict(CalibrationFile.load(bundle / "calibration.safetensors").vision.inputs)
    del inputs["vision_tower.blocks.1.mlp.fc1"]
    with pytest.raises(RadtrtError, match="no vision statistics for 'vision_tower.blocks.1.mlp.fc1'"):
        quantize_vision(fp32, tmp_path / "v.onnx", inputs)
    assert not (tmp_path / "v.onnx").exists()


def _first_logits(decoder: Path, model_dir: Path, phantoms: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(ONNX Runtime, fp32 torch) first-step logits of a held-out prompt with its image."""
    import numpy as np
    import onnxruntime as ort

    from radtrt.calibration.run import calibrate
    from radtrt.exporter.gqa import SEQLENS, TOTAL, io_names as gqa_io_names
    from radtrt.exporter.onnx import decoder_io_names

    loaded = load_model(model_dir)
    lm, cfg = loaded.model.language_model, loaded.model.language_model.cfg
    sample = calibrate(loaded, phantoms, 1, skip=4).samples[0]
    with torch.no_grad():
        x = loaded.model.embed_multimodal(sample.prompt_ids, loaded.model.encode_images(sample.pixels[None])[0])[None]
    session = ort.InferenceSession(str(decoder), providers=["CPUExecutionProvider"])
    t = x.shape[1]
    if SEQLENS in {i.name for i in session.get_inputs()}:  # fused attention: the cache holds the prompt
        names, _ = gqa_io_names(cfg.num_hidden_layers)
        kv_type = np.int8 if session.get_inputs()[3].type == "tensor(int8)" else np.float32
        cache = np.zeros((1, cfg.num_key_value_heads, t, cfg.head_dim), kv_type)
        feeds = {"inputs_embeds": x.numpy(), SEQLENS: np.array([t - 1], np.int32), TOTAL: np.array(t, np.int32),
                 **{n: cache for n in names[3:]}}
    else:
        names, _ = decoder_io_names(cfg.num_hidden_layers)
        empty = np.zeros((1, cfg.num_key_value_heads, 0, cfg.head_dim), np.float32)
        feeds = {"inputs_embeds": x.numpy(), "position_ids": np.arange(t)[None], "past_mask": np.zeros((1, 0), bool),
                 "new_mask": np.ones((1, t), bool), **{n: empty for n in names[4:]}}
    got = session.run(["logits"], feeds)[0]
    ref = greedy_generate(lm, [x[0]], eos_token_id=-1, max_new_tokens=1, keep_logits=True).first_logits
    return torch.from_numpy(got), ref


def test_weight_only_decoder_is_matmulnbits_with_a_float_lm_head(weight_only: Path, model_dir: Path,
                                                                phantoms: Path) -> None:
    model = onnx.load(str(weight_only), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["MatMulNBits"] == 7 * 2 and "MatMulInteger" not in ops
    nbits = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: a.i for a in nbits.attribute}
    assert attrs["bits"] == 8 and attrs["accuracy_level"] == 4 and attrs["block_size"] == 128
    head = next(n for n in model.graph.node if n.name == lm_head_node(model))
    assert head.op_type == "MatMul"  # lm_head=False keeps it float
    got, ref = _first_logits(weight_only, model_dir, phantoms)
    print(f"weight-only first-logit error {float((got - ref).abs().max()) / float(ref.max() - ref.min()):.2%}")
    assert float((got - ref).abs().max()) <= MAX_LOGIT_REL * float(ref.max() - ref.min())


def test_smoothquant_decoder_is_w8a8_everywhere(bundle: Path, model_dir: Path, phantoms: Path) -> None:
    model = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    inits = {i.name for i in model.graph.initializer}
    float_weight_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and any(i in inits for i in n.input)]
    # per layer: packed q/k/v, o, packed gate/up, down (radtrt.exporter.gqa); + lm_head
    assert ops["MatMulInteger"] == 4 * 2 + 1 and ops["DynamicQuantizeLinear"] >= 1 and not float_weight_matmuls
    manifest = read_manifest(bundle)
    assert manifest["int8"]["lm_head"] == "int8" and manifest["int8"]["alpha"] == 0.5
    assert manifest["int8"]["decoder_method"]["method"] == "smoothquant"
    assert (manifest["decoder"]["attention"], manifest["decoder"]["kv_cache"]) == ("fused", "float32")
    assert ops["GroupQueryAttention"] == 2
    got, ref = _first_logits(bundle / "decoder.onnx", model_dir, phantoms)
    print(f"smoothquant first-logit error {float((got - ref).abs().max()) / float(ref.max() - ref.min()):.2%}")
    assert float((got - ref).abs().max()) <= MAX_SQ_LOGIT_REL * float(ref.max() - ref.min())


def test_manifest_records_the_calibration(bundle: Path, phantoms: Path) -> None:
    manifest = read_manifest(bundle)
    assert manifest["precision"] == "int8"
    cal = manifest["calibration"]
    stored = CalibrationFile.load(bundle / cal["file"])
    assert cal["hash"] == stored.hash == sample_list_hash(stored.refs) and cal["n"] == 3
    rows = [json.loads(line) for line in (phantoms / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r.sha256 for r in stored.refs) == sorted(sha256_file(phantoms / row["image"]) for row in rows[:3])
    assert cal["source"]["kind"] == "manifest" and "calibration.safetensors" in manifest["files"]
    # the bundle travels: neither file names the data's folder or files (study folders name patients)
    assert [(r.study, r.file) for r in stored.refs] == [(None, None)] * 3
    for path in (bundle / "manifest.json", bundle / cal["file"]):
        raw = path.read_bytes()
        assert str(phantoms.parent).encode() not in raw and rows[0]["image"].encode() not in raw, path


def test_int8_bundle_runs_and_stays_close_to_fp32_torch(bundle: Path, model_dir: Path, phantoms: Path) -> None:
    from radtrt.calibration.run import calibrate
    from radtrt.runtime.ort import OrtBackend

    loaded = load_model(model_dir)
    ref = loaded.model
    heldout = calibrate(loaded, phantoms, 2, skip=3).samples
    pixels = torch.stack([s.pixels for s in heldout])
    ort = OrtBackend(bundle)  # verifies hashes; KV buffers and the (dequantized) table are fp32
    assert ort.precision == "int8" and ort.table.dtype.name == "float32"
    table = ref.language_model.model.embed_tokens.weight.detach()
    step = table.abs().amax(1, keepdim=True) / 127  # INT8 rows on disk: within half a step of fp32
    assert bool(((torch.from_numpy(ort.table) - table).abs() <= step / 2 + 1e-6).all())
    with torch.no_grad():
        ref_img = ref.encode_images(pixels)
    got_img = ort.encode_images(pixels)
    cos = torch.nn.functional.cosine_similarity(got_img.flatten(1).double(), ref_img.flatten(1).double())
    assert float(cos.min()) >= MIN_COSINE
    embeds = [ref.embed_multimodal(heldout[0].prompt_ids, ref_img[0]).detach()]
    r = greedy_generate(ref.language_model, embeds, eos_token_id=-1, max_new_tokens=8, keep_logits=True)
    g = ort.generate(embeds, eos_token_id=-1, max_new_tokens=8, keep_logits=True)
    span = float(r.first_logits.max() - r.first_logits.min())
    print(f"bundle cosine {float(cos.min()):.5f} first-logit error {float((g.first_logits - r.first_logits).abs().max()) / span:.2%}")
    assert float((g.first_logits - r.first_logits).abs().max()) <= MAX_SQ_LOGIT_REL * span
    assert len(g.token_ids[0]) == 8


def test_export_prints_the_parity_gate(bundle: Path) -> None:
    parity = read_manifest(bundle)["export_check"]["int8_parity"]
    assert parity["studies"] == 2 and "held-out samples" in parity["source"]
    assert parity["vision_cosine_min"] >= MIN_COSINE and 0.0 <= parity["exact_match_rate"] <= 1.0
    assert {"label_f1_int8", "label_f1_fp32", "rouge_l_mean", "warnings"} <= set(parity)
    assert parity["decode_steps_compared"] > 0 and parity["decode_logits_mean_max_abs_diff"] >= 0.0
    # numbers and labels only: no report text of the held-out data goes into the bundle's manifest
    per_study = parity["per_study"][0]
    assert "tokens_equal" in per_study and not {"report", "reference_report", "true_findings"} & set(per_study)
    assert per_study["sample"] == 1 and "study" not in per_study  # a study folder's name can be an accession number


def test_int8_bundle_is_smaller_than_fp32(bundle: Path, model_dir: Path) -> None:
    """Weights (graphs' external data and the embedding table): at most 0.35x their fp32 bytes."""
    model = load_model(model_dir).model
    fp32_bytes = sum(p.numel() * 4 for p in model.state_dict().values())
    files = read_manifest(bundle)["files"]
    int8_bytes = sum(files[f]["bytes"] for f in ("vision.onnx.data", "decoder.onnx.data", "embed_tokens.safetensors"))
    assert int8_bytes <= 0.35 * fp32_bytes


@pytest.fixture(scope="module")
def smoothed_graphs(model_dir: Path, phantoms: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny decoder exported plain, and a copy smoothed in place (alpha 0.8: factors far from 1)."""
    import shutil

    from radtrt.calibration.run import calibrate
    from radtrt.exporter.int8_decoder import smooth_graph_file, smoothing_factors
    from radtrt.exporter.onnx import export_decoder

    loaded = load_model(model_dir)
    lm = loaded.model.language_model
    stats = calibrate(loaded, phantoms, 2).file.decoder
    out = tmp_path_factory.mktemp("smooth")
    export_decoder(lm, out / "plain" / "decoder.onnx")
    shutil.copytree(out / "plain", out / "smoothed")
    smoothing = smoothing_factors(lm, stats, alpha=0.8)
    smooth_graph_file(out / "smoothed" / "decoder.onnx", smoothing)
    return lm, stats, smoothing, out / "plain" / "decoder.onnx", out / "smoothed" / "decoder.onnx"


def _run_plain(path: Path, lm, x: torch.Tensor) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    from radtrt.exporter.onnx import decoder_io_names

    cfg = lm.cfg
    names, outputs = decoder_io_names(cfg.num_hidden_layers)
    empty = np.zeros((1, cfg.num_key_value_heads, 0, cfg.head_dim), np.float32)
    t = x.shape[1]
    feeds = {"inputs_embeds": x.numpy(), "position_ids": np.arange(t)[None], "past_mask": np.zeros((1, 0), bool),
             "new_mask": np.ones((1, t), bool), **{n: empty for n in names[4:]}}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip(outputs, session.run(outputs, feeds)))


def test_smoothing_the_graph_is_exact_in_float_and_divides_the_cached_values(smoothed_graphs) -> None:
    """Folded SmoothQuant factors (GQA o_proj via v_proj, down via up_proj rows, norms) change no logit; the
    cached values come out divided by v_proj's factors (what the INT8 KV cache's value scales follow)."""
    lm, _, smoothing, plain, smoothed = smoothed_graphs
    assert lm.cfg.num_key_value_heads < lm.cfg.num_attention_heads  # the tiny decoder has grouped KV heads
    x = torch.randn(1, 12, lm.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    a, b = _run_plain(plain, lm, x), _run_plain(smoothed, lm, x)
    span = float(a["logits"].max() - a["logits"].min())
    assert abs(a["logits"] - b["logits"]).max() <= 1e-5 * span
    for i in range(lm.cfg.num_hidden_layers):
        s_kv = smoothing.value_divisors(lm.cfg.num_hidden_layers)[i].numpy()
        assert float(s_kv.min()) < 0.9 or float(s_kv.max()) > 1.1  # the factors are not trivial
        divided = a[f"value.{i}"] / s_kv.reshape(lm.cfg.num_key_value_heads, 1, lm.cfg.head_dim)
        assert abs(b[f"value.{i}"] - divided).max() <= 1e-5 * abs(divided).max()
        assert abs(b[f"key.{i}"] - a[f"key.{i}"]).max() <= 1e-5 * abs(a[f"key.{i}"]).max()  # keys unchanged


def test_smoothing_a_decoder_whose_norms_were_never_trained(smoothed_graphs, tmp_path: Path) -> None:
    """All-ones norms (train init, then stages 1 and 2) are merged into one initializer by the exporter:
    'no lm.model.layers.0.post_attention_layernorm.weight in it', exit 2, for every such model's INT8 export."""
    import copy
    import shutil

    from radtrt.exporter.int8_decoder import smooth_graph_file, smoothing_factors
    from radtrt.exporter.onnx import export_decoder

    lm, stats, _, _, _ = smoothed_graphs
    fresh = copy.deepcopy(lm)
    for name, param in fresh.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
    export_decoder(fresh, tmp_path / "plain" / "decoder.onnx")
    norms = [i.name for i in onnx.load(str(tmp_path / "plain" / "decoder.onnx"), load_external_data=False)
             .graph.initializer if i.name.endswith("norm.weight")]
    assert len(norms) == 1  # what the exporter does with equal tensors (the case this test is for)
    shutil.copytree(tmp_path / "plain", tmp_path / "smoothed")
    smoothing = smoothing_factors(fresh, stats, alpha=0.8)
    smooth_graph_file(tmp_path / "smoothed" / "decoder.onnx", smoothing)
    x = torch.randn(1, 12, lm.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    a, b = _run_plain(tmp_path / "plain" / "decoder.onnx", lm, x), _run_plain(tmp_path / "smoothed" / "decoder.onnx",
                                                                              lm, x)
    assert abs(a["logits"] - b["logits"]).max() <= 1e-5 * float(a["logits"].max() - a["logits"].min())
    inits = onnx.load(str(tmp_path / "smoothed" / "decoder.onnx")).graph.initializer
    assert sum(i.name.endswith(("norm.weight", "norm.weight.smoothed")) for i in inits) == \
        2 * lm.cfg.num_hidden_layers + 1  # each smoothed norm its own, the final norm the merged one


def test_smoothed_graph_weights_are_quant_smooth_bit_for_bit(smoothed_graphs) -> None:
    """The graph holds exactly what ``quant.smooth`` / ``fold_into_norm`` compute on the PyTorch weights."""
    import numpy as np

    from radtrt.exporter.onnx import DECODER_ROOT, module_of
    from radtrt.exporter.quant import fold_into_norm, smooth

    lm, stats, smoothing, _, smoothed = smoothed_graphs
    model = onnx.load(str(smoothed))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    weight = {module_of(n, DECODER_ROOT): inits[n.input[1]] for n in model.graph.node
              if n.op_type == "MatMul" and n.input[1] in inits}
    layer, p = lm.model.layers[1], "model.layers.1."
    attn, mlp = layer.self_attn, layer.mlp
    (q, k, v), s = smooth([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight],
                          stats.input_absmax(p + "self_attn.q_proj"), 0.8)
    s_kv = smoothing.outputs[p + "self_attn.v_proj"]
    expected = {p + "self_attn.q_proj": q, p + "self_attn.k_proj": k, p + "self_attn.v_proj": v / s_kv[:, None],
                p + "self_attn.o_proj": attn.o_proj.weight.detach() * smoothing.inputs[p + "self_attn.o_proj"][None, :]}
    (gate, up), s2 = smooth([mlp.gate_proj.weight, mlp.up_proj.weight], stats.input_absmax(p + "mlp.gate_proj"), 0.8)
    (down,), s3 = smooth([mlp.down_proj.weight], stats.input_absmax(p + "mlp.down_proj"), 0.8)
    expected |= {p + "mlp.gate_proj": gate, p + "mlp.up_proj": up / s3[:, None], p + "mlp.down_proj": down}
    for module, w in expected.items():
        assert np.array_equal(weight[module], w.T.numpy()), module
    assert np.array_equal(inits[f"{DECODER_ROOT}.{p}input_layernorm.weight"],
                          fold_into_norm(layer.input_layernorm.weight, s).numpy())
    assert np.array_equal(inits[f"{DECODER_ROOT}.{p}post_attention_layernorm.weight"],
                          fold_into_norm(layer.post_attention_layernorm.weight, s2).numpy())
    assert np.array_equal(weight["lm_head"], lm.lm_head.weight.detach().T.numpy())  # not smoothed


def test_smoothquant_int8_cache_value_scales_follow_the_smoothed_values(smoothed_graphs, tmp_path: Path) -> None:
    """The cached values are v_proj's outputs over its factors: the value scales are their maxima / 127."""
    import numpy as np

    from radtrt.exporter.int8_decoder import quantize_smoothquant

    lm, stats, smoothing, _, _ = smoothed_graphs
    quantize_smoothquant(lm, stats, tmp_path / "decoder.onnx", tmp_path, alpha=0.8, cache="int8")
    model = onnx.load(str(tmp_path / "decoder.onnx"))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name.startswith("gqa_v_scale")}
    for i, s_kv in enumerate(smoothing.value_divisors(lm.cfg.num_hidden_layers)):
        expected = (stats.output_absmax(f"model.layers.{i}.self_attn.v_proj") / s_kv).clamp(min=1e-6) / 127.0
        assert np.allclose(inits[f"gqa_v_scale.{i}"], expected.numpy(), rtol=1e-6, atol=0)


def test_smoothquant_plain_attention_decoder_stays_close_to_fp32(smoothed_graphs, tmp_path: Path) -> None:
    """``--attention plain``: the smoothed graph goes through ``quantize_dynamic`` (activation products too)."""
    from radtrt.exporter.int8_decoder import quantize_smoothquant

    lm, stats, _, plain, _ = smoothed_graphs
    quantize_smoothquant(lm, stats, tmp_path / "decoder.onnx", tmp_path, alpha=0.5, cache=None)
    assert _ops(tmp_path / "decoder.onnx")["MatMulInteger"] > 4 * lm.cfg.num_hidden_layers  # q/k/v/o/gate/up/down...
    x = torch.randn(1, 12, lm.cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    ref, got = _run_plain(plain, lm, x)["logits"], _run_plain(tmp_path / "decoder.onnx", lm, x)["logits"]
    assert abs(got - ref).max() <= MAX_SQ_LOGIT_REL * float(ref.max() - ref.min())


def test_smoothing_reports_progress_per_weight_matrix(smoothed_graphs, tmp_path: Path) -> None:
    import shutil

    from test_streamed_quant import _Recorder

    from radtrt.exporter.int8_decoder import smooth_graph_file

    lm, _, smoothing, plain, _ = smoothed_graphs
    shutil.copytree(plain.parent, tmp_path / "g")
    recorder = _Recorder()
    smooth_graph_file(tmp_path / "g" / "decoder.onnx", smoothing, recorder)
    n = 7 * lm.cfg.num_hidden_layers  # q, k, v, o, gate, up, down
    assert recorder.tasks == {0: (f"SmoothQuant: {n} weight matrices", n)}
    assert recorder.completed[0] == list(range(1, n + 1))


def test_smoothing_refuses_a_graph_without_the_modules_it_names(smoothed_graphs, tmp_path: Path) -> None:
    import shutil
    from dataclasses import replace

    from radtrt.exporter.int8_decoder import smooth_graph_file

    _, _, smoothing, plain, _ = smoothed_graphs
    shutil.copytree(plain.parent, tmp_path / "g")
    before = (tmp_path / "g" / "decoder.onnx.data").read_bytes()
    bad = replace(smoothing, inputs={**smoothing.inputs, "model.layers.9.mlp.gate_proj": torch.ones(1)})
    with pytest.raises(RadtrtError, match="no model.layers.9.mlp.gate_proj in it"):
        smooth_graph_file(tmp_path / "g" / "decoder.onnx", bad)
    assert (tmp_path / "g" / "decoder.onnx.data").read_bytes() == before  # left as it was


def test_trtllm_reads_the_bundles_calibration(bundle: Path, model_dir: Path, tmp_path: Path) -> None:
    """A SmoothQuant TensorRT-LLM checkpoint from an INT8 bundle uses the calibration the bundle carries."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    result = runner.invoke(app, ["export", "--model", str(model_dir), "--bundle", str(copy), "--target", "trtllm",
                                 "--precision", "int8", "--int8-decoder", "smoothquant", "-o", str(copy)])
    assert result.exit_code == 0, result.stderr
    ckpt = copy / "trtllm" / "checkpoint-w8a8_sq"
    config = json.loads((ckpt / "config.json").read_text())
    # without --precision the decoder follows the bundle: INT8 (weight-only), not a quiet fp16
    plain = runner.invoke(app, ["export", "--model", str(model_dir), "--bundle", str(copy), "--target", "trtllm"])
    assert plain.exit_code == 0, plain.stderr
    assert json.loads((copy / "trtllm" / "checkpoint-w8a16" / "config.json").read_text())["quantization"][
        "quant_algo"] == "W8A16"
    assert config["quantization"]["quant_algo"].startswith("W8A8_SQ")
    assert json.loads((ckpt / "radtrt_checkpoint.json").read_text())["smoothquant_alpha"] == 0.5
    # the command the CPU host advises for the GPU host builds from that checkpoint instead of refusing it
    again = runner.invoke(app, ["export", "--model", str(model_dir), "--bundle", str(copy), "--target", "trtllm",
                                "--precision", "int8", "--int8-decoder", "smoothquant"])
    assert again.exit_code == 0 and "written before" in again.stderr, again.stderr
    # --smoothquant-alpha was ignored by the TensorRT-LLM checkpoint (0.5 recorded)
    other = runner.invoke(app, ["export", "--model", str(model_dir), "--bundle", str(copy), "--target", "trtllm",
                                "--precision", "int8", "--int8-decoder", "smoothquant", "--smoothquant-alpha", "0.8"])
    assert other.exit_code == 2 and "written with other settings (SmoothQuant alpha 0.5" in other.stderr
    shutil.rmtree(ckpt)
    assert runner.invoke(app, ["export", "--model", str(model_dir), "--bundle", str(copy), "--target", "trtllm",
                               "--precision", "int8", "--int8-decoder", "smoothquant", "--smoothquant-alpha",
                               "0.8"]).exit_code == 0
    assert json.loads((ckpt / "radtrt_checkpoint.json").read_text())["smoothquant_alpha"] == 0.8
    # a checkpoint copied in from another bundle (or damaged) was built from as this bundle's: its weights are kept
    rebuild = ["export", "--model", str(model_dir), "--bundle", str(copy), "--target", "trtllm", "--precision", "int8",
               "--int8-decoder", "smoothquant", "--smoothquant-alpha", "0.8"]
    meta_file, rank0 = ckpt / "radtrt_checkpoint.json", ckpt / "rank0.safetensors"
    meta = json.loads(meta_file.read_text())
    assert meta["bundle_weights"] == read_manifest(copy)["model"]["weights_fingerprint_fp16"]
    rank0.write_bytes(rank0.read_bytes()[:-4] + b"\0\0\0\0")
    damaged = runner.invoke(app, rebuild)
    assert damaged.exit_code == 2 and "rank0.safetensors does not match its checkpoint's record" in damaged.stderr
    # the folder is named: deleting the file alone, as it said before, led to the same refusal
    assert f"delete {ckpt} to write it again" in " ".join(damaged.stderr.split())
    meta_file.write_text(json.dumps({**meta, "bundle_weights": "0" * 16}))
    foreign = runner.invoke(app, rebuild)
    assert foreign.exit_code == 2 and "was not written from the weights of the model" in foreign.stderr


@pytest.fixture(scope="module")
def int8_kv(model_dir: Path, bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Weight-only decoder with the INT8 KV cache, reusing the SmoothQuant bundle's calibration."""
    out = tmp_path_factory.mktemp("kv") / "b"
    result = runner.invoke(app, ["export", "--model", str(model_dir), "-o", str(out), "--precision", "int8",
                                 "--int8-decoder", "weight-only", "--int8-kv-cache", "--calibration-data",
                                 str(bundle / "calibration.safetensors"), "--parity-samples", "0"])
    assert result.exit_code == 0, result.stderr
    # only the random-pixel smoke check ran: the skipped gate is said, not left to be inferred
    assert "INT8 parity gate skipped (--parity-samples 0); measure it with: radtrt bench parity --bundle" in \
        " ".join((result.stdout + result.stderr).split())
    return out


def test_int8_kv_cache_graph_is_group_query_attention_over_int8_buffers(int8_kv: Path, model_dir: Path) -> None:
    cfg = load_model(model_dir).model.cfg.decoder
    model = onnx.load(str(int8_kv / "decoder.onnx"), load_external_data=False)
    # each layer: an If whose decode branch is the int8-cache GQA and whose prompt branch attends in fp32
    # (radtrt.exporter.gqa.float_prompt_attention; tested on its own in test_prompt_attention.py)
    branches = [{a.name: a.g for a in n.attribute} for n in model.graph.node if n.op_type == "If"]
    gqa = [n for b in branches for n in b["else_branch"].node if n.op_type == "GroupQueryAttention"]
    prompt = [n for b in branches for n in b["then_branch"].node if n.op_type == "GroupQueryAttention"]
    assert not any(n.op_type == "GroupQueryAttention" for n in model.graph.node)
    assert len(gqa) == len(prompt) == cfg.num_hidden_layers and all(n.domain == "com.microsoft" for n in gqa)
    assert "prompt step's attention in fp32" in read_manifest(int8_kv)["int8"]["kv_cache"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa[0].attribute}
    assert attrs["kv_cache_bit_width"] == 8 and attrs["do_rotary"] == 1
    assert attrs["num_heads"] == cfg.num_attention_heads and attrs["kv_num_heads"] == cfg.num_key_value_heads
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert inputs["past_key.0"] == onnx.TensorProto.INT8 and "position_ids" not in inputs and "past_mask" not in inputs
    assert not any(n.op_type == "Softmax" for n in model.graph.node)  # the old attention is gone
    inits = {i.name: onnx.numpy_helper.to_array(i, base_dir=str(int8_kv)) for i in model.graph.initializer
             if i.name.startswith("gqa_")}
    width = cfg.num_key_value_heads * cfg.head_dim
    assert all(inits[f"gqa_k_scale.{i}"].shape == (width,) and (inits[f"gqa_k_scale.{i}"] > 0).all()
               for i in range(cfg.num_hidden_layers))
    assert inits["gqa_cos_cache"].shape == (cfg.max_position_embeddings, cfg.head_dim // 2)
    assert "int8" in read_manifest(int8_kv)["int8"]["kv_cache"]


def test_int8_kv_cache_bundle_generates_close_to_fp32_and_batches_one_by_one(int8_kv: Path, model_dir: Path,
                                                                            phantoms: Path) -> None:
    from radtrt.calibration.run import calibrate
    from radtrt.runtime.ort import OrtBackend

    loaded = load_model(model_dir)
    ref = loaded.model
    heldout = calibrate(loaded, phantoms, 2, skip=3).samples
    ort = OrtBackend(int8_kv)
    assert ort.fused and ort.kv_dtype == "int8"
    assert ort.per_study  # weight-only INT8: a study's logits moved with its place in the batch
    with torch.no_grad():
        embeds = [ref.embed_multimodal(s.prompt_ids, ref.encode_images(s.pixels[None])[0]).detach() for s in heldout]
    r = greedy_generate(ref.language_model, embeds[:1], eos_token_id=-1, max_new_tokens=8, keep_logits=True)
    g = ort.generate(embeds[:1], eos_token_id=-1, max_new_tokens=8, keep_logits=True)
    span = float(r.first_logits.max() - r.first_logits.min())
    assert float((g.first_logits - r.first_logits).abs().max()) <= MAX_LOGIT_REL * span
    assert len(g.token_ids[0]) == 8
    both = ort.generate(embeds, eos_token_id=-1, max_new_tokens=8, keep_logits=True)
    alone = [ort.generate([e], eos_token_id=-1, max_new_tokens=8).token_ids[0] for e in embeds]
    assert both.token_ids == alone and both.first_logits is not None and both.first_logits.shape[0] == 2
    with pytest.raises(RadtrtError, match="exceed the model's 512 positions"):  # GQA's rotary tables end there
        ort.generate(embeds[:1], eos_token_id=-1, max_new_tokens=512)


def test_a_smoothquant_bundle_reports_on_each_study_alone(bundle: Path, model_dir: Path, phantoms: Path) -> None:
    """Its activations are quantized with one scale per call: in a batch one study's values set another's scale,
    and a report changed with its neighbours (2 of 6 phantom studies at --batch-size 6)."""
    from radtrt.calibration.run import calibrate
    from radtrt.runtime.ort import OrtBackend

    loaded = load_model(model_dir)
    ref = loaded.model
    sample = calibrate(loaded, phantoms, 1, skip=3).samples[0]
    ort = OrtBackend(bundle)
    assert ort.per_study
    with torch.no_grad():
        quiet = ref.embed_multimodal(sample.prompt_ids, ref.encode_images(sample.pixels[None])[0]).detach()
    loud = quiet * 40  # a neighbour whose activations span a far wider range
    both = ort.generate([quiet, loud], eos_token_id=-1, max_new_tokens=8, keep_logits=True)
    alone = ort.generate([quiet], eos_token_id=-1, max_new_tokens=8, keep_logits=True)
    assert both.token_ids[0] == alone.token_ids[0]
    assert torch.equal(both.logits[0], alone.logits[0])  # bit for bit: no scale shared with the neighbour


def test_a_smoothquant_batch_records_each_studys_own_decoder_run(bundle: Path, phantoms: Path) -> None:
    """Run one study at a time, a batch's records gave every study the batch's summed prefill and decode times
    (and a ms per token several times too high) under a batch_size that was not the decoder's."""
    studies = sorted(p for p in phantoms.rglob("*.png"))[:3]
    result = runner.invoke(app, ["infer", *map(str, studies), "--bundle", str(bundle), "--backend", "onnxruntime",
                                 "--json", "--max-new-tokens", "4", "--batch-size", "3"])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["batch_size"], r["decode_batch_size"]) for r in records] == [(3, 1)] * 3
    # each its own run, not one shared sum (which gave all three the same time; two fast runs can tie by chance)
    assert len({r["timings_ms"]["decode"] for r in records}) > 1
    assert len({r["timings_ms"]["vision"] for r in records}) == 1  # the vision batch still ran once


def test_kv_scales_bound_the_rotated_keys() -> None:
    from radtrt.exporter.gqa import kv_scales
    from radtrt.exporter.quant import ActivationStats
    from radtrt.model.config import tiny_decoder

    cfg = tiny_decoder()
    width = cfg.num_key_value_heads * cfg.head_dim
    k = torch.zeros(width)
    k[0], k[cfg.head_dim // 2] = 3.0, 4.0  # a pair the rotation can turn into one channel of norm 5
    stats = ActivationStats({}, {f"model.layers.{i}.self_attn.{n}_proj": k if n == "k" else torch.full((width,), 2.0)
                                 for i in range(cfg.num_hidden_layers) for n in "kv"})
    scales = kv_scales(stats, cfg, [torch.full((width,), 4.0)] * cfg.num_hidden_layers)
    half = cfg.head_dim // 2
    for key, value in zip(scales.key, scales.value):
        assert key.shape == value.shape == (width,)
        assert key[0] == key[half] == pytest.approx(5.0 / 127)  # the pair's norm, both channels
        assert key[1] == pytest.approx(1e-6 / 127)  # a channel never seen non-zero keeps a tiny positive scale
        assert value == pytest.approx([0.5 / 127] * width)  # divided by the smoothing factors


def test_int8_kv_cache_needs_an_int8_onnx_bundle(model_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", "--model", str(model_dir), "--precision", "fp32", "--int8-kv-cache",
                                 "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--int8-kv-cache in an ONNX bundle needs --precision int8" in result.stderr


@pytest.mark.parametrize("extra, match", [
    (["--precision", "int8", "--int8-kv-cache", "--attention", "plain", "--calibration-data", "phantom"],
     "--int8-kv-cache needs the fused attention"),
    (["--attention", "flash"], "unknown --attention 'flash'"),
])
def test_attention_choices_are_checked_before_exporting(model_dir: Path, tmp_path: Path, extra: list[str],
                                                        match: str) -> None:
    result = runner.invoke(app, ["export", "--model", str(model_dir), *extra, "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and match in result.stderr, result.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_calibration_stats_file_serves_the_onnx_int8_export(model_dir: Path, bundle: Path, tmp_path: Path) -> None:
    """--calibration-stats (the TensorRT-LLM flag) is also taken as the calibration of an ONNX INT8 export."""
    calib = bundle / "calibration.safetensors"
    out = _export(model_dir, tmp_path / "b", "--precision", "int8", "--int8-decoder", "weight-only",
                  "--calibration-stats", str(calib), "--parity-samples", "0")
    from safetensors.torch import load_file

    mine, given = load_file(out / "calibration.safetensors"), load_file(calib)
    assert mine.keys() == given.keys() and all(torch.equal(mine[k], given[k]) for k in given)


def test_seven_bit_weights_are_computed_exactly_by_onnx_runtime() -> None:
    """Why ORT_REDUCE_RANGE: with weights in [-64, 64] ONNX Runtime's integer GEMM equals exact integer
    arithmetic on any x86 CPU (without VNNI, 8-bit weights saturate int16 pair sums and do not)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    k, n = 768, 256
    w = rng.integers(-64, 65, (k, n)).astype(np.int8)
    w[:2] = 64  # the worst case for a pair: two 64s against two activations of 127
    x = rng.standard_normal((4, k)).astype(np.float32)
    x[:, :2] = 3.0
    xs, ws = np.float32(np.abs(x).max() / 127), np.full(n, 0.01, np.float32)
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(ws, "ws"),
             numpy_helper.from_array(np.zeros(n, np.int8), "wz"), numpy_helper.from_array(np.array(xs), "xs"),
             numpy_helper.from_array(np.array(0, np.int8), "xz")]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    exact = (np.clip(np.round(x / xs), -128, 127).astype(np.int64) @ w.astype(np.int64)) * xs * ws
    assert np.abs(y - exact).max() <= 1e-5 * np.abs(exact).max()


def test_trtllm_calibration_of_another_model_is_refused_before_the_bundle(bundle: Path, tmp_path: Path) -> None:
    """The ONNX bundle was written whole before the TensorRT-LLM step found the statistics were another model's."""
    from radtrt.model.loading import LoadedModel
    from radtrt.model.tiny import random_model, train_tiny_tokenizer

    other = save_toolkit(LoadedModel(random_model(seed=1), train_tiny_tokenizer(), "other"), tmp_path / "other")
    result = runner.invoke(app, ["export", "--model", str(other), "--precision", "fp16", "--target", "trtllm",
                                 "--int8-kv-cache", "--calibration-stats", str(bundle / "calibration.safetensors"),
                                 "-o", str(tmp_path / "new")])
    assert result.exit_code == 2 and "other weights" in result.stderr and not (tmp_path / "new").exists()


def test_a_bundle_calibration_of_an_older_format_does_not_block_checkpoints_without_statistics(
        bundle: Path, model_dir: Path, tmp_path: Path) -> None:
    """Every TensorRT-LLM checkpoint of an INT8 bundle from before calibration format 2 was refused, the fp16 and
    weight-only ones too, which use no statistics ("re-run 'radtrt calibrate'" cannot mend a bundle)."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    calib = copy / "calibration.safetensors"
    with safe_open(str(calib), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, calib, metadata={**metadata, "format_version": "1"})
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["calibration.safetensors"].update(sha256=sha256_file(calib), bytes=calib.stat().st_size)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    for extra, ckpt in (([], "checkpoint-w8a16"), (["--precision", "fp16"], "checkpoint-fp16")):
        result = runner.invoke(app, ["export", "--model", str(model_dir), "--bundle", str(copy), "--target", "trtllm",
                                     *extra])
        assert result.exit_code == 0, result.stderr
        assert (copy / "trtllm" / ckpt / "rank0.safetensors").is_file()
    sq = runner.invoke(app, ["export", "--model", str(model_dir), "--bundle", str(copy), "--target", "trtllm",
                             "--int8-decoder", "smoothquant"])
    assert sq.exit_code == 2 and "format version 1" in sq.stderr  # SmoothQuant does need the statistics


def test_a_smoothquant_bundle_decodes_alone_whatever_its_manifest_says(bundle: Path, weight_only: Path,
                                                                        tmp_path: Path) -> None:
    """Whether studies decode one at a time came from the manifest's INT8 record, which is not hashed: emptying it
    made a SmoothQuant bundle's batches decode together (one study's activations scaling another's)."""
    import shutil

    from radtrt.runtime.ort import OrtBackend, depends_on_batch

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["int8"] = {}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert OrtBackend(copy, verify=False).per_study
    # weight-only INT8's MatMulNBits: a study's logits moved with its place in the batch (a token flipped 175 steps
    # in), so its studies decode one at a time too
    assert depends_on_batch(weight_only)

"""ONNX bundle export and the ONNX Runtime backend against the PyTorch reference (tiny model)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from radtrt.cli import app
from radtrt.errors import RadtrtError
from radtrt.exporter.bundle import BUNDLE_FORMAT_VERSION, read_manifest, sha256_file
from radtrt.imaging.synthetic import radiograph_dataset, synthetic_chest
from radtrt.model.config import preset
from radtrt.model.loading import LoadedModel, load_model, save_toolkit
from radtrt.model.tiny import random_model

from conftest import TinyRelease

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tiny_release: TinyRelease, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("m") / "model"
    return save_toolkit(load_model(tiny_release.release_dir, tiny_release.base_dir), out, dtype=torch.float32)


def _exported(model_dir: Path, tmp_path_factory: pytest.TempPathFactory, *options: str) -> Path:
    out = tmp_path_factory.mktemp("b") / "bundle"
    result = runner.invoke(app, ["export", "--model", str(model_dir), *options, "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    attention = "plain" if "plain" in options else "fused (GroupQueryAttention, com.microsoft)"
    assert f"decoder attention: {attention}" in result.stderr
    # the reference the check measured: an fp16 bundle's is torch float16 (it said 'fp32 reference')
    reference = "float16" if "fp16" in options else "float32"
    assert f"ONNX Runtime vs PyTorch (reference torch {reference} on the CPU)" in result.stderr
    assert "image embeddings max abs err " in result.stderr and ") (rel " not in result.stderr
    assert " (rel " in result.stderr.split("first-step logits")[1]  # the relative error is printed, not only stored
    return out


@pytest.fixture(scope="module")
def bundle(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _exported(model_dir, tmp_path_factory, "--precision", "fp32")


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("studies")
    paths = []
    for i in range(4):
        path = root / f"s{i}.dcm"
        radiograph_dataset(synthetic_chest(rows=180 + 20 * i, cols=200, seed=20 + i)).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _infer(*args: str | Path) -> list[dict]:
    result = runner.invoke(app, ["infer", *map(str, args), "--json", "--max-new-tokens", "20"])
    assert result.exit_code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_manifest_describes_and_hashes_the_bundle(bundle: Path) -> None:
    m = read_manifest(bundle)
    assert m["format_version"] == BUNDLE_FORMAT_VERSION and m["precision"] == "fp32" and m["opset"] >= 17
    assert {"vision.onnx", "decoder.onnx", "embed_tokens.safetensors", "tokenizer.model"} <= set(m["files"])
    for name, meta in m["files"].items():
        assert sha256_file(bundle / name) == meta["sha256"]
    assert m["graphs"]["decoder.onnx"]["inputs"]["inputs_embeds"][0] == "batch"
    assert m["preprocess"]["image_size"] == 56 and m["prompt"]["template"] == "v1"
    assert (m["decoder"]["attention"], m["decoder"]["kv_cache"]) == ("fused", "float32")
    # the model's identity: its weights' fingerprint, not the embedding table's file hash under a misleading name
    assert set(m["model"]) == {"name", "source", "config_sha256", "weights_fingerprint_fp16"}
    check = m["export_check"]
    assert check["greedy_tokens_equal"] is True
    assert check["vision"]["max_abs"] < 1e-4 and check["decoder_first_logits"]["max_abs"] < 1e-4
    assert not (bundle.parent / "bundle.partial").exists()


@pytest.mark.parametrize("indication", [None, "Shortness of breath"])
def test_onnxruntime_tokens_equal_torch(bundle: Path, model_dir: Path, studies: list[Path],
                                        indication: str | None) -> None:
    extra = ["--indication", indication] if indication else []
    ort = _infer(*studies, "--bundle", bundle, "--backend", "onnxruntime", *extra)
    ref = _infer(*studies, "--model", model_dir, "--backend", "torch", *extra)
    assert [r["token_ids"] for r in ort] == [r["token_ids"] for r in ref]
    assert [r["report"] for r in ort] == [r["report"] for r in ref]
    assert {r["backend"] for r in ort} == {"onnxruntime"} and len({tuple(r["token_ids"]) for r in ref}) > 1


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_batched_generation_equals_one_by_one(bundle: Path, model_dir: Path, studies: list[Path],
                                              backend: str) -> None:
    src = ["--bundle", bundle] if backend == "onnxruntime" else ["--model", model_dir]
    one = _infer(*studies, *src, "--backend", backend)
    batched = _infer(*studies, *src, "--backend", backend, "--batch-size", "3", "--indication", "")
    assert [r["token_ids"] for r in batched] == [r["token_ids"] for r in one]
    assert [r.get("batch_size", 1) for r in batched] == [3, 3, 3, 1]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_torch_half_precision_reports_do_not_change_with_the_batch(model_dir: Path, studies: list[Path],
                                                                   dtype: str) -> None:
    """Half-precision sums come out of other kernels at other batch shapes: a study's report changed with
    --batch-size (every study of a tiny model's batch of 7 in bfloat16). Each runs alone, and says so."""
    args = (*studies, "--model", model_dir, "--backend", "torch", "--dtype", dtype)
    one = _infer(*args)
    batched = _infer(*args, "--batch-size", "4")
    assert [r["token_ids"] for r in batched] == [r["token_ids"] for r in one]
    assert [r.get("batch_size", 1) for r in batched] == [4, 4, 4, 4] and {r["decode_batch_size"] for r in batched} == {1}


@pytest.fixture(scope="module")
def bundle_plain(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _exported(model_dir, tmp_path_factory, "--attention", "plain")


def test_fused_and_plain_attention_graphs(bundle: Path, bundle_plain: Path, model_dir: Path) -> None:
    import onnx

    layers = load_model(model_dir).model.cfg.decoder.num_hidden_layers
    ops = {name: [n.op_type for n in onnx.load(str(b / "decoder.onnx"), load_external_data=False).graph.node]
           for name, b in (("fused", bundle), ("plain", bundle_plain))}
    assert ops["fused"].count("GroupQueryAttention") == layers and "Softmax" not in ops["fused"]
    # q/k/v packed into one projection, gate/up into one (+ a Split): 4 weight MatMuls per layer, + lm_head
    assert ops["fused"].count("MatMul") == 4 * layers + 1 and ops["plain"].count("MatMul") >= 7 * layers + 1
    assert "GroupQueryAttention" not in ops["plain"] and ops["plain"].count("Softmax") == layers
    m = read_manifest(bundle_plain)
    assert (m["decoder"]["attention"], m["decoder"]["kv_cache"]) == ("plain", "float32")
    assert m["export_check"]["greedy_tokens_equal"] is True


@pytest.mark.parametrize("which", ["fused", "plain"])
def test_rms_norms_are_written_so_onnxruntime_fuses_them(bundle: Path, bundle_plain: Path, model_dir: Path,
                                                        tmp_path: Path, which: str) -> None:
    import onnx
    import onnxruntime as ort

    layers = load_model(model_dir).model.cfg.decoder.num_hidden_layers
    decoder = (bundle if which == "fused" else bundle_plain) / "decoder.onnx"
    ops = [n.op_type for n in onnx.load(str(decoder), load_external_data=False).graph.node]
    assert "Reciprocal" not in ops and ops.count("Div") >= 2 * layers + 1
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(decoder), sess_options=opts, providers=["CPUExecutionProvider"])
    optimized = [n.op_type for n in onnx.load(opts.optimized_model_filepath, load_external_data=False).graph.node]
    norms = optimized.count("SimplifiedLayerNormalization") + optimized.count("SkipSimplifiedLayerNormalization")
    assert norms == 2 * layers + 1 and "ReduceMean" not in optimized


def test_vision_gelus_are_written_so_onnxruntime_fuses_them(bundle: Path, model_dir: Path, tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    blocks = len(load_model(model_dir).model.vision_tower.blocks)
    vision = bundle / "vision.onnx"
    # one GELU per block used (select layer -2 leaves the last block out) + the projector's
    assert [n.op_type for n in onnx.load(str(vision), load_external_data=False).graph.node].count("Erf") == blocks
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(vision), sess_options=opts, providers=["CPUExecutionProvider"])
    optimized = [n.op_type for n in onnx.load(opts.optimized_model_filepath, load_external_data=False).graph.node]
    assert "Erf" not in optimized and optimized.count("BiasGelu") + optimized.count("Gelu") == blocks


def test_gelu_reorder_is_exact_and_only_for_a_half() -> None:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from radtrt.exporter.onnx import gelus_for_fusion

    def gelu_graph(half: float) -> onnx.ModelProto:
        consts = {"sqrt2": np.float32(np.sqrt(2.0)), "one": np.float32(1.0), "half": np.float32(half)}
        nodes = [helper.make_node("Div", ["x", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
                 helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["half", "a"], ["h"]),
                 helper.make_node("Mul", ["x", "h"], ["y"])]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])],
                                  [numpy_helper.from_array(np.array(v), k) for k, v in consts.items()])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])

    x = np.random.default_rng(0).standard_normal(64).astype(np.float32) * 4
    model = gelu_graph(0.5)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # compare the graphs as written
    before = ort.InferenceSession(model.SerializeToString(), opts).run(None, {"x": x})[0]
    assert gelus_for_fusion(model.graph) == 1
    after = ort.InferenceSession(model.SerializeToString(), opts).run(None, {"x": x})[0]
    np.testing.assert_array_equal(before, after)  # multiplying by 0.5 is exact: same bits in either order
    assert gelus_for_fusion(gelu_graph(0.25).graph) == 0


@pytest.mark.parametrize("which", ["fused", "plain"])
def test_prompts_of_different_lengths_in_one_batch(bundle: Path, bundle_plain: Path, model_dir: Path,
                                                   which: str) -> None:
    """Fused attention batches equal lengths together; plain attention left-pads: both equal torch."""
    from radtrt.model.generate import greedy_generate
    from radtrt.runtime.ort import OrtBackend

    lm = load_model(model_dir).model.language_model
    g = torch.Generator().manual_seed(3)
    embeds = [torch.randn(n, lm.cfg.hidden_size, generator=g) * 0.5 for n in (12, 17, 12, 9)]
    ort = OrtBackend(bundle if which == "fused" else bundle_plain)
    batched = ort.generate(embeds, max_new_tokens=12, eos_token_id=-1, keep_logits=True)
    one = [ort.generate([e], max_new_tokens=12, eos_token_id=-1).token_ids[0] for e in embeds]
    ref = greedy_generate(lm, embeds, eos_token_id=-1, max_new_tokens=12, keep_logits=True)
    assert batched.token_ids == one == ref.token_ids
    assert len({tuple(t) for t in one}) > 1
    assert float((batched.first_logits - ref.first_logits).abs().max()) < 1e-4
    # every step's logits are kept, each a copy (the output buffer is reused by the next step)
    assert batched.logits.shape == ref.logits.shape == (4, 12, lm.cfg.vocab_size)
    assert float((batched.logits - ref.logits).abs().max()) < 1e-4


def test_a_decoder_without_a_known_kv_cache_input_is_refused(bundle: Path, tmp_path: Path) -> None:
    from radtrt.runtime.ort import OrtBackend

    copy = _copy(bundle, tmp_path)
    shutil.copy(copy / "vision.onnx", copy / "decoder.onnx")  # a loadable graph, but not a decoder
    with pytest.raises(RadtrtError, match="the graph's inputs and outputs are no radtrt decoder's"):
        OrtBackend(copy, verify=False)


def test_fused_fp32_attention_on_a_gpu_provider_is_explained(bundle: Path, bundle_fp16: Path) -> None:
    from radtrt.runtime.ort import OrtBackend

    fp32, fp16 = OrtBackend(bundle), OrtBackend(bundle_fp16)
    assert fp32.attention_note() is None  # CPU: every fused kernel is there
    fp32.provider = fp16.provider = "cuda"  # what a GPU host would have chosen (no CUDA provider here)
    assert "runs on the CPU" in (fp32.attention_note() or "") and fp16.attention_note() is None


def test_fused_cache_lives_where_its_attention_runs(bundle: Path, bundle_fp16: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a GPU provider an fp16 bundle's KV buffers are allocated on the GPU (no per-step copies); an
    fp32 bundle's stay in host memory, next to its CPU attention."""
    import onnxruntime as ort

    from radtrt.runtime.ort import OrtBackend

    calls = []
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_shape_and_type",
                        lambda *args, **kwargs: calls.append(args) or "gpu buffer")
    fp32, fp16 = OrtBackend(bundle), OrtBackend(bundle_fp16)
    assert fp16._cache_buffer((1, 2, 3, 4)).device_name() == "cpu"  # the CPU provider: host memory
    fp32.provider = fp16.provider = "cuda"  # what a GPU host would have chosen (no CUDA provider here)
    assert fp16._cache_buffer((1, 2, 3, 4)) == "gpu buffer" and calls == [((1, 2, 3, 4), np.float16, "cuda", 0)]
    assert fp32._cache_buffer((1, 2, 3, 4)).device_name() == "cpu"


def test_spinning_threads_only_within_a_run(bundle: Path) -> None:
    from radtrt.runtime.ort import OrtBackend

    def entries(backend: OrtBackend) -> set[tuple[str, str]]:
        opts = [s.get_session_options() for s in (backend.vision, backend.decoder)]
        return {(o.get_session_config_entry("session.intra_op.allow_spinning"),
                 o.get_session_config_entry("session.force_spinning_stop")) for o in opts}

    assert entries(OrtBackend(bundle, spin=True)) == {("1", "1")}
    quiet = OrtBackend(bundle)
    assert {s.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
            for s in (quiet.vision, quiet.decoder)} == {"0"}


def test_export_check_runs_without_prepacked_weight_copies(bundle: Path, model_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The check runs beside the PyTorch model at the export's memory peak: no packed copies of the weights."""
    import radtrt.runtime.ort as ort_runtime
    from radtrt.exporter.check import check_bundle_against_torch

    opened = []

    class Recording(ort_runtime.OrtBackend):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            opened.append({s.get_session_options().get_session_config_entry("session.disable_prepacking")
                           for s in (self.vision, self.decoder)})

    monkeypatch.setattr(ort_runtime, "OrtBackend", Recording)
    result = check_bundle_against_torch(bundle, load_model(model_dir).model, steps=2)
    assert opened == [{"1"}] and result["greedy_tokens_equal"] is True


def test_a_model_with_few_positions_left_exports(tmp_path: Path) -> None:
    """A plain-template model whose positions hold its prompt and a token or two (load_model lets it through): the
    export's check fed it the image and 8 tokens + 4 new ones, and refused it with infer's advice ("shorten
    --indication or lower --max-new-tokens"), options export does not have."""
    import dataclasses

    from radtrt.model.tiny import train_tiny_tokenizer

    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, conv_template="plain", decoder=dataclasses.replace(
        cfg.decoder, max_position_embeddings=cfg.num_image_tokens + 2))
    model = save_toolkit(LoadedModel(random_model(cfg, seed=0), train_tiny_tokenizer(), "few"), tmp_path / "model")
    result = runner.invoke(app, ["export", "--model", str(model), "-o", str(tmp_path / "bundle")])
    assert result.exit_code == 0, result.stderr
    assert "greedy tokens identical over 1 steps" in " ".join(result.stderr.split())


def test_auto_backend_picks_onnxruntime_for_a_bundle(bundle: Path, studies: list[Path]) -> None:
    result = runner.invoke(app, ["infer", str(studies[0]), "--bundle", str(bundle), "--json", "--max-new-tokens", "2"])
    assert result.exit_code == 0 and json.loads(result.stdout)["backend"] == "onnxruntime"
    assert "no CUDA GPU visible here, so ONNX Runtime on the CPU" in result.stderr and "spinning" not in result.stderr
    spun = runner.invoke(app, ["infer", str(studies[0]), "--bundle", str(bundle), "--json", "--max-new-tokens", "2",
                               "--ort-spin"])
    assert spun.exit_code == 0 and "provider cpu, spinning threads" in spun.stderr
    assert json.loads(spun.stdout)["token_ids"] == json.loads(result.stdout)["token_ids"]


def _copy(bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(bundle, out)
    return out


def _refused(args: list[str], match: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("radtrt: error:") and match in result.stderr
    assert "Traceback" not in result.stderr


def test_corrupt_bundle_file_is_refused(bundle: Path, studies: list[Path], tmp_path: Path) -> None:
    copy = _copy(bundle, tmp_path)
    data = copy / "decoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    _refused(["infer", str(studies[0]), "--bundle", str(copy)], "does not match its manifest hash")


def test_corrupt_embedding_table_with_a_matching_hash_is_refused(bundle: Path, studies: list[Path],
                                                                   tmp_path: Path) -> None:
    """A table that cannot be read is one line even when the manifest was edited to match it."""
    copy = _copy(bundle, tmp_path)
    table = copy / "embed_tokens.safetensors"
    table.write_bytes(table.read_bytes()[:2000])
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["embed_tokens.safetensors"].update(sha256=sha256_file(table), bytes=table.stat().st_size)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    _refused(["infer", str(studies[0]), "--bundle", str(copy)], "embed_tokens.safetensors is truncated or corrupt")


def test_a_file_given_as_the_bundle_is_said_to_be_one(studies: list[Path]) -> None:
    """It was 'bundle directory not found', though the path exists."""
    _refused(["infer", str(studies[0]), "--bundle", str(studies[0])], f"{studies[0]} is a file, not a bundle folder")


def test_bundle_from_another_version_is_refused(bundle: Path, studies: list[Path], tmp_path: Path) -> None:
    copy = _copy(bundle, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = BUNDLE_FORMAT_VERSION + 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    _refused(["infer", str(studies[0]), "--bundle", str(copy)], "re-export")


@pytest.mark.parametrize("damage", ["binary", "list", "no files", "files null", "no precision", "int3",
                                    "no decoder", "no model name"])
def test_damaged_manifest_is_refused(bundle: Path, studies: list[Path], tmp_path: Path, damage: str) -> None:
    copy = _copy(bundle, tmp_path)
    path = copy / "manifest.json"
    manifest = json.loads(path.read_text())
    edits = {"no files": lambda m: m.pop("files"), "files null": lambda m: m.update(files=None),
             "no precision": lambda m: m.pop("precision"), "int3": lambda m: m.update(precision="int3"),
             "no decoder": lambda m: m.pop("decoder"), "no model name": lambda m: m["model"].pop("name")}
    if damage == "binary":
        path.write_bytes(b"\xff\xfe\x00garbage")
    elif damage == "list":
        path.write_text("[1, 2]")
    else:
        edits[damage](manifest)
        path.write_text(json.dumps(manifest))
    _refused(["infer", str(studies[0]), "--bundle", str(copy)], str(path))


@pytest.mark.parametrize("precision, match", [("fp16", "decoder.onnx takes float32 embeddings"),
                                              ("int8", "without an INT8 quantization record")])
def test_a_precision_the_graphs_do_not_have_is_refused(bundle: Path, studies: list[Path], tmp_path: Path,
                                                       precision: str, match: str) -> None:
    """An edited precision was taken at its word: infer's records and bench's sides named the wrong one."""
    copy = _copy(bundle, tmp_path)
    path = copy / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "precision": precision}))
    _refused(["infer", str(studies[0]), "--bundle", str(copy)], match)


def _set(section: str, key: str, value: object) -> Callable[[dict], None]:
    return lambda m: m[section].update({key: value})


@pytest.mark.parametrize("edit, match", [
    (_set("decoder", "num_layers", 7), "decoder.num_layers is 7, the model's is 2"),  # a binding traceback
    (_set("decoder", "kv_cache", "int4"), "kv_cache 'int4' unknown"),
    (_set("decoder", "attention", "weird"), "attention 'weird'"),
    (_set("vision", "image_size", 224), "vision.image_size is 224"),
    (lambda m: m.update(format_version=str(m["format_version"])), "format version '1' is not an integer"),  # "reads 1"
    (lambda m: m.update(format_version=2, tools=None), r"written by an unknown radtrt"),  # an AttributeError
    (lambda m: m.update(graphs=None), "'graphs' section is not an object"),  # an AttributeError
    (lambda m: (m.pop("graph_revision"), m["decoder"].pop("attention")), "exported by an older radtrt"),
    (lambda m: m.update(graph_revision=99), "exported by a newer radtrt"),  # ran as if it were this one's
    # an unlisted file escaped the hash check: a corrupted decoder.onnx.data ran with exit 0
    (lambda m: m["files"].pop("decoder.onnx.data"), "does not list decoder.onnx.data"),
    (lambda m: m["files"].pop("embed_tokens.safetensors"), "does not list embed_tokens.safetensors"),
    (lambda m: m["files"].pop("tokenizer_config.json"), "does not list tokenizer_config.json"),  # 'legacy' unchecked
    (lambda m: m["graphs"]["decoder.onnx"].update(inputs=[]), None),  # the graph's own inputs are what is bound
    (lambda m: m.pop("graphs"), None),  # a description only: the runtime reads the graphs themselves
])
def test_manifest_fields_disagreeing_with_the_model_are_refused(bundle: Path, studies: list[Path], tmp_path: Path,
                                                                  edit: Callable[[dict], None], match: str) -> None:
    """The manifest is not hashed; the fields the runtime sizes its buffers from are checked against the
    bundle's (hashed) model_config.json."""
    copy = _copy(bundle, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    if match is None:
        result = runner.invoke(app, ["infer", str(studies[0]), "--bundle", str(copy), "--max-new-tokens", "2"])
        assert result.exit_code == 0, result.stderr
    else:
        _refused(["infer", str(studies[0]), "--bundle", str(copy)], match)


@pytest.mark.parametrize("into", ["fused", "plain"])
def test_a_decoder_graph_of_the_other_attention_kind_is_refused(bundle: Path, bundle_plain: Path, studies: list[Path],
                                                                tmp_path: Path, into: str) -> None:
    """A decoder copied in from another bundle, its hashes updated: an ONNX Runtime binding traceback (exit 1)."""
    target, source = (bundle, bundle_plain) if into == "fused" else (bundle_plain, bundle)
    copy = _copy(target, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    for name in ("decoder.onnx", "decoder.onnx.data"):
        if name in manifest["files"]:
            del manifest["files"][name]
            (copy / name).unlink()
    for name in ("decoder.onnx", "decoder.onnx.data"):
        if (source / name).is_file():
            shutil.copy(source / name, copy / name)
            manifest["files"][name] = {"sha256": sha256_file(copy / name), "bytes": (copy / name).stat().st_size}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    other = "plain" if into == "fused" else "fused"
    _refused(["infer", str(studies[0]), "--bundle", str(copy)],
             f"decoder.onnx does not match its manifest ({into} attention, 2 layers): the graph's inputs and outputs "
             f"are another decoder's ({other} attention, 2 layers)")


def test_an_embedding_table_of_another_shape_is_refused(bundle: Path, studies: list[Path], tmp_path: Path) -> None:
    """Re-hashed to match, a table of other rows or dtype was an IndexError / ONNX Runtime traceback."""
    from safetensors.numpy import load_file, save_file

    copy = _copy(bundle, tmp_path)
    table = copy / "embed_tokens.safetensors"
    weight = load_file(table)["weight"]
    for name, replaced in (("rows", weight[:10]), ("dtype", weight.astype("float64"))):
        save_file({"weight": replaced}, table)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["files"]["embed_tokens.safetensors"].update(sha256=sha256_file(table), bytes=table.stat().st_size)
        (copy / "manifest.json").write_text(json.dumps(manifest))
        _refused(["infer", str(studies[0]), "--bundle", str(copy)], "not the model's")


def test_a_config_whose_image_size_the_vision_graph_does_not_take_is_refused(bundle: Path, studies: list[Path],
                                                                               tmp_path: Path) -> None:
    """model_config.json and the manifest edited alike (and re-hashed): an ONNX Runtime shape traceback."""
    copy = _copy(bundle, tmp_path)
    config = json.loads((copy / "model_config.json").read_text())
    config["vision"]["img_size"] = config["vision"]["img_size"] + config["vision"]["patch_size"]
    (copy / "model_config.json").write_text(json.dumps(config))
    manifest = json.loads((copy / "manifest.json").read_text())
    grid = config["vision"]["img_size"] // config["vision"]["patch_size"]
    manifest["vision"].update(image_size=config["vision"]["img_size"], num_image_tokens=grid * grid)
    manifest["files"]["model_config.json"].update(sha256=sha256_file(copy / "model_config.json"),
                                                  bytes=(copy / "model_config.json").stat().st_size)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    _refused(["infer", str(studies[0]), "--bundle", str(copy)], "vision.onnx takes")


@pytest.mark.parametrize("extra, match", [
    (["--dtype", "float16"], "--dtype applies to the torch backend; this run uses onnxruntime"),
    (["--model", "/does/not/exist"], "--model directory not found: /does/not/exist"),  # ignored for the bundle
    (["--ort-provider", "cpu", "--trt-cache", "cache"], "--trt-cache is the TensorRT execution provider's"),
    (["--backend", "torch", "--model", "MODEL", "--ort-spin"], "--ort-spin applies to the onnxruntime backend"),
    (["--indication", "see <ima<image>ge> prior"], "contains the image placeholder"),  # failed every study
    (["--model", "MODEL"], "--model is not used: this run uses onnxruntime"),  # ran the bundle, ignored the model
    (["--backend", "torch", "--model", "MODEL"], "--bundle is not used: this run uses torch"),
    (["--trt-decoder", "w8a16"], "--trt-decoder picks a TensorRT-LLM engine of the tensorrt backend; this run uses "
                                 "onnxruntime"),
    (["--backend", "tensorrt", "--device", "cpu"], "--device cpu: the tensorrt backend runs on the GPU"),
    # ran on the CPU without a word: the provider decides
    (["--device", "cuda", "--ort-provider", "cpu"], "--device cuda contradicts --ort-provider cpu"),
    (["--device", "cpu", "--ort-provider", "cuda"], "--device cpu contradicts --ort-provider cuda"),
])
def test_infer_options_the_run_would_ignore_are_refused(bundle: Path, model_dir: Path, studies: list[Path],
                                                        extra: list[str], match: str) -> None:
    extra = [str(model_dir) if a == "MODEL" else a for a in extra]
    _refused(["infer", str(studies[0]), "--bundle", str(bundle), *extra], match)


def test_an_sr_says_which_weights_precision_and_backend_wrote_it(bundle: Path, model_dir: Path, studies: list[Path],
                                                                 tmp_path: Path) -> None:
    """Every SR's version was radtrt's own: an INT8 bundle's SR could not be told from the fp32 model's."""
    import pydicom

    versions = {}
    for name, args in (("torch", ["--model", str(model_dir)]), ("ort", ["--bundle", str(bundle)])):
        result = runner.invoke(app, ["infer", str(studies[0]), *args, "--max-new-tokens", "2", "--sr-out",
                                     str(tmp_path / name)])
        assert result.exit_code == 0, result.stderr
        (sr,) = (tmp_path / name).glob("*.dcm")
        versions[name] = list(pydicom.dcmread(sr).SoftwareVersions)
    weights = json.loads((bundle / "manifest.json").read_text())["model"]["weights_fingerprint_fp16"][:16]
    assert versions["torch"][0] == f"weights {weights}, fp32 on torch"  # one id for a model and its bundles
    assert versions["ort"][0] == f"weights {weights}, fp32 on onnxruntime"


def test_a_failed_study_is_named_as_given(bundle: Path, studies: list[Path], tmp_path: Path) -> None:
    """In a run of several studies, the error named only 'frontal.dcm', the file inside the study folder."""
    broken = tmp_path / "study-7"
    broken.mkdir()
    (broken / "frontal.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    result = runner.invoke(app, ["infer", str(studies[0]), str(broken), "--bundle", str(bundle), "--json",
                                 "--max-new-tokens", "2"])
    # the folder's PNG is screened with its header, as a DICOM is: unusable, so the folder has none usable
    assert result.exit_code == 2 and f"radtrt: error: {broken}: no usable image in folder: frontal.png: " \
        in result.stderr, result.stderr
    ran, failed = [json.loads(line) for line in result.stdout.splitlines()]  # the other study still ran
    assert ran["token_ids"] and failed == {"study": str(broken), "error": failed["error"], "stage": "input"}


def test_malformed_model_config_with_a_matching_hash_is_refused(bundle: Path, studies: list[Path],
                                                                 tmp_path: Path) -> None:
    copy = _copy(bundle, tmp_path)
    config = copy / "model_config.json"
    config.write_text('{"x": 1}')  # a KeyError traceback from the runtime
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["model_config.json"].update(sha256=sha256_file(config), bytes=config.stat().st_size)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    _refused(["infer", str(studies[0]), "--bundle", str(copy)], "model_config.json is malformed")


def test_graph_onnxruntime_cannot_load_is_refused(bundle: Path, tmp_path: Path) -> None:
    from radtrt.runtime.ort import OrtBackend

    copy = _copy(bundle, tmp_path)
    (copy / "decoder.onnx").write_bytes(b"not an onnx graph")
    with pytest.raises(RadtrtError, match="ONNX Runtime cannot load decoder.onnx"):
        OrtBackend(copy, verify=False)


def test_not_a_bundle_is_refused(model_dir: Path, studies: list[Path]) -> None:
    _refused(["infer", str(studies[0]), "--bundle", str(model_dir)], "not a radtrt bundle")


def test_a_bundle_given_as_model_is_named_so(bundle: Path, studies: list[Path], tmp_path: Path) -> None:
    """'missing file: BUNDLE/config.json' left the user guessing."""
    for args in (["export", "--model", str(bundle), "-o", str(tmp_path / "b")],
                 ["infer", str(studies[0]), "--model", str(bundle)],
                 ["calibrate", "--model", str(bundle), "--data", "phantom", "--n", "1", "-o", str(tmp_path / "c.safetensors")]):
        _refused(args, f"{bundle} is an ONNX bundle, not a model: --model takes the model folder it was exported from")


@pytest.mark.parametrize("extra, match", [
    (["--precision", "int8"], "needs calibration data"),
    (["--target", "tensorrt"], "no CUDA GPU"),
    (["--target", "all"], "no CUDA GPU"),
    (["--target", "trtllm", "--int8-decoder", "smoothquant", "--precision", "int8"], "calibration statistics"),
    (["--target", "triton"], "--bundle"),
    (["--target", "tensor"], "unknown export target"),
    # options this export would not use were accepted without a word
    (["--precision", "fp16", "--smoothquant-alpha", "0.7"], "--smoothquant-alpha applies to SmoothQuant"),
    (["--precision", "fp32", "--parity-samples", "3"], "--parity-samples applies to the ONNX INT8 export only"),
    (["--precision", "fp32", "--fp32-lm-head"], "--fp32-lm-head applies to the ONNX INT8 export only"),
    (["--precision", "int8", "--int8-decoder", "weight-only", "--smoothquant-alpha", "0.9",
      "--calibration-data", "phantom"], "--smoothquant-alpha applies to SmoothQuant"),
    (["--precision", "int8", "--calibration-data", "phantom", "--calibration-stats", "c.safetensors"], "not both"),
    (["--precision", "int8", "--int8-decoder", "", "--calibration-data", "phantom"], "unknown --int8-decoder ''"),
    (["--precision", "fp16", "--calibration-stats", "c.safetensors"], "--calibration-stats is used by INT8 exports"),
    (["--precision", "int8", "--calibration-stats", "nowhere.safetensors"], "no such file"),  # ignored: exit 0
])
def test_export_refusals(model_dir: Path, tmp_path: Path, extra: list[str], match: str) -> None:
    _refused(["export", "--model", str(model_dir), "-o", str(tmp_path / "b"), *extra], match)


def test_export_refuses_a_non_empty_output(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("user data")
    _refused(["export", "--model", str(model_dir), "-o", str(tmp_path / "b")], "is not empty")
    assert (tmp_path / "b" / "keep.txt").read_text() == "user data"
    (tmp_path / "f").write_text("a file")
    _refused(["export", "--model", str(model_dir), "-o", str(tmp_path / "f" / "b")], "is not a folder")


def test_failed_export_leaves_nothing_behind(model_dir: Path, tmp_path: Path) -> None:
    """A failure inside the export (here: calibration data without one usable study) removes its work folder."""
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "notes.txt").write_text("no studies here")
    _refused(["export", "--model", str(model_dir), "--precision", "int8", "--calibration-data",
              str(tmp_path / "calib"), "-o", str(tmp_path / "b")], "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib"]


def test_onnxruntime_backend_without_bundle_is_refused(model_dir: Path, studies: list[Path]) -> None:
    _refused(["infer", str(studies[0]), "--model", str(model_dir), "--backend", "onnxruntime"], "--bundle")


def test_unavailable_provider_is_refused(bundle: Path, studies: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import radtrt.runtime.ort as ort_runtime

    monkeypatch.setattr(ort_runtime, "available_providers", lambda: ["CPUExecutionProvider"])  # on GPU hosts too
    _refused(["infer", str(studies[0]), "--bundle", str(bundle), "--ort-provider", "tensorrt"],
             "TensorrtExecutionProvider")


@pytest.fixture(scope="module")
def bundle_fp16(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _exported(model_dir, tmp_path_factory, "--precision", "fp16")


def test_fp16_bundle_within_stated_tolerance_of_fp32_torch(bundle_fp16: Path, model_dir: Path,
                                                           studies: list[Path]) -> None:
    """fp16 tolerances (README): image-embedding cosine >= 0.999, first-step logits within 2% of their range."""
    from radtrt.benchmarks.parity import FP16_MAX_LOGIT_REL_DIFF, FP16_MIN_VISION_COSINE
    from radtrt.runtime.ort import OrtBackend

    manifest = read_manifest(bundle_fp16)
    assert manifest["precision"] == "fp16" and manifest["decoder"]["kv_cache"] == "float16"
    ref = load_model(model_dir).model
    ort = OrtBackend(bundle_fp16)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_img = ref.encode_images(pixels)
    got_img = ort.encode_images(pixels).float()
    cos = torch.nn.functional.cosine_similarity(got_img.flatten(1), ref_img.flatten(1))
    assert float(cos.min()) >= FP16_MIN_VISION_COSINE == 0.999
    embeds = [torch.cat([ref_img[0], ref.language_model.embed(torch.arange(1, 9))])]
    from radtrt.model.generate import greedy_generate

    r = greedy_generate(ref.language_model, embeds, eos_token_id=-1, max_new_tokens=1, keep_logits=True)
    g = ort.generate([e.half() for e in embeds], eos_token_id=-1, max_new_tokens=1, keep_logits=True)
    span = float(r.first_logits.max() - r.first_logits.min())
    assert float((g.first_logits - r.first_logits).abs().max()) <= FP16_MAX_LOGIT_REL_DIFF * span == 0.02 * span
    fp16 = _infer(*studies, "--bundle", bundle_fp16)
    fp32 = _infer(*studies, "--model", model_dir, "--backend", "torch")
    same = sum(a["token_ids"] == b["token_ids"] for a, b in zip(fp16, fp32))
    assert {r["precision"] for r in fp16} == {"fp16"}
    print(f"fp16 ONNX Runtime vs fp32 torch: {same}/{len(studies)} identical token sequences")


def test_trtllm_checkpoint_added_to_a_bundle_without_a_gpu(bundle_fp16: Path, model_dir: Path,
                                                           tmp_path: Path) -> None:
    """The GPU-independent TensorRT-LLM checkpoint is written anywhere; the engine build waits for the target."""
    copy = _copy(bundle_fp16, tmp_path)
    args = ["export", "--model", str(model_dir), "--bundle", str(copy), "--target", "trtllm", "--precision", "int8"]
    _refused([*args, "-o", str(tmp_path / "elsewhere")], "drop -o")  # engines go into the bundle, not elsewhere
    result = runner.invoke(app, args)  # no -o needed with --bundle
    assert result.exit_code == 0, result.stderr
    assert runner.invoke(app, [*args[:-2]]).exit_code == 0  # without --precision: the bundle's own, fp16
    assert (copy / "trtllm" / "checkpoint-fp16" / "config.json").is_file()
    ckpt = copy / "trtllm" / "checkpoint-w8a16"
    config = json.loads((ckpt / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == "W8A16" and (ckpt / "rank0.safetensors").is_file()
    # the GPU host's command keeps the decoder's precision chosen here (the bundle's own is fp16)
    assert (f"the model must be there too) with: radtrt export --bundle {copy} --target trtllm --model {model_dir} "
            f"--precision int8") in " ".join(result.stderr.split())
    read_manifest(copy)  # the bundle's own files are untouched
    assert json.loads((copy / "manifest.json").read_text())["model"]["weights_fingerprint_fp16"]

    # the checkpoint must come from the model the bundle's graphs were exported from
    other = save_toolkit(LoadedModel(random_model(preset("tiny"), seed=1), load_model(model_dir).tokenizer, "other"),
                         tmp_path / "other", dtype=torch.float32)
    _refused(["export", "--model", str(other), "--bundle", str(copy), "--target", "trtllm"], "other weights")
    _refused(["export", "--bundle", str(copy), "--target", "trtllm"], "needs --model as well")
    _refused(["export", "--bundle", str(copy), "--precision", "fp16"], "is already an ONNX bundle")  # a silent no-op


@pytest.mark.parametrize("extra, match", [
    # each was accepted and ignored, or (--calibration-data) refused with advice to pass it again
    (["--target", "trtllm", "--precision", "int8", "--int8-decoder", "smoothquant", "--calibration-data", "phantom"],
     "--calibration-data calibrates an ONNX INT8 export"),
    (["--target", "trtllm", "--attention", "plain"], "--attention chooses the ONNX decoder's attention"),
    # it suggested --calibration-stats, which --target triton refuses too
    (["--target", "triton", "--calibration-data", "phantom"], "is exported already: it serves engines built already"),
    (["--target", "trtllm", "--trtllm-engine", "/srv/engine"], "--trtllm-engine names the decoder engine a Triton"),
    (["--target", "tensorrt", "--int8-kv-cache"], "--int8-kv-cache is the decoder's"),
    (["--target", "tensorrt", "--precision", "int8"], "built from the fp32 graphs of"),  # built an fp32 engine
    (["--target", "all", "--precision", "fp16"], "built from the fp32 graphs of"),
])
def test_options_an_existing_bundle_would_ignore_are_refused(bundle: Path, model_dir: Path, extra: list[str],
                                                             match: str) -> None:
    _refused(["export", "--model", str(model_dir), "--bundle", str(bundle), *extra], match)


def test_max_batch_is_refused_where_no_engine_is_built(model_dir: Path, tmp_path: Path) -> None:
    _refused(["export", "--model", str(model_dir), "--max-batch", "4", "-o", str(tmp_path / "b")],
             "--max-batch limits engines")
    assert not (tmp_path / "b").exists()


def test_fp16_bundle_and_trtllm_checkpoint_in_one_export(model_dir: Path, tmp_path: Path) -> None:
    """The fp16 export casts the loaded model in place; its own TensorRT-LLM step must still recognise it."""
    out = tmp_path / "b16"
    result = runner.invoke(app, ["export", "--model", str(model_dir), "--precision", "fp16", "--target", "trtllm",
                                 "--trtllm-logits", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert (out / "trtllm" / "checkpoint-fp16" / "rank0.safetensors").is_file()
    # the GPU host's command keeps this run's options (a bare 'radtrt export --target trtllm' lost --trtllm-logits
    # and --model)
    assert (f"the model must be there too) with: radtrt export --bundle {out} --target trtllm --model {model_dir} "
            f"--precision fp16 --trtllm-logits") in " ".join(result.stderr.split())


def test_triton_repository_from_a_bundle(bundle_fp16: Path, tmp_path: Path) -> None:
    from radtrt.exporter.triton import check_repo

    repo = tmp_path / "repo"
    args = ["export", "--target", "triton", "--bundle", str(bundle_fp16), "-o", str(repo)]
    _refused(args, "--trtllm-engine")
    _refused([a for a in args if a not in ("-o", str(repo))] + ["--trtllm-engine", str(tmp_path)], "-o/--out is required")
    # a relative path was resolved on this host and written as the serving host's
    _refused([*args, "--trtllm-engine", "engines/llava-rad"], "give the engine folder's absolute path")
    # radtrt's own checkpoint folder given as the engine: a KeyError traceback
    checkpoint = tmp_path / "checkpoint-fp16"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"architecture": "LlamaForCausalLM", "dtype": "float16"}))
    _refused([*args, "--trtllm-engine", str(checkpoint)], "is not a TensorRT-LLM engine folder")
    assert not repo.exists()
    engine = tmp_path / "engines \N{GRINNING FACE}" / "llava-rad"  # outside the BMP: written as UTF-8, not \ud83d
    result = runner.invoke(app, [*args, "--trtllm-engine", str(engine)])
    assert result.exit_code == 0, result.stderr
    check_repo(repo)
    assert (repo / "radtrt" / "config.pbtxt").is_file()
    # where it can be served, said and kept beside the models
    assert "serve it from the tritonserver TensorRT-LLM image of the TensorRT-LLM release that built the decoder " \
           "engine" in " ".join(result.stderr.split())
    text = (repo / "tensorrt_llm" / "config.pbtxt").read_text(encoding="utf-8")
    assert str(engine) in text and "\\ud83d" not in text


def test_triton_repository_refuses_damage_infer_refuses(bundle_fp16: Path, tmp_path: Path) -> None:
    """Files damaged and re-hashed in the manifest: a truncated vision graph was a DecodeError traceback, a truncated
    tokenizer a repository whose servers fail to start, and an edited (unhashed) eos id in the manifest cut every
    served report at that token."""
    def repo_of(edit: Callable[[Path, dict], None]) -> tuple[Any, Path]:
        copy = Path(shutil.copytree(bundle_fp16, tmp_path / f"copy{len(list(tmp_path.iterdir()))}"))
        manifest = json.loads((copy / "manifest.json").read_text())
        edit(copy, manifest)
        for name, meta in manifest["files"].items():
            meta.update(sha256=sha256_file(copy / name), bytes=(copy / name).stat().st_size)
        (copy / "manifest.json").write_text(json.dumps(manifest))
        repo = copy.with_name(copy.name + "-repo")
        return runner.invoke(app, ["export", "--target", "triton", "--bundle", str(copy), "-o", str(repo),
                                   "--trtllm-engine", "/srv/engine"]), repo

    def truncate(name: str) -> Callable[[Path, dict], None]:
        return lambda copy, _: (copy / name).write_bytes((copy / name).read_bytes()[:100])

    for name, match in (("vision.onnx", "vision.onnx is not a readable ONNX graph"),
                        ("tokenizer.model", "tokenizer.model is not a valid sentencepiece model")):
        result, repo = repo_of(truncate(name))
        assert result.exit_code == 2 and match in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not repo.exists()
    result, repo = repo_of(lambda _, m: m["decoder"].update(eos_token_id=5))
    assert result.exit_code == 0, result.stderr
    post = (repo / "postprocessing" / "config.pbtxt").read_text()
    assert 'key: "eos_token_id"' in post and 'string_value: "2"' in post.split('key: "eos_token_id"')[1][:80]


def test_cast_on_load_tells_a_float16_model_from_a_float32_one(tmp_path: Path) -> None:
    """An fp16-converted model is cast to an in-memory fp32 copy by the export (the CLI says so when large);
    an fp32 one is read memory-mapped."""
    from radtrt.model.loading import LoadedModel, cast_on_load
    from radtrt.model.tiny import random_model, train_tiny_tokenizer

    loaded = LoadedModel(random_model(seed=0), train_tiny_tokenizer(), "tiny")
    params = sum(p.numel() for p in loaded.model.state_dict().values())
    half = save_toolkit(loaded, tmp_path / "half", dtype=torch.float16)
    full = save_toolkit(loaded, tmp_path / "full", dtype=torch.float32)
    assert cast_on_load(half) == ("float16", 4 * params)
    assert cast_on_load(full) is None and cast_on_load(half, torch.float16) is None


@pytest.mark.parametrize("target, extra, match", [
    ("tensorrt", {"int8_decoder": "weight-only"}, "--int8-decoder is the decoder's"),
    ("triton", {"int8_kv_cache": True, "trtllm_engine": Path("/srv/e")}, "--int8-kv-cache chooses which engine"),
    ("triton", {"int8_decoder": "smoothquant", "trtllm_engine": Path("/srv/e")}, "--int8-decoder chooses which engine"),
])
def test_decoder_options_no_decoder_step_uses_are_refused(tmp_path: Path, target: str, extra: dict, match: str) -> None:
    from radtrt.exporter.targets import refuse_unused_options

    options = dict(precision="int8", target=target, bundle=tmp_path, int8_decoder=None, calibration_data=None,
                   calibration_stats=None, int8_kv_cache=False, int8_only={
                       k: False for k in ("--calibration-n", "--smoothquant-alpha", "--fp32-lm-head",
                                          "--fp32-embeddings", "--parity-samples")})
    with pytest.raises(RadtrtError, match=match):
        refuse_unused_options(**{**options, **extra})


@pytest.mark.parametrize("target, bundle_given, used", [
    ("tensorrt", True, False), ("triton", True, False), ("triton", False, False),
    ("tensorrt", False, True), ("trtllm", True, True), ("all", True, True), ("onnx", False, True),
])
def test_model_options_no_step_reads_are_refused(tmp_path: Path, target: str, bundle_given: bool, used: bool) -> None:
    """A vision engine is built from the bundle's graphs: --bundle B --target tensorrt --model /nonexistent
    exited 0."""
    from radtrt.exporter.targets import refuse_unused_options

    options = {"precision": "fp32", "target": target, "bundle": tmp_path if bundle_given else None,
               "int8_decoder": None, "calibration_data": None, "calibration_stats": None, "int8_kv_cache": False,
               "int8_only": {k: False for k in ("--calibration-n", "--smoothquant-alpha", "--fp32-lm-head",
                                                "--fp32-embeddings", "--parity-samples")}}
    for flag in ("model_given", "base_model_given"):
        if used:
            refuse_unused_options(**options, **{flag: True})
            continue
        with pytest.raises(RadtrtError, match=f"drop --{flag[:-6].replace('_', '-')}$"):
            refuse_unused_options(**options, **{flag: True})


def test_vision_engine_of_a_bundle_takes_no_model(bundle: Path, tmp_path: Path) -> None:
    for flag in ("--model", "--base-model"):
        _refused(["export", "--bundle", str(bundle), "--target", "tensorrt", flag, str(tmp_path / "nonexistent")],
                 f"builds the vision engine from the graphs of {bundle}, not from a model; drop {flag}")


def test_a_failed_vision_engine_says_the_bundle_is_complete_and_how_to_retry(
        model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a (simulated) GPU host whose engine build fails after the bundle is written: exit 2 with one line
    that says so and how to build only the engine; rerunning the same command was refused ('not empty')."""
    import radtrt.exporter.gpu as gpu_module
    import radtrt.exporter.tensorrt as tensorrt_module
    from radtrt.errors import fail
    from radtrt.exporter.gpu import GpuInfo

    t4 = GpuInfo("Tesla T4", (7, 5), "12.4", "10.4.0", None, 15.0)
    monkeypatch.setattr(gpu_module, "detect_gpu", lambda device=0: t4)

    def refused(*args: object, **kwargs: object) -> bytes:
        fail("TensorRT could not build the vision engine (its log above says why)")

    monkeypatch.setattr(tensorrt_module, "_build_serialized", refused)
    out = tmp_path / "b"
    _refused(["export", "--model", str(model_dir), "--target", "tensorrt", "--max-batch", "4", "-o", str(out)],
             f"TensorRT could not build the vision engine (its log above says why); the ONNX bundle at {out} is "
             f"complete: retry only the engine with: radtrt export --bundle {out} --target tensorrt --max-batch 4")
    read_manifest(out)  # complete and verified
    assert not (out / "tensorrt").exists()
    monkeypatch.setattr(tensorrt_module, "_build_serialized", lambda *a, **k: b"plan")
    result = runner.invoke(app, ["export", "--bundle", str(out), "--target", "tensorrt", "--max-batch", "4"])
    assert result.exit_code == 0, result.stderr
    assert (out / "tensorrt" / "tesla-t4_sm75_trt10.4.0_fp32" / "engine.json").is_file()


def test_retry_command_carries_the_engine_options(tmp_path: Path) -> None:
    from radtrt.exporter.targets import ExportPlan, retry_engines_command

    bundle = tmp_path / "my bundle"
    sq = ExportPlan("all", "int8", "smoothquant", True, tmp_path / "stats", 4, smoothquant_alpha=0.8)
    assert retry_engines_command(bundle, "tensorrt", sq, model=Path("m"), base_model=Path("v"), max_batch_given=True,
                                 alpha_given=True) == (
        f"radtrt export --bundle '{bundle}' --target all --model m --base-model v --int8-decoder smoothquant "
        f"--int8-kv-cache --calibration-stats {tmp_path / 'stats'} --smoothquant-alpha 0.8 --max-batch 4")
    assert retry_engines_command(bundle, "trtllm", sq, model=Path("m")).startswith(
        f"radtrt export --bundle '{bundle}' --target trtllm --model m --int8-decoder")
    # weight-only: no statistics read, so none passed (--bundle would refuse them), nor a SmoothQuant alpha
    w8 = ExportPlan("trtllm", "int8", None, False, tmp_path / "stats", smoothquant_alpha=0.8)
    assert retry_engines_command(bundle, "trtllm", w8, model=Path("m"), alpha_given=True) == (
        f"radtrt export --bundle '{bundle}' --target trtllm --model m")
    assert retry_engines_command(bundle, "tensorrt", ExportPlan("tensorrt", "fp16")) == (
        f"radtrt export --bundle '{bundle}' --target tensorrt")
    assert retry_engines_command(bundle, "trtllm", ExportPlan("trtllm", "fp16", keep_logits=True),
                                 model=Path("m")).endswith("--model m --trtllm-logits")


def test_triton_takes_no_model(bundle_fp16: Path, model_dir: Path, tmp_path: Path) -> None:
    _refused(["export", "--target", "triton", "--bundle", str(bundle_fp16), "-o", str(tmp_path / "repo"),
              "--trtllm-engine", "/srv/engine", "--model", str(model_dir)], "writes its repository from --bundle alone")


def test_triton_with_an_engine_refuses_a_precision(bundle_fp16: Path, tmp_path: Path) -> None:
    """The engine named is served as it was built: --precision int8 and fp32 wrote identical repositories."""
    _refused(["export", "--target", "triton", "--bundle", str(bundle_fp16), "-o", str(tmp_path / "repo"),
              "--trtllm-engine", "/srv/engine", "--precision", "int8"], "--precision chooses which engine")
    assert not (tmp_path / "repo").exists()


def test_trtllm_logits_builds_an_engine_parity_can_read(bundle_fp16: Path, model_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Engines from 'radtrt export' never kept their logits, so 'bench parity --backend tensorrt' could not run
    on them; --trtllm-logits builds one that does, and is refused where no engine is built."""
    import shutil

    import radtrt.exporter.gpu as gpu_module
    import radtrt.exporter.trtllm_build as build_module
    from radtrt.exporter.gpu import GpuInfo

    a100 = GpuInfo("NVIDIA A100-SXM4-80GB", (8, 0), "12.4", "10.8.0", "0.16.0", 80.0)
    monkeypatch.setattr(gpu_module, "detect_gpu", lambda device=0: a100)
    monkeypatch.setattr(gpu_module, "library_version", lambda name: "0.16.0")
    built: list[dict] = []

    def build(bundle: Path, checkpoint: Path, gpu: GpuInfo, limits: object, **kwargs: object) -> Path:
        built.append(kwargs)
        return bundle / "trtllm" / "engine"

    monkeypatch.setattr(build_module, "build_decoder_engine", build)
    bundle = Path(shutil.copytree(bundle_fp16, tmp_path / "b"))
    result = runner.invoke(app, ["export", "--bundle", str(bundle), "--model", str(model_dir), "--target", "trtllm",
                                 "--trtllm-logits"])
    assert result.exit_code == 0, result.stderr
    assert built == [{"gather_generation_logits": True}]
    _refused(["export", "--bundle", str(bundle), "--target", "tensorrt", "--trtllm-logits"],
             "--trtllm-logits is a TensorRT-LLM engine build option")


@pytest.mark.parametrize("edit, match", [
    # not objects where the code reads fields of them: AttributeError / TypeError tracebacks
    (lambda m: m["graphs"].update({"decoder.onnx": 5}), r"graphs\['decoder.onnx'\] is not an object"),
    (lambda m: m["graphs"].update({"vision.onnx": "x"}), r"graphs\['vision.onnx'\] is not an object"),
    (lambda m: m["graphs"]["decoder.onnx"].update(inputs="x"), r"graphs\['decoder.onnx'\].inputs is 'x'"),
    (lambda m: m.update(vision=[1]), "its 'vision' section is not an object"),
    (lambda m: m["decoder"].update(num_layers="2"), "decoder.num_layers is '2', not a whole number"),
    (lambda m: m["decoder"].update(hidden_size=None), "decoder.hidden_size is None, not a whole number"),
    (lambda m: m["vision"].pop("num_image_tokens"), "no vision.num_image_tokens"),
    (lambda m: m["model"].update(weights_fingerprint_fp16=7), "model.weights_fingerprint_fp16 is 7, not a string"),
    (lambda m: m.update(graph_revision="6"), "graph_revision is '6', not a whole number"),
    (lambda m: m.update(format_version="1"), r"format version '1' is not an integer\): re-export the bundle$"),
    (lambda m: m.update(format_version=1.0), r"format version 1.0 is not an integer\): re-export the bundle$"),
    # the manifest's own revision is current: not "exported by an older radtrt (... revision 6; this radtrt writes 6)"
    (lambda m: m.update(decoder={}), "no decoder.num_layers"),
    (lambda m: m["decoder"].pop("attention"), "no decoder.attention"),
])
def test_a_damaged_manifest_structure_is_one_line(tmp_path: Path, edit: Callable[[dict], None], match: str) -> None:
    """Any damaged field the code reads is 'BUNDLE/manifest.json is damaged (...): re-export the bundle'."""
    from test_trt_vision import make_fake_bundle

    bundle = make_fake_bundle(tmp_path)
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["graphs"] = {"decoder.onnx": {"inputs": {"inputs_embeds": [1]}, "outputs": {}}, "vision.onnx": {}}
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(RadtrtError, match=match) as e:
        read_manifest(bundle)
    assert str(e.value).startswith(f"{path} is damaged (") and str(e.value).endswith(": re-export the bundle")


def test_bundle_version_and_missing_file_messages_give_the_remedy(tmp_path: Path) -> None:
    """A missing file had no remedy; a newer format version said only 're-export it', which this radtrt cannot
    read either; an older graph revision without the attention record is still 'an older radtrt'."""
    from test_trt_vision import make_fake_bundle

    from radtrt.exporter.onnx import GRAPH_REVISION

    bundle = make_fake_bundle(tmp_path)
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    for name in ("decoder.onnx", "embed_tokens.safetensors"):  # placeholders: only their presence is checked here
        (bundle / name).write_bytes(b"x")
        manifest["files"][name] = {"sha256": sha256_file(bundle / name), "bytes": 1}
    path.write_text(json.dumps(manifest))
    read_manifest(bundle)
    (bundle / "tokenizer.model").unlink()
    with pytest.raises(RadtrtError, match=f"bundle {bundle} is missing tokenizer.model: re-export the bundle$"):
        read_manifest(bundle)
    (bundle / "tokenizer.model").symlink_to("/dev/zero")  # read as missing
    with pytest.raises(RadtrtError, match=f"bundle file {bundle / 'tokenizer.model'} is not a regular file"):
        read_manifest(bundle)
    (bundle / "tokenizer.model").unlink()
    path.write_text(json.dumps({**manifest, "format_version": BUNDLE_FORMAT_VERSION + 1}))
    with pytest.raises(RadtrtError, match=r"has format version 2 .*: upgrade radtrt or re-export it with this one$"):
        read_manifest(bundle, verify=False)
    path.write_text(json.dumps({**manifest, "format_version": BUNDLE_FORMAT_VERSION - 1}))
    with pytest.raises(RadtrtError, match=r"has format version 0 .*: re-export it$"):
        read_manifest(bundle, verify=False)
    older = {**manifest, "graph_revision": GRAPH_REVISION - 1, "decoder": {
        k: v for k, v in manifest["decoder"].items() if k != "attention"}}
    path.write_text(json.dumps(older))
    with pytest.raises(RadtrtError, match=f"exported by an older radtrt .*graph revision {GRAPH_REVISION - 1};"):
        read_manifest(bundle, verify=False)


def test_a_vision_graph_of_another_precision_is_refused(bundle: Path, studies: list[Path], tmp_path: Path) -> None:
    """An fp16 vision.onnx copied into an fp32 bundle, its hashes updated: an ONNX Runtime InvalidArgument traceback
    at the first study (only the decoder's input type was checked against the precision)."""
    from onnx import TensorProto
    from test_trt_vision import vision_graph

    copy = _copy(bundle, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    for name in ("vision.onnx", "vision.onnx.data"):
        (copy / name).unlink(missing_ok=True)
        manifest["files"].pop(name, None)
    vision_graph(copy / "vision.onnx", dtype=TensorProto.FLOAT16, size=manifest["vision"]["image_size"])
    for name in ("vision.onnx", "vision.onnx.data"):
        manifest["files"][name] = {"sha256": sha256_file(copy / name), "bytes": (copy / name).stat().st_size}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    _refused(["infer", str(studies[0]), "--bundle", str(copy)],
             "manifest.json says precision fp32, but vision.onnx takes float16 pixels (an fp32 bundle's takes float32)")


def test_external_data_linked_out_of_the_bundle_is_named_with_the_remedy(bundle: Path, studies: list[Path],
                                                                         tmp_path: Path) -> None:
    """A bundle 'copied' with its .onnx.data as symbolic links to the original: ONNX Runtime's 'External data path
    escapes model directory' named neither the link nor what to do."""
    copy = tmp_path / "linked"
    copy.mkdir()
    for f in bundle.iterdir():
        if f.name == "decoder.onnx.data":
            (copy / f.name).symlink_to(f)
        elif f.is_file():
            shutil.copy(f, copy / f.name)
    assert any(f.is_symlink() for f in copy.iterdir())
    _refused(["infer", str(studies[0]), "--bundle", str(copy)],
             f"{copy}/decoder.onnx.data is a symbolic link out of the bundle folder (to {bundle.resolve()}/"
             f"decoder.onnx.data), which ONNX Runtime refuses to read: copy the bundle with real files, e.g. cp -rL")
    inside = _copy(bundle, tmp_path)  # a link within the folder is read as before
    (inside / "decoder.onnx.data").rename(inside / "real.data")
    (inside / "decoder.onnx.data").symlink_to("real.data")
    from radtrt.runtime.ort import _linked_out

    assert _linked_out(inside / "decoder.onnx") is None
    every = tmp_path / "every-file-linked"  # cp -rs: each graph resolves beside its data, which ORT reads
    every.mkdir()
    for f in bundle.iterdir():
        if f.is_file():
            (every / f.name).symlink_to(f)
    assert _linked_out(every / "decoder.onnx") is None and _linked_out(every / "vision.onnx") is None


def test_fused_attention_refuses_heads_its_kernel_cannot_run(tmp_path: Path) -> None:
    """head_dim 8: the fused graph was written, then the export check died in ONNX Runtime's GroupQueryAttention
    ('head_size shall be a multiple of 16') with a traceback and exit 1; --attention plain exports it."""
    import dataclasses

    from radtrt.model.config import preset
    from radtrt.model.loading import LoadedModel
    from radtrt.model.tiny import random_model, train_tiny_tokenizer

    c = preset("tiny")
    c = dataclasses.replace(c, decoder=dataclasses.replace(c.decoder, hidden_size=32, num_attention_heads=4,
                                                           num_key_value_heads=2, intermediate_size=64))
    model = save_toolkit(LoadedModel(random_model(c, seed=0), train_tiny_tokenizer(), "hd8"), tmp_path / "m",
                         dtype=torch.float32)
    result = runner.invoke(app, ["export", "--model", str(model), "-o", str(tmp_path / "b")])
    assert result.exit_code == 2 and not (tmp_path / "b").exists(), result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("this decoder's is 8: export it with --attention plain")
    assert "Traceback" not in result.stderr
    result = runner.invoke(app, ["export", "--model", str(model), "--attention", "plain", "-o", str(tmp_path / "b")])
    assert result.exit_code == 0, result.stderr

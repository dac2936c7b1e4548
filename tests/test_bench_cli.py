"""``radtrt bench`` end to end on the tiny preset: exit codes, outputs, and fp32 parity of the backends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from radtrt.benchmarks.assets import Assets, random_assets
from radtrt.benchmarks.cli import register
from radtrt.errors import RadtrtError

runner = CliRunner()


def _app() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.callback()
    def _root() -> None:
        """Test root."""

    register(app)
    return app


APP = _app()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-work")


@pytest.fixture(scope="module")
def tiny(work: Path) -> Assets:
    """The tiny random model and bundle, built once; CLI runs with --work-dir reuse them."""
    return random_assets("tiny", work, seed=0)


def _invoke(*args: object) -> tuple[int, str, str]:
    result = runner.invoke(APP, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_parity_onnxruntime_vs_torch_is_exact_in_fp32(tiny: Assets, work: Path) -> None:
    code, out, err = _invoke("bench", "parity", "--random-model", "tiny", "--work-dir", work, "--synthetic", 2,
                             "--max-new-tokens", 16, "--json")
    assert code == 0, err
    data = json.loads(out)
    s = data["summary"]
    assert data["backend"] == "onnxruntime" and data["reference"] == "torch"
    assert s["exact_match_rate"] == 1.0 and s["first_divergences"] == [None, None] and s["rouge_l_min"] == 1.0
    assert s["vision_cosine_min"] > 0.99999 and s["first_logits_max_abs_diff"] < 1e-3
    assert all(st["new_tokens"] > 0 for st in data["studies"])
    assert data["command"].startswith("radtrt bench parity --random-model tiny")



def test_parity_prompts_manifest_rows_with_their_own_indication_and_says_so(tiny: Assets, work: Path,
                                                                          tmp_path: Path) -> None:
    """Rows with an indication of their own: --indication prompts only the others (the report said nothing, and its
    command still named it), and an over-long row indication was blamed on --indication."""
    from radtrt.data.phantom_set import write_phantom_set

    manifest = write_phantom_set(tmp_path / "set", 2, 5, rows=96, cols=80, formats=("png",))
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[1]["indication"] = None
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = _invoke("bench", "parity", "--random-model", "tiny", "--work-dir", work, "--studies", manifest,
                             "--max-new-tokens", 4, "--indication", "Fever.", "--json")
    assert code == 0, err
    assert json.loads(out)["prompts"] == ("1 of 2 studies prompted with the indication of its manifest row; the "
                                          "others --indication")
    rows[0]["indication"] = "Shortness of breath after a fall. " * 60
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = _invoke("bench", "parity", "--random-model", "tiny", "--work-dir", work, "--studies", manifest,
                           "--max-new-tokens", 4)
    assert code == 2 and f"shorten the indication of phantom-00000.png in {manifest}" in " ".join(err.split()), err


def test_parity_on_a_phantom_manifest_reports_finding_labels(tiny: Assets, work: Path, tmp_path: Path) -> None:
    """``--studies`` a phantom set: its manifest rows are the studies and give the true labels."""
    from radtrt.data.phantom_set import write_phantom_set

    manifest = write_phantom_set(tmp_path / "set", 3, 5, rows=96, cols=80, formats=("png",))
    preds = tmp_path / "preds"
    code, out, err = _invoke("bench", "parity", "--random-model", "tiny", "--work-dir", work, "--studies",
                             manifest.parent, "--max-new-tokens", 8, "--json", "--predictions-out", preds,
                             "-o", tmp_path / "r.md")
    assert code == 0, err
    assert err.index("wrote ") < err.index("CheXprompt: radtrt eval")  # the next step once everything is written
    data = json.loads(out)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [st["true_labels"] for st in data["studies"]] == [r["labels"] for r in rows]
    assert [st["study"] for st in data["studies"]] == ["phantom-00000.png", "phantom-00001.png", "phantom-00002.png"]
    s = data["summary"]
    assert s["label_f1_vs_reference"] == 1.0  # fp32: identical reports, identical labels
    assert s["label_f1_drop"] == 0.0 and 0.0 <= s["label_f1_true"] <= 1.0
    # both sides' reports, with the manifest's findings as ground truth, for 'radtrt eval --paired' (CheXprompt)
    ref, cand = ([json.loads(line) for line in (preds / f"{n}.jsonl").read_text().splitlines()]
                 for n in ("reference", "candidate"))
    assert [r["reference"] for r in ref] == [r["reference"] for r in cand] == [r["findings"] for r in rows]
    assert [r["prediction"] for r in cand] == [st["report"] for st in data["studies"]]
    assert [r["prediction"] for r in ref] == [st["reference_report"] for st in data["studies"]]
    assert f"radtrt eval --paired {preds / 'reference.jsonl'} {preds / 'candidate.jsonl'}" in err
    from radtrt.cli import app

    result = runner.invoke(app, ["eval", "--paired", str(preds / "reference.jsonl"), str(preds / "candidate.jsonl"),
                                 "--metrics", "rouge,labels"])
    assert result.exit_code == 0, result.stderr
    # the printed command runs again as printed: the earlier predictions and report are replaced
    import shlex

    (preds / "candidate.jsonl").write_text("stale\n")
    code, _, err = _invoke(*shlex.split(data["command"])[1:])
    assert code == 0, err
    assert (preds / "candidate.jsonl").read_text().splitlines()[0] == json.dumps(cand[0])


def test_studies_sharing_a_file_name_are_named_apart(tiny: Assets, work: Path, tmp_path: Path) -> None:
    """A PACS-style set (every study's frontal.dcm) was three rows named 'frontal.dcm', and --predictions-out was
    refused for it."""
    from radtrt.data.phantom_set import write_phantom_set

    manifest = write_phantom_set(tmp_path / "set", 2, 5, rows=96, cols=80, formats=("dicom",))
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    frontal = manifest.with_name("frontal.jsonl")
    frontal.write_text("".join(json.dumps({**r, "image": f"{r['image']}/frontal.dcm"}) + "\n" for r in rows))
    code, out, err = _invoke("bench", "parity", "--random-model", "tiny", "--work-dir", work, "--studies", frontal,
                             "--max-new-tokens", 2, "--json", "--predictions-out", tmp_path / "preds")
    assert code == 0, err
    assert [st["study"] for st in json.loads(out)["studies"]] == ["phantom-00000/frontal.dcm", "phantom-00001/frontal.dcm"]
    frontal.write_text(frontal.read_text() + frontal.read_text().splitlines()[0] + "\n")
    code, _, err = _invoke("bench", "parity", "--random-model", "tiny", "--work-dir", work, "--studies", frontal,
                           "--max-new-tokens", 2, "--predictions-out", tmp_path / "preds2")
    assert code == 2 and "lists a study twice" in err


def test_study_names_that_are_not_utf8_or_hold_a_pipe_are_written_legibly(tiny: Assets, work: Path,
                                                                         tmp_path: Path) -> None:
    """A study named in Latin-1 (an old PACS export) made -o's strict UTF-8 writer raise UnicodeEncodeError (exit 1,
    no report) after the whole benchmark had run; a '|' in a name shifted every later column of its table row."""
    import os

    from radtrt.data.phantom_set import write_phantom_set

    manifest = write_phantom_set(tmp_path / "set", 2, 5, rows=96, cols=80, formats=("png",))
    studies = tmp_path / "studies"
    studies.mkdir()
    pngs = sorted(manifest.parent.rglob("*.png"))
    latin1, piped = studies / os.fsdecode(b"pt\xe9.png"), studies / "a|b.png"
    for source, name in zip(pngs, (latin1, piped)):
        name.write_bytes(source.read_bytes())
    out = tmp_path / os.fsdecode(b"r\xe9p") / "parity.md"
    code, _, err = _invoke("bench", "parity", "--random-model", "tiny", "--work-dir", work, "--studies", studies,
                           "--max-new-tokens", 2, "-o", out)
    assert code == 0, err
    text = out.read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith(("| pt", "| a"))]
    assert sorted(row.split(" | ")[0] for row in rows) == ["| a\\|b.png", "| pt\\xe9.png"], rows
    assert all(row.count(" | ") == rows[0].count(" | ") for row in rows)
    data = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert sorted(st["study"] for st in data["studies"]) == ["a|b.png", "pt\\xe9.png"]
    assert "r\\xe9p" in data["command"] and "r\\xe9p" in text


def test_predictions_written_before_an_interrupt_are_named_complete(tiny: Assets, work: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupt after --predictions-out was whole and before the reports were written said only 'no output
    was left half-written': the complete folder went unnamed (export and train name theirs)."""
    from radtrt import interrupts
    from radtrt.benchmarks import cli as bench_cli
    from radtrt.data.phantom_set import write_phantom_set

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    manifest = write_phantom_set(tmp_path / "set", 2, 5, rows=96, cols=80, formats=("png",))
    monkeypatch.setattr(bench_cli, "_emit", interrupted)
    monkeypatch.setattr(interrupts, "_complete", [])
    preds = tmp_path / "preds"
    _invoke("bench", "parity", "--random-model", "tiny", "--work-dir", work, "--studies", manifest.parent,
            "--max-new-tokens", 2, "--predictions-out", preds)
    assert interrupts._complete == [("paired predictions folder", str(preds))]
    assert (preds / "candidate.jsonl").is_file()


def test_a_report_written_before_an_interrupt_is_named_complete(tiny: Assets, work: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupt once the report set was in place said only 'no output was left half-written'."""
    from radtrt import interrupts

    monkeypatch.setattr(interrupts, "_complete", [])
    code, _, err = _invoke("bench", "latency", "--random-model", "tiny", "--work-dir", work, "--synthetic", 1,
                           "--runs", 1, "--warmup", 0, "--max-new-tokens", 2, "-o", tmp_path / "r.md")
    assert code == 0, err
    assert ("report", str(tmp_path / "r.md")) in interrupts._complete


def test_predictions_out_needs_ground_truth_findings(tiny: Assets, work: Path, tmp_path: Path) -> None:
    code, _, err = _invoke("bench", "parity", "--random-model", "tiny", "--work-dir", work, "--synthetic", 1,
                           "--predictions-out", tmp_path / "p")
    assert code == 2 and "--predictions-out needs --studies with ground-truth findings" in err
    assert not (tmp_path / "p").exists()


def test_a_manifest_without_findings_serves_parity_but_not_predictions_out(tiny: Assets, work: Path,
                                                                          tmp_path: Path) -> None:
    """Rows without 'findings' were refused for every bench ("'findings' is missing"), though only CheXprompt's
    predictions need them; --predictions-out refuses them before anything is built or run."""
    from radtrt.data.phantom_set import write_phantom_set

    manifest = write_phantom_set(tmp_path / "set", 1, 5, rows=96, cols=80, formats=("png",))
    bare = manifest.with_name("bare.jsonl")
    bare.write_text("".join(json.dumps({"image": json.loads(line)["image"]}) + "\n"
                            for line in manifest.read_text().splitlines()))
    code, out, err = _invoke("bench", "parity", "--random-model", "tiny", "--work-dir", work, "--studies", bare,
                             "--max-new-tokens", 2, "--json")
    assert code == 0, err
    assert [st["study"] for st in json.loads(out)["studies"]] == ["phantom-00000.png"]
    code, _, err = _invoke("bench", "parity", "--random-model", "tiny", "--work-dir", tmp_path / "w2", "--studies",
                           bare, "--max-new-tokens", 2, "--predictions-out", tmp_path / "p")
    assert code == 2 and "has studies without them" in err
    assert not (tmp_path / "w2").exists() and not (tmp_path / "p").exists()  # refused before the model's build


def test_studies_are_screened_before_the_model_is_built(tmp_path: Path) -> None:
    """A CT among --studies was found when it was read, after a random model's build (or a 7B model's load)."""
    from radtrt.imaging.synthetic import synthetic_chest, write_radiograph

    studies = tmp_path / "studies"
    write_radiograph(studies / "a" / "pa.dcm", synthetic_chest(seed=1), view_position="PA", study_uid="1.2.3.1")
    write_radiograph(studies / "b" / "pa.dcm", synthetic_chest(seed=2), view_position="PA", study_uid="1.2.3.2",
                     modality="CT")
    for command in ("latency", "parity"):
        code, _, err = _invoke("bench", command, "--random-model", "tiny", "--work-dir", tmp_path / "w", "--studies",
                               studies)
        assert code == 2 and "b: no usable image in folder: pa.dcm: modality 'CT'" in err, err
    assert not (tmp_path / "w").exists()


def test_a_run_that_cannot_fit_or_is_too_large_is_refused_before_it_starts(tiny: Assets, work: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """--max-new-tokens past the model's positions was refused after the bandwidth probe and a first run; a million
    --synthetic studies were written (200 KB each) until the disk filled."""
    import radtrt.benchmarks.api as api
    import radtrt.benchmarks.bandwidth as bandwidth

    def must_not_run(*_a: object, **_k: object) -> None:
        raise AssertionError("the run started")

    for target, name in ((bandwidth, "measure_gemv_bandwidth"), (api, "measure"), (api, "measure_parity")):
        monkeypatch.setattr(target, name, must_not_run)
    for command in ("latency", "parity"):
        code, _, err = _invoke("bench", command, "--random-model", "tiny", "--work-dir", work, "--synthetic", 1,
                               "--max-new-tokens", 100000)
        assert code == 2 and "exceed the model's 512 positions" in err, err
    code, _, err = _invoke("bench", "latency", "--random-model", "tiny", "--work-dir", tmp_path / "w", "--synthetic",
                           1000001)
    assert code == 2 and "--synthetic is at most 1000 studies" in err and not (tmp_path / "w").exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_every_report_file_is_written_before_stdout(tiny: Assets, work: Path, tmp_path: Path) -> None:
    """With stdout full, the command failed in one line after writing the Markdown and JSON, but not the chart."""
    import subprocess
    import sys

    out = tmp_path / "r.md"
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "radtrt.cli", "bench", "latency", "--random-model", "tiny",
                                 "--work-dir", str(work), "--synthetic", "1", "--runs", "1", "--warmup", "0",
                                 "--stages", "vision", "-o", str(out)],
                                stdout=full, stderr=subprocess.PIPE, text=True, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert out.with_suffix(".png").is_file() or "matplotlib is not installed" in result.stderr


def test_parity_transformers_generate_vs_torch(tiny: Assets, work: Path, tmp_path: Path) -> None:
    out_md = tmp_path / "parity.md"
    code, out, err = _invoke("bench", "parity", "--model", tiny.model_dir, "--backend", "transformers",
                             "--synthetic", 1, "--work-dir", work, "--max-new-tokens", 12, "-o", out_md)
    assert code == 0, err
    assert "| exact-match rate of generated tokens (95% interval) | 1/1 (100%; 21% to 100%) |" in out  # Wilson: one study proves little
    assert out_md.read_text() == out
    assert json.loads(out_md.with_suffix(".json").read_text())["summary"]["exact_match_rate"] == 1.0


def test_latency_two_backends_writes_markdown_json_png(tiny: Assets, work: Path, tmp_path: Path) -> None:
    report = tmp_path / "out" / "latency.md"
    code, out, err = _invoke("bench", "latency", "--random-model", "tiny", "--work-dir", work, "--vs-backend",
                             "torch", "--runs", 2, "--warmup", 0, "--max-new-tokens", 4, "-o", report)
    assert code == 0, err
    assert out == report.read_text() and "| median | onnxruntime | torch | onnxruntime / torch |" in out
    assert "radtrt bench latency --random-model tiny" in out
    data = json.loads(report.with_suffix(".json").read_text())
    assert [b["name"] for b in data["backends"]] == ["onnxruntime", "torch"]
    assert all(len(b["samples"]) == 2 for b in data["backends"])
    assert set(data["ratios"]["of_medians"]) >= {"vision", "prefill", "decode_per_token", "end_to_end"}
    assert data["bandwidth"]["gb_per_s"] > 0 and data["peak_rss_mb"] > 0
    assert data["backends"][0]["decode_floor"]["floor_tokens_per_s"] > 0
    png = report.with_suffix(".png")
    assert png.is_file() or "no PNG chart" in err
    # the same -o again replaces the whole earlier report; a parity report there drops its stale chart
    code, _, err = _invoke("bench", "parity", "--random-model", "tiny", "--work-dir", work, "--synthetic", 1,
                           "--max-new-tokens", 2, "-o", report)
    assert code == 0, err
    assert json.loads(report.with_suffix(".json").read_text())["kind"] == "parity" and not png.exists()


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable VmHWM")
def test_peak_rss_leaves_out_what_ran_before_and_the_bandwidth_probe(tiny: Assets, work: Path) -> None:
    """'Peak RSS ... (all backends together)' was the process's lifetime peak: the bandwidth probe's 512 MiB
    matrix, a random model's build, anything the caller had allocated before."""
    import numpy as np

    from radtrt.benchmarks.api import run_latency
    from radtrt.benchmarks.machine import PEAK_WHILE_MEASURED, current_rss_mb

    before = current_rss_mb()
    assert before is not None
    big = np.ones(300 << 17)  # 300 MiB, touched
    del big
    report = run_latency(random_model="tiny", work_dir=work, backends=["onnxruntime"], synthetic=1, runs=1, warmup=0,
                         max_new_tokens=2)
    assert report.bandwidth is not None and report.bandwidth.matrix_bytes >= 256 << 20  # the probe ran
    assert report.peak_rss_scope == PEAK_WHILE_MEASURED
    assert report.peak_rss_mb < before + 200, (before, report.peak_rss_mb)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable VmHWM")
def test_a_peak_over_a_random_models_build_says_so(tmp_path: Path) -> None:
    """The first run of a --random-model bench (which builds and exports the model) reported 507 MB under the
    same words as every later run from the cache (319 MB): the build's libraries stay loaded."""
    from radtrt.benchmarks.api import run_latency
    from radtrt.benchmarks.machine import PEAK_AFTER_BUILD, PEAK_WHILE_MEASURED

    scopes = [run_latency(random_model="tiny", work_dir=tmp_path, backends=["onnxruntime"], synthetic=1, runs=1,
                          warmup=0, max_new_tokens=2, bandwidth_probe=False).peak_rss_scope for _ in range(2)]
    assert scopes == [PEAK_AFTER_BUILD, PEAK_WHILE_MEASURED]


def test_latency_refuses_an_engine_whose_streaming_copies_its_logits(tiny: Assets, work: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A TensorRT-LLM < 1.0 engine built for parity runs in one call: its first token has no time of its own."""
    from types import SimpleNamespace

    import radtrt.benchmarks.api as api

    side = SimpleNamespace(name="tensorrt", pipeline=SimpleNamespace(backend=SimpleNamespace(streams_cheaply=False)))
    monkeypatch.setattr(api, "open_sides", lambda *a, **k: [side])
    monkeypatch.setattr(api, "measure", lambda *a, **k: pytest.fail("measured"))
    with pytest.raises(RadtrtError, match="tensorrt: its TensorRT-LLM engine keeps generation logits .*; time an "
                                          "engine built without --trtllm-logits"):
        api.run_latency(random_model="tiny", work_dir=work, backends=["tensorrt"], synthetic=1, runs=1, warmup=0,
                        max_new_tokens=2)


def test_latency_two_bundles_named_by_precision(tiny: Assets, work: Path, tmp_path: Path) -> None:
    """``--vs-bundle``: an fp16 bundle against the fp32 one, interleaved; its KV cache counted at 2 bytes."""
    from radtrt.cli import app

    fp16 = tmp_path / "fp16"
    result = runner.invoke(app, ["export", "--model", str(tiny.model_dir), "--precision", "fp16", "-o", str(fp16)])
    assert result.exit_code == 0, result.stderr
    code, out, err = _invoke("bench", "latency", "--random-model", "tiny", "--work-dir", work, "--vs-bundle", fp16,
                             "--runs", 1, "--warmup", 0, "--max-new-tokens", 4, "--ort-spin", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert [b["name"] for b in data["backends"]] == ["onnxruntime fp32", "onnxruntime fp16"]
    assert all(b["settings"]["spinning threads"] == "on" for b in data["backends"]) and "--ort-spin" in data["command"]
    assert data["ratios"]["numerator"] == "onnxruntime fp32" and data["ratios"]["denominator"] == "onnxruntime fp16"
    floors = [b["decode_floor"] for b in data["backends"]]
    assert floors[0]["kv_bytes_at_mean_context"] == pytest.approx(2 * floors[1]["kv_bytes_at_mean_context"])
    assert "--vs-bundle" in data["command"]
    code, _, err = _invoke("bench", "latency", "--random-model", "tiny", "--work-dir", work, "--vs-bundle", fp16,
                           "--vs-backend", "torch")
    assert code == 2 and "--vs-bundle compares two bundles" in err
    (tmp_path / "link").symlink_to(fp16)  # a bundle against itself ran without a word
    code, _, err = _invoke("bench", "latency", "--bundle", fp16, "--vs-bundle", tmp_path / "link", "--work-dir", work)
    assert code == 2 and "is the same bundle as" in err


def test_a_vs_bundle_that_is_not_the_random_model_is_refused_before_building_it(tiny: Assets, tmp_path: Path) -> None:
    """--stages vision builds a vision-only stub of the preset; a --vs-bundle of the full preset then failed after
    the build, saying the two bundles held different models."""
    code, _, err = _invoke("bench", "latency", "--random-model", "tiny", "--work-dir", tmp_path / "w", "--vs-bundle",
                           tiny.bundle, "--stages", "vision", "--runs", 1)
    assert code == 2 and "builds a vision-only model (a 1-layer decoder stub)" in err and "Traceback" not in err, err
    assert not (tmp_path / "w").exists()
    from radtrt.benchmarks.assets import check_vs_bundle_fits

    with pytest.raises(RadtrtError, match="holds another model than --random-model mid builds"):
        check_vs_bundle_fits("mid", False, tiny.bundle)  # type: ignore[arg-type]
    with pytest.raises(RadtrtError, match="is not a folder"):
        check_vs_bundle_fits("tiny", False, tmp_path / "missing")
    check_vs_bundle_fits("tiny", False, tiny.bundle)  # type: ignore[arg-type]


def test_two_bundles_in_folders_of_one_name_are_named_by_the_shortest_distinct_path(tiny: Assets, work: Path,
                                                                                    tmp_path: Path) -> None:
    """runs/a/bundle against runs/b/bundle (same precision, same folder name) was refused."""
    import shutil

    for run in ("a", "b"):
        shutil.copytree(tiny.bundle, tmp_path / "runs" / run / "bundle")  # type: ignore[arg-type]
    code, out, err = _invoke("bench", "latency", "--bundle", tmp_path / "runs/a/bundle", "--vs-bundle",
                             tmp_path / "runs/b/bundle", "--synthetic", 1, "--runs", 1, "--warmup", 0,
                             "--max-new-tokens", 2, "--work-dir", work, "--json")
    assert code == 0, err
    assert [b["name"] for b in json.loads(out)["backends"]] == ["onnxruntime a/bundle", "onnxruntime b/bundle"]
    from radtrt.benchmarks.sides import distinct_suffixes

    assert distinct_suffixes([Path("/x/fp32"), Path("/y/int8")]) == ["fp32", "int8"]
    assert distinct_suffixes([Path("/a"), Path("/b/a")]) == ["a", "b/a"]
    with pytest.raises(RadtrtError, match="are the same folder"):
        distinct_suffixes([tmp_path, tmp_path / "runs" / ".."])


def test_latency_vision_stage_with_given_bundle_and_model(tiny: Assets, work: Path) -> None:
    code, out, err = _invoke("bench", "latency", "--bundle", tiny.bundle, "--model", tiny.model_dir, "--vs-backend",
                             "torch", "--stages", "vision", "--runs", 1, "--warmup", 0, "--synthetic", 1,
                             "--work-dir", work, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert set(data["backends"][0]["stages_ms"]) == {"preprocess", "vision", "end_to_end"}
    assert "--max-new-tokens" not in data["command"]  # nothing decodes; the reproduce command refused it
    assert data["bandwidth"] is None and data["backends"][0]["decode_floor"] is None


@pytest.mark.parametrize("args,match", [
    (("latency", "--synthetic", 1, "--studies", "."), "not both"),
    (("latency", "--backend", "cuda-magic"), "unknown backend"),
    # the random model's bundle has no engines: refused before it is built, not after
    (("latency", "--backend", "tensorrt"), "--random-model builds an ONNX bundle without engines"),
    (("latency", "--vs-backend", "onnxruntime"), "must differ"),
    (("latency", "--random-model", "tiny", "--bundle", "x"), "do not combine"),
    (("parity",), "say what to benchmark"),
    (("latency", "--stages", "text"), "unknown --stages"),
    (("latency", "--runs", 0), "--runs"),
    (("parity", "--max-new-tokens", 0), "--max-new-tokens"),  # after loading both backends: "returned no logits"
    # options of a side that does not run were ignored without a word
    (("latency", "--device", "cuda"), "--device applies to the torch"),
    (("latency", "--backend", "torch", "--ort-spin"), "--ort-spin applies to the onnxruntime side"),
    (("latency", "--stages", "vision", "--indication", "Cough."), "--stages vision runs no decoder"),
    (("latency", "--bundle", "x", "--seed", 5), "--seed chooses the random weights"),
    (("latency", "--bundle", "x", "--base-model", "v"), "--base-model completes --model"),
    # ... and so were --model beside onnxruntime sides only, and --max-new-tokens with --stages vision (64, the
    # default, is accepted: reports printed it in their vision-stage reproduce commands before 2026-11-30)
    (("latency", "--bundle", "x", "--model", "m"), "--model is the torch / transformers side's model"),
    (("latency", "--bundle", "x", "--vs-bundle", "y", "--model", "m"), "--model is the torch / transformers"),
    (("latency", "--stages", "vision", "--max-new-tokens", 32), "--stages vision runs no decoder"),
    (("latency", "--bundle", "x", "--studies", "s"), "--work-dir caches random models and synthetic studies"),
    (("parity", "--bundle", "x", "--model", "m", "--studies", "s"), "--work-dir caches random models"),
])
def test_bad_input_is_one_line_and_exit_2(tiny: Assets, work: Path, args: tuple, match: str) -> None:
    extra = () if "--bundle" in args or args == ("parity",) else ("--random-model", "tiny")
    code, _, err = _invoke("bench", *args, *extra, "--work-dir", work)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and lines and lines[-1].startswith("radtrt: error:") and match in lines[-1], err
    assert "Traceback" not in err


def test_a_bundle_of_other_weights_is_refused(tiny: Assets, work: Path, tmp_path: Path) -> None:
    """Same configuration, other weights (another fine-tune): parity numbers between them mean nothing, and
    were reported."""
    other = random_assets("tiny", work, seed=1)
    code, _, err = _invoke("bench", "parity", "--bundle", tiny.bundle, "--model", other.model_dir, "--synthetic", 1,
                           "--max-new-tokens", 2, "--work-dir", work)
    assert code == 2 and "--model has other weights than the model" in err, err
    import radtrt.runtime.tensorrt as trt_runtime

    with pytest.MonkeyPatch.context() as patch:  # torch beside the tensorrt side was not checked at all
        patch.setattr(trt_runtime, "TensorRTBackend", _StandInTensorRT)
        code, _, err = _invoke("bench", "parity", "--bundle", tiny.bundle, "--model", other.model_dir, "--backend",
                               "tensorrt", "--synthetic", 1, "--max-new-tokens", 2, "--work-dir", work)
    assert code == 2 and "--model has other weights than the model" in err, err
    import shutil

    renamed = Path(shutil.copytree(other.bundle, tmp_path / "other-bundle"))  # the sides are named by folder
    code, _, err = _invoke("bench", "latency", "--bundle", tiny.bundle, "--vs-bundle", renamed, "--synthetic", 1,
                           "--runs", 1, "--warmup", 0, "--max-new-tokens", 2, "--work-dir", work)
    assert code == 2 and "exported from different weights" in err, err


def test_torch_side_needs_a_model(tiny: Assets, work: Path) -> None:
    code, _, err = _invoke("bench", "parity", "--bundle", tiny.bundle, "--work-dir", work)
    assert code == 2 and "needs --model" in err


@pytest.mark.parametrize("kind", ["latency", "parity"])
def test_unusable_report_path_is_refused_before_any_work(work: Path, tmp_path: Path, kind: str) -> None:
    (tmp_path / "afile").write_text("x")
    for out, match in ((tmp_path, "is a folder"), (tmp_path / "afile" / "r.md", "is not a folder")):
        code, _, err = _invoke("bench", kind, "--random-model", "tiny", "--work-dir", tmp_path / "never",
                               "--synthetic", 1, "-o", out)
        assert code == 2 and match in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()  # refused before the random model was built


def test_a_folder_beside_the_report_is_said_to_be_in_the_way(tmp_path: Path) -> None:
    """-o r2/x.md with a folder r2/x.json: "report r2/x.json is a folder; give the file to write", though the
    file given was x.md: the folder must move (or -o change)."""
    from radtrt.benchmarks.report_files import check_report_path

    for suffix in (".json", ".png"):
        (tmp_path / f"x{suffix}").mkdir()
        with pytest.raises(RadtrtError) as refused:
            check_report_path(tmp_path / "x.md")
        assert str(refused.value) == (f"{tmp_path / f'x{suffix}'}, where the {suffix[1:].upper()} of -o "
                                      f"{tmp_path / 'x.md'} goes, is a folder: move it away or choose another -o")
        (tmp_path / f"x{suffix}").rmdir()


@pytest.mark.parametrize("kind", ["latency", "parity"])
def test_files_beside_the_report_are_the_users_unless_an_earlier_report_wrote_them(tmp_path: Path, kind: str) -> None:
    """-o r.md also writes r.json and r.png: they used to be replaced whatever they held (a bundle's
    manifest.json for -o BUNDLE/manifest.md)."""
    (tmp_path / "r.json").write_text('{"format_version": 1}')
    (tmp_path / "c.png").write_bytes(b"\x89PNG user chart")
    for out, match in ((tmp_path / "r.md", "r.json already exists and is not part of an earlier radtrt bench report"),
                       (tmp_path / "c.md", "c.png already exists"),
                       (tmp_path / "x.json", "names the Markdown report"), (tmp_path / "x.png", "names the Markdown")):
        code, _, err = _invoke("bench", kind, "--random-model", "tiny", "--work-dir", tmp_path / "never",
                               "--synthetic", 1, "-o", out)
        assert code == 2 and match in err and "Traceback" not in err, err
    assert (tmp_path / "r.json").read_text() == '{"format_version": 1}' and not (tmp_path / "never").exists()
    from radtrt.benchmarks.report_files import check_report_path

    (tmp_path / "old.md").write_text(f"# radtrt bench {kind}: onnxruntime\n")
    (tmp_path / "old.json").write_text(json.dumps({"kind": kind, "command": "radtrt bench ..."}))
    check_report_path(tmp_path / "old.md")  # rerunning a benchmark replaces its own report
    # a user's notes (or picture) under the report's names were replaced when only the JSON was radtrt's
    (tmp_path / "old.md").write_text("my notes on the run")
    with pytest.raises(RadtrtError, match="old.md already exists and is not part of an earlier radtrt bench"):
        check_report_path(tmp_path / "old.md")
    (tmp_path / "old.md").write_text(f"# radtrt bench {kind}: onnxruntime\n")
    from PIL import Image

    Image.new("L", (4, 4)).save(tmp_path / "old.png")  # a PNG that radtrt's chart did not write
    with pytest.raises(RadtrtError, match="old.png already exists"):
        check_report_path(tmp_path / "old.md")


@pytest.mark.parametrize("args, match", [
    (("--work-dir", "{file}"), "--work-dir folder"),  # NotADirectoryError traceback
    (("--seed", str(2**70)), "--seed"),  # torch's OverflowError traceback, and an empty folder left behind
])
def test_unusable_work_dir_and_seed_are_refused(tmp_path: Path, args: tuple[str, ...], match: str) -> None:
    (tmp_path / "afile").write_text("x")
    args = tuple(a.format(file=tmp_path / "afile") for a in args)
    work = () if "--work-dir" in args else ("--work-dir", tmp_path / "never")
    code, _, err = _invoke("bench", "latency", "--random-model", "tiny", "--synthetic", 1, *work, *args)
    assert code == 2 and match in err and "Traceback" not in err, err
    assert not (tmp_path / "never").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, a folder nobody can write in")
@pytest.mark.parametrize("kind", ["latency", "parity"])
def test_report_path_in_a_folder_that_refuses_files_is_refused_first(tmp_path: Path, kind: str) -> None:
    """/proc passes os.access for root, yet no file can be made there: the check must try."""
    code, _, err = _invoke("bench", kind, "--random-model", "tiny", "--work-dir", tmp_path / "never",
                           "--synthetic", 1, "-o", "/proc/radtrt-report.md")
    assert code == 2 and "cannot write report /proc/radtrt-report.md" in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()


def test_predictions_out_must_be_a_new_folder(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "reference.jsonl").write_text("{}\n")
    from radtrt.benchmarks.parity import PREDICTIONS_MARKER

    for folder, marker in (("theirs", '{"written_by": "someone else"}'), ("mixed", None)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / PREDICTIONS_MARKER).write_text(
            marker or '{"written_by": "radtrt bench parity --predictions-out"}')
    (tmp_path / "mixed" / "notes.txt").write_text("mine")  # beside an earlier run's predictions: not replaced
    for target, match in ((tmp_path / "afile", "is not a folder"), (tmp_path / "full", "is not empty"),
                          (tmp_path / "theirs", "is not empty"), (tmp_path / "mixed", "is not empty")):
        code, _, err = _invoke("bench", "parity", "--random-model", "tiny", "--work-dir", tmp_path / "never",
                               "--synthetic", 1, "--predictions-out", target)
        assert code == 2 and match in err and "Traceback" not in err, err
    assert not (tmp_path / "never").exists() and (tmp_path / "full" / "reference.jsonl").read_text() == "{}\n"


@pytest.mark.parametrize("preds, out", [("rep", "rep"), ("rep.json", "rep.md"), ("rep.png", "rep.md"),
                                        ("d", "d/r.md"), ("d/sub", "d")])
def test_predictions_out_in_the_way_of_the_report_is_refused_first(tmp_path: Path, preds: str, out: str) -> None:
    """Accepted, it failed after the whole run, with the predictions (and half the report) written."""
    code, _, err = _invoke("bench", "parity", "--random-model", "tiny", "--work-dir", tmp_path / "never",
                           "--synthetic", 1, "--predictions-out", tmp_path / preds, "-o", tmp_path / out)
    assert code == 2 and "are in each other's way" in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind, flag, target", [
    ("latency", "-o", "studies/r.md"), ("parity", "-o", "studies/sub/r.md"), ("latency", "--work-dir", "studies"),
    ("parity", "--work-dir", "studies/cache"), ("parity", "--predictions-out", "studies/preds"),
    ("latency", "-o", "link/r.md")])
def test_outputs_inside_the_studies_folder_are_refused_first(tmp_path: Path, kind: str, flag: str,
                                                             target: str) -> None:
    """A report among the studies was read as one by the printed reproduce command; --work-dir exported a random
    model into the user's study folder."""
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "a.dcm").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "studies")
    work = () if flag == "--work-dir" else ("--work-dir", tmp_path / "never")
    code, _, err = _invoke("bench", kind, "--random-model", "tiny", "--studies", tmp_path / "studies", *work,
                           flag, tmp_path / target)
    assert code == 2 and "is inside the --studies folder" in err and "Traceback" not in err, err
    assert [p.name for p in (tmp_path / "studies").iterdir()] == ["a.dcm"] and not (tmp_path / "never").exists()


@pytest.mark.parametrize("kind, flag", [("latency", "-o"), ("parity", "--predictions-out")])
def test_outputs_among_a_manifests_images_are_refused_first(tmp_path: Path, kind: str, flag: str) -> None:
    """The chart (a PNG) landed among the images a manifest lists, and a later run over that folder read it as a
    chest X-ray."""
    (tmp_path / "set" / "png").mkdir(parents=True)
    (tmp_path / "set" / "png" / "a.png").write_bytes(b"x")
    (tmp_path / "set" / "m.jsonl").write_text('{"image": "png/a.png", "findings": "Clear."}\n')
    target = tmp_path / "set" / "png" / ("r.md" if flag == "-o" else "preds")
    code, _, err = _invoke("bench", kind, "--random-model", "tiny", "--studies", tmp_path / "set" / "m.jsonl",
                           "--work-dir", tmp_path / "never", flag, target)
    assert code == 2 and f"{flag} {target} is inside {tmp_path / 'set' / 'png'}, a folder of the images the " \
                          "--studies manifest lists" in err and "Traceback" not in err, err
    assert [p.name for p in (tmp_path / "set" / "png").iterdir()] == ["a.png"] and not (tmp_path / "never").exists()


def test_the_default_work_dir_inside_a_studies_folder_given_as_dot_is_fine(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from inside the studies folder (--studies .), the default work dir (a hidden folder, never read as a
    study) lies in it; only a --work-dir the user gives is refused there. An older report's vision-stage
    reproduce command, which printed --max-new-tokens 64, still runs."""
    from radtrt.imaging.synthetic import synthetic_chest, write_radiograph

    studies = tmp_path / "studies"
    write_radiograph(studies / "a.dcm", synthetic_chest(seed=1))
    monkeypatch.chdir(studies)
    code, out, err = _invoke("bench", "latency", "--random-model", "tiny", "--studies", ".", "--stages", "vision",
                             "--runs", 1, "--warmup", 0, "--max-new-tokens", 64, "-o", tmp_path / "r.md")
    assert code == 0, err
    assert sorted(p.name for p in studies.iterdir()) == [".radtrt-cache", "a.dcm"]


@pytest.mark.parametrize("name", [".", "/"])  # "": refused as empty (test_cli_help)
def test_a_folder_as_the_report_is_one_line(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """'.' and '/' have no name to put report.json beside: a ValueError traceback."""
    monkeypatch.chdir(tmp_path)
    code, _, err = _invoke("bench", "latency", "--random-model", "tiny", "--work-dir", tmp_path / "wd", "-o", name)
    assert code == 2 and f"'{name}' names a folder: give the file to write" in err and "Traceback" not in err, err


def test_bundle_labels_keep_the_path_as_typed(tmp_path: Path) -> None:
    """A bundle given through a link (fp32-current) was labelled by its target's folder."""
    from radtrt.benchmarks.sides import distinct_suffixes

    (tmp_path / "runs" / "a" / "bundle").mkdir(parents=True)
    (tmp_path / "runs" / "b" / "bundle").mkdir(parents=True)
    (tmp_path / "fp32-current").symlink_to(tmp_path / "runs" / "a" / "bundle")
    assert distinct_suffixes([tmp_path / "fp32-current", tmp_path / "runs" / "b" / "bundle"]) == ["fp32-current",
                                                                                                 "bundle"]
    assert distinct_suffixes([tmp_path / "runs" / "a" / "bundle", tmp_path / "runs" / "b" / "bundle/"]) == [
        "a/bundle", "b/bundle"]


class _StandInTensorRT:
    """What the tensorrt side opens, standing in for TensorRTBackend on a host without a GPU: ONNX Runtime runs the
    bundle, and the engine facts the side reports come from here."""

    def __new__(cls, bundle: Path, *, decoder: str | None = None):  # noqa: ANN204
        from radtrt.runtime.ort import OrtBackend

        backend = OrtBackend(bundle)
        backend.name = "tensorrt"
        backend.precision = f"fp16+{decoder or 'fp16'}"
        backend.limits = {"max_batch": 4, "max_input_len": 4096, "max_seq_len": 4096}
        backend.decoder_stamp = {"int8_kv": decoder == "w8a16-kv8"}
        engine_dir = bundle.parent / "stand-in-engine"
        engine_dir.mkdir(exist_ok=True)
        (engine_dir / "rank0.engine").write_bytes(b"\0" * 1000)
        backend.decoder_dir = engine_dir
        return backend


def test_the_tensorrt_backend_is_benchmarked_like_the_others(tiny: Assets, work: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """'radtrt bench latency/parity --backend tensorrt' was 'unknown backend': the engines could only be timed by
    benchmarks/gpu_check.sh."""
    import radtrt.runtime.tensorrt as trt_runtime

    monkeypatch.setattr(trt_runtime, "TensorRTBackend", _StandInTensorRT)
    code, out, err = _invoke("bench", "latency", "--bundle", tiny.bundle, "--backend", "tensorrt", "--vs-backend",
                             "onnxruntime", "--trt-decoder", "w8a16-kv8", "--synthetic", 1, "--work-dir", work,
                             "--runs", 1, "--warmup", 0, "--max-new-tokens", 4, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert "--backend tensorrt" in report["command"] and "--trt-decoder w8a16-kv8" in report["command"]
    trt = next(b for b in report["backends"] if b["name"] == "tensorrt")
    assert trt["settings"]["decoder engine max batch"] == 4 and trt["weight_bytes"] == 1000
    code, out, err = _invoke("bench", "parity", "--bundle", tiny.bundle, "--backend", "tensorrt", "--reference",
                             "onnxruntime", "--synthetic", 1, "--work-dir", work, "--max-new-tokens", 4, "--json")
    assert code == 0 and json.loads(out)["summary"]["exact_match_rate"] == 1.0, err
    code, _, err = _invoke("bench", "latency", "--bundle", tiny.bundle, "--trt-decoder", "fp16", "--synthetic", 1,
                           "--work-dir", work)
    assert code == 2 and "--trt-decoder picks the tensorrt side's TensorRT-LLM engine; none runs here" in err


def test_more_threads_than_cpus_are_refused_as_in_training(tiny: Assets, work: Path) -> None:
    """Only < 1 was checked: --threads 100000 was "can't start new thread" and a segfault, as in training."""
    import os

    fresh = work.parent / "fresh-work"  # refused before the random model is built there (it was built first)
    for command in ("latency", "parity"):
        code, _, err = _invoke("bench", command, "--random-model", "tiny", "--work-dir", fresh, "--threads",
                               (os.cpu_count() or 1) + 1)
        assert code == 2 and f"is more than this machine's {os.cpu_count()} CPUs" in err
        assert not fresh.exists()


def test_a_report_set_is_written_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk at the JSON left this run's Markdown beside nothing (or an older run's JSON); with an earlier
    set there, it left the old JSON and PNG and no Markdown (this run's had replaced the old, then was removed)."""
    import errno

    from radtrt.benchmarks.cli import _emit

    def png(file: Path) -> bool:
        file.write_bytes(b"earlier chart")
        return True

    real = Path.write_text

    def full_at_json(self: Path, *args: object, **kwargs: object) -> int:
        if ".json" in self.name:  # the JSON's temporary name, or the JSON itself
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_at_json)
    with pytest.raises(RadtrtError, match=f"cannot write report {tmp_path / 'r.json'}: No space left on device"):
        _emit("# report\n", {"a": 1}, False, tmp_path / "r.md")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(Path, "write_text", real)
    _emit("# earlier\n", {"a": 0}, False, tmp_path / "r.md", png)
    earlier = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(earlier) == ["r.json", "r.md", "r.png"]
    monkeypatch.setattr(Path, "write_text", full_at_json)
    for chart in (png, None):
        with pytest.raises(RadtrtError, match="No space left on device"):
            _emit("# report\n", {"a": 1}, False, tmp_path / "r.md", chart)
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == earlier  # the earlier set, whole
    monkeypatch.setattr(Path, "write_text", real)

    def interrupted(path: Path) -> bool:  # Ctrl-C while the chart renders
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _emit("# report\n", {"a": 1}, False, tmp_path / "r.md", interrupted)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == earlier

    def no_matplotlib(path: Path) -> bool:
        return False

    _emit("# report\n", {"a": 1}, False, tmp_path / "r.md", no_matplotlib)  # no chart of this run: the earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]  # one described another run
    assert (tmp_path / "r.md").read_text() == "# report\n"


def test_a_vs_bundle_without_its_weights_fingerprint_is_refused(tiny: Assets, tmp_path: Path) -> None:
    """Deleting model.weights_fingerprint_fp16 (the manifest is not hashed) skipped the same-model check of
    --vs-bundle: two bundles of different models were compared without a word."""
    import shutil

    from radtrt.benchmarks.sides import open_sides

    copy = tmp_path / "copy"
    shutil.copytree(tiny.bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["model"]["weights_fingerprint_fp16"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RadtrtError, match=f"{copy}/manifest.json has no model.weights_fingerprint_fp16 \\(damaged, "
                                          f"or exported by an older radtrt\\), so the two bundles cannot be checked "
                                          f"to hold one model: re-export the bundle$"):
        open_sides(["onnxruntime"], tiny, vs_bundle=copy)

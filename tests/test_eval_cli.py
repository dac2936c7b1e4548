"""``radtrt eval`` through typer, prediction files, and the optional model-based metrics."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from radtrt.errors import RadtrtError
from radtrt.evaluation.cli import register
from radtrt.evaluation.labels import CONDITIONS
from radtrt.evaluation.records import ReportPair, align_pairs, load_predictions

RECORDS = [
    {"study": "a", "reference": "Small left pleural effusion. No pneumothorax.",
     "prediction": "Small left pleural effusion. No pneumothorax."},
    {"study": "b", "reference": "Moderate cardiomegaly. Mild pulmonary edema.",
     "prediction": "Mild cardiomegaly. No edema."},
    {"study": "c", "reference": "No acute cardiopulmonary process.",
     "prediction": "Right lower lobe consolidation, possibly pneumonia."},
]


def app() -> typer.Typer:
    root = typer.Typer()

    @root.callback()
    def _root() -> None:
        """Stand-in for the radtrt root app."""

    register(root)
    return root


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app(), ["eval", *args])
    return result.exit_code, result.stdout, result.stderr


def write_jsonl(path: Path, records: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_eval_writes_json_and_prints_markdown(tmp_path: Path) -> None:
    preds = write_jsonl(tmp_path / "preds.jsonl", RECORDS)
    code, out, err = run("--predictions", str(preds), "--metrics", "rouge,bleu,labels", "-o", str(tmp_path / "r.json"),
                         "--bootstrap", "100")
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    metrics = result["metrics"]
    assert result["n_reports"] == 3 and result["bootstrap"] == {"n_resamples": 100, "seed": 3, "level": 0.95,
                                                               "method": "percentile"}
    assert set(metrics) == {"rouge_l", "bleu_1", "bleu_4", "offline_labels"}
    assert 0 < metrics["rouge_l"]["value"] < 1 and metrics["rouge_l"]["ci_low"] <= metrics["rouge_l"]["value"]
    labels = metrics["offline_labels"]
    assert "proxy for F1-CheXbert" in labels["name"]
    # Study a: effusion TP; b: cardiomegaly TP, edema FN; c: consolidation FP, pneumonia uncertain (-> 0),
    # No Finding FN (the reference is normal): TP 2, FP 1, FN 2.
    assert labels["micro_f1_14"]["value"] == pytest.approx(4 / 7)
    assert "| ROUGE-L |" in out and "Micro-F1-14 (offline labels)" in out and "offline proxy" in out


def test_intervals_from_too_few_reports_are_not_shown_as_certain(tmp_path: Path) -> None:
    """One report: every "95% CI" was the value itself ([85.7, 85.7]) with no word, in Markdown and JSON."""
    one = write_jsonl(tmp_path / "one.jsonl", RECORDS[1:2])
    code, out, err = run("-p", str(one), "--metrics", "rouge,labels", "-o", str(tmp_path / "r.json"),
                         "--bootstrap", "20")
    assert code == 0, err
    assert re.search(r"\| ROUGE-L \| \d+\.\d \[n/a\] \|", out), out
    assert "CIs n/a: no interval from fewer than 2 reports" in out
    rouge = json.loads((tmp_path / "r.json").read_text())["metrics"]["rouge_l"]
    assert rouge["ci_low"] is None and rouge["ci_high"] is None and "fewer than 2 reports" in rouge["ci_reason"]
    assert rouge["n"] == 1 and 0 < rouge["value"] < 1
    code, out, err = run("-p", str(write_jsonl(tmp_path / "three.jsonl", RECORDS)), "--metrics", "rouge",
                         "-o", str(tmp_path / "r3.json"), "--bootstrap", "20")
    assert code == 0 and "Intervals from fewer than 30 reports (here 3) are rough" in out and "[n/a]" not in out
    assert "ci_reason" not in json.loads((tmp_path / "r3.json").read_text())["metrics"]["rouge_l"]


def test_eval_is_deterministic(tmp_path: Path) -> None:
    preds = write_jsonl(tmp_path / "preds.jsonl", RECORDS)
    outs = [run("--predictions", str(preds), "--bootstrap", "50")[1] for _ in range(2)]
    assert outs[0] == outs[1]


@pytest.mark.parametrize("args,message", [
    ([], "give either --predictions"),
    (["--metrics", "rouge,meteor"], "unknown metric(s) meteor"),
    (["--metrics", "chexprompt"], "--judge-model"),
    (["--metrics", "chexprompt", "--judge-model", "gpt"], "--endpoint URL"),
    (["--metrics", "chexbert"], "F1-CheXbert needs local weights"),
    (["--metrics", "radgraph"], "F1-RadGraph needs the radgraph package"),
    (["--metrics", "rouge", "--seed", "-1"], "bootstrap seed must be at least 0"),  # numpy's ValueError traceback
    # options of a metric that is not computed were ignored without a word
    (["--metrics", "rouge", "--endpoint", "http://x/v1", "--judge-model", "g"], "--endpoint is for the chexprompt"),
    (["--metrics", "rouge", "--chexbert-checkpoint", "c.pth"], "--chexbert-checkpoint is for the chexbert"),
    (["--metrics", "rouge", "--radgraph-dir", "r"], "--radgraph-dir is for the radgraph"),
    (["--metrics", "rouge", "--device", "tpu9"], "--device is for the chexbert"),
    (["--metrics", "rouge", "--judge-prompt", "radtrt"], "--judge-prompt is for the chexprompt"),
    (["--metrics", "rouge", "--timeout", "-3"], "--timeout is for the chexprompt"),  # invalid and ignored
    (["--metrics", "rouge", "--concurrency", "9"], "--concurrency is for the chexprompt"),
    (["--metrics", "chexprompt", "--judge-model", "g", "--endpoint", "http://x/v1", "--judge-prompt", "bogus"],
     "unknown --judge-prompt 'bogus'"),
    (["--metrics", "rouge", "--margin", "0.2"], "--margin is the CheXprompt parity margin"),
    (["--metrics", "chexprompt", "--judge-model", "g", "--endpoint", "http://x/v1", "--api-version", "2024-06-01"],
     "--api-version and --azure-deployment are for Azure OpenAI"),
    (["--metrics", "chexprompt", "--judge-model", "g", "--endpoint", "http://x/v1", "--azure-deployment", "d"],
     "--api-version and --azure-deployment are for Azure OpenAI"),
    # values that ended in tracebacks or meant something else than said
    (["--metrics", "chexprompt", "--judge-model", "g", "--endpoint", "http://x/v1", "--timeout", "nan"],
     "judge timeout must be a finite positive number"),
    (["--metrics", "chexprompt", "--judge-model", "g", "--endpoint", "http://x/v1", "--requests-per-minute", "-1"],
     "--requests-per-minute must be a finite number >= 0"),
    (["--metrics", "chexprompt", "--judge-model", "g", "--endpoint", "http://x/v1", "--requests-per-minute", "inf"],
     "--requests-per-minute must be a finite number >= 0"),  # "at least 0.01, got inf"
    # past threading.TIMEOUT_MAX: OverflowError tracebacks from the socket and the rate limiter's wait
    (["--metrics", "chexprompt", "--judge-model", "g", "--endpoint", "http://x/v1", "--timeout", "1e12"],
     "at most 3600 (--timeout), got 1000000000000.0"),
    (["--metrics", "chexprompt", "--judge-model", "g", "--endpoint", "http://x/v1", "--requests-per-minute", "1e-9"],
     "0 for no limit, else at least 0.01"),
])
def test_user_errors_are_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    preds = write_jsonl(tmp_path / "preds.jsonl", RECORDS)
    full = args if not args or args[0] != "--metrics" else ["--predictions", str(preds), *args]
    code, out, err = run(*full)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("radtrt: error: ") and message in lines[0]


def test_prediction_file_errors_name_the_line_not_the_content(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"study": "PATIENT-SECRET", "reference": 3}) + "\n")
    with pytest.raises(RadtrtError) as info:
        load_predictions(bad)
    assert "line 2" in str(info.value) and "PATIENT-SECRET" not in str(info.value)
    dup = write_jsonl(tmp_path / "dup.jsonl", [RECORDS[0], RECORDS[0]])
    with pytest.raises(RadtrtError, match="appears twice"):
        load_predictions(dup)
    with pytest.raises(RadtrtError, match="does not exist"):
        load_predictions(tmp_path / "missing.jsonl")
    for body, said in ((b'["PATIENT-SECRET"]\n', "line 2: each line must be a JSON object$"),
                       (b'{"study": "PATIENT-SECRET",\n', r"line 2: not valid JSON \(Expecting property name"),
                       (b'"\xff"\n', r"line 2: not UTF-8 text \(a JSONL predictions file is expected\)$")):
        bad.write_bytes(json.dumps(RECORDS[0]).encode() + b"\n" + body)  # the manifest's reader, with this file's words
        with pytest.raises(RadtrtError, match=f"^bad.jsonl {said}"):
            load_predictions(bad)


def test_paired_arms_must_match() -> None:
    a = [ReportPair("s1", "ref 1", "x"), ReportPair("s2", "ref 2", "y")]
    reordered = align_pairs(a, [ReportPair("s2", "ref 2", "q"), ReportPair("s1", "ref 1", "p")])[1]
    assert [p.prediction for p in reordered] == ["p", "q"]
    with pytest.raises(RadtrtError, match="different studies"):
        align_pairs(a, a[:1])
    with pytest.raises(RadtrtError, match="ground-truth"):
        align_pairs(a, [ReportPair("s1", "ref 1", "x"), ReportPair("s2", "other", "y")])


def test_paired_ids_written_differently_are_named_as_such() -> None:
    """'./ph/x' against 'ph/x', or 'café' composed against decomposed: "different studies" and nothing more."""
    ref = [ReportPair("ph/a", "r", "x"), ReportPair("caf\u00e9", "r", "y"), ReportPair("b", "r", "z")]
    cand = [ReportPair("./ph/a", "r", "x"), ReportPair("cafe\u0301", "r", "y"), ReportPair("c", "r", "z")]
    with pytest.raises(RadtrtError, match=r"\(3 only in the reference arm, 3 only in the candidate arm\); 2 of them "
                                          r"are the same id written differently \(a './' prefix"):
        align_pairs(ref, cand)
    with pytest.raises(RadtrtError) as e:
        align_pairs(ref[2:], cand[2:])
    assert "written differently" not in str(e.value)


def test_infer_records_are_told_how_to_become_predictions(tmp_path: Path) -> None:
    """'field reference is missing' alone, for the raw 'infer --json' output the README's first commands make."""
    record = {"study": "ph/dicom/p0", "source_file": "f.dcm", "view_position": "PA", "report": "Clear lungs.",
              "token_ids": [1, 2], "backend": "torch", "precision": "fp32", "timings_ms": {}}
    code, _, err = run("-p", str(write_jsonl(tmp_path / "infer.jsonl", [record])), "--metrics", "rouge")
    assert code == 2 and "infer.jsonl line 1: field 'reference' is missing or not a string: 'radtrt infer " in err
    assert "join each with its ground-truth findings" in err and "README's CLI table, 'radtrt eval' row" in err
    code, _, err = run("-p", str(write_jsonl(tmp_path / "p.jsonl", [{"study": "a", "prediction": "x"}])))
    assert code == 2 and "field 'reference' is missing" in err and "infer" not in err


def test_the_released_llava_rad_prediction_files_are_scored(tmp_path: Path) -> None:
    """llava/eval/model_mimic_cxr.py writes {"id", "query", "reference", "prediction"}: refused as lacking 'study'."""
    rows = [{"id": r["study"], "query": "q", "reference": r["reference"], "prediction": r["prediction"]} for r in RECORDS]
    pairs = load_predictions(write_jsonl(tmp_path / "released.jsonl", rows))
    assert pairs == load_predictions(write_jsonl(tmp_path / "ours.jsonl", RECORDS))
    with pytest.raises(RadtrtError, match="line 2: a study appears twice"):
        load_predictions(write_jsonl(tmp_path / "dup.jsonl", rows[:1] * 2))


def test_paired_lexical_eval_prints_both_arms(tmp_path: Path) -> None:
    ref = write_jsonl(tmp_path / "ref.jsonl", RECORDS)
    cand = write_jsonl(tmp_path / "cand.jsonl", [{**r, "prediction": r["reference"]} for r in RECORDS])
    code, out, err = run("--paired", str(ref), str(cand), "--metrics", "rouge", "-o", str(tmp_path / "p.json"))
    assert code == 0, err
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["candidate"]["metrics"]["rouge_l"]["value"] == pytest.approx(1.0)
    assert result["reference"]["metrics"]["rouge_l"]["value"] < 1.0
    assert result["chexprompt_parity"] is None
    assert "| ROUGE-L | " in out and "| 100.0 [100.0, 100.0] |" in out


# --- F1-CheXbert from local weights: a tiny BERT with the released checkpoint layout ------------------

def _tiny_chexbert(tmp_path: Path, bias_class: int, positions: int = 512) -> tuple[Path, Path]:
    import torch
    from transformers import BertConfig

    from radtrt.evaluation.chexbert import build_labeler

    bert_dir = tmp_path / "bert"
    bert_dir.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "small", "left", "pleural", "effusion", "."]
    (bert_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=positions)
    cfg.save_pretrained(bert_dir)
    torch.manual_seed(0)
    model = build_labeler(cfg)
    with torch.no_grad():
        for head in model.linear_heads:
            head.weight.zero_()
            head.bias.zero_()
            head.bias[min(bias_class, head.bias.numel() - 1)] = 5.0
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    checkpoint = tmp_path / "chexbert.pth"
    torch.save({"epoch": 1, "model_state_dict": state}, checkpoint)
    return checkpoint, bert_dir


def test_chexbert_labels_from_local_checkpoint(tmp_path: Path) -> None:
    from radtrt.evaluation.chexbert import CheXbertConfig, chexbert_labels

    checkpoint, bert_dir = _tiny_chexbert(tmp_path, bias_class=2)
    codes = chexbert_labels(["Small left pleural effusion.", "", "no effusion " * 400],
                            CheXbertConfig(checkpoint=checkpoint, bert_dir=bert_dir, batch_size=2))
    assert codes.shape == (3, 14)
    assert (codes[:, :13] == 2).all()  # the heads were forced to "negative"
    assert (codes[:, 13] == 1).all()  # the two-way No Finding head: its class 1 is "positive"


def test_a_report_longer_than_the_berts_positions_is_cut_there(tmp_path: Path) -> None:
    """A BERT with fewer than 512 positions: a longer report was cut at 512 anyway, a RuntimeError traceback."""
    from radtrt.evaluation.chexbert import CheXbertConfig, chexbert_labels

    checkpoint, bert_dir = _tiny_chexbert(tmp_path, bias_class=2, positions=64)
    codes = chexbert_labels(["no effusion " * 400], CheXbertConfig(checkpoint=checkpoint, bert_dir=bert_dir))
    assert (codes[:, :13] == 2).all()


def test_chexbert_metric_through_cli(tmp_path: Path) -> None:
    checkpoint, bert_dir = _tiny_chexbert(tmp_path, bias_class=1)
    preds = write_jsonl(tmp_path / "preds.jsonl", RECORDS)
    code, out, err = run("--predictions", str(preds), "--metrics", "chexbert", "--chexbert-checkpoint",
                         str(checkpoint), "--bert-dir", str(bert_dir), "-o", str(tmp_path / "r.json"),
                         "--bootstrap", "20")
    assert code == 0, err
    chexbert = json.loads((tmp_path / "r.json").read_text())["metrics"]["chexbert"]
    assert chexbert["micro_f1_14"]["value"] == pytest.approx(1.0)  # every label positive on both sides
    assert "Micro-F1-14 (CheXbert)" in out


def test_chexbert_checkpoint_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    import torch

    from radtrt.evaluation.chexbert import CheXbertConfig, chexbert_labels

    _, bert_dir = _tiny_chexbert(tmp_path, bias_class=0)
    wrong = tmp_path / "wrong.pth"
    torch.save({"model_state_dict": {"module.something": torch.zeros(2)}}, wrong)
    with pytest.raises(RadtrtError, match="does not match the CheXbert architecture"):
        chexbert_labels(["x"], CheXbertConfig(checkpoint=wrong, bert_dir=bert_dir))



def test_chexbert_checkpoint_for_another_bert_is_one_line(tmp_path: Path) -> None:
    """Same weight names, other shapes (a cased vocabulary): load_state_dict's "size mismatch" was a traceback."""
    import torch
    from transformers import BertConfig

    from radtrt.evaluation.chexbert import CheXbertConfig, chexbert_labels

    checkpoint, bert_dir = _tiny_chexbert(tmp_path, bias_class=0)
    other = tmp_path / "other_bert"
    other.mkdir()
    (other / "vocab.txt").write_text((bert_dir / "vocab.txt").read_text() + "extra\n")
    config = BertConfig.from_pretrained(str(bert_dir))
    config.vocab_size += 1
    config.save_pretrained(other)
    torch.manual_seed(0)
    with pytest.raises(RadtrtError, match="does not match the BERT in --bert-dir") as err:
        chexbert_labels(["x"], CheXbertConfig(checkpoint=checkpoint, bert_dir=other))
    assert str(checkpoint) in str(err.value) and "word_embeddings" in str(err.value)


def test_chexbert_checkpoint_holding_no_tensors_is_not_blamed_on_the_bert(tmp_path: Path) -> None:
    """A value that is no tensor was reported as a shape mismatch: "give the bert-base-uncased the checkpoint was
    trained from", which no --bert-dir can satisfy."""
    import torch

    from radtrt.evaluation.chexbert import CheXbertConfig, chexbert_labels

    checkpoint, bert_dir = _tiny_chexbert(tmp_path, bias_class=0)
    saved = torch.load(checkpoint, weights_only=True)
    saved["model_state_dict"]["module.linear_heads.0.weight"] = [1.0, 2.0]
    torch.save(saved, checkpoint)
    with pytest.raises(RadtrtError, match="is not a CheXbert state dict: linear_heads.0.weight holds a list") as err:
        chexbert_labels(["x"], CheXbertConfig(checkpoint=checkpoint, bert_dir=bert_dir))
    assert "bert-base-uncased" not in str(err.value)


@pytest.mark.parametrize("name, content, message", [
    ("config.json", "{bad", "config.json cannot be read or is not valid JSON"),  # transformers' OSError
    ("config.json", "[]", "config.json is not a usable BERT config"),
    ("config.json", {"hidden_size": "16"}, "config.json is not a usable BERT config .*hidden_size"),  # strict field
    ("config.json", {"hidden_size": 15}, "config.json does not describe a BERT that can be built"),  # 2 heads
    ("vocab.txt", "", "vocab.txt is empty"),  # WordPiece's bare Exception on the first report
    ("vocab.txt", b"\xff\xfe[UNK]\n", "vocab.txt is not UTF-8 text"),
    ("vocab.txt", "[PAD]\nword\n", r"vocab.txt has no \[UNK\] token"),
    ("vocab.txt", "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n" + "".join(f"w{i}\n" for i in range(20)),
     "vocab.txt makes 25 token ids, more than the vocab_size 11 of config.json"),  # an IndexError when run
])
def test_damaged_bert_dir_is_one_line_naming_the_file(tmp_path: Path, name: str, content: object,
                                                      message: str) -> None:
    checkpoint, bert_dir = _tiny_chexbert(tmp_path, bias_class=0)
    target = bert_dir / name
    if isinstance(content, dict):
        content = json.dumps({**json.loads(target.read_text()), **content})
    if isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(str(content))
    preds = write_jsonl(tmp_path / "preds.jsonl", RECORDS)
    code, _, err = run("-p", str(preds), "--metrics", "chexbert", "--chexbert-checkpoint", str(checkpoint),
                         "--bert-dir", str(bert_dir), "--bootstrap", "5")
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith(f"radtrt: error: --bert-dir {bert_dir}: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err


@pytest.mark.parametrize("broken, named", [
    ("checkpoint", "--chexbert-checkpoint"),
    ("config.json", "has no config.json"),
    ("vocab.txt", "has no vocab.txt"),
])
def test_chexbert_paths_name_the_one_that_is_wrong(tmp_path: Path, broken: str, named: str) -> None:
    from radtrt.evaluation.chexbert import CheXbertConfig

    checkpoint, bert_dir = _tiny_chexbert(tmp_path, bias_class=0)
    (checkpoint if broken == "checkpoint" else bert_dir / broken).unlink()
    with pytest.raises(RadtrtError, match=named) as err:
        CheXbertConfig(checkpoint=checkpoint, bert_dir=bert_dir).check()
    assert str(checkpoint if broken == "checkpoint" else bert_dir) in str(err.value)


def test_text_file_as_chexbert_checkpoint_is_not_called_a_pickle(tmp_path: Path) -> None:
    from radtrt.evaluation.chexbert import CheXbertConfig, chexbert_labels

    _, bert_dir = _tiny_chexbert(tmp_path, bias_class=0)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")  # 'n' is a byte the weights-only unpickler calls unsupported
    with pytest.raises(RadtrtError, match="is not a PyTorch checkpoint") as err:
        chexbert_labels(["x"], CheXbertConfig(checkpoint=text, bert_dir=bert_dir))
    assert "Python objects" not in str(err.value)

# --- F1-RadGraph through the radgraph package: a stand-in package records how it is called ---------

def _radgraph_config(bert: object, tokenizer_bert: object) -> dict:
    """radgraph's config.json names its BERT twice: for the tokenizer and for the embedder."""
    return {"dataset_reader": {"token_indexers": {"bert": {"model_name": tokenizer_bert}}},
            "model": {"embedder": {"token_embedders": {"bert": {"model_name": bert}}}}}


def _radgraph_dir(tmp_path: Path, bert: str, tokenizer_bert: str | None = None) -> Path:
    folder = tmp_path / "weights" / "radgraph"
    (folder / "vocabulary").mkdir(parents=True)
    (folder / "weights.th").write_bytes(b"")
    (folder / "config.json").write_text(json.dumps(_radgraph_config(bert, tokenizer_bert or bert)))
    return tmp_path / "weights"


def _radgraph_stub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in ``radgraph`` package on sys.path, recording how F1RadGraph is built."""
    stub = tmp_path / "stub" / "radgraph"
    stub.mkdir(parents=True)
    stub.joinpath("__init__.py").write_text(
        "CALLS = []\n"
        "class F1RadGraph:\n"
        "    def __init__(self, **kwargs):\n"
        "        CALLS.append(kwargs)\n"
        "    def __call__(self, refs, hyps):\n"
        "        rewards = [1.0 if r == h else 0.25 for r, h in zip(refs, hyps)]\n"
        "        return sum(rewards) / len(rewards), rewards, [], []\n")
    monkeypatch.syspath_prepend(str(tmp_path / "stub"))
    monkeypatch.delitem(sys.modules, "radgraph", raising=False)


def test_radgraph_uses_local_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from radtrt.evaluation.bootstrap import BootstrapConfig
    from radtrt.evaluation.radgraph_metric import RadGraphConfig, f1_radgraph

    _radgraph_stub(tmp_path, monkeypatch)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(RadtrtError, match="not a local directory"):
        RadGraphConfig(model_dir=_radgraph_dir(tmp_path / "hub", "some/hub-bert")).check()
    with pytest.raises(RadtrtError, match="extracted radgraph.tar.gz"):
        RadGraphConfig(model_dir=tmp_path / "empty").check()
    (tmp_path / "bert").mkdir()
    # only the embedder's name pointed at the local copy: radgraph would have fetched the tokenizer from the hub
    with pytest.raises(RadtrtError, match="BERT 'some/hub-bert', which is not a local directory: point "
                                          "dataset_reader.token_indexers.bert.model_name"):
        RadGraphConfig(model_dir=_radgraph_dir(tmp_path / "half", str(tmp_path / "bert"), "some/hub-bert")).check()

    model_dir = _radgraph_dir(tmp_path, str(tmp_path / "bert"))
    got = f1_radgraph(["same", "different"], ["same", "other"], RadGraphConfig(model_dir=model_dir),
                      BootstrapConfig(n_resamples=50))
    assert got.value == pytest.approx(0.625)
    import radgraph  # the stand-in

    assert radgraph.CALLS == [{"reward_level": "partial", "model_type": "radgraph", "model_cache_dir": str(model_dir)}]
    assert np.isfinite([got.ci_low, got.ci_high]).all()


def test_radgraph_package_is_checked_before_any_scoring_and_only_what_is_missing_is_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The missing package was noticed after the other metrics had run, in a line that also asked for the weights
    folder the user had given complete."""
    from radtrt.evaluation.radgraph_metric import RadGraphConfig

    (tmp_path / "bert").mkdir()
    model_dir = _radgraph_dir(tmp_path, str(tmp_path / "bert"))
    monkeypatch.setitem(sys.modules, "radgraph", None)  # what an environment without the package looks like
    preds = write_jsonl(tmp_path / "preds.jsonl", RECORDS)
    code, out, err = run("-p", str(preds), "--metrics", "rouge,radgraph", "--radgraph-dir", str(model_dir),
                         "-o", str(tmp_path / "r.json"))
    assert code == 2 and out == "" and not (tmp_path / "r.json").exists()
    assert "F1-RadGraph needs the radgraph package (pip install 'radgraph>=0.1,<=0.1.18')" in err and "--radgraph-dir" not in err

    _radgraph_stub(tmp_path, monkeypatch)
    (model_dir / "radgraph" / "weights.th").unlink()
    with pytest.raises(RadtrtError, match="needs radgraph/weights.th in --radgraph-dir") as info:
        RadGraphConfig(model_dir=model_dir).check()
    assert "pip install" not in str(info.value) and "config.json" not in str(info.value)

    (model_dir / "radgraph" / "weights.th").write_bytes(b"")
    (model_dir / "radgraph" / "config.json").write_text(json.dumps(
        _radgraph_config(5, str(tmp_path / "bert"))))  # a TypeError traceback
    code, _, err = run("-p", str(preds), "--metrics", "radgraph", "--radgraph-dir", str(model_dir))
    assert code == 2 and "model_name must be a name or a folder, got 5" in err and "Traceback" not in err


def test_conditions_are_the_released_chexbert_order() -> None:
    assert CONDITIONS == ("Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                          "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                          "Pleural Other", "Fracture", "Support Devices", "No Finding")


def test_binary_predictions_and_results_over_an_input_are_refused(tmp_path: Path) -> None:
    binary = tmp_path / "preds.jsonl"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    code, _, err = run("--predictions", str(binary))
    assert code == 2 and "line 1: not UTF-8 text" in err and "Traceback" not in err
    preds = write_jsonl(tmp_path / "p.jsonl", RECORDS)
    before = preds.read_text()
    code, _, err = run("--predictions", str(preds), "-o", str(preds))
    assert code == 2 and "one of the prediction files" in err
    assert preds.read_text() == before  # the predictions were overwritten by the results before
    code, _, err = run("--predictions", str(preds), "--metrics", "chexprompt", "--judge-model", "m",
                       "--endpoint", "localhost:8000/v1")
    assert code == 2 and "--endpoint must be an http(s) URL" in err


def test_paired_margin_is_checked_before_the_judge_runs(tmp_path: Path) -> None:
    """A negative margin used to be refused after the paid judge run, and nan gave a verdict and bad JSON."""
    a = write_jsonl(tmp_path / "a.jsonl", RECORDS)
    b = write_jsonl(tmp_path / "b.jsonl", RECORDS)
    judge = ["--metrics", "chexprompt", "--judge-model", "g", "--endpoint", "http://127.0.0.1:9/v1"]
    for margin in ("-1", "nan", "inf"):
        code, _, err = run("--paired", str(a), str(b), *judge, "--margin", margin)
        assert code == 2 and "--margin must be a number >= 0" in err


def test_results_path_may_not_be_the_judge_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    preds = write_jsonl(tmp_path / "p.jsonl", RECORDS)
    cache = tmp_path / "judge.sqlite"
    code, _, err = run("-p", str(preds), "--metrics", "chexprompt", "--judge-model", "g", "--endpoint",
                       "http://127.0.0.1:9/v1", "--judge-cache", str(cache), "-o", str(cache))
    assert code == 2 and "is the judge cache" in err and not cache.exists()
    cache.write_bytes(b"SQLite format 3\x00")
    (tmp_path / "results.json").hardlink_to(cache)  # the cache's answers were replaced by the results JSON
    code, _, err = run("-p", str(preds), "--metrics", "chexprompt", "--judge-model", "g", "--endpoint",
                       "http://127.0.0.1:9/v1", "--judge-cache", str(cache), "-o", str(tmp_path / "results.json"))
    assert code == 2 and "is the judge cache" in err and cache.read_bytes() == b"SQLite format 3\x00"


def test_results_replace_the_old_file_whole(tmp_path: Path) -> None:
    """The results were written in place: a full disk left half a JSON file, and the old results were gone."""
    preds = write_jsonl(tmp_path / "p.jsonl", RECORDS)
    keep = tmp_path / "keep.json"
    keep.write_text("earlier results")
    (tmp_path / "r.json").hardlink_to(keep)  # written in place, the other name's file changed too
    code, _, err = run("-p", str(preds), "--metrics", "rouge", "--bootstrap", "2", "-o", str(tmp_path / "r.json"))
    assert code == 0, err
    assert keep.read_text() == "earlier results" and json.loads((tmp_path / "r.json").read_text())


def test_deeply_nested_or_huge_json_is_one_line(tmp_path: Path) -> None:
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "\n")
    huge = tmp_path / "huge.jsonl"
    huge.write_text('{"study": ' + "9" * 5000 + "}\n")
    for path in (deep, huge):
        code, _, err = run("-p", str(path))
        assert code == 2 and "line 1: not a predictions row" in err and "Traceback" not in err, err


def test_paired_run_against_itself_is_refused(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", RECORDS)
    code, _, err = run("--paired", str(a), str(a), "--metrics", "rouge")
    assert code == 2 and "names" in err and "twice" in err


def test_prediction_texts_that_cannot_be_scored_are_refused(tmp_path: Path) -> None:
    surrogate = tmp_path / "s.jsonl"
    surrogate.write_text('{"study": "a", "reference": "x", "prediction": "\\ud800"}\n')
    with pytest.raises(RadtrtError, match="line 1: field 'prediction' holds a lone surrogate"):
        load_predictions(surrogate)
    long = write_jsonl(tmp_path / "l.jsonl", [{"study": "a", "reference": "x", "prediction": "word " * 2001}])
    with pytest.raises(RadtrtError, match="prediction has 2001 words"):
        load_predictions(long)
    # rouge_score splits on anything but letters and digits: this passed as one word, then ROUGE-L took seconds
    # and gigabytes on its quadratic table
    commas = write_jsonl(tmp_path / "c.jsonl", [{"study": "a", "reference": ",".join(["effusion"] * 8000),
                                                 "prediction": "x"}])
    with pytest.raises(RadtrtError, match="line 1: the reference has 8000 words"):
        load_predictions(commas)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + (json.dumps(RECORDS[0]) + "\n").encode())
    assert load_predictions(bom)[0].study == "a"  # a Windows editor's byte-order mark is not an error


def test_empty_references_are_refused_before_any_scoring(tmp_path: Path) -> None:
    """An empty ground truth was scored: a normal prediction got a perfect label F1, and went to the paid judge."""
    rows = [RECORDS[0], {**RECORDS[1], "study": "patient-7", "reference": ""}, {**RECORDS[2], "reference": " \n"}]
    preds = write_jsonl(tmp_path / "p.jsonl", rows)
    code, out, err = run("-p", str(preds), "--metrics", "chexprompt,labels", "--judge-model", "g", "--endpoint",
                         "http://127.0.0.1:9/v1", "--judge-cache", str(tmp_path / "c.sqlite"),
                         "-o", str(tmp_path / "r.json"))
    assert code == 2 and "2 of 3 rows have an empty 'reference' (first at line 2)" in err, err
    # nothing visible: zero-width and format characters, a Hangul filler, a variation selector (str.strip keeps them)
    # a Braille blank, a lone combining mark (U+0301, U+20DD) or a private-use code point: missed before
    for invisible in ("\u200b", "\ufeff\u2060 \u200d", "\u3164\ufe0f", "\u00ad\t", "\u2800", "\u0301",
                      " \u20dd\u0301", "\ue000"):
        unseen = write_jsonl(tmp_path / "inv.jsonl", [RECORDS[0], {**RECORDS[1], "reference": invisible}])
        code, _, err = run("-p", str(unseen), "--metrics", "rouge")
        assert code == 2 and "1 of 2 rows has an empty 'reference' (first at line 2)" in err, (invisible, err)
    seen = write_jsonl(tmp_path / "vis.jsonl", [{**RECORDS[0], "reference": "\u200bEffusion.\u200b"}])
    assert run("-p", str(seen), "--metrics", "rouge")[0] == 0
    from radtrt.evaluation.records import has_visible_text

    # a mark on a letter, non-Latin letters, digits, symbols and punctuation are all text
    assert all(has_visible_text(t) for t in ("e\u0301", "\u0e01\u0e34", "\u80ba", "5", "\u2192", "?"))
    assert "join" in err and "patient-7" not in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "c.sqlite").exists() and out == ""
    code, _, err = run("--paired", str(write_jsonl(tmp_path / "a.jsonl", RECORDS)), str(preds), "--metrics", "rouge")
    assert code == 2 and "p.jsonl: 2 of 3 rows have an empty 'reference'" in err


def test_references_without_a_word_to_score_are_refused(tmp_path: Path) -> None:
    """A Chinese reference scored ROUGE-L 0 against an identical prediction, and the offline labels read both as
    "No Finding" (a true positive); a reference "-" was taken as ground truth."""
    for reference in ("\u53cc\u80ba\u6e05\u6670\uff0c\u65e0\u80f8\u8154\u79ef\u6db2\u3002", "-", "..."):
        rows = [RECORDS[0], {**RECORDS[1], "study": "patient-7", "reference": reference, "prediction": reference}]
        code, out, err = run("-p", str(write_jsonl(tmp_path / "p.jsonl", rows)), "--metrics", "rouge,labels")
        assert code == 2 and "p.jsonl: 1 of 2 rows has a 'reference' with no word to score (first at line 2)" in err
        assert "give the English findings text" in err and "patient-7" not in err and out == ""
        assert len(err.strip().splitlines()) == 1, err
    ok = [RECORDS[0], {**RECORDS[1], "reference": "No acute findings."}, {**RECORDS[2], "reference": "Herz normal."}]
    assert run("-p", str(write_jsonl(tmp_path / "ok.jsonl", ok)), "--metrics", "rouge")[0] == 0


def test_references_in_another_script_are_scored_by_metrics_that_read_them(tmp_path: Path) -> None:
    """'--metrics chexprompt' refused a Chinese reference although only ROUGE, BLEU and the offline labels read ASCII
    words alone: the judge reads any language, CheXbert and RadGraph their BERT's WordPiece tokens."""
    chinese = "\u53cc\u80ba\u6e05\u6670\uff0c\u5fc3\u5f71\u4e0d\u5927\u3002"
    rows = [RECORDS[0], {**RECORDS[1], "reference": chinese, "prediction": chinese},
            {**RECORDS[2], "prediction": "\u53cc\u80ba\u6e05\u6670\u3002"}]
    preds = write_jsonl(tmp_path / "zh.jsonl", rows)
    for metrics in (("chexprompt",), ("radgraph",), ("chexbert",), ("chexprompt", "chexbert")):
        assert [p.reference for p in load_predictions(preds, metrics)][1] == chinese
    with pytest.raises(RadtrtError, match=r"BLEU reads runs of ASCII letters .* leave bleu out of --metrics"):
        load_predictions(preds, ("chexprompt", "bleu"))
    with pytest.raises(RadtrtError, match=r"ROUGE, BLEU and the offline labeler read .* leave rouge,bleu,labels out"):
        load_predictions(preds)
    checkpoint, bert_dir = _tiny_chexbert(tmp_path, bias_class=1)
    code, out, err = run("-p", str(preds), "--metrics", "chexbert", "--chexbert-checkpoint", str(checkpoint),
                         "--bert-dir", str(bert_dir), "--bootstrap", "2")
    assert code == 0 and "no word" not in err and "warning" not in err, err  # a Chinese prediction is read too
    empty = write_jsonl(tmp_path / "e.jsonl", [*rows[:2], {**RECORDS[2], "prediction": " "}])
    code, _, err = run("-p", str(empty), "--metrics", "chexbert", "--chexbert-checkpoint", str(checkpoint),
                       "--bert-dir", str(bert_dir), "--bootstrap", "2")
    assert code == 0 and "e.jsonl: 1 of 3 predictions are empty" in err, err  # still said for every metric
    code, _, err = run("-p", str(preds), "--metrics", "rouge,chexbert", "--chexbert-checkpoint", str(checkpoint),
                       "--bert-dir", str(bert_dir))
    assert code == 2 and "ROUGE reads runs of ASCII letters and digits only" in err and "no ground truth for it" in err


def test_predictions_without_a_word_to_score_are_counted_once_on_stderr(tmp_path: Path) -> None:
    rows = [RECORDS[0], {**RECORDS[1], "prediction": "\u53cc\u80ba\u6e05\u6670\u3002"},
            {**RECORDS[2], "prediction": ""}, {**RECORDS[2], "study": "d", "prediction": "-"}]
    code, out, err = run("-p", str(write_jsonl(tmp_path / "p.jsonl", rows)), "--metrics", "rouge")
    assert code == 0, err
    assert err.count("warning:") == 1 and "p.jsonl: 3 of 4 predictions have no word to score (1 empty" in err, err
    assert "no word" not in out


def test_timeout_help_says_what_it_limits() -> None:
    """"Seconds per judge request" promised a deadline; httpx applies it to each connect and read instead, so an
    answer trickling in stays alive far longer."""
    import inspect

    from radtrt.evaluation.cli import eval_command

    text = inspect.signature(eval_command).parameters["timeout"].default.help
    assert "per judge request" not in text and "between bytes of its answer" in text and "not cut off" in text


def test_empty_predictions_are_named_on_stderr(tmp_path: Path) -> None:
    preds = write_jsonl(tmp_path / "p.jsonl", [RECORDS[0], {**RECORDS[1], "prediction": "  "}])
    code, out, err = run("-p", str(preds), "--metrics", "rouge")
    assert code == 0 and "1 of 2 predictions are empty" in err and "predictions are empty" not in out


def test_a_metric_whose_extra_is_not_installed_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """'pip install radtrt' leaves sacrebleu out, and BLEU is a default metric: eval was a ModuleNotFoundError
    traceback after the README's first command."""
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # what an install without the eval extra looks like
    preds = write_jsonl(tmp_path / "preds.jsonl", RECORDS)
    code, _, err = run("--predictions", str(preds), "-o", str(tmp_path / "r.json"))
    assert code == 2 and "the bleu metric needs the eval extra (sacrebleu is not installed)" in err
    assert "leave bleu out of --metrics" in err and not (tmp_path / "r.json").exists()
    code, _, err = run("--predictions", str(preds), "--metrics", "rouge,labels", "-o", str(tmp_path / "r.json"))
    assert code == 0, err


@pytest.mark.parametrize("paired", [False, True])
def test_metrics_of_the_base_install_run_without_the_judges_client(tmp_path: Path, paired: bool) -> None:
    """Without the eval extra (no openai), '--metrics rouge,labels' printed its table, then a ModuleNotFoundError
    traceback, exit 1: the CheXprompt checks after it imported the judge's client whatever was scored."""
    import subprocess

    rows = [{"study": "a", "reference": "The heart is enlarged.", "prediction": "The heart is enlarged."},
            {"study": "b", "reference": "Small left effusion.", "prediction": "No effusion."}]
    for name in ("reference", "candidate"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    inputs = (["--paired", str(tmp_path / "reference.jsonl"), str(tmp_path / "candidate.jsonl")] if paired else
              ["-p", str(tmp_path / "reference.jsonl")])
    code = ("import sys; sys.modules['openai'] = None; sys.argv = ['radtrt', 'eval', *sys.argv[1:]]; "
            "from radtrt.entry import main; main()")
    done = subprocess.run([sys.executable, "-c", code, *inputs, "--metrics", "rouge,labels"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "ROUGE" in done.stdout.upper()

"""``radtrt eval``: a thin typer command over ``radtrt.evaluation``.

``register(app)`` adds the command to the root app. Results: JSON to ``-o``, a Markdown summary to
stdout, progress to stderr. A ``RadtrtError`` becomes one ``radtrt: error: ...`` line on stderr and exit
code 2, as for every radtrt command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from radtrt.cli_support import PathOption, emit, user_errors
from radtrt.errors import fail


def eval_command(
    predictions: Optional[Path] = PathOption(None, "--predictions", "-p",
                                               help="JSONL with {study, reference, prediction} per line."),
    paired: Optional[tuple[Path, Path]] = PathOption(
        None, "--paired", metavar="<path path>", help="REFERENCE.jsonl CANDIDATE.jsonl: two backends on the same studies; with "
                               "chexprompt, a parity verdict."),
    metrics: str = typer.Option("rouge,bleu,labels", "--metrics",
                                help="Comma list: rouge,bleu,labels,chexprompt,radgraph,chexbert."),
    out: Optional[Path] = PathOption(None, "-o", "--out", file="results.json", help="JSON file to write the full results to."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint",
                                           help="OpenAI-compatible base URL of the judge, e.g. http://host:8000/v1."),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="Judge model (or Azure deployment) name."),
    azure_endpoint: Optional[str] = typer.Option(None, "--azure-endpoint", help="Azure OpenAI resource URL."),
    azure_deployment: Optional[str] = typer.Option(None, "--azure-deployment",
                                                   help="Azure deployment (default: --judge-model)."),
    api_version: Optional[str] = typer.Option(None, "--api-version", help="Azure OpenAI API version."),
    judge_prompt: Optional[str] = typer.Option(
        None, "--judge-prompt", help="auto (published if chexprompt is installed) | published | radtrt. "
                                     "\\[default: auto]"),
    requests_per_minute: Optional[float] = typer.Option(None, "--requests-per-minute",
                                                        help="Judge rate limit (0: none). \\[default: 30]"),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", min=1, help="Judge requests in flight. "
                                                                                 "\\[default: 4]"),
    max_attempts: Optional[int] = typer.Option(None, "--max-attempts", min=1, help="Tries per judge request. "
                                                                                   "\\[default: 6]"),
    timeout: Optional[float] = typer.Option(
        None, "--timeout", help="Seconds the judge may stay silent (to connect, or between bytes of its answer) "
                                "before an attempt times out; an answer that keeps arriving slowly is not cut off. "
                                "\\[default: 60]"),
    judge_cache: Optional[Path] = PathOption(None, "--judge-cache",
                                               help="Judge answer cache (default ~/.cache/radtrt/...)."),
    margin: Optional[float] = typer.Option(None, "--margin", help="Parity margin of --paired runs, significant "
                                           "errors per report. \\[default: 0.1]"),
    n_bootstrap: int = typer.Option(500, "--bootstrap", min=1, max=100_000, help="Bootstrap resamples."),
    seed: int = typer.Option(3, "--seed", help="Bootstrap seed."),
    chexbert_checkpoint: Optional[Path] = PathOption(None, "--chexbert-checkpoint", help="Local chexbert.pth."),
    bert_dir: Optional[Path] = PathOption(None, "--bert-dir", help="Local bert-base-uncased directory."),
    radgraph_dir: Optional[Path] = PathOption(None, "--radgraph-dir",
                                                help="Folder holding radgraph/ (extracted radgraph.tar.gz)."),
    device: str = typer.Option("cpu", "--device", help="Device for CheXbert: cpu | cuda."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Score generated reports: ROUGE-L, BLEU, finding-label F1, CheXprompt, F1-RadGraph, F1-CheXbert."""
    from radtrt.evaluation.bootstrap import BootstrapConfig
    from radtrt.evaluation.chexbert import CheXbertConfig
    from radtrt.evaluation.chexprompt.config import JudgeConfig
    from radtrt.evaluation.markdown import render_paired, render_report
    from radtrt.evaluation.radgraph_metric import RadGraphConfig
    from radtrt.evaluation.records import load_predictions
    from radtrt.evaluation.run import EvalConfig, evaluate, evaluate_paired, parse_metrics

    from radtrt.evaluation.parity import DEFAULT_MARGIN, check_margin

    if (predictions is None) == (paired is None):
        fail("give either --predictions FILE or --paired REFERENCE.jsonl CANDIDATE.jsonl")
    if paired is not None and all(p.is_file() for p in paired) and paired[0].samefile(paired[1]):
        fail(f"--paired names {paired[0]} twice: a run compared with itself always passes; give the reference "
             f"and the candidate runs")
    names = parse_metrics(metrics)
    if margin is not None:
        if paired is None or "chexprompt" not in names:
            fail("--margin is the CheXprompt parity margin: it needs --paired and chexprompt in --metrics")
        check_margin(margin)
    # the judge's settings: only those given, so that JudgeConfig's defaults apply to the rest
    tuning = {key: value for key, value in (("prompt", judge_prompt), ("requests_per_minute", requests_per_minute),
                                            ("concurrency", concurrency), ("max_attempts", max_attempts),
                                            ("timeout_s", timeout)) if value is not None}
    _refuse_unused({"--endpoint": endpoint, "--judge-model": judge_model, "--azure-endpoint": azure_endpoint,
                    "--azure-deployment": azure_deployment, "--api-version": api_version,
                    "--judge-cache": judge_cache, "--judge-prompt": judge_prompt,
                    "--requests-per-minute": requests_per_minute, "--concurrency": concurrency,
                    "--max-attempts": max_attempts, "--timeout": timeout}, "chexprompt", names)
    _refuse_unused({"--chexbert-checkpoint": chexbert_checkpoint, "--bert-dir": bert_dir}, "chexbert", names)
    _refuse_unused({"--radgraph-dir": radgraph_dir}, "radgraph", names)
    _refuse_unused({"--device": None if device == "cpu" else device}, "chexbert", names)
    judge = None
    if "chexprompt" in names:
        if not judge_model:
            fail("CheXprompt needs --judge-model NAME")
        judge = JudgeConfig(model=judge_model, endpoint=endpoint, azure_endpoint=azure_endpoint,
                            azure_deployment=azure_deployment, api_version=api_version, cache_path=judge_cache,
                            **tuning)
    if out is not None:
        _check_results_path(out, [predictions] if predictions is not None else list(paired or ()),
                            judge.resolved_cache_path() if judge is not None else None)
    chexbert = None
    if chexbert_checkpoint is not None or bert_dir is not None:
        if chexbert_checkpoint is None or bert_dir is None:
            fail("F1-CheXbert needs both --chexbert-checkpoint and --bert-dir")
        chexbert = CheXbertConfig(checkpoint=chexbert_checkpoint, bert_dir=bert_dir, device=device)
    radgraph = RadGraphConfig(model_dir=radgraph_dir) if radgraph_dir is not None else None
    cfg = EvalConfig(metrics=names, bootstrap=BootstrapConfig(n_resamples=n_bootstrap, seed=seed), judge=judge,
                     chexbert=chexbert, radgraph=radgraph, show_progress=not no_progress)
    cfg.check()

    if paired is not None:
        arms = load_predictions(paired[0], names), load_predictions(paired[1], names)
        _warn_empty(paired[0], arms[0], names)
        _warn_empty(paired[1], arms[1], names)
        paired_report = evaluate_paired(*arms, cfg, margin=DEFAULT_MARGIN if margin is None else margin)
        result, summary = paired_report.to_json(), render_paired(paired_report)
    else:
        assert predictions is not None
        pairs = load_predictions(predictions, names)
        _warn_empty(predictions, pairs, names)
        report = evaluate(pairs, cfg)
        result, summary = report.to_json(), render_report(report)
    if out is not None:  # whole or not at all: a full disk after a long judge run must not cost the old results
        from radtrt.outputs import make_dir, write_text

        from radtrt import interrupts

        make_dir(out.parent, "folder for the results file")
        with interrupts.completing("results file", out):
            write_text(out, json.dumps(result, indent=2) + "\n", "results file")
    emit(summary, nl=False)
    if "chexprompt" in names:  # its summary helpers import the judge's client (the eval extra): only where judged
        _check_judged(result, out)


def _check_judged(result: dict, out: Optional[Path]) -> None:
    """Fail a CheXprompt run that scored nothing, warn on one that scored some reports only."""
    from radtrt.evaluation.chexprompt.summary import nothing_judged, refusal, unreadable_only, unscored

    if nothing_judged(result):
        written = f" (results written to {out})" if out is not None else ""
        refused = refusal(result)
        if refused is not None:  # a rerun sends the same requests and gets the same answer
            fail(f"CheXprompt scored none of the reports: the judge endpoint rejected the requests ({refused})"
                 f"{written}; a rerun fails the same way: check --judge-model (a chat model that takes temperature "
                 f"and max_tokens) and --endpoint (or --azure-endpoint)")
        unreadable = unreadable_only(result)
        if unreadable is not None:  # at temperature 0 the judge gives the same answers again
            fail(f"CheXprompt scored none of the reports: none of the judge's {unreadable} answers could be read "
                 f"(see the reasons in the summary){written}; the judge answers at temperature 0, so a rerun gets the same "
                 f"answers: use a judge model that answers in the CheXprompt format (--judge-model), or the other "
                 f"prompt (--judge-prompt published or radtrt)")
        fail(f"CheXprompt scored none of the reports: no judge answer could be used (failed requests or "
             f"unreadable answers, see the reasons in the summary){written}; rerun the same command to ask again")
    note = unscored(result)
    if note is not None:
        from radtrt.cli_support import err

        err.print(f"warning: {note}", markup=False, highlight=False, soft_wrap=True)


def _check_results_path(out: Path, inputs: list[Path], judge_cache: Optional[Path]) -> None:
    """Refuse a results path that would overwrite an input or the judge cache, or cannot be written,
    before any scoring.

    Scoring may take a long, paid judge run: a bad ``-o`` must fail first, and ``-o`` naming the
    predictions file would replace the user's predictions with the results.
    """
    from radtrt.outputs import check_file_target, resolved

    if any(p.exists() and out.exists() and out.samefile(p) for p in inputs):
        fail(f"-o {out} is one of the prediction files being scored; choose another results path")
    if judge_cache is not None and (resolved(out) == resolved(judge_cache) or
                                    (out.exists() and judge_cache.exists() and out.samefile(judge_cache))):
        fail(f"-o {out} is the judge cache; choose another results path")
    check_file_target(out, "results file")


def _refuse_unused(options: dict[str, Any], metric: str, names: tuple[str, ...]) -> None:
    """An option of a metric that is not being computed would be ignored without a word."""
    given = [name for name, value in options.items() if value is not None]
    if given and metric not in names:
        fail(f"{given[0]} is for the {metric} metric: add {metric} to --metrics, or drop it")


def _warn_empty(path: Path, pairs: list[Any], metrics: tuple[str, ...]) -> None:
    """Empty predictions score as reports that mention nothing, which can look like a perfect normal study; so do
    predictions with no word ROUGE, BLEU or the offline labels read (another script, punctuation alone) when one of
    those runs: one line with their count, since the judge may still read them and the run is not refused."""
    from radtrt.cli_support import err
    from radtrt.evaluation.records import ascii_word_readers, has_visible_text, report_words

    readers = ascii_word_readers(metrics)
    empty = sum(not has_visible_text(p.prediction) for p in pairs)
    # without an ASCII-word metric a prediction in another script is read like any other
    wordless = sum(report_words(p.prediction) == 0 for p in pairs) if readers else empty
    if not wordless:
        return
    what = ("are empty" if empty == wordless else
            f"have no word to score ({empty} empty, the others no ASCII letters or digits, the only words {readers})")
    err.print(f"warning: {path.name}: {wordless} of {len(pairs)} predictions {what} (scored as reports that "
              f"mention no finding)", markup=False, highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``eval`` to ``app`` (the root ``radtrt`` app)."""
    app.command("eval")(user_errors(eval_command))

"""Report evaluation: lexical metrics, finding-label F1, CheXprompt judging and CheXprompt parity.

Public API::

    from radtrt.evaluation import (EvalConfig, JudgeConfig, evaluate, evaluate_paired, load_predictions,
                                   chexprompt_parity)

    report = evaluate(load_predictions(Path("preds.jsonl")), EvalConfig(metrics=("rouge", "bleu", "labels")))
    verdict = chexprompt_parity(Path("torch.jsonl"), Path("trt.jsonl"),
                                JudgeConfig(model="gpt-4o", endpoint="http://judge:8000/v1"), margin=0.1)

Heavy or optional dependencies (openai, tenacity, rouge-score, sacrebleu, torch, radgraph) are imported
only by the metric that needs them.
"""

from radtrt.evaluation.bootstrap import BootstrapConfig, Estimate
from radtrt.evaluation.chexprompt.config import JudgeConfig
from radtrt.evaluation.parity import ParityVerdict, chexprompt_parity
from radtrt.evaluation.records import ReportPair, load_predictions
from radtrt.evaluation.run import EvalConfig, EvalReport, PairedReport, evaluate, evaluate_paired

__all__ = ["BootstrapConfig", "Estimate", "EvalConfig", "EvalReport", "JudgeConfig", "PairedReport",
           "ParityVerdict", "ReportPair", "chexprompt_parity", "evaluate", "evaluate_paired", "load_predictions"]

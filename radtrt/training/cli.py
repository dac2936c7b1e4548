"""``radtrt train ...``: thin typer commands over ``radtrt.training``.

    radtrt train tokenizer MANIFEST -o DIR            sentencepiece tokenizer on the reports
    radtrt train init --tokenizer DIR -o DIR          fresh model (--arch phantom|tiny|mid|llava-rad)
    radtrt train vision MANIFEST --model DIR -o RUN   stage 0, trunk: finding classification
    radtrt train lm     MANIFEST --model DIR -o RUN   stage 0, decoder: causal LM on the reports
    radtrt train stage1 MANIFEST --model DIR -o RUN   projector only, plain template
    radtrt train stage2 MANIFEST --model DIR -o RUN   LoRA + projector, v1 template
    radtrt train resume RUN                           continue an interrupted run exactly
    radtrt train eval MANIFEST --model DIR            held-out finding micro-F1 (phantom vocabulary)

Each stage writes ``RUN/model`` (toolkit layout) for the next. Multi-GPU: ``torchrun
--nproc_per_node N $(which radtrt) train stage2 ...``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from radtrt.cli_support import PathArgument, PathOption, emit, err
from radtrt.cli_support import user_errors as guarded
from radtrt.errors import fail
from radtrt.outputs import check_new_dir, resolved
from radtrt.threads import check_workers, set_threads


def _model_name(name: str | None) -> str | None:
    from radtrt.model.loading import check_model_name

    return None if name is None else check_model_name(name, "--name")


def tokenizer(manifest: Path = PathArgument(..., metavar="MANIFEST", help="Training manifest (JSONL)."),
              out: Path = PathOption(..., "-o", "--out", help="Folder for tokenizer.model + config."),
              vocab_size: int = typer.Option(1024, "--vocab-size", help="Upper bound on the vocabulary.")) -> None:
    """Train a LLaMA-style sentencepiece tokenizer on a manifest's reports."""
    from radtrt.data.manifest import read_manifest
    from radtrt.outputs import check_buildable_aside, new_dir_built_aside
    from radtrt.training.tokenizer import train_tokenizer

    check_buildable_aside(out, "tokenizer folder")  # before training; never replace an existing model's tokenizer
    tok = train_tokenizer(read_manifest(manifest), vocab_size)
    with new_dir_built_aside(out, "tokenizer folder") as work:  # a failed write leaves no half folder
        tok.save(work)
    err.print(f"tokenizer with {tok.vocab_size} pieces", highlight=False)
    emit(str(out))


def init(out: Path = PathOption(..., "-o", "--out", help="Output model folder (toolkit layout)."),
         tokenizer_dir: Path = PathOption(..., "--tokenizer", help="Folder with tokenizer.model."),
         arch: str = typer.Option("phantom", "--arch", help="phantom | tiny | mid | llava-rad"),
         seed: int = typer.Option(0, "--seed", help="Initialization of the new weights."),
         name: Optional[str] = typer.Option(None, "--name", help="Model name recorded in config.json.")) -> None:
    """A freshly initialized LLaVA-Rad-architecture model to train from scratch."""
    from radtrt.model.loading import save_toolkit
    from radtrt.model.tokenizer import LlamaSPTokenizer
    from radtrt.training.config import check_seed
    from radtrt.training.init_model import ARCHS, fresh_model

    if arch not in ARCHS:
        fail(f"unknown --arch '{arch}' ({', '.join(ARCHS)})")
    check_seed(seed, "--seed")
    check_new_dir(out)
    save_toolkit(fresh_model(arch, LlamaSPTokenizer.from_dir(tokenizer_dir), seed, _model_name(name)), out)
    emit(str(out))


def _stage_command(stage: str, summary: str):  # noqa: ANN202 - typer reads the signature
    def command(
        manifest: Path = PathArgument(..., metavar="MANIFEST", help="Training manifest (JSONL)."),
        model: Path = PathOption(..., "--model", help="Model to start from (toolkit dir or release dir)."),
        base_model: Optional[Path] = PathOption(None, "--base-model", help="Base LM dir for a release --model."),
        out: Path = PathOption(..., "-o", "--out", help="Run folder: checkpoint/, log.jsonl, model/."),
        preset: str = typer.Option("paper", "--preset", help="paper | phantom | tiny"),
        epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the manifest (default: the preset's)."),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps (overrides --epochs)."),
        lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (cosine schedule after warmup)."),
        weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW decay (not on 1-D parameters: biases, norms, LayerScale)."),
        warmup_ratio: Optional[float] = typer.Option(None, "--warmup-ratio", help="Fraction of the steps with linear warmup."),
        micro_batch_size: Optional[int] = typer.Option(None, "--micro-batch-size", help="Per process."),
        grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step."),
        max_grad_norm: Optional[float] = typer.Option(None, "--max-grad-norm", help="Gradient clipping norm."),
        precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | bf16 (autocast)"),
        max_length: Optional[int] = typer.Option(None, "--max-length", help="Tokens per example, image tokens counted as one (not vision)."),
        lora_r: Optional[int] = typer.Option(None, "--lora-r", help="LoRA rank (stage2 only)."),
        lora_alpha: Optional[int] = typer.Option(None, "--lora-alpha", help="LoRA alpha (stage2 only)."),
        lora_dropout: Optional[float] = typer.Option(None, "--lora-dropout", help="LoRA dropout (stage2 only)."),
        save_every: Optional[int] = typer.Option(None, "--save-every", help="Steps between checkpoints."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Data order, dropout and initialization."),
        device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
        num_workers: int = typer.Option(0, "--num-workers", help="DataLoader workers (images read lazily)."),
        no_feature_cache: bool = typer.Option(False, "--no-feature-cache", help="Run the frozen trunk every step (stage1 and stage2)."),
        name: Optional[str] = typer.Option(None, "--name", help="Model name recorded in RUN/model."),
        threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads."),
    ) -> None:
        from radtrt.training.config import make_config
        from radtrt.training.loop import train

        unused = [flag for flag, value in (("--lora-r", lora_r), ("--lora-alpha", lora_alpha),
                                           ("--lora-dropout", lora_dropout)) if value is not None and stage != "stage2"]
        unused += ["--max-length"] if max_length is not None and stage == "vision" else []
        unused += ["--no-feature-cache"] if no_feature_cache and stage in ("vision", "lm") else []
        if unused:  # refused, not ignored: the user believes they took effect
            why = {"--lora": "LoRA is stage 2's", "--max-length": "it reads no text",
                   "--no-feature-cache": "only stages 1 and 2 cache the features of their frozen trunk"}
            fail(f"{unused[0]} does not apply to 'train {stage}' ("
                 + next(text for prefix, text in why.items() if unused[0].startswith(prefix)) + ")")
        set_threads(threads)
        check_workers(num_workers)
        cfg = make_config(stage, preset, manifest=str(resolved(manifest)), init_model=str(resolved(model)),
                          init_base_model=str(resolved(base_model)) if base_model else None,
                          out_dir=str(resolved(out)), epochs=epochs, max_steps=max_steps, lr=lr,
                          weight_decay=weight_decay, warmup_ratio=warmup_ratio, micro_batch_size=micro_batch_size,
                          grad_accum=grad_accum, max_grad_norm=max_grad_norm, precision=precision,
                          max_length=max_length, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          save_every=save_every, seed=seed, device=device, num_workers=num_workers,
                          cache_features=not no_feature_cache, model_name=_model_name(name))
        result = train(cfg, console=err)
        if result.model_dir is not None:
            emit(str(result.model_dir))

    command.__doc__ = summary
    return command


def resume(run: Path = PathArgument(..., metavar="RUN", help="Run folder of an interrupted 'radtrt train' stage."),
           threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads.")) -> None:
    """Continue an interrupted run from its last checkpoint (same config, data position, RNG)."""
    from radtrt.training.loop import resume_config, train

    set_threads(threads)
    result = train(resume_config(run), resume=True, console=err)
    if result.model_dir is not None:
        emit(str(result.model_dir))


def evaluate(manifest: Path = PathArgument(..., metavar="MANIFEST", help="Held-out manifest with findings (and labels)."),
             model: Path = PathOption(..., "--model", help="Model dir (toolkit or release)."),
             base_model: Optional[Path] = PathOption(None, "--base-model", help="Base LM dir for a release --model."),
             limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N rows."),
             max_new_tokens: int = typer.Option(160, "--max-new-tokens", min=1, help="Generated tokens per report at most."),
             as_json: bool = typer.Option(False, "--json", help="Print the full result as JSON."),
             threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads.")) -> None:
    """Micro-F1 between phantom-vocabulary labels of generated and reference findings."""
    from radtrt.model.loading import load_model
    from radtrt.training.evaluate import evaluate_findings

    set_threads(threads)
    result = evaluate_findings(load_model(model, base_model), manifest, limit=limit, max_new_tokens=max_new_tokens,
                               console=err)
    if as_json:
        emit(json.dumps(result.to_dict(), indent=2))
    else:
        emit(f"micro-F1 {result.f1.micro_f1:.3f}  macro-F1 {result.f1.macro_f1:.3f}  (n={result.f1.n})")


STAGE_HELP = {
    "vision": "Stage 0 (trunk): multi-label finding classification on the selected hidden state.",
    "lm": "Stage 0 (decoder): causal-LM training of the whole decoder on the reports.",
    "stage1": "Stage 1: projector only, plain template (LLaVA-Rad alignment).",
    "stage2": "Stage 2: LoRA on every decoder linear + projector, v1 template.",
}


def register(app: typer.Typer) -> None:
    """Add the ``radtrt train`` group."""
    train_app = typer.Typer(no_args_is_help=True, help="Train LLaVA-Rad-architecture models (stages 0, 1, 2).")
    train_app.command("tokenizer")(guarded(tokenizer))
    train_app.command("init")(guarded(init))
    for stage, summary in STAGE_HELP.items():
        train_app.command(stage)(guarded(_stage_command(stage, summary)))
    train_app.command("resume")(guarded(resume))
    train_app.command("eval")(guarded(evaluate))
    app.add_typer(train_app, name="train")

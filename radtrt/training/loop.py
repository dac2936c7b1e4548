"""The training loop: flat and readable (nanoGPT style), one function for every stage.

AdamW (no decay on 1-D parameters: biases, norm weights, LayerScale), cosine schedule with
linear warmup (the released scripts' ``lr_scheduler_type cosine``: ``schedule.cosine_with_warmup``,
equal to transformers' ``get_cosine_schedule_with_warmup``), gradient accumulation and clipping, fp32 or bf16 autocast, DDP under torchrun,
periodic checkpoints with exact resume, a rich progress bar on stderr and ``RUN/log.jsonl``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

from radtrt.progress import LineProgress, make_progress
from torch.nn.parallel import DistributedDataParallel

from radtrt import interrupts
from radtrt.data.manifest import read_jsonl, read_manifest
from radtrt.data.vocabulary import LABELS
from radtrt.errors import RadtrtError, fail, shell_quote
from radtrt.model.checkpoints import all_finite
from radtrt.model.fingerprint import weights_fingerprint
from radtrt.model.io import read_json, sha256_file
from radtrt.model.loading import load_model
from radtrt.outputs import WORK_MARKER, check_folder_target, check_new_dir, make_dir, not_ours, work_dir, write_text
from radtrt.training import checkpoint as ckpt
from radtrt.training.config import TrainConfig
from radtrt.training.data import (ManifestDataset, Schedule, collate, non_frontal_warning, repeated_rows,
                                  mismatch_warning, repeated_warning, too_long_warning, untrained_warning)
from radtrt.training.distributed import DistInfo, barrier, gather_objects, init_distributed, mean_across, shutdown
from radtrt.training.objectives import MultimodalLM, build_objective, trainable_parameters
from radtrt.training.outputs import LORA_DIR, MODEL_DIR, check_leftover_lora, write_outputs
from radtrt.training.runlock import LOCK_FILE, RunLock, lock_holder, lock_run
from radtrt.training.schedule import cosine_with_warmup

CONFIG_FILE = "train_config.json"
LOG_FILE = "log.jsonl"


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path | None  # None when the run stopped before its last step
    step: int
    total_steps: int
    losses: list[float] = field(default_factory=list)  # this invocation's per-step losses


def label_vocabulary(dataset: ManifestDataset) -> list[str]:
    """Labels seen in the manifest: the phantom vocabulary's order first, then any others sorted."""
    seen = {label for i in range(len(dataset.rows)) for label in dataset.row_labels(i)}
    if not seen and all(row.labels is not None for row in dataset.rows):
        # said as "the manifest has no 'labels'" when every row had them, as []; the phrase labeler gives every
        # findings paragraph at least "no_finding", so this is the case in practice
        fail("trunk pretraining needs finding labels: every manifest row's 'labels' is an empty list; list each "
             "study's findings there (\"no_finding\" for a normal study), or leave 'labels' out to have them read "
             "from the findings")
    if not seen:
        fail("trunk pretraining needs finding labels: the manifest's rows have none, and none could be read from "
             "their findings")
    return [x for x in LABELS if x in seen] + sorted(seen - set(LABELS))


def _optimizer(named: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with no decay on 1-D parameters (biases, norm weights, the trunk's LayerScale gammas): timm's rule for
    ViTs, which Hugging Face's name-based rule (biases and norms only) would decay towards 0, shrinking the blocks."""
    decay = [p for n, p in named if p.dim() >= 2]
    no_decay = [p for n, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


class _StepStats(ProgressColumn):
    """The last step's loss, learning rate and speed; nothing before the first step of this invocation (its
    placeholder "loss nan" read as the divergence a run stops for)."""

    def render(self, task: Task) -> Text:
        f = task.fields
        if f.get("loss") is None:
            return Text("")
        return Text(f"loss {f['loss']:.4f}  lr {f['lr']:.2e}  {f['sps']:.1f} samples/s")


def _progress(console: Console) -> Progress | LineProgress:
    return make_progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _StepStats(),
                         TimeRemainingColumn(), console=console, transient=False)


def _check_run_dir(run_dir: Path, resume: bool, is_main: bool = True, stage: str | None = None) -> None:
    """Refuse an -o that holds another run or model, or cannot be created, before any slow work."""
    if resume:  # the run folder is the run's; only the outputs it ends with must still be writable
        _check_resume_outputs(run_dir, stage)
        return
    check_folder_target(run_dir, "run folder")
    holder = lock_holder(run_dir)
    if holder is not None:
        fail(f"{holder} is training in {run_dir} right now; choose another -o")
    if (run_dir / MODEL_DIR).exists():  # first: a finished run keeps its checkpoint, and resume refuses it
        fail(f"{run_dir} already holds a trained model; choose another -o")
    if ckpt.state_path(run_dir).exists():
        # each command last and bare: quoted inside quotes ('radtrt train resume '/a/my run'') it did not paste
        fail(f"{run_dir} already holds a training run; choose another -o, or to continue it, run: radtrt train "
             f"resume {shell_quote(str(run_dir))}")
    if (run_dir / CONFIG_FILE).exists():
        fail(_before_first_checkpoint(run_dir))
    if is_main:  # the other ranks start while the main one may already be writing into it
        check_new_dir(run_dir, "run folder")  # a user's log.jsonl or train_config.json there was overwritten


def _check_resume_outputs(run_dir: Path, stage: str | None) -> None:
    """What would stop a resume from writing its outputs, said before it trains: a user's RUN/model.partial was
    found after every remaining step, with a remedy ("choose another -o") resume cannot take."""
    check_folder_target(run_dir / MODEL_DIR, "model folder")
    outputs = [(MODEL_DIR, "model")] + ([(LORA_DIR, "LoRA adapter")] if stage == "stage2" else [])
    for name, what in outputs:
        work = work_dir(run_dir / name)
        if not_ours(work):
            fail(f"{work} is in the way of the {what} this run ends with (radtrt builds {name}/ there first) and is "
                 f"not radtrt's unfinished work: move it away, then run: radtrt train resume "
                 f"{shell_quote(str(run_dir))}")
    if stage == "stage2" and not (run_dir / MODEL_DIR).exists():
        check_leftover_lora(run_dir)


def _before_first_checkpoint(run_dir: Path) -> str:
    return (f"{run_dir} holds a run that stopped before its first checkpoint, so there is nothing to resume: delete "
            f"the folder and run the training command again (or choose another -o)")


def _prepare_run_dir(cfg: TrainConfig, run_dir: Path, resume: bool, info: DistInfo) -> RunLock | None:
    """Lock the new run's folder and write its config and empty log: only once the data, model and schedule were
    accepted. The lock, for the caller to hold until the run ends."""
    if not info.is_main or resume:
        return None
    make_dir(run_dir, "run folder")
    lock = lock_run(run_dir, f"{run_dir} was taken by another run started at the same time ({{holder}}); choose "
                             f"another -o")
    try:
        config_path, log_path = run_dir / CONFIG_FILE, run_dir / LOG_FILE
        try:  # created exclusively: of two runs started into one folder at once, the second stops here
            config = open(config_path, "x", encoding="utf-8")
        except FileExistsError:
            fail(f"{run_dir} was taken by another run started at the same time; choose another -o")
        except OSError as e:
            fail(f"cannot write {config_path} ({e.strerror or e}); nothing was trained")
        try:
            with config:
                config.write(cfg.to_json())
            log_path.write_text("")
        except OSError as e:
            # both are this run's (the folder was empty and the config created exclusively); an empty
            # train_config.json left behind made the folder refuse a rerun ("not empty") and a resume alike
            config_path.unlink(missing_ok=True)
            log_path.unlink(missing_ok=True)
            fail(f"cannot write {config_path.name} and {log_path.name} in {run_dir} ({e.strerror or e}); "
                 f"nothing was trained: free space and run the command again")
    except BaseException:
        lock.release()  # its file too: the folder is left as empty as it was found
        raise
    return lock


def _append_log(run_dir: Path, entry: dict[str, Any]) -> None:
    """A full disk here stops the run in one line; a cut last line it may leave is dropped by the resume."""
    path = run_dir / LOG_FILE
    try:
        with path.open("a", encoding="utf-8") as log:
            log.write(json.dumps(entry) + "\n")
    except OSError as e:
        if not ckpt.state_path(run_dir).is_file():  # resume would refuse: nothing saved yet (train says what to do)
            fail(f"cannot append to training log {path} ({e.strerror or e}) before the run's first checkpoint")
        fail(f"cannot append to training log {path} ({e.strerror or e}); the steps since the last checkpoint are "
             f"lost: free space, then run: radtrt train resume {shell_quote(str(run_dir))}")


def _log_step(line: str) -> int | None:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = entry.get("step") if isinstance(entry, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _truncate_log(run_dir: Path, step: int) -> None:
    """Drop log lines past the checkpoint (steps a killed run did after its last save).

    A run killed while appending leaves a cut last line, which is dropped too; a damaged line
    anywhere else is the user's to look at, so the resume stops before rewriting the log.
    """
    path = run_dir / LOG_FILE
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    keep = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        line_step = _log_step(line)
        if line_step is None:
            if number == len(lines) and not text.endswith("\n"):
                break
            fail(f"{path} line {number} is not a training log entry; repair or remove the line, then resume")
        if line_step <= step:
            keep.append(line)
    write_text(path, "".join(ln + "\n" for ln in keep), "training log")


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    """The run's log entries, for scripts that plot a run; a cut last line (a run killed while appending) is
    left out, as resume leaves it out."""
    path = run_dir / LOG_FILE
    return [entry for _, entry in read_jsonl(path, complete_only=True)] if path.is_file() else []


def run_config(run_dir: Path) -> TrainConfig:
    """The config a run was started with, from its checkpoint (the source of truth for resume), writing into
    ``run_dir`` itself: a run that was copied or moved continues where it is now, never in the folder it was
    started in (which may hold another run, or be gone). The whole checkpoint is read and verified for it (the
    config is one of its records): the cost of one load, paid by resume anyway."""
    return _run_state(run_dir)[0]


def _run_state(run_dir: Path) -> tuple[TrainConfig, int]:
    """:func:`run_config`, and the step of the checkpoint."""
    if not ckpt.state_path(run_dir).is_file() and (run_dir / CONFIG_FILE).is_file():
        holder = lock_holder(run_dir)
        if holder is not None:
            fail(f"{holder} is training in {run_dir} right now and has not saved its first checkpoint yet; wait for "
                 f"it to end")
        fail(_before_first_checkpoint(run_dir))
    state = ckpt.load_checkpoint(run_dir)
    config = state.get("config")
    if not isinstance(config, dict):
        fail(f"the checkpoint in {run_dir} has no training config (damaged file?)")
    return TrainConfig.from_dict({**config, "out_dir": str(run_dir)},
                                 f"the training config in {ckpt.state_path(run_dir)}"), state["step"]


def resume_config(run_dir: Path) -> TrainConfig:
    """:func:`run_config`, checked against ``RUN/train_config.json``. Why: resume continued whatever checkpoint
    was in the folder (another run's, another stage's) and ignored an edited train_config.json without a word;
    a deleted one is written again from the checkpoint (``convert --to llava-rad`` reads it)."""
    folder = run_dir / ckpt.CHECKPOINT_DIR
    if folder.is_symlink():  # a run set up with links to another's files: its saves went into that other run
        fail(f"{folder} is a link to {os.path.realpath(folder)}: resume would write its checkpoints there, into "
             f"another run's folder; copy the folder in place of the link (cp -rL) to continue this run on its own")
    cfg, step = _run_state(run_dir)
    _check_config_file(run_dir, cfg)
    if (run_dir / MODEL_DIR).is_dir():  # built aside: present means complete. Said before the model loads and
        # every image is read (the same check in _restore stays for callers of train(resume=True))
        fail(_finished(run_dir, step))
    return cfg


_ABSENT = object()


def _check_config_file(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse a train_config.json that disagrees with the checkpoint's config (out_dir aside: a copied run's file
    still names the folder it was copied from); recreate a missing one."""
    path = run_dir / CONFIG_FILE
    if not path.exists() and not path.is_symlink():
        write_text(path, cfg.to_json(), "training config")
        return
    try:
        recorded = read_json(path)
    except RadtrtError as e:  # the checkpoint holds the config: the file can be written again from it
        fail(f"{e}; to write it again from the checkpoint, delete it, then run: radtrt train resume "
             f"{shell_quote(str(run_dir))}")
    saved = cfg.to_dict()
    for key in sorted(set(saved) | set(recorded)):
        if key == "out_dir":
            continue
        in_file, in_checkpoint = recorded.get(key, _ABSENT), saved.get(key, _ABSENT)
        if in_file != in_checkpoint:
            fail(f"{path} disagrees with the checkpoint {ckpt.state_path(run_dir)} ({key}: {_said(in_file)} in the "
                 f"file, {_said(in_checkpoint)} in the checkpoint): the checkpoint is another run's, or the file was "
                 f"edited (resume continues a run with the settings it began with; new settings need a new run); "
                 f"put back the one that is wrong (a deleted {CONFIG_FILE} is written again from the checkpoint)")


def _said(value: object) -> str:
    return "nothing" if value is _ABSENT else repr(value)


def _finished(run_dir: Path, steps: int) -> str:
    return f"{run_dir} has finished all {steps} steps and written its model; nothing to resume"


def train(cfg: TrainConfig, *, resume: bool = False, stop_after: int | None = None,
          console: Console | None = None) -> TrainResult:
    """Run (or resume) one stage. ``stop_after`` ends this invocation after that many steps, saved."""
    console = console or Console(stderr=True)
    info = init_distributed(cfg.device)
    try:
        with contextlib.ExitStack() as held:  # the run folder's lock, from where it is taken to the run's end
            return _train(cfg, info, resume, stop_after, console, held)
    finally:
        shutdown(info)


def _train(cfg: TrainConfig, info: DistInfo, resume: bool, stop_after: int | None, console: Console,
           held: contextlib.ExitStack) -> TrainResult:
    run_dir = Path(cfg.out_dir)
    manifest = Path(cfg.manifest)
    if resume and info.is_main:  # two resumes of one run interleaved its log and removed each other's lora/
        held.enter_context(lock_run(run_dir, f"{{holder}} is training in {run_dir} right now; a second process "
                                             f"would overwrite its checkpoint and log: wait for it to end"))
        # held now: no other radtrt is saving into the folder, so a temporary checkpoint file there is a killed save's
        leftovers = ckpt.remove_leftover_saves(run_dir)
        if leftovers:
            console.print(f"radtrt: removed {_unfinished_saves(leftovers)} left by an interrupted run", markup=False,
                          highlight=False, soft_wrap=True)
    _check_run_dir(run_dir, resume, info.is_main, cfg.stage)
    rows = read_manifest(manifest)  # inputs are checked before anything is written
    torch.manual_seed(cfg.seed + info.rank)
    loaded = load_model(Path(cfg.init_model), Path(cfg.init_base_model) if cfg.init_base_model else None,
                        device=info.device)
    # what the checkpoint cannot hold (frozen weights, tokenizer, the data): a resume refuses other ones than the run
    # began with
    origin = {"init_weights": weights_fingerprint(loaded.model), "manifest_sha256": sha256_file(manifest),
              "tokenizer_sha256": hashlib.sha256(loaded.tokenizer.model_proto).hexdigest()}
    _check_max_length(cfg, loaded.model.cfg)
    image_size = None if cfg.stage == "lm" else loaded.model.cfg.vision.img_size
    where = [f"{manifest}:{lineno}" for lineno, _ in read_jsonl(manifest)]  # each row, by its line
    dataset = ManifestDataset(rows, manifest.parent, tokenizer=loaded.tokenizer,
                              template=cfg.template, max_length=cfg.max_length, image_size=image_size,
                              preload=cfg.num_workers == 0 or cfg.cache_features, console=console,
                              condition_on_labels=cfg.stage == "lm" and cfg.lm_condition == "labels",
                              where=where)
    origin["images_sha256"] = dataset.images_digest(run_dir)  # before the feature cache drops the pixels
    if info.is_main:
        repeats = repeated_rows(rows)
        for warning in ([non_frontal_warning(where, dataset.non_frontal)] if dataset.non_frontal else []) + \
                ([too_long_warning(where, dataset.too_long, cfg.max_length)] if dataset.too_long else []) + \
                ([untrained_warning(where, dataset.untrained, cfg.max_length)] if dataset.untrained else []) + \
                ([mismatch_warning(where, dataset.mismatched)] if dataset.mismatched else []) + \
                ([repeated_warning(where, repeats)] if repeats else []):
            console.print(warning, markup=False, highlight=False, soft_wrap=True)
    label_names = label_vocabulary(dataset) if cfg.stage == "vision" else None
    dataset.label_names = label_names
    objective, peft_lm = build_objective(cfg, loaded.model, label_names)
    objective.to(info.device)
    autocast = torch.autocast(device_type=info.device.split(":")[0], dtype=torch.bfloat16,
                              enabled=cfg.precision == "bf16")
    if isinstance(objective, MultimodalLM) and cfg.cache_features and dataset.images is not None:
        with console.status("computing image features once (the trunk is frozen)"):
            objective.build_feature_cache(dataset.images.to(info.device), autocast)
        dataset.images, dataset.image_size = None, None
    named = trainable_parameters(objective)
    params = [p for _, p in named]
    optimizer = _optimizer(named, cfg)
    schedule = Schedule(len(dataset), cfg.micro_batch_size, cfg.grad_accum, info.world_size, cfg.seed)
    schedule.check()
    total = schedule.total_steps(cfg.epochs, cfg.max_steps)
    # at most total - 1 warmup steps: a warmup as long as the run trains every step at lr 0 or near it (one step: 0)
    scheduler = cosine_with_warmup(optimizer, min(math.ceil(cfg.warmup_ratio * total), total - 1), total)
    start = _restore(run_dir, objective, named, optimizer, scheduler, info, total, origin) if resume else 0
    saved = start if resume else None  # the step of the run folder's checkpoint
    end = total if stop_after is None else min(total, start + stop_after)
    losses: list[float] = []
    created = not run_dir.exists()  # an interrupt before the first checkpoint then removes the folder too
    lock = _prepare_run_dir(cfg, run_dir, resume, info)
    if lock is not None:
        held.enter_context(lock)
    try:  # from the moment the run folder holds files: an interrupt in the loader's start left them
        model: torch.nn.Module = objective
        if info.enabled:
            model = DistributedDataParallel(objective, device_ids=[info.local_rank] if info.device != "cpu" else None)
        plan = _Plan(schedule, start, end, info.rank)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=plan, collate_fn=collate,
                                             num_workers=cfg.num_workers, generator=torch.Generator(),
                                             worker_init_fn=_quiet_on_sigterm if cfg.num_workers else None)
        # the workers are forked here: an interrupt landing in logging's at-fork hook was ignored by Python
        # ("Exception ignored in: _releaseLock"), and training went on; held, it lands once the workers are up
        with interrupts.deferred():
            batches = iter(loader)
        model.train()
        progress = _progress(console) if info.is_main else None
        with progress or contextlib.nullcontext():
            task = progress.add_task(f"{cfg.stage}", total=total, completed=start, loss=None, lr=None,
                                     sps=None) if progress else None
            for step in range(start, end):
                t0 = time.perf_counter()
                lr = scheduler.get_last_lr()[0]
                optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for micro in range(cfg.grad_accum):
                    batch = next(batches)
                    if "error" in batch:  # an unreadable image, read lazily by a DataLoader worker
                        fail(_image_failed(batch["error"], run_dir, saved))
                    sync = micro == cfg.grad_accum - 1 or not info.enabled
                    with (contextlib.nullcontext() if sync else model.no_sync()), autocast:  # type: ignore[operator]
                        loss = model(batch)
                    (loss / cfg.grad_accum).backward()
                    step_loss += float(loss.detach()) / cfg.grad_accum
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                step_loss = mean_across(info, step_loss)
                if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):  # before the step spreads it to the weights
                    fail(f"training diverged at step {step + 1}: loss {step_loss}, gradient norm {grad_norm} (a lower --lr?); "
                         f"no model written, {_kept(saved)}")
                optimizer.step()
                bad = _first_non_finite(named)
                if bad is not None:  # a finite loss and gradient can still take a step to infinity
                    fail(f"training diverged at step {step + 1}: the step made {bad} non-finite (a lower --lr?); no "
                         f"model written, {_kept(saved)}")
                scheduler.step()
                losses.append(step_loss)
                sps = schedule.global_batch / (time.perf_counter() - t0)
                done = step + 1
                if info.is_main:
                    entry = {"step": done, "epoch": round(schedule.epoch_of(done), 4), "loss": step_loss, "lr": lr,
                             "grad_norm": grad_norm, "samples_per_s": round(sps, 2)}
                    _append_log(run_dir, entry)
                    assert progress is not None and task is not None
                    progress.update(task, completed=done, loss=step_loss, lr=lr, sps=sps)
                if done % cfg.save_every == 0 or done == end:
                    # one step with its record: a SIGTERM between them named no checkpoint (or an older one) and,
                    # before the first, had the user delete a run whose checkpoint was already on disk
                    with interrupts.deferred("finishing the checkpoint save"):
                        _save(run_dir, cfg, info, done, named, optimizer, scheduler, origin)
                        saved = done
        model_dir = None
        if end == total and info.is_main:
            try:
                model_dir = write_outputs(cfg, run_dir, loaded, objective, peft_lm, total)
            except RadtrtError as e:  # a full disk said only "cannot write RUN/model.partial/...", not how to go on
                fail(f"{e}; all {total} steps are saved in {ckpt.state_path(run_dir)}: to write the model without "
                     f"training again once that is fixed, run: radtrt train resume {shell_quote(str(run_dir))}")
    except RadtrtError as e:
        if saved is not None or not info.is_main:
            raise
        fail(f"{e}; so there is nothing to resume: {_start_again(run_dir, created)}")
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (radtrt.interrupts) from timeout, kill or a batch scheduler
        if info.is_main:
            model = run_dir / MODEL_DIR
            if (model / "config.json").is_file() and not (model / WORK_MARKER).exists():  # in place before it
                line = f"radtrt: interrupted after the last step; the model is complete in {model}"
            else:
                removed = _remove_unstarted(run_dir, created) if saved is None else None
                line = _interrupted(run_dir, saved, removed)
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        interrupts.explained()  # the CLI's generic line would repeat it (on every rank: the main one speaks for all)
        raise
    barrier(info)
    return TrainResult(run_dir, model_dir if end == total else None, end, total, losses)


def _first_non_finite(named: list[tuple[str, torch.nn.Parameter]]) -> str | None:
    """The first trainable weight holding NaN or infinity, checked after every step so that no checkpoint or model
    ever holds one: lr 10 with weight decay 1e38 made the projector infinite while the loss and gradient checked
    before the step were still finite, and the run ended with exit 0 and a model every later command refused.
    One sum per weight, read back at once (one device sync a step); only a sum that overflowed is looked at
    element by element."""
    with torch.no_grad():
        sums = torch.stack([p.detach().sum(dtype=torch.float32) for _, p in named])
    if bool(torch.isfinite(sums).all()):
        return None
    return next((n for n, p in named if not all_finite(p.detach())), None)


def _interrupted(run_dir: Path, saved: int | None, removed: str | None = None) -> str:
    """What an interrupted run left, and the command that goes on from it; ``removed``: what
    :func:`_remove_unstarted` removed."""
    if saved is None and removed is not None:
        return (f"radtrt: interrupted before the first checkpoint, so there is nothing to resume; {removed}: run the "
                f"command again")
    if saved is None:
        return (f"radtrt: interrupted before the first checkpoint, so there is nothing to resume: delete {run_dir} "
                f"and run the command again")
    return (f"radtrt: interrupted; to go on from step {saved}, its last checkpoint, run: radtrt train resume "
            f"{shell_quote(str(run_dir))}")


def _remove_unstarted(run_dir: Path, created: bool) -> str | None:
    """Remove what a new run wrote before its first checkpoint (its config, log and lock, an empty checkpoint
    folder), and the run folder itself when this run created it. Why: the run cannot be resumed, and its folder,
    no longer empty, refused the rerun, which the user then had to clear by hand. Anything else there (a file
    the user put in meanwhile) keeps the folder as it is: None. Else what was removed, for the message."""
    own = {CONFIG_FILE, LOG_FILE, LOCK_FILE}
    checkpoint = run_dir / ckpt.CHECKPOINT_DIR
    try:
        for entry in run_dir.iterdir():
            if entry.is_symlink() or not (entry.name in own and entry.is_file() or entry == checkpoint and entry.is_dir()
                                          and not any(entry.iterdir())):
                return None
        if checkpoint.is_dir():
            checkpoint.rmdir()
        for name in own:  # the lock file too, still held: its release then finds it gone, as it allows
            (run_dir / name).unlink(missing_ok=True)
        if created:
            run_dir.rmdir()
    except OSError:  # a file added meanwhile, a permission: the message then says to delete the folder
        return None
    return (f"{run_dir}, which this run had created, was removed" if created else
            f"this run's files in {run_dir} were removed (the folder is empty again)")


def _kept(saved: int | None) -> str:
    return "the checkpoints before it are kept" if saved is not None else "and no checkpoint saved yet"


def _start_again(run_dir: Path, created: bool) -> str:
    """How to start again a run that failed before its first checkpoint, after removing what it wrote. Why: the
    failures' own remedies said to delete the run folder, and a rerun refused the folder left holding the run's
    config and log; radtrt removes its own files, never one it did not write."""
    removed = _remove_unstarted(run_dir, created)
    if removed is not None:
        return f"{removed}; once that is fixed, run the training command again"
    return (f"once that is fixed, delete {shell_quote(str(run_dir))} and run the training command again (or choose "
            f"another -o)")


def _unfinished_saves(files: list[Path]) -> str:
    names = ", ".join(f"{ckpt.CHECKPOINT_DIR}/{f.name}" for f in files)
    return f"{len(files)} unfinished checkpoint save{'s' if len(files) > 1 else ''} ({names})"


def _image_failed(error: str, run_dir: Path, saved: int | None) -> str:
    """A lazily read image that failed mid-run (its header passed the check before the run). Resume refuses a run
    whose image data changed since it began (the files' digest), so repairing the image cannot continue this run:
    the message says so, instead of leaving the user to find it out from a refused resume. Before the first
    checkpoint (``saved`` None) there is nothing to resume at all: resume was named, and refused the run."""
    if saved is None:  # train says what to do
        return f"{error}; the run stopped before its first checkpoint"
    return (f"{error}; if its bytes must be repaired, resume refuses a run whose images changed since it began: start "
            f"the run again (delete {run_dir} or choose another -o); if the file was only out of reach (permissions, "
            f"a mount), restore access, then run: radtrt train resume {shell_quote(str(run_dir))}")


def _quiet_on_sigterm(worker_id: int) -> None:
    """A DataLoader worker ends at once, with status 0, on SIGTERM.

    torch's workers end quietly on their parent's SIGTERM only. A scheduler or ``kill`` signals every process of
    a job: a worker dying of the signal made torch's SIGCHLD handler in the main process raise, and two
    tracebacks buried the interrupted run's message. Ending,
    instead of ignoring the signal, keeps interpreter exit from hanging: multiprocessing terminates leftover
    daemonic workers with SIGTERM and then joins them.
    """
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


def _check_max_length(cfg: TrainConfig, model_cfg: Any) -> None:
    """Examples longer than the decoder's positions trained positions no later command can use (infer refuses
    the model past them); checked before the run folder is made."""
    if cfg.template is None:
        return
    positions = model_cfg.decoder.max_position_embeddings
    fits = positions - (model_cfg.num_image_tokens - 1 if cfg.template in ("plain", "v1") else 0)
    if fits < 2:
        fail(f"the model's {positions} positions cannot hold its {model_cfg.num_image_tokens} image tokens and a report")
    if cfg.max_length > fits:
        fail(f"max_length {cfg.max_length} does not fit the model's {positions} positions"
             + (f" with its {model_cfg.num_image_tokens} image tokens" if fits != positions else "")
             + f": pass --max-length {fits} or less")


class _Plan:
    """The micro-batches of steps [start, end), made as the loader asks for them: a list of all of them took
    a minute and 700 MB before the first step of a long run (and never ended for --epochs 1e15)."""

    def __init__(self, schedule: Schedule, start: int, end: int, rank: int) -> None:
        self.schedule, self.start, self.end, self.rank = schedule, start, end, rank

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.end):
            yield from self.schedule.micro_batches(step, self.rank)


def _restore(run_dir: Path, objective: torch.nn.Module, named: list[tuple[str, torch.nn.Parameter]],
             optimizer: torch.optim.Optimizer, scheduler: Any, info: DistInfo, total: int,
             origin: dict[str, str]) -> int:
    """Load a checkpoint's trainable weights, optimizer, scheduler and this rank's RNG; the step to go on from."""
    state = ckpt.load_checkpoint(run_dir)
    recorded = state.get("origin")
    # a check left out checks nothing; the images' digest came later, and runs saved before it resume unchecked
    if not isinstance(recorded, dict) or not set(origin) - {"images_sha256"} <= set(recorded):
        fail(f"the checkpoint in {run_dir} does not record what the run started from (made by an older radtrt?); "
             f"start a new run")
    for key, what in (("init_weights", f"--model {state['config'].get('init_model')}"),
                      ("tokenizer_sha256", f"the tokenizer of --model {state['config'].get('init_model')}"),
                      ("manifest_sha256", f"manifest {state['config'].get('manifest')}"),
                      ("images_sha256", f"the image data of manifest {state['config'].get('manifest')} (the manifest "
                                        f"itself is unchanged)")):
        if key in recorded and recorded[key] != origin[key]:
            fail(f"{what} has changed since {run_dir} started; an exact continuation needs the same one "
                 f"(restore it, or start a new run)")
    if state["world_size"] != info.world_size:
        fail(f"{run_dir} was trained with {state['world_size']} processes; resume it with the same number "
             f"(now {info.world_size}) for an exact continuation")
    absent = sorted({n for n, _ in named} - set(state["trainable"]))
    unexpected = sorted(set(state["trainable"]) - {n for n, _ in named})
    if unexpected or absent:
        fail(f"checkpoint in {run_dir} does not match this stage's trainable weights ({(unexpected or absent)[0]})")
    saved = state["trainable"]
    for n, p in named:  # the names matched; a shape that differs is another model's (or another LoRA rank's) weight
        if isinstance(saved[n], torch.Tensor) and tuple(saved[n].shape) != tuple(p.shape):
            fail(f"checkpoint in {run_dir} does not match this stage's trainable weights ({n}: "
                 f"{tuple(saved[n].shape)} in the checkpoint, {tuple(p.shape)} in the model)")
    try:  # what else is inside them (optimizer groups, RNG bytes, a value that is no tensor) can still be damaged
        objective.load_state_dict(state["trainable"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"][info.rank], info.device)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [""])[0]
        fail(f"checkpoint in {run_dir} holds damaged training state ({type(e).__name__}: {reason})")
    step = int(state["step"])
    if not 0 <= step <= total:  # step -3 trained 9 steps of 6; step 100 of 6 wrote a 2-step model as finished
        fail(f"training checkpoint {ckpt.state_path(run_dir)} is damaged: it is at step {step}, outside its run's 0 "
             f"to {total} steps; restore the file from a backup, or start the run again")
    if step >= total and (run_dir / MODEL_DIR).is_dir():  # built aside: present means complete
        fail(_finished(run_dir, total))
    # step == total without a model: interrupted while writing it; the resume writes it (no step to run)
    if info.is_main:
        _truncate_log(run_dir, step)
    return step


def _save(run_dir: Path, cfg: TrainConfig, info: DistInfo, step: int, named: list[tuple[str, torch.nn.Parameter]],
          optimizer: torch.optim.Optimizer, scheduler: Any, origin: dict[str, str]) -> None:
    rng = gather_objects(info, ckpt.rng_state(info.device))
    if info.is_main:
        ckpt.save_checkpoint(run_dir, {
            "config": cfg.to_dict(), "step": step, "world_size": info.world_size, "origin": origin,
            "trainable": {n: p.detach().cpu().clone() for n, p in named},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng})
    barrier(info)

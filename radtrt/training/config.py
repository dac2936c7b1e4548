"""Training configuration: one frozen dataclass per run, saved into every checkpoint.

Stages (LLaVA-Rad's recipe, plus the two pretraining steps a model built from scratch needs):

* ``vision`` -- stage 0 for the trunk: multi-label finding classification on the hidden state
  LLaVA-Rad selects (LLaVA-Rad keeps its trunk frozen, and no pretrained trunk can be downloaded
  here, so a small trunk must learn to see first). The paper's trunk was BiomedCLIP-CXR, trained
  contrastively; classification is the cheaper choice for labelled phantoms.
* ``lm`` -- stage 0 for the decoder: causal-LM training of the whole decoder on the reports (the
  stand-in for Vicuna, which LLaVA-Rad starts from). With ``lm_condition="labels"`` each report
  follows its labels in words and only the report is a target: the decoder learns to write what
  its context says, the skill stage 1 relies on (a frozen decoder that only ever modelled reports
  on their own gives the projector nothing to steer; measured: image features then change the
  stage-1 loss by < 1 %).
* ``stage1`` -- alignment: ``plain`` template, only the projector trains.
* ``stage2`` -- ``v1`` template, LoRA on every decoder linear layer + the projector.

Presets: ``paper`` (the released scripts' hyperparameters where they exist), ``phantom`` (the
embedded default model, small and CPU-friendly) and ``tiny`` (tests).
"""

from __future__ import annotations

import dataclasses
import json
import math
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from radtrt.errors import RadtrtError, fail
from radtrt.training.distributed import world_size_from_env

STAGES = ("vision", "lm", "stage1", "stage2")
TEMPLATES = {"vision": None, "lm": "text", "stage1": "plain", "stage2": "v1"}
PRECISIONS = ("fp32", "bf16")
SEED_LIMIT = 2**32  # data.Schedule seeds torch.Generator with seed * 100_003 + epoch, which must stay below 2**64
LM_CONDITIONS = ("none", "labels")


# the fields a 'radtrt train' stage takes as options (--max-steps for max_steps): a value given there is refused
# under the option's name ("lr must be positive" named a field the user never typed); the others (lm_condition,
# a resumed run's train_config.json) keep their field names
OPTION_FIELDS = ("epochs", "max_steps", "lr", "weight_decay", "warmup_ratio", "micro_batch_size", "grad_accum",
                 "max_grad_norm", "precision", "max_length", "seed", "save_every", "lora_r", "lora_alpha",
                 "lora_dropout", "device", "num_workers")
_AS_OPTIONS: ContextVar[bool] = ContextVar("radtrt_train_config_as_options", default=False)


def _said(name: str) -> str:
    """A field as the user gave it: its option while :func:`make_config` builds the config of a command line."""
    return "--" + name.replace("_", "-") if _AS_OPTIONS.get() and name in OPTION_FIELDS else name


def check_seed(seed: int, name: str = "seed") -> None:
    if not 0 <= seed < SEED_LIMIT:
        fail(f"{name} must be in [0, 2**32), got {seed}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on, saved in the run folder and in each checkpoint: a resume reads it
    back instead of the command line, so it continues the run that was started, not a new one."""

    stage: str
    manifest: str
    init_model: str
    out_dir: str
    init_base_model: str | None = None
    model_name: str | None = None  # name recorded in the saved model (default: "<init name>+<stage>")
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    micro_batch_size: int = 16
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    precision: str = "fp32"
    max_length: int = 2048
    seed: int = 0
    save_every: int = 100  # steps between checkpoints; the last step always saves
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.05
    cache_features: bool = True  # frozen trunk: compute image features once per run (small data sets)
    lm_condition: str = "none"  # decoder pretraining: "labels" puts the row's labels before its report
    device: str = "cpu"
    num_workers: int = 0

    def __post_init__(self) -> None:
        # NaN passes every comparison below as "not too small", and inf lr trains to non-finite weights
        for name in ("epochs", "lr", "weight_decay", "warmup_ratio", "max_grad_norm", "lora_dropout"):
            value = getattr(self, name)
            # a hand-edited train_config.json ("lr": "fast") reached math.isfinite: "must be real number, not str"
            # named no field
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                fail(f"{_said(name)} must be a number, got {type(value).__name__} {value!r}")
            if not math.isfinite(value):
                fail(f"{_said(name)} must be a finite number, got {value}")
        for name in ("micro_batch_size", "grad_accum", "max_length", "seed", "save_every", "lora_r", "lora_alpha",
                     "num_workers", "max_steps"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, int)) and not (name == "max_steps" and value is None):
                fail(f"{_said(name)} must be a whole number, got {type(value).__name__} {value!r}")
        check_seed(self.seed, _said("seed"))
        if self.stage not in STAGES:
            fail(f"unknown training stage '{self.stage}' ({', '.join(STAGES)})")
        if self.precision not in PRECISIONS:
            fail(f"unknown {_said('precision')} '{self.precision}' ({', '.join(PRECISIONS)})")
        for name in ("micro_batch_size", "grad_accum", "max_length", "lora_r", "lora_alpha"):
            if getattr(self, name) < 1:
                fail(f"{_said(name)} must be at least 1, got {getattr(self, name)}")
        if self.lm_condition not in LM_CONDITIONS:
            fail(f"unknown lm_condition '{self.lm_condition}' ({', '.join(LM_CONDITIONS)})")
        # each named with what was given: "lr and epochs must be positive and warmup_ratio in [0, 1)"
        # left the user to guess which of the three was wrong
        for name in ("lr", "epochs"):
            if getattr(self, name) <= 0:
                fail(f"{_said(name)} must be positive, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio < 1:
            fail(f"{_said('warmup_ratio')} must be in [0, 1), got {self.warmup_ratio}")
        # checked here, not where they are used: a bad value must not surface mid-run as a traceback
        # (save_every 0 divides by zero at the first step) or be quietly read as "unset" (max_steps 0)
        if self.max_steps is not None and self.max_steps < 1:
            fail(f"{_said('max_steps')} must be at least 1, got {self.max_steps}")
        if self.save_every < 1:
            fail(f"{_said('save_every')} must be at least 1, got {self.save_every}")
        if self.num_workers < 0:
            fail(f"{_said('num_workers')} must be at least 0, got {self.num_workers}")
        if not 0 <= self.lora_dropout < 1:
            fail(f"{_said('lora_dropout')} must be in [0, 1), got {self.lora_dropout}")
        if self.weight_decay < 0:
            fail(f"{_said('weight_decay')} must be at least 0, got {self.weight_decay}")
        if self.max_grad_norm <= 0:
            fail(f"{_said('max_grad_norm')} must be positive, got {self.max_grad_norm}")
        # bounded here, before the run folder is made: lr 1e38 overflowed inside AdamW (a RuntimeError traceback
        # that left train_config.json behind), and lr 10 with weight decay 1e38 trained to infinite weights.
        # AdamW decays by lr * weight_decay per step: above 1 it flips the weights' signs instead of shrinking them
        if self.lr > 1:
            fail(f"{_said('lr')} must be at most 1, got {self.lr}")
        if self.weight_decay > 1:
            fail(f"{_said('weight_decay')} must be in [0, 1], got {self.weight_decay}")

    @property
    def template(self) -> str | None:
        return TEMPLATES[self.stage]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "training config") -> "TrainConfig":
        """A run's config as it was saved: every key must be there. Why: a missing one (lora_r, say) took its
        default, so a resume or export went on with another config than the run's and failed later for an
        unrelated reason (or not at all)."""
        if not isinstance(d, dict):
            fail(f"{where} is not a JSON object (damaged file?)")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            fail(f"{where} has unknown keys {unknown} (written by another radtrt version?)")
        missing = sorted(names - set(d))
        if missing:
            fail(f"{where} is incomplete: it lacks {', '.join(missing)} (a damaged or hand-edited file, or one "
                 f"written by another radtrt version)")
        try:
            return cls(**d)
        except TypeError as e:  # a value of the wrong type (a damaged or hand-edited file)
            fail(f"{where} is malformed ({e})")
        except RadtrtError as e:  # a bad value said without the file it came from ("lr must be ..." - where?)
            fail(f"{where} is malformed ({e})")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


_PAPER = {
    # scripts/pretrain.sh: lr 1e-3, 1 epoch, global batch 256, cosine, warmup 3%, wd 0, bf16
    "stage1": dict(lr=1e-3, epochs=1.0, micro_batch_size=32, grad_accum=8, precision="bf16"),
    # scripts/finetune_lora.sh: lr 1e-4, 3 epochs, global batch 64 (16 x 4 GPUs), LoRA r 64 / alpha 128 / dropout 0.05
    "stage2": dict(lr=1e-4, epochs=3.0, micro_batch_size=16, grad_accum=4, precision="bf16"),
    "vision": dict(lr=3e-4, epochs=10.0, micro_batch_size=64, grad_accum=1, weight_decay=0.05, precision="bf16"),
    "lm": dict(lr=3e-4, epochs=3.0, micro_batch_size=32, grad_accum=1, weight_decay=0.1, precision="bf16"),
}
_PHANTOM = {  # the embedded default model (tools/train_default_model.sh): ~20 minutes on 2 CPU cores
    "vision": dict(lr=1e-3, epochs=8.0, micro_batch_size=32, weight_decay=0.05, warmup_ratio=0.05, save_every=200),
    "lm": dict(lr=2e-3, epochs=3.0, micro_batch_size=32, weight_decay=0.1, warmup_ratio=0.05, save_every=200,
               lm_condition="labels"),
    "stage1": dict(lr=2e-3, epochs=4.0, micro_batch_size=32, save_every=200),
    # LoRA dropout 0: a third faster on CPU, and 3 epochs of 4000 phantoms do not overfit
    "stage2": dict(lr=1e-3, epochs=3.0, micro_batch_size=16, lora_r=32, lora_alpha=64, lora_dropout=0.0,
                   save_every=200),
}
for _stage in ("lm", "stage1", "stage2"):  # the phantom model's 512 positions hold 64 image tokens + 448 ids
    _PHANTOM[_stage]["max_length"] = 448
_TINY = dict(lr=3e-3, max_steps=6, micro_batch_size=2, grad_accum=2, save_every=2, lora_r=4, lora_alpha=8,
             warmup_ratio=0.2, max_length=256)
PRESETS = ("paper", "phantom", "tiny")
# The recipe's global batch, whatever the number of processes: the per-process micro-batch and accumulation above are
# for one process, and under torchrun the loop multiplies by the world size (4 GPUs trained stage 2 at 256, not 64)
_PAPER_GLOBAL_BATCH = {"stage1": 256, "stage2": 64}


def split_global_batch(global_batch: int, micro_batch_size: int, world_size: int) -> tuple[int, int]:
    """(micro-batch, accumulation) per process so that ``world_size`` processes make ``global_batch`` per step; the
    micro-batch shrinks where the processes alone exceed it (8 GPUs for stage 2's 64: 8 each, no accumulation)."""
    if global_batch % world_size:
        fail(f"the preset's global batch {global_batch} does not divide among {world_size} processes; give "
             f"--micro-batch-size and --grad-accum yourself")
    per_process = global_batch // world_size
    micro = min(micro_batch_size, per_process)
    if per_process % micro:
        fail(f"--micro-batch-size {micro_batch_size} does not divide the preset's global batch {global_batch} "
             f"over {world_size} process{'es' if world_size > 1 else ''} ({per_process} each); give --grad-accum too")
    return micro, per_process // micro


def make_config(stage: str, preset: str = "paper", **overrides: Any) -> TrainConfig:
    """A stage's config from a preset, with explicit overrides (None values are ignored)."""
    if preset not in PRESETS:
        fail(f"unknown training preset '{preset}' ({', '.join(PRESETS)})")
    if stage not in STAGES:
        fail(f"unknown training stage '{stage}' ({', '.join(STAGES)})")
    base: dict[str, Any] = dict({"paper": _PAPER, "phantom": _PHANTOM}.get(preset, {}).get(stage, {}))
    if preset == "tiny":
        base = dict(_TINY)
    micro = overrides.get("micro_batch_size")
    micro = base.get("micro_batch_size") if micro is None else micro
    if preset == "paper" and stage in _PAPER_GLOBAL_BATCH and overrides.get("grad_accum") is None and micro >= 1:
        base["micro_batch_size"], base["grad_accum"] = split_global_batch(_PAPER_GLOBAL_BATCH[stage], micro,
                                                                          world_size_from_env())
        overrides = {**overrides, "micro_batch_size": None}
    if overrides.get("epochs") is not None and overrides.get("max_steps") is None:
        base.pop("max_steps", None)  # epochs asked for: the tiny preset's step count no longer wins over them
    token = _AS_OPTIONS.set(True)  # a refusal names the option (a preset's own values are all valid)
    try:
        return TrainConfig(stage=stage, **{**base, **{k: v for k, v in overrides.items() if v is not None}})
    finally:
        _AS_OPTIONS.reset(token)

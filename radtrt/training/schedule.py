"""The learning-rate schedule of the released scripts (``--lr_scheduler_type cosine --warmup_ratio``).

Linear warmup from 0, then half a cosine down to 0 at the last step: the formula of
transformers' ``get_cosine_schedule_with_warmup`` (``tests/test_train_schedule.py`` checks the two
agree), on ``torch.optim.lr_scheduler.LambdaLR``, so training does not import transformers.
"""

from __future__ import annotations

import functools
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _cosine_factor(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def cosine_with_warmup(optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """A ``partial`` (not a lambda) so the scheduler's state dict stays plain data."""
    return LambdaLR(optimizer, functools.partial(_cosine_factor, warmup=warmup_steps, total=total_steps))

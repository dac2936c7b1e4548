"""torch.distributed as ``torchrun`` sets it up: process group, rank, device; no-ops for one process.

``torchrun --nproc_per_node N -m radtrt.cli train ...`` (or ``torchrun $(which radtrt) train ...``)
sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; the training loop then wraps its loss module in
``DistributedDataParallel`` (NCCL on CUDA, gloo on CPU). Nothing else here is home-made.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from radtrt.errors import fail


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    owns_group: bool = False  # this process created the process group and must destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    if device not in ("cpu", "cuda"):
        fail(f"unknown device '{device}' (cpu or cuda)")
    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for, but PyTorch sees no CUDA GPU here")
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo(device="cuda:0" if device == "cuda" else "cpu")
    local = _env_int("LOCAL_RANK", 0)
    owns = not dist.is_initialized()
    if owns:
        # checked here: torch's env:// rendezvous raises them as a ValueError traceback
        missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            fail(f"WORLD_SIZE={world} asks for {world} processes, but {', '.join(missing)} "
                 f"{'is' if len(missing) == 1 else 'are'} not set: start multi-process training with torchrun, "
                 f"or unset WORLD_SIZE for one process")
        _env_int("RANK", 0)
        _env_int("MASTER_PORT", 0)
        try:
            dist.init_process_group("nccl" if device == "cuda" else "gloo")
        except (ValueError, RuntimeError) as e:  # e.g. a MASTER_ADDR that does not resolve (DistNetworkError)
            fail(f"cannot join the process group of {world} processes at {os.environ['MASTER_ADDR']}:"
                 f"{os.environ['MASTER_PORT']} ({(str(e).strip().splitlines() or [type(e).__name__])[0]})")
    if device == "cuda":
        torch.cuda.set_device(local)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, f"cuda:{local}" if device == "cuda" else "cpu", owns)


def world_size_from_env() -> int:
    """How many processes torchrun started (1 without torchrun), before the process group is joined: a preset's
    global batch is divided among them when the run's config is made."""
    return max(_env_int("WORLD_SIZE", 1), 1)


def _env_int(name: str, default: int) -> int:
    """A torchrun variable as a number; a stray non-number (``WORLD_SIZE=x``) was a ValueError traceback."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        fail(f"environment variable {name}={raw!r} is not a whole number (torchrun sets it; unset it to train "
             f"in one process)")


def mean_across(info: DistInfo, value: float) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()

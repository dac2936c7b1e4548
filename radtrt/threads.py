"""``--threads``, checked once for every command that takes it (training, bench)."""

from __future__ import annotations

import os

import torch

from radtrt.errors import fail


def check_threads(threads: int | None) -> None:
    """Bounded by the CPUs: torch tried to start --threads 100000 threads, failed ("can't start new thread") and
    the process died of a segfault (exit 139), with no message. Callers check before their work starts."""
    if threads is None:
        return
    if threads < 1:
        fail("--threads must be at least 1")
    cpus = os.cpu_count()
    if cpus is not None and threads > cpus:
        fail(f"--threads {threads} is more than this machine's {cpus} CPUs; give {cpus} or fewer")


def check_workers(workers: int) -> None:
    """``--num-workers`` bounded by the CPUs as ``--threads`` is: 100000 DataLoader workers got the process killed
    (exit 137, no message) and left workers running without a parent; more than the CPUs only printed torch's
    warning, with its source lines. Checked for a new run (a resumed one keeps the count it was started with)."""
    cpus = os.cpu_count()
    if cpus is not None and workers > cpus:
        fail(f"--num-workers {workers} is more than this machine's {cpus} CPUs; give {cpus} or fewer")


def set_threads(threads: int | None) -> None:
    check_threads(threads)
    if threads is not None:
        torch.set_num_threads(threads)

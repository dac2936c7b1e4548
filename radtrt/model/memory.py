"""Whether loading a model fits this host, checked before the load starts.

Why: a load that does not fit is not an error Python sees. The kernel's OOM killer ends the process
minutes in (Vicuna-7B cast to float32 is 27 GB), with no message and, for an export or a convert, a
half-written output folder. What is checked is a lower bound on what the load must hold in anonymous
memory, so a refusal is certain to be right; a load that passes may still need more.
"""

from __future__ import annotations

from pathlib import Path

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def available_bytes(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """What this process can still allocate: available memory plus free swap, capped by the cgroup v2
    limits above it (inside a container /proc/meminfo shows the host's memory, not the container's)."""
    host = psutil.virtual_memory().available + psutil.swap_memory().free
    limits = cgroup_headroom(cgroup_root, proc_cgroup)
    return min([host, *limits])


def cgroup_headroom(cgroup_root: Path, proc_cgroup: Path) -> list[int]:
    """Room left under each cgroup v2 ``memory.max`` from this process's group up to the root.

    The group's page cache (``file`` in ``memory.stat``) counts as room: the kernel reclaims it before
    it kills, so a refusal never rests on memory that is only caching files."""
    if not proc_cgroup.is_file():
        return []
    line = next((l for l in proc_cgroup.read_text().splitlines() if l.startswith("0::")), None)
    if line is None:  # cgroup v1 only: its limits are not read
        return []
    group = cgroup_root / line[3:].strip("/")
    room = []
    for folder in (group, *group.parents):
        if not folder.is_relative_to(cgroup_root):
            break
        limit_file, current_file, stat_file = (folder / n for n in ("memory.max", "memory.current", "memory.stat"))
        if not (limit_file.is_file() and current_file.is_file()):
            continue
        limit = limit_file.read_text().strip()
        if limit == "max":
            continue
        stat = dict(l.split(maxsplit=1) for l in stat_file.read_text().splitlines()) if stat_file.is_file() else {}
        room.append(int(limit) - int(current_file.read_text()) + int(stat.get("file", 0)))
    return room

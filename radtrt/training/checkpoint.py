"""Training checkpoints: everything an exact resume needs, in one weights-only loadable file.

``RUN/checkpoint/state.pt`` holds the config, the global step, the trainable parameters (the
frozen ones come back from ``config.init_model``), the optimizer and scheduler states and every
rank's RNG states. The data position is the step itself (``data.Schedule`` is a function of it).
It is written to a temporary name and renamed, so a crash mid-save leaves the previous one.
"""

from __future__ import annotations

import pickle
import re
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from radtrt.errors import fail, shell_quote
from radtrt.outputs import replaced_atomically

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.pt"
FORMAT = "radtrt-train-state-1"
# what radtrt.outputs.replaced_atomically names its temporary file when it writes state.pt: mkstemp's 8 random
# characters between ".state.pt." and ".partial"
_LEFTOVER = re.compile(rf"\.{re.escape(STATE_FILE)}\.[a-z0-9_]{{8}}\.partial")
FIELDS = {"config": dict, "step": int, "world_size": int, "trainable": dict, "optimizer": dict, "scheduler": dict,
          "rng": list}  # what save_checkpoint's callers store and resume reads


def state_path(run_dir: Path) -> Path:
    return run_dir / CHECKPOINT_DIR / STATE_FILE


def rng_state(device: str) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: str) -> None:
    torch.set_rng_state(state["cpu"])
    if device.startswith("cuda") and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], torch.device(device))


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Replace the run's checkpoint whole or not at all: a full disk keeps the previous one to resume from."""
    path = state_path(run_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(path) as tmp:
            torch.save({"format": FORMAT, **state}, tmp)
    except (OSError, RuntimeError) as e:  # a full disk: torch's writer raises RuntimeError ("file write failed",
        # or "unexpected pos": no errno to say so, hence the free space)
        why = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [type(e).__name__])[0]
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else None
        room = f"; {free / 1e6:.0f} MB free there" if free is not None else ""
        run = shell_quote(str(run_dir))
        # before the first one, train adds what to do (it removes what the run wrote)
        after = (f"the previous one is kept: free space, then run: radtrt train resume {run}" if path.is_file() else
                 "it was the run's first")
        fail(f"cannot write training checkpoint {path} ({why}{room}); {after}")
    return path


def remove_leftover_saves(run_dir: Path) -> list[Path]:
    """Delete the temporary files of checkpoint saves that never finished; the files removed.

    Why: a run killed (``kill -9``, a node lost) while saving leaves ``checkpoint/.state.pt.XXXXXXXX.partial``,
    as large as the checkpoint itself (gigabytes at 7B), hidden and never removed. Only the caller that holds the
    run folder's lock (``runlock.lock_run``) may call this: a save in progress by the lock's holder writes such a
    file. Only regular files of exactly that name go; anything else in the folder is left as it is."""
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    removed = []
    try:
        for entry in folder.iterdir():
            if _LEFTOVER.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
                entry.unlink(missing_ok=True)
                removed.append(entry)
    except OSError as e:
        fail(f"cannot remove the unfinished checkpoint saves in {folder} ({e.strerror or e}); delete the files named "
             f".{STATE_FILE}.*.partial there, then resume again")
    return removed


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The checkpoint, verified (zip CRCs, then torch's weights-only unpickler): a damaged one is one line, never
    a resume that quietly trains on flipped bits."""
    path = state_path(run_dir)
    if not path.is_file():
        if not run_dir.is_dir():  # a mistyped RUN read as a run without a checkpoint
            fail(f"run folder {run_dir} {'is not a folder' if run_dir.exists() else 'does not exist'}")
        fail(f"no training checkpoint in {run_dir} (expected {CHECKPOINT_DIR}/{STATE_FILE})")
    try:
        # torch.load never checks the zip's CRC-32s: a flipped bit in a tensor was resumed from, and trained into
        # the model, without a word. torch.save writes them (the zip writer computes one per record).
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        if damaged is not None:
            # records sit under a folder named after the file torch.save wrote: the temporary one it was written
            # through (".state.pt.iek0kpmv/data/37"), a name that means nothing to the user
            record = damaged.split("/", 1)[-1]
            fail(f"training checkpoint {path} is corrupt: its record {record} fails its checksum (a damaged disk "
                 f"or copy); restore the file from a backup, or start the run again")
        state = torch.load(path, map_location="cpu", weights_only=True)
    # what model/io.py's load_weights_pickle catches: damaged pickle bytes raise whatever the unpickler trips over
    # (a flipped byte in a string: UnicodeDecodeError, a ValueError)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, IndexError, KeyError,
            TypeError, ValueError, struct.error) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]  # an empty file raises with no message
        fail(f"training checkpoint {path} is corrupt or not radtrt's ({type(e).__name__}: {reason})")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        fail(f"{path} is not a radtrt training checkpoint of format {FORMAT}")
    for key, kind in FIELDS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            fail(f"training checkpoint {path} has no valid '{key}' (damaged file?)")
    return state

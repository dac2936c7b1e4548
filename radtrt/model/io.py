"""Reading weight and config files with one clear error for each way they can be broken.

Pickled checkpoints (``.bin``/``.pt``) are read only through ``torch.load(weights_only=True)``:
a release directory is untrusted input, and a full unpickler would execute code from it.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from radtrt.errors import fail
from radtrt.outputs import broken_link, replaced_atomically


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (bundle manifests, engine stamps, calibration sample lists)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        fail(f"{path} is {broken_link(path)}" if broken_link(path) else
             f"{path} is not a file" if path.exists() else f"missing file: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:  # no permission
        fail(f"cannot read {path} ({e.strerror or e})")
    except json.JSONDecodeError as e:
        fail(f"{path} is not valid JSON ({e})")
    except UnicodeDecodeError:
        fail(f"{path} is not valid JSON (not UTF-8 text)")
    except (ValueError, RecursionError):  # Python's own text names a setting the user cannot reach
        fail(f"{path} is not valid JSON (a number too long or nesting too deep)")
    if not isinstance(data, dict):
        fail(f"{path} does not hold a JSON object")
    return data


LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def _check_exists(path: Path) -> None:
    if not path.is_file():
        fail(f"missing weight file: {path}")
    if path.stat().st_size == 0:
        fail(f"weight file is empty: {path}")
    with path.open("rb") as handle:
        if handle.read(len(LFS_POINTER)) == LFS_POINTER:  # a clone without 'git lfs pull'
            fail(f"{path} is a Git LFS pointer, not the weights: fetch them ('git lfs pull') or copy the real file")


def safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (safetensors dtype, shape) of every tensor, read from the header alone (no tensor data)."""
    _check_exists(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        fail(f"weight file is truncated or corrupt: {path} ({e})")


def is_safetensors(path: Path) -> bool:
    """Whether ``path`` is a safetensors file, by content (an 8-byte header length, then its JSON header), not by
    name: a 'radtrt calibrate' file copied to ``calib.bin`` was called "neither a folder nor a JSONL manifest", then
    read as a pickle."""
    try:
        if not path.is_file():
            return False
        with path.open("rb") as f:
            head = f.read(9)
        return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") + 8 <= path.stat().st_size
    except OSError as e:  # said as what it is: "neither a folder nor a JSONL manifest" sent the user elsewhere
        fail(f"cannot read {path} ({e.strerror or e})")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file or a weights-only pickle, on the CPU."""
    if path.suffix == ".safetensors" or is_safetensors(path):
        _check_exists(path)
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            fail(f"weight file is truncated or corrupt: {path} ({e})")
    obj = load_weights_pickle(path)  # checks the file itself
    if not isinstance(obj, dict):
        fail(f"{path} does not hold a state dict")
    return obj


ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = b"\x80"


def looks_like_torch_save(head: bytes) -> bool:
    """Whether a file's first bytes can be torch.save's: its zip archive, or the legacy format's pickle (protocol
    2 or later, so it opens with the PROTO opcode). The weights-only unpickler reports any byte it does not know
    as an unsupported pickle, so a text file was called one holding Python objects other than tensors."""
    return head.startswith((ZIP_MAGIC, PICKLE_PROTO))


def load_weights_pickle(path: Path) -> Any:
    """What a weights-only pickle holds (tensors in plain containers); anything else is refused in one line."""
    _check_exists(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message goes on to suggest weights_only=False: never here
        with path.open("rb") as handle:
            if not looks_like_torch_save(handle.read(len(ZIP_MAGIC))):
                fail(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle; a text file?)")
        fail(f"refusing {path}: it holds Python objects other than tensors, and radtrt loads weights only, "
             "never code")
    # the legacy (non-zip) reader fails on junk with whatever it trips over (KeyError, IndexError, struct.error)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, KeyError, IndexError, TypeError, ValueError,
            struct.error) as e:
        fail(f"weight file is truncated or corrupt, or not a PyTorch file: {path} "
             f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None, *,
                 new: str | None = None) -> None:
    """Write safetensors atomically: a crash never leaves a half-written weight file behind. ``new``: the file must
    not exist when it is put in place (``replaced_atomically``)."""
    try:
        with replaced_atomically(path, new=new) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    except (SafetensorError, OSError) as e:
        fail(f"cannot write {path}: {e}")


HF_WEIGHTS = (("model.safetensors.index.json", "model.safetensors"),
              ("pytorch_model.bin.index.json", "pytorch_model.bin"))


def hf_weight_map(index: Path) -> dict[str, str]:
    """Tensor name -> shard file of a Hugging Face index (``*.index.json``), checked to be one."""
    weight_map = read_json(index).get("weight_map", {})
    if not isinstance(weight_map, dict):
        fail(f"{index}: 'weight_map' is not an object of tensor name -> file")
    if not weight_map:
        fail(f"{index} lists no weight files")
    bad = next((name for name, shard in weight_map.items() if not isinstance(shard, str) or not shard), None)
    if bad is not None:
        fail(f"{index}: 'weight_map' maps '{bad}' to {weight_map[bad]!r}, not a file name")
    # an absolute or '..' name read weights from outside the model folder, with exit 0
    bad = next((name for name, shard in weight_map.items()
                if Path(shard).is_absolute() or ".." in Path(shard).parts), None)
    if bad is not None:
        fail(f"{index}: 'weight_map' maps '{bad}' to {weight_map[bad]!r}, which is not a file of {index.parent}")
    return weight_map


def shard_problem(shard: str, held: set[str], weight_map: dict[str, str]) -> str | None:
    """What is wrong between one shard's tensor names and its index, or None. Why each: a tensor also held by
    another shard replaced the one the index maps (whichever file was read last won, exit 0, wrong weights); a
    name its shard lacks was noticed only as some later, unrelated error, and so was an index that omits names."""
    mapped = {name for name, file in weight_map.items() if file == shard}
    absent = sorted(mapped - held)
    if absent:
        return (f"it maps '{absent[0]}' to {shard}, which does not hold it ({len(absent)} such; mismatched or "
                f"damaged shards?)")
    elsewhere = sorted(name for name in held - mapped if name in weight_map)
    if elsewhere:
        return (f"{shard} holds '{elsewhere[0]}', which it maps to {weight_map[elsewhere[0]]} ({len(elsewhere)} "
                f"such): a tensor in two shards, whose right copy is unknown (mismatched shards?)")
    unlisted = sorted(held - set(weight_map))
    if unlisted:
        return (f"incomplete index: it does not list '{unlisted[0]}', which {shard} holds ({len(unlisted)} such; "
                f"damaged or hand-edited index?)")
    return None


def hf_weights(directory: Path) -> tuple[dict[str, torch.Tensor], Path | None]:
    """The tensors of a Hugging Face model directory (sharded or not, safetensors preferred), and the index they
    were read through (None: one file). Each tensor comes from the shard its index maps it to, and a shard that
    disagrees with the index is refused (shard_problem): the shards used to be merged file by file."""
    for index_name, single in HF_WEIGHTS:
        index = directory / index_name
        if index.is_file():
            weight_map = hf_weight_map(index)
            shards = sorted(set(weight_map.values()))
            # every named file before any is read: a tensor mapped to a missing file but held by a shard read first
            # was called "a tensor in two shards"
            for shard in shards:
                _check_exists(directory / shard)
            tensors: dict[str, torch.Tensor] = {}
            for shard in shards:
                held = load_tensors(directory / shard)
                problem = shard_problem(shard, set(held), weight_map)
                if problem:
                    fail(f"{index}: {problem}")
                tensors.update((name, held[name]) for name, file in weight_map.items() if file == shard)
            return tensors, index
        if (directory / single).is_file():
            return load_tensors(directory / single), None
    fail(f"no model weights (model.safetensors or pytorch_model.bin, sharded or not) in {directory}")

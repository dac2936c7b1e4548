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


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file or a weights-only pickle, on the CPU."""
    if path.suffix == ".safetensors":
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


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write safetensors atomically: a crash never leaves a half-written weight file behind."""
    try:
        with replaced_atomically(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    except (SafetensorError, OSError) as e:
        fail(f"cannot write {path}: {e}")


def hf_weight_files(directory: Path) -> list[Path]:
    """The weight files of a Hugging Face model directory (sharded or not), safetensors preferred."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = directory / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map", {})
            if not isinstance(weight_map, dict):
                fail(f"{index}: 'weight_map' is not an object of tensor name -> file")
            shards = sorted({str(v) for v in weight_map.values()})
            if not shards:
                fail(f"{index} lists no weight files")
            return [directory / s for s in shards]
        if (directory / single).is_file():
            return [directory / single]
    fail(f"no model weights (model.safetensors or pytorch_model.bin, sharded or not) in {directory}")

"""Rewriting an ONNX graph whose weights stay on disk.

Why: ``onnx.load`` + ``onnx.save`` of a decoder holds every weight in memory at least twice (the loaded
protobuf and its serialized copy), which at Vicuna-7B's size is tens of GB on top of the PyTorch model
the export already holds. A rewrite that only reorganizes a few tensors (packing q/k/v, gate/up) does not
need that: ``TensorFile`` reads the original tensors through memory maps, appends new ones to a new data
file as they are made, and at the end copies the untouched tensors over in chunks, so memory holds at
most one new tensor at a time.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import BinaryIO, Callable, Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from radtrt.errors import fail

ALIGN = 4096  # offsets page-aligned, as onnx's own writer does for memory-mapped loading
COPY_CHUNK = 64 << 20


def _point(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``tensor`` refer to bytes of a data file (onnx's ``set_external_data`` wants the bytes in hand)."""
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)


class TensorStore(Protocol):
    """Where a graph rewrite reads initializers from and puts the ones it makes."""

    def read(self, tensor: TensorProto) -> np.ndarray: ...

    def add(self, array: np.ndarray, name: str) -> TensorProto: ...


class InMemory:
    """Initializers inside the protobuf (tests, small graphs)."""

    def read(self, tensor: TensorProto) -> np.ndarray:
        return numpy_helper.to_array(tensor)

    def add(self, array: np.ndarray, name: str) -> TensorProto:
        return numpy_helper.from_array(array, name)


class TensorFile:
    """Reads a graph's external tensors from ``base_dir`` and writes new ones into one new data file.

    Use as a context manager around the rewrite, then ``finish(graph)``: every initializer the graph still
    holds externally is copied into the new file (original files are only read), and the caller replaces
    the old data file with ``self.path``.
    """

    def __init__(self, base_dir: Path, path: Path, location: str) -> None:
        self.base_dir, self.path, self.location = base_dir, path, location
        self._out: BinaryIO | None = None
        self._added: set[str] = set()  # initializers already in the new file

    def __enter__(self) -> "TensorFile":
        self._out = self.path.open("wb")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._out is not None
        self._out.close()
        if exc[0] is not None:
            self.path.unlink(missing_ok=True)

    def _source(self, tensor: TensorProto) -> tuple[Path, int, int]:
        info = ExternalDataInfo(tensor)
        source = (self.base_dir / info.location).resolve()
        if not source.is_relative_to(self.base_dir.resolve()):
            fail(f"tensor {tensor.name} points outside the graph's folder ({info.location})")
        size = source.stat().st_size
        offset = info.offset or 0
        length = info.length if info.length is not None else size - offset
        if offset + length > size:
            fail(f"{source.name} is shorter than tensor {tensor.name} needs: re-export the bundle")
        return source, offset, length

    def read(self, tensor: TensorProto) -> np.ndarray:
        if not uses_external_data(tensor):
            return numpy_helper.to_array(tensor)
        source, offset, length = self._source(tensor)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        shape = tuple(tensor.dims)
        if length != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            fail(f"tensor {tensor.name}: {length} bytes on disk for shape {list(shape)} of {dtype}")
        return np.memmap(source, dtype=dtype, mode="r", offset=offset, shape=shape)

    def _append(self) -> int:
        assert self._out is not None, "use TensorFile as a context manager"
        offset = -(-self._out.tell() // ALIGN) * ALIGN
        self._out.seek(offset)
        return offset

    def add(self, array: np.ndarray, name: str) -> TensorProto:
        offset = self._append()
        data = np.ascontiguousarray(array)
        if data.dtype.byteorder == ">":
            data = data.astype(data.dtype.newbyteorder("<"))
        self._out.write(data.tobytes())  # type: ignore[union-attr]
        tensor = TensorProto(name=name, dims=list(data.shape),
                             data_type=helper.np_dtype_to_tensor_dtype(data.dtype))
        _point(tensor, self.location, offset, data.nbytes)
        self._added.add(name)
        return tensor

    def finish(self, graph: onnx.GraphProto) -> None:
        """Copy every initializer the graph still reads from the old files into the new one."""
        for tensor in graph.initializer:
            if not uses_external_data(tensor) or tensor.name in self._added:
                continue
            source, offset, length = self._source(tensor)
            start = self._append()
            with source.open("rb") as src:
                src.seek(offset)
                left = length
                while left:
                    chunk = src.read(min(COPY_CHUNK, left))
                    if not chunk:
                        fail(f"{source.name} ended inside tensor {tensor.name}: re-export the bundle")
                    self._out.write(chunk)  # type: ignore[union-attr]
                    left -= len(chunk)
            _point(tensor, self.location, start, length)
        self._out.flush()  # type: ignore[union-attr]
        os.fsync(self._out.fileno())  # type: ignore[union-attr]


def rewrite_graph_file(src: Path, out: Path, edit: Callable[[onnx.ModelProto, TensorFile], None]) -> None:
    """Load ``src``'s graph without its weights, let ``edit`` change it (reading and adding tensors through a
    ``TensorFile``), and write it as ``out`` with one data file, ``out.name + '.data'``; ``src == out``
    rewrites in place. ``out``'s old data files are replaced only once the new one is complete."""
    model = onnx.load(str(src), load_external_data=False)
    location = out.name + ".data"
    fresh = out.with_name(location + ".new")
    with TensorFile(src.parent, fresh, location) as store:
        edit(model, store)
        store.finish(model.graph)
    for stale in out.parent.glob(glob.escape(out.name) + "*.data"):
        stale.unlink()
    fresh.rename(out.with_name(location))
    onnx.save(model, str(out))

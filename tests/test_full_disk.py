"""A full disk where the writer gives no errno, or wraps the error: one line that says what happened."""

from __future__ import annotations

from pathlib import Path

import pytest

from radtrt.errors import RadtrtError


def test_a_quantizer_reading_back_a_cut_graph_is_one_line(tmp_path: Path) -> None:
    """onnx's shape-inference writer ignores a full disk; ONNX Runtime's quantizer then read a cut file, and the
    protobuf DecodeError was a traceback with exit 1."""
    from google.protobuf.message import DecodeError

    from radtrt.exporter.int8_vision import _read_back_errors

    with pytest.raises(RadtrtError, match=r"could not read back the vision graph .* a full disk\? \d+ MB free"):
        with _read_back_errors(tmp_path):
            raise DecodeError("Error parsing message with type 'onnx.ModelProto'")


def test_phantoms_on_a_full_disk_say_so_without_pydicoms_traceback(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """pydicom re-raises a write error as OSError(text of a traceback) without its errno."""
    import radtrt.data.phantom_set as phantom_set

    def full(*args: object, **kwargs: object) -> None:
        cause = OSError(28, "No space left on device")
        raise OSError("With tag (7FE0,0010) got exception: [Errno 28] ...\nTraceback (most recent call last):") \
            from cause

    monkeypatch.setattr(phantom_set, "_fill", full)
    with pytest.raises(RadtrtError, match=r"cannot write the phantoms into .*: No space left on device$"):
        phantom_set.write_phantom_set(tmp_path / "ph", 2, 0, rows=64, cols=64, formats=("png",))


def test_a_first_checkpoint_or_log_line_that_cannot_be_written_gives_the_remedy_that_works(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before any checkpoint, both said to resume (which then refused) or that 'the previous one is kept'."""
    import radtrt.training.checkpoint as ckpt
    from radtrt.training import loop

    def full(*args: object, **kwargs: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 29248 vs 29140")

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(RadtrtError, match=r"unexpected pos .* MB free there\); it was the run's first$"):
        ckpt.save_checkpoint(tmp_path, {"step": 1})
    (tmp_path / "log.jsonl").mkdir()  # appending fails
    with pytest.raises(RadtrtError, match=r"cannot append to training log .* before the run's first checkpoint$"):
        loop._append_log(tmp_path, {"step": 1})


def test_synthesize_on_a_full_disk_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The row's unwritten rest stayed buffered, and closing the handle (outside the handler that names the file)
    raised ENOSPC again: "a write failed (No space left on device); stopped there", naming no file."""
    import errno
    import io
    import json

    from radtrt.data.synthesize import synthesize

    class Full(io.RawIOBase):  # what a full disk's file is to the buffered handle above it
        def writable(self) -> bool:
            return True

        def write(self, data: object) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    real = Path.open

    def open_full(self: Path, mode: str = "r", *args: object, **kwargs: object) -> object:
        if self.name.endswith(".partial") and "a" in mode:
            return io.TextIOWrapper(io.BufferedWriter(Full()), encoding="utf-8")
        return real(self, mode, *args, **kwargs)

    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"image": "a.png", "labels": ["Edema"]}) + "\n")
    monkeypatch.setattr(Path, "open", open_full)
    with pytest.raises(RadtrtError) as refused:
        synthesize(labels, tmp_path / "out.jsonl", client=None, console=None)
    assert str(refused.value) == f"cannot write {tmp_path / 'out.jsonl.partial'}: No space left on device"

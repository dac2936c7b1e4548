"""Manifest rows as training items, and the deterministic order in which a run consumes them.

Images go through the inference path (``load_study`` -> ``preprocess``) so training sees what
``radtrt infer`` sees. They are kept as the 8-bit resized, cropped grey picture and normalised per
batch (``normalize``), which reproduces ``preprocess`` bit for bit at a quarter of the memory.

The order is a pure function of (seed, step): epoch ``e`` is ``randperm(n)`` seeded by
``(seed, e)``; step ``k`` of an epoch takes the ``k``-th slice of ``global_batch`` indices (the
last partial slice is dropped), split into contiguous per-rank parts and then micro-batches.
Resuming at step ``s`` therefore sees exactly the data the uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch.utils.data import get_worker_info

from radtrt.data.labeler import extract_labels
from radtrt.data.manifest import ManifestRow
from radtrt.errors import RadtrtError, fail, printable
from radtrt.imaging.dicom import read_header
from radtrt.imaging.preprocess import preprocess
from radtrt.imaging.raster import sniff_raster
from radtrt.imaging.study import load_study, screen_study, study_files
from radtrt.imaging.views import UNKNOWN_VIEW, is_frontal, view_of
from radtrt.model.tokenizer import LlamaSPTokenizer
from radtrt.outputs import broken_link, resolved
from radtrt.progress import make_progress
from radtrt.training.examples import IGNORE_INDEX, build_example, min_length


def load_pixels_u8(path: Path, image_size: int, shown_as: str | None = None) -> torch.Tensor:
    """The study's frontal image resized and cropped as ``preprocess`` does, as uint8 ``[S, S]``."""
    return _load_pixels_u8(path, image_size, shown_as)[0]


def _load_pixels_u8(path: Path, image_size: int, shown_as: str | None = None) -> tuple[torch.Tensor, str]:
    """:func:`load_pixels_u8`, and the view of the image read (``views.view_of``'s code)."""
    image = load_study(path, shown_as=shown_as)
    unit = preprocess(image.pixels_u8, image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))[0]
    return unit.mul(255).round().to(torch.uint8), image.view_position


def _screened_view(path: Path, shown_as: str | None = None) -> str:
    """The view of the image a screened study will be read from, from its header alone. A folder always gives a
    frontal image or one of unknown view (``study._choose``), so only a file given by itself is looked at; a PNG or
    JPEG has no view to tell."""
    if path.is_dir():
        return UNKNOWN_VIEW
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError as e:  # read a moment ago by the screening: gone or locked away since
        fail(f"cannot read {shown_as or f'manifest image {path}'} ({e.strerror or e})")
    return UNKNOWN_VIEW if sniff_raster(head) else view_of(read_header(path))[0]


def non_frontal_warning(where: list[str], rows: list[tuple[int, str]]) -> str:
    """One line for every row whose image is not frontal: infer calls a report on such a view unreliable, and
    training and ``train eval`` took them without a word. Where to look (the first row's ``MANIFEST:LINE``, from ``where``) and the
    view code only; never the image's path, which may carry a patient's name. The manifest's path is written as
    every stderr line writes one (``printable``: a newline in it made two lines, an undecodable byte showed as
    ``\\udcfe``)."""
    index, view = rows[0]
    return printable(f"radtrt: warning: {len(rows)} manifest row{'s are' if len(rows) > 1 else ' is'} not a frontal "
                     f"(PA/AP) view (first: {where[index]}, a {view} view); LLaVA-Rad trains and reports on frontal "
                     f"radiographs, and infer calls a report on any other view unreliable")


def too_long_warning(where: list[str], rows: list[tuple[int, int]], max_length: int) -> str:
    """One line for every row whose example is cut to ``--max-length``: its report's end and its EOS go untrained,
    silently (the released trainer cuts as silently). Named by the first row's line, never its image's path."""
    index, n = rows[0]
    return printable(f"radtrt: warning: {len(rows)} manifest row{'s are' if len(rows) > 1 else ' is'} longer than "
                     f"--max-length {max_length} ids with the prompt, and cut (first: {where[index]}, {n} ids): the end "
                     f"of such a report and its end-of-sequence token are not trained on")


def untrained_warning(where: list[str], rows: list[tuple[int, int]], max_length: int) -> str:
    """One line for every row whose prompt alone fills ``--max-length``: cut there, not one id of its report is
    trained on (it was counted among the rows whose report's end is cut). Named by the first row's line."""
    index, prompt = rows[0]
    many = len(rows) > 1
    return printable(f"radtrt: warning: {len(rows)} manifest row{'s train' if many else ' trains'} on nothing: "
                     f"the prompt alone fills --max-length {max_length} ids (first: {where[index]}, "
                     f"{prompt} ids before its report; a long indication?)")


MISMATCH_WHY = ("the released v1 masking ignores every label of a row whose text splits its conversation (a literal "
                "'</s>' or ' ASSISTANT: ' in the findings or indication?)")


def mismatch_warning(where: list[str], rows: list[int]) -> str:
    """One line for every row the released v1 masking ignores whole (the released trainer prints a warning per row
    and trains on; here they were dropped without a word). Named by the first row's line."""
    return printable(f"radtrt: warning: {len(rows)} manifest row{'s train' if len(rows) > 1 else ' trains'} on "
                     f"nothing: {MISMATCH_WHY} (first: {where[rows[0]]})")


def repeated_rows(rows: list[ManifestRow]) -> list[tuple[int, int]]:
    """(row index, index of the earlier row it repeats) for each row that is another's copy (image, findings,
    indication and labels): trained on as often as it is copied, a manifest concatenated twice, say."""
    first: dict[tuple[Any, ...], int] = {}
    out = []
    for i, row in enumerate(rows):
        key = (row.image, row.findings, row.indication, row.labels)
        if key in first:
            out.append((i, first[key]))
        else:
            first[key] = i
    return out


def repeated_warning(where: list[str], repeats: list[tuple[int, int]]) -> str:
    i, j = repeats[0]
    return printable(f"radtrt: warning: {len(repeats)} manifest row{'s repeat' if len(repeats) > 1 else ' repeats'} an "
                     f"earlier row (first: {where[i]}, a copy of line {where[j].rpartition(':')[2]}); each copy is "
                     f"trained on")


def normalize(pixels_u8: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``[B, S, S]`` uint8 -> ``[B, 3, S, S]`` model input, identical to ``preprocess``'s output."""
    x = pixels_u8.to(torch.float32).div(255)[:, None].expand(-1, 3, -1, -1)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


class ManifestDataset(torch.utils.data.Dataset):
    """Items ``{index, pixels, input_ids, labels, targets}`` for one training stage.

    ``template`` None means no text (trunk pretraining); ``image_size`` None means no images
    (decoder pretraining). ``label_names`` turns each row's labels (or, without them, the labels
    the phrase labeler reads from its findings) into a multi-hot ``targets`` vector.
    ``condition_on_labels`` (text only) puts each row's labels, in words, before its report.
    """

    def __init__(self, rows: list[ManifestRow], root: Path, *, tokenizer: LlamaSPTokenizer | None,
                 template: str | None, max_length: int, image_size: int | None,
                 label_names: list[str] | None = None, preload: bool = True, console: Console | None = None,
                 condition_on_labels: bool = False, where: list[str] | None = None) -> None:
        """``where``: each row as errors name it (``MANIFEST:LINE``), in place of its image's path, which may carry a
        patient's name (a study folder named after one, say)."""
        if condition_on_labels and template != "text":
            fail("conditioning on labels is only for text-only decoder pretraining")
        self.rows, self.root, self.condition_on_labels = rows, root, condition_on_labels
        self.where = where
        self.tokenizer, self.template, self.max_length = tokenizer, template, max_length
        self.image_size, self.label_names = image_size, label_names
        if template is not None and tokenizer is not None and max_length < min_length(tokenizer, template):
            fail(f"max_length {max_length} leaves no report token to train on in any '{template}' example (the "
                 f"prompt before the report is longer); it must be at least {min_length(tokenizer, template)}")
        self.images: torch.Tensor | None = None
        # (row index, its example's length in ids) of each row cut to max_length: its report's end and EOS are not
        # trained on, so the model learns no stop there (the training loop warns)
        self.too_long: list[tuple[int, int]] = []
        # (row index, its prompt's length in ids) of each row whose prompt alone fills max_length (a long indication):
        # not one of its report's ids is trained on (the training loop warns; every row so is refused here)
        self.untrained: list[tuple[int, int]] = []
        # index of each row the released v1 masking ignores whole (its "tokenization mismatch", which the released
        # trainer only prints): a literal stop string or role name in its text splits the conversation's rounds
        self.mismatched: list[int] = []
        if template is not None and tokenizer is not None:
            self.too_long, self.untrained, self.mismatched = self._measure(console)
            if self.untrained and len(self.untrained) == len(rows):
                # a run trained on nothing: loss 0 at every step, and its model, the one it started from, exit 0
                first, prompt = min(self.untrained, key=lambda row: row[1])
                fail(f"every manifest row's prompt fills --max-length {max_length} ids before its report (shortest: "
                     f"{self._row(first)}, {prompt} ids), so the run would train on nothing; give --max-length "
                     f"{prompt + 1} or more, or shorter indications")
            if self.mismatched and len(self.mismatched) + len(self.untrained) == len(rows):
                fail(f"every manifest row would train on nothing: {MISMATCH_WHY}, and {len(self.mismatched)} do "
                     f"(first: {self._row(self.mismatched[0])})" + (
                         f"; the others' prompts fill --max-length {max_length}" if self.untrained else ""))
        # (row index, view) of each image that is not frontal: infer calls its report unreliable, and a run trained
        # on them without a word (the training loop warns)
        self.non_frontal: list[tuple[int, str]] = []
        if image_size is not None:
            missing = next((i for i, r in enumerate(rows) if not r.image_path(root).exists()), None)
            if missing is not None:
                path = rows[missing].image_path(root)
                # a link that leads nowhere was said as "not found", the file plainly being there
                broken = next((p for p in (path, *path.parents) if broken_link(p)), None)
                if where is not None:  # the row's line, not its path
                    fail(f"{where[missing]}: its image " + (f"is {broken_link(broken)}" if broken == path else
                                                            "cannot be read (a link on its path leads nowhere)"
                                                            if broken is not None else "is not found") +
                         " (its 'image', relative to the manifest's folder)")
                if broken is not None:
                    fail(f"manifest image {rows[missing].image} (relative to {root}) cannot be read: "
                         f"{'it' if broken == path else broken} is {broken_link(broken)}")
                fail(f"manifest image not found: {rows[missing].image} (relative to {root})")
            if preload:
                self.images = self._preload(console)
            else:  # read later, by DataLoader workers: what their headers tell is refused now, before the run starts
                self._screen(console)

    def _row(self, index: int) -> str:
        return self.where[index] if self.where is not None else f"manifest row {index + 1}"

    def _measure(self, console: Console | None) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[int]]:
        """The rows cut to max_length (index, example length), of those the ones left with no report id to train on
        (index, prompt length), and the rows whose every label the v1 masking ignores (index)."""
        assert self.template is not None and self.tokenizer is not None
        cut, untrained, mismatched = [], [], []
        with make_progress(console=console or Console(stderr=True), transient=True) as progress:
            task = progress.add_task("measuring reports", total=len(self.rows))
            for i, row in enumerate(self.rows):
                context = self.label_context(i) if self.condition_on_labels else None
                example = build_example(self.tokenizer, self.template, row.findings, row.indication, sys.maxsize,
                                        context)
                n = len(example.input_ids)
                if example.mismatch:
                    mismatched.append(i)
                elif n > self.max_length:
                    prompt = next((k for k, label in enumerate(example.labels) if label != IGNORE_INDEX), n)
                    (untrained.append((i, prompt)) if prompt >= self.max_length else cut.append((i, n)))
                progress.advance(task)
        return cut, untrained, mismatched

    def _screen(self, console: Console | None) -> None:
        """Refuse an image that reading it would refuse from its header (a damaged PNG, a CT) before the run
        starts: read lazily it failed the run mid-way, after checkpoints were written, and a run whose images
        changed cannot be resumed."""
        with make_progress(console=console or Console(stderr=True), transient=True) as progress:
            task = progress.add_task("checking images", total=len(self.rows))
            for i, row in enumerate(self.rows):
                screen_study(row.image_path(self.root), shown_as=self._shown(i))
                self._note_view(i, _screened_view(row.image_path(self.root), self._shown(i)))
                progress.advance(task)

    def _preload(self, console: Console | None) -> torch.Tensor:
        assert self.image_size is not None
        images = torch.empty(len(self.rows), self.image_size, self.image_size, dtype=torch.uint8)
        with make_progress(console=console or Console(stderr=True), transient=True) as progress:
            task = progress.add_task("reading images", total=len(self.rows))
            for i, row in enumerate(self.rows):
                images[i], view = _load_pixels_u8(row.image_path(self.root), self.image_size, self._shown(i))
                self._note_view(i, view)
                progress.advance(task)
        return images

    def _shown(self, i: int) -> str | None:
        """How errors name row ``i``'s image: by the row's line where known (see ``__init__``)."""
        return f"{self.where[i]} (its image)" if self.where is not None else None

    def _note_view(self, i: int, view: str) -> None:
        if view != UNKNOWN_VIEW and not is_frontal(view):
            self.non_frontal.append((i, view))

    def images_digest(self, run_dir: Path | None = None) -> str | None:
        """sha256 of the image data the run trains on, for resume to refuse other images under an unchanged
        manifest (PNGs overwritten in place continued the run on other data). The preloaded pixels when there are
        any (already in memory: hashing them is cheap, and they are exactly what is trained on); otherwise the
        files' bytes, one extra read of the data set. None without images.

        ``run_dir``: the run's own folder, left out where it lies in a row's study folder: its log and checkpoint,
        written after this digest was taken, were "image data that has changed", and resume refused the run."""
        if self.image_size is None:
            return None
        h = hashlib.sha256()
        if self.images is not None:
            h.update(b"pixels\0")
            h.update(memoryview(self.images.contiguous().numpy()))
            return h.hexdigest()
        h.update(b"files\0")
        own = resolved(run_dir) if run_dir is not None else None
        for i, row in enumerate(self.rows):
            path = row.image_path(self.root)
            # a row may name a study folder: every file in it, by name (it was read as a file: 'Is a directory')
            files = study_files(path) if path.is_dir() else [path]
            for file in files:
                if own is not None and resolved(file).is_relative_to(own):
                    continue
                h.update(file.relative_to(path).as_posix().encode() if file != path else b"")
                try:
                    with file.open("rb") as f:
                        while block := f.read(1 << 22):
                            h.update(block)
                except OSError as e:
                    # by the row, not the path; a file of a row's study folder is not named either (its name may be
                    # a patient's as much as the folder's)
                    shown = (self._shown(i) if file == path else f"{self.where[i]} (a file of its study folder)") \
                        if self.where is not None else None
                    fail(f"cannot read {shown or f'manifest image {file}'} ({e.strerror or e})")
                h.update(b"\0")  # file boundaries: two files that swap bytes between them differ
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self.rows)

    def row_labels(self, i: int) -> list[str]:
        row = self.rows[i]
        return list(row.labels) if row.labels is not None else extract_labels(row.findings)

    def label_context(self, i: int) -> str:
        """The row's labels as words, e.g. ``"cardiomegaly, pleural effusion left"``."""
        return ", ".join(label.replace("_", " ") for label in self.row_labels(i))

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        item: dict[str, Any] = {"index": i}
        if self.image_size is not None:
            if self.images is not None:
                item["pixels"] = self.images[i]
            else:
                try:
                    item["pixels"] = load_pixels_u8(row.image_path(self.root), self.image_size, self._shown(i))
                except RadtrtError as e:
                    if get_worker_info() is None:
                        raise
                    # a DataLoader worker's exception reaches the main process wrapped with its traceback
                    # text; the message travels as data instead, and the training loop fails with it
                    return {"index": i, "error": str(e)}
        if self.template is not None:
            assert self.tokenizer is not None
            context = self.label_context(i) if self.condition_on_labels else None
            ex = build_example(self.tokenizer, self.template, row.findings, row.indication, self.max_length, context)
            item["input_ids"], item["labels"] = ex.input_ids, ex.labels
        if self.label_names is not None:
            present = set(self.row_labels(i))
            item["targets"] = torch.tensor([float(name in present) for name in self.label_names])
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    failed = next((it for it in items if "error" in it), None)
    if failed is not None:
        return {"error": failed["error"]}
    batch: dict[str, Any] = {"index": torch.tensor([it["index"] for it in items])}
    if "pixels" in items[0]:
        batch["pixels"] = torch.stack([it["pixels"] for it in items])
    if "input_ids" in items[0]:
        batch["input_ids"] = [it["input_ids"] for it in items]
        batch["labels"] = [it["labels"] for it in items]
    if "targets" in items[0]:
        batch["targets"] = torch.stack([it["targets"] for it in items])
    return batch


@dataclass(frozen=True)
class Schedule:
    """Which dataset indices each (step, rank, micro-batch) uses."""

    n: int
    micro_batch_size: int
    grad_accum: int
    world_size: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def check(self) -> None:
        if self.steps_per_epoch < 1:
            fail(f"the manifest has {self.n} rows, fewer than one global batch of {self.global_batch} "
                 f"(micro-batch {self.micro_batch_size} x accumulation {self.grad_accum} x {self.world_size} "
                 f"processes); lower --micro-batch-size or --grad-accum")

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        return max_steps if max_steps else max(1, math.ceil(epochs * self.steps_per_epoch))

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        per_rank = self.micro_batch_size * self.grad_accum
        mine = perm[k * self.global_batch:(k + 1) * self.global_batch][rank * per_rank:(rank + 1) * per_rank]
        return [mine[j * self.micro_batch_size:(j + 1) * self.micro_batch_size].tolist()
                for j in range(self.grad_accum)]

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch

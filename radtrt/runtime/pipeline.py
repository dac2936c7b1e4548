"""Study in, report out: read and select the frontal image, preprocess, encode, prompt, generate."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from radtrt.imaging.study import SelectedImage, load_study
from radtrt.model.config import LlavaRadConfig
from radtrt.model.generate import MAX_NEW_TOKENS
from radtrt.model.prompt import STOP_STR, build_prompt, build_query, tokenizer_image_token
from radtrt.model.tokenizer import LlamaSPTokenizer
from radtrt.runtime.backends import Backend


@dataclass
class StudyResult:
    """One study's result; ``to_json`` is the ``radtrt infer --json`` contract."""

    study: str
    source_file: str
    view_position: str
    report: str
    token_ids: list[int]
    stop_reason: str  # "eos", or "max_new_tokens": the report was cut off
    backend: str
    precision: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1
    decode_batch_size: int = 1  # below batch_size where the decoder ran the batch in parts (see Generation.parts)
    image: SelectedImage | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` contract; timings of batched stages are per batch (``batch_size`` says how big; prefill
        and decode are those of the study's decoder batch where that was smaller, ``decode_batch_size``).

        Field by field, not ``asdict``: that deep-copied ``image`` (its pydicom Dataset and pixels) only to drop
        it, and pydicom re-validates UIDs on copy, warning with their values outside the CLI's silencing."""
        d: dict[str, Any] = {"study": self.study, "source_file": self.source_file,
                             "view_position": self.view_position, "report": self.report,
                             "token_ids": list(self.token_ids), "backend": self.backend, "precision": self.precision,
                             "timings_ms": dict(self.timings_ms)}
        if self.batch_size != 1:
            d["batch_size"] = self.batch_size
        if self.decode_batch_size != self.batch_size:
            d["decode_batch_size"] = self.decode_batch_size
        if self.stop_reason != "eos":  # beside the stable keys, only where it applies (as batch_size)
            d["truncated"] = True
        return d


@dataclass
class StudyFailure:
    """A study that produced no report (``stage`` "input") or whose SR could not be written (``stage`` "sr",
    after its report record): ``--json`` keeps one record per study, so a consumer never has to match stderr
    lines to inputs."""

    study: str
    error: str
    stage: str = "input"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def postprocess(text: str) -> str:
    """The released evaluator's cleanup: strip, drop a trailing stop string, strip again."""
    text = text.strip()
    if text.endswith(STOP_STR):
        text = text[: -len(STOP_STR)]
    return text.strip()


@dataclass
class PreparedStudy:
    """A study read, its frontal image preprocessed and its prompt tokenized: ready for compute."""

    study: Path
    image: SelectedImage
    pixels: torch.Tensor
    prompt_ids: list[int]
    preprocess_ms: float


class Pipeline:
    """Study -> report over any backend: the study reading, preprocessing and prompt are the same code for
    torch, ONNX Runtime and TensorRT, so a difference in output can only come from the backend itself."""

    def __init__(self, backend: Backend, tokenizer: LlamaSPTokenizer, cfg: LlavaRadConfig,
                 model_name: str = "llava-rad") -> None:
        self.backend = backend
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.cfg = cfg

    @property
    def model_version(self) -> str:
        """An SR's algorithm version: which weights, in which precision, on which backend (an INT8 bundle's
        reports differ from the fp32 model's, and its SRs must say so)."""
        return f"weights {self.backend.weights_id[:16]}, {self.backend.precision} on {self.backend.name}"

    def check_fits(self, indication: str | None, max_new_tokens: int, *, source: str = "--indication") -> None:
        """Refuse a prompt plus ``max_new_tokens`` the backend cannot run (past the model's positions, or a
        TensorRT-LLM engine's build limits) before any study is read: every
        study of a run shares the prompt, and the refusal came at the first batch, after the studies before it
        had their records (so ``--json`` listed some studies and not the rest). ``source``: where the indication
        came from, which the remedy names (bench parity's manifest rows have their own)."""
        def length(text: str | None) -> int:
            return len(self.prompt_ids(text)) - 1 + self.cfg.num_image_tokens  # the placeholder, expanded

        self.backend.check_length(length(indication), max_new_tokens,
                                  shorten=(source, length(None)) if indication else None)

    def prompt_ids(self, indication: str | None) -> list[int]:
        prompt = build_prompt(build_query(indication), self.cfg.conv_template)
        return tokenizer_image_token(prompt, self.tokenizer.encode, self.tokenizer.bos_token_id)

    def prepare(self, study: Path, *, indication: str | None = None, allow_any_modality: bool = False,
                shown_as: str | None = None) -> PreparedStudy:
        """Everything before the model; a bad study fails here, before any batch is formed. ``shown_as``: how its
        errors name the study (``load_study``)."""
        t0 = time.perf_counter()
        image = load_study(study, allow_any_modality=allow_any_modality, shown_as=shown_as)
        pixels = self.cfg.preprocessing(image.pixels_u8)
        return PreparedStudy(study, image, pixels, self.prompt_ids(indication), (time.perf_counter() - t0) * 1e3)

    def generate(self, batch: list[PreparedStudy], *, max_new_tokens: int = MAX_NEW_TOKENS) -> list[StudyResult]:
        """One batch through vision, prefill and decode (left-padded; same tokens as one by one)."""
        t0 = time.perf_counter()
        image_embeds = self.backend.encode_images(torch.stack([p.pixels for p in batch]))
        t1 = time.perf_counter()
        embeds = [self.backend.embed_prompt(p.prompt_ids, image_embeds[i]) for i, p in enumerate(batch)]
        gen = self.backend.generate(embeds, max_new_tokens=max_new_tokens, eos_token_id=self.tokenizer.eos_token_id)
        t2 = time.perf_counter()
        results = []
        for i, (p, ids) in enumerate(zip(batch, gen.token_ids)):
            run, decode_batch = gen.batch_of(i)  # the decoder may have run the batch in parts
            steps = run.decode_steps(max_new_tokens)
            timings = {"preprocess": p.preprocess_ms, "vision": (t1 - t0) * 1e3, "prefill": run.prefill_ms,
                       "decode": run.decode_ms, "end_to_end": p.preprocess_ms + (t2 - t0) * 1e3}
            if steps:  # none (--max-new-tokens 1, or EOS at once): no per-token time was measured
                timings["decode_per_token"] = run.decode_ms / steps
            results.append(StudyResult(study=str(p.study), source_file=str(p.image.source_file),
                                       view_position=p.image.view_position,
                                       report=postprocess(self.tokenizer.decode(ids)), token_ids=ids,
                                       stop_reason="max_new_tokens" if len(ids) >= max_new_tokens else "eos",
                                       backend=self.backend.name, precision=self.backend.precision,
                                       timings_ms={k: round(v, 3) for k, v in timings.items()},
                                       batch_size=len(batch), decode_batch_size=decode_batch, image=p.image))
        return results

    def run(self, study: Path, *, indication: str | None = None, max_new_tokens: int = MAX_NEW_TOKENS,
            allow_any_modality: bool = False, shown_as: str | None = None) -> StudyResult:
        prepared = self.prepare(study, indication=indication, allow_any_modality=allow_any_modality,
                                shown_as=shown_as)
        return self.generate([prepared], max_new_tokens=max_new_tokens)[0]

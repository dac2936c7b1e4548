"""Study in, report out: read and select the frontal image, preprocess, encode, prompt, generate."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from radtrt.imaging.preprocess import preprocess
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
    backend: str
    precision: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    image: SelectedImage | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("image")
        return d


def postprocess(text: str) -> str:
    """The released evaluator's cleanup: strip, drop a trailing stop string, strip again."""
    text = text.strip()
    if text.endswith(STOP_STR):
        text = text[: -len(STOP_STR)]
    return text.strip()


class Pipeline:
    def __init__(self, backend: Backend, tokenizer: LlamaSPTokenizer, cfg: LlavaRadConfig,
                 model_name: str = "llava-rad") -> None:
        self.backend = backend
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.cfg = cfg

    def prompt_ids(self, indication: str | None) -> list[int]:
        prompt = build_prompt(build_query(indication), self.cfg.conv_template)
        return tokenizer_image_token(prompt, self.tokenizer.encode, self.tokenizer.bos_token_id)

    def run(self, study: Path, *, indication: str | None = None, max_new_tokens: int = MAX_NEW_TOKENS,
            allow_any_modality: bool = False) -> StudyResult:
        t0 = time.perf_counter()
        image = load_study(study, allow_any_modality=allow_any_modality)
        pixels = preprocess(image.pixels_u8, image_size=self.cfg.vision.img_size, mean=self.cfg.image_mean,
                            std=self.cfg.image_std)
        t1 = time.perf_counter()
        image_embeds = self.backend.encode_images(pixels[None])[0]
        t2 = time.perf_counter()
        embeds = self.backend.embed_prompt(self.prompt_ids(indication), image_embeds)
        gen = self.backend.generate([embeds], max_new_tokens=max_new_tokens, eos_token_id=self.tokenizer.eos_token_id)
        t3 = time.perf_counter()
        ids = gen.token_ids[0]
        timings = {"preprocess": (t1 - t0) * 1e3, "vision": (t2 - t1) * 1e3, "prefill": gen.prefill_ms,
                   "decode": gen.decode_ms, "decode_per_token": gen.decode_ms / max(len(ids) - 1, 1),
                   "end_to_end": (t3 - t0) * 1e3}
        return StudyResult(study=str(study), source_file=str(image.source_file), view_position=image.view_position,
                           report=postprocess(self.tokenizer.decode(ids)), token_ids=ids,
                           backend=self.backend.name, precision=self.backend.precision,
                           timings_ms={k: round(v, 3) for k, v in timings.items()}, image=image)

"""The Triton Python-backend models of radtrt's repository (``radtrt.exporter.triton``): request preparation
(image bytes + indication -> pixels and prompt ids with fake image ids) and output decoding. Their pure parts
are tested without Triton; ``triton_python_backend_utils`` is imported only inside ``execute``."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from radtrt.errors import RadtrtError, fail

NP_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass
class RequestPreparer:
    """Image bytes + indication -> the tensors the vision and TensorRT-LLM models take (one request)."""

    tokenizer: Any
    cfg: Any  # LlavaRadConfig
    vocab_size: int
    num_image_tokens: int
    pixel_dtype: str
    engine_limits: dict[str, int] | None = None  # the TensorRT-LLM engine's max_input_len / max_seq_len, if known

    @classmethod
    def from_dir(cls, folder: Path, params: dict[str, str]) -> "RequestPreparer":
        from radtrt.exporter.bundle import read_bundle_side

        cfg, tokenizer = read_bundle_side(folder)
        limits = {k: int(params[k]) for k in ("max_input_len", "max_seq_len") if k in params}
        return cls(tokenizer, cfg, int(params["vocab_size"]), int(params["num_image_tokens"]), params["pixel_dtype"],
                   limits or None)

    def __call__(self, image: bytes, indication: str, max_new_tokens: int) -> dict[str, np.ndarray]:
        from radtrt.imaging.study import load_study, study_warnings
        from radtrt.model.generate import check_positions
        from radtrt.model.prompt import build_prompt, build_query, tokenizer_image_token
        from radtrt.runtime.tensorrt import check_engine_limits, fake_prompt_ids

        if max_new_tokens < 1:
            fail("MAX_NEW_TOKENS must be at least 1")
        with tempfile.TemporaryDirectory() as tmp:  # the study reader sniffs content, not names
            path = Path(tmp) / "IMAGE"
            path.write_bytes(image)
            selected = load_study(path, shown_as="IMAGE")  # the request input, not a server path
        warnings = "; ".join(study_warnings(Path("IMAGE"), selected))  # the request input, as errors name it
        pixels = self.cfg.preprocessing(selected.pixels_u8)
        def prompt_ids(text: str | None) -> list[int]:
            prompt = build_prompt(build_query(text), self.cfg.conv_template)
            ids = tokenizer_image_token(prompt, self.tokenizer.encode, self.tokenizer.bos_token_id)
            return fake_prompt_ids(ids, self.num_image_tokens, self.vocab_size)

        ids = prompt_ids(indication or None)
        shorten = ("INDICATION", len(prompt_ids(None))) if indication else None
        check_positions(len(ids), max_new_tokens, self.cfg.decoder.max_position_embeddings, shorten=shorten,
                        limit="MAX_NEW_TOKENS")
        if self.engine_limits:  # tighter than the model's positions; the backend would cut MAX_NEW_TOKENS silently
            check_engine_limits([len(ids)], max_new_tokens, self.engine_limits, shorten=shorten,
                                limit="MAX_NEW_TOKENS")
        eos = self.tokenizer.eos_token_id
        col = lambda v: np.array([[v]], dtype=np.int32)  # noqa: E731 - [batch 1, 1]
        return {"PIXEL_VALUES": pixels.numpy().astype(NP_DTYPES[self.pixel_dtype])[None],
                "INPUT_IDS": np.array([ids], dtype=np.int32), "INPUT_LENGTH": col(len(ids)),
                "REQUEST_OUTPUT_LEN": col(max_new_tokens), "PROMPT_VOCAB_SIZE": col(self.num_image_tokens),
                "END_ID": col(eos), "PAD_ID": col(eos), "WARNINGS": np.array([[warnings.encode()]], dtype=object)}


def decode_output(tokenizer: Any, output_ids: np.ndarray, sequence_length: np.ndarray,
                  eos_token_id: int) -> tuple[str, list[int]]:
    """One request's ``[beams, L]`` generated ids (prompt excluded) -> (report, ids without EOS)."""
    from radtrt.runtime.pipeline import postprocess

    ids = [int(x) for x in output_ids[0][: int(sequence_length[0])]]
    ids = ids[:ids.index(eos_token_id)] if eos_token_id in ids else ids
    return postprocess(tokenizer.decode(ids)), ids


def request_inputs(tensor: Callable[[str], np.ndarray]) -> tuple[bytes, str, int]:
    """One request's (IMAGE, INDICATION, MAX_NEW_TOKENS) from ``tensor(name)``, its input as an array.

    A request carrying several studies is refused, not cut to its first: the server batches requests, so a
    client sends one request per study. An indication that is not UTF-8 fails its own request only."""
    values = {}
    for name in ("IMAGE", "INDICATION", "MAX_NEW_TOKENS"):
        array = tensor(name)
        if array.size != 1:
            fail(f"{name} holds {array.size} values: send one request per study (the server batches requests)")
        values[name] = array.reshape(-1)[0]
    indication = values["INDICATION"]
    try:
        text = indication.decode("utf-8") if isinstance(indication, bytes) else str(indication)
    except UnicodeDecodeError:
        fail("INDICATION is not UTF-8 text")
    return bytes(values["IMAGE"]), text, int(values["MAX_NEW_TOKENS"])


def _model_args(args: dict[str, Any]) -> tuple[Path, dict[str, str]]:
    cfg = json.loads(args["model_config"])
    params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
    return Path(args["model_repository"]) / str(args["model_version"]), params


class PreprocessingModel:
    """Triton Python-backend model (``TritonPythonModel`` interface); a bad image fails its request only."""

    def initialize(self, args: dict[str, Any]) -> None:
        folder, params = _model_args(args)
        self.prepare = RequestPreparer.from_dir(folder, params)

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            try:
                arrays = self.prepare(*request_inputs(
                    lambda name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()))  # noqa: B023
            except RadtrtError as e:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e))))
                continue
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(k, v) for k, v in arrays.items()]))
        return responses


class PostprocessingModel:
    """Triton Python-backend model: generated ids -> report text."""

    def initialize(self, args: dict[str, Any]) -> None:
        from radtrt.model.tokenizer import LlamaSPTokenizer

        folder, params = _model_args(args)
        self.tokenizer = LlamaSPTokenizer.from_dir(folder)
        self.eos = int(params["eos_token_id"])

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            ids = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()[0]
            lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()[0]
            report, kept = decode_output(self.tokenizer, ids, lengths, self.eos)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("REPORT", np.array([[report.encode()]], dtype=object)),
                pb_utils.Tensor("TOKEN_IDS", np.array([kept], dtype=np.int32))]))
        return responses

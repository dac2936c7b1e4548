"""LLaVA-Rad's prompt: the Vicuna ``v1`` conversation and the chunked ``<image>`` tokenization.

Both mirror the released code (``llava/conversation.py``, ``llava/mm_utils.py``,
``llava/eval/model_mimic_cxr.py``) so prompt ids are identical to what the model was evaluated on.
"""

from __future__ import annotations

from typing import Callable

from radtrt.errors import fail

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200
SYSTEM_V1 = ("A chat between a curious user and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the user's questions.")
QUERY = "Provide a description of the findings in the radiology image."
QUERY_WITH_INDICATION = ("Provide a description of the findings in the radiology image given the following "
                         "indication: {indication}")
STOP_STR = "</s>"  # conv_vicuna_v1.sep2


def build_query(indication: str | None = None) -> str:
    """The paper's query, with the exam indication when one is given (blank counts as none). Newlines in the
    indication become spaces, as the released MIMIC loaders do for training *and* test rows
    (``reason.replace('\\n', ' ')``): a hard-wrapped indication otherwise reached the model as a prompt it never saw."""
    if indication is None or not indication.strip():
        return QUERY
    if IMAGE_TOKEN in indication:  # the released code strips it once: "<ima<image>ge>" left a second placeholder
        fail(f"the indication contains the image placeholder {IMAGE_TOKEN}; remove it")
    return QUERY_WITH_INDICATION.format(indication=indication.replace("\n", " "))


def build_prompt(query: str, template: str = "v1") -> str:
    """The evaluation prompt: ``<image>`` moved to the front of the query, then the template."""
    query = IMAGE_TOKEN + "\n" + query.replace(IMAGE_TOKEN, "").strip()
    if template == "v1":
        return f"{SYSTEM_V1} USER: {query} ASSISTANT:"
    if template == "plain":
        return IMAGE_TOKEN
    fail(f"unknown conversation template '{template}' (supported: v1, plain)")


def tokenizer_image_token(prompt: str, encode: Callable[[str], list[int]], bos_token_id: int,
                          image_token_index: int = IMAGE_TOKEN_INDEX) -> list[int]:
    """Released algorithm: tokenize each ``<image>``-separated chunk, keep one BOS, splice the index."""
    chunks = [encode(chunk) for chunk in prompt.split(IMAGE_TOKEN)]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    separator = [image_token_index] * (offset + 1)
    interleaved = [x for chunk in chunks for x in (chunk, separator)][:-1]
    for x in interleaved:
        ids.extend(x[offset:])
    return ids


def shortest_prompt_length(encode: Callable[[str], list[int]], bos_token_id: int, template: str,
                           num_image_tokens: int) -> int:
    """Positions the shortest prompt (no indication) takes with the image's rows spliced in: what a model's
    positions, or an engine's input length, must hold before any new token."""
    ids = tokenizer_image_token(build_prompt(build_query(None), template), encode, bos_token_id)
    return len(ids) - 1 + num_image_tokens

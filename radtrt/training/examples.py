"""Token ids and loss targets for one training example, masked exactly as LLaVA-Rad's train.py does.

Targets equal the ids except positions set to ``IGNORE_INDEX`` (-100), which the loss skips.
Mirrored from the released ``llava/train/train.py`` (conversation from ``llava/conversation.py``):

* ``plain`` (stage 1, ``preprocess_plain``): conversation ``"<image>" + findings + "\\n"`` (the
  plain template's separator); the ids of ``"<image>"`` alone (BOS + image index) are ignored, so
  the findings and the trailing newline are the targets (no ``</s>``).
* ``v1`` (stage 2, ``preprocess_v1``): conversation ``SYSTEM USER: <image>\\n{query} ASSISTANT:
  {findings}</s>``; split on ``</s>`` into rounds and each round on ``" ASSISTANT: "``; BOS is
  ignored, then ``len(ids(instruction + sep)) - 2`` instruction ids, then the round; what is left
  after the rounds is ignored. The ``</s>`` (tokenized from the text, as the slow tokenizer does)
  is a target. If the counted length differs from the actual one, the released code ignores the
  whole example ("tokenization mismatch"); so does this.
* ``text`` (radtrt's decoder pretraining, no LLaVA counterpart): BOS + findings + EOS, all targets;
  with a ``context`` (the row's labels in words) BOS + context + newline come first, ignored.

Image positions are ignored later, when the image embeddings are spliced in (``batching``).
Truncation to ``max_length`` happens after masking, on the unspliced ids, like the released collator.
"""

from __future__ import annotations

from dataclasses import dataclass

from radtrt.errors import fail
from radtrt.model.prompt import IMAGE_TOKEN, STOP_STR, SYSTEM_V1, build_query, tokenizer_image_token
from radtrt.model.tokenizer import LlamaSPTokenizer

IGNORE_INDEX = -100
PLAIN_SEP = "\n"  # conv_llava_plain.sep
V1_ROLES = ("USER", "ASSISTANT")
V1_SEP, V1_SEP2 = " ", STOP_STR  # conv_vicuna_v1.sep, .sep2


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    mismatch: bool = False  # the released algorithm's "tokenization mismatch": every label ignored

    @property
    def n_targets(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def human_message(indication: str | None) -> str:
    """The user turn as the released data loader writes it and ``preprocess_multimodal`` moves ``<image>``."""
    query = build_query(indication)
    return IMAGE_TOKEN + "\n" + query.replace(IMAGE_TOKEN, "").strip()


def v1_conversation(indication: str | None, findings: str) -> str:
    """``conv_vicuna_v1.get_prompt()`` for one exchange (SeparatorStyle.TWO)."""
    user, assistant = V1_ROLES
    return (SYSTEM_V1 + V1_SEP + f"{user}: {human_message(indication)}" + V1_SEP
            + f"{assistant}: {findings}" + V1_SEP2)


def _ids(tokenizer: LlamaSPTokenizer, text: str) -> list[int]:
    return tokenizer_image_token(text, tokenizer.encode, tokenizer.bos_token_id)


def plain_example(tokenizer: LlamaSPTokenizer, findings: str) -> Example:
    ids = _ids(tokenizer, IMAGE_TOKEN + findings + PLAIN_SEP)
    n_prompt = len(_ids(tokenizer, IMAGE_TOKEN))
    return Example(ids, [IGNORE_INDEX] * n_prompt + ids[n_prompt:])


def v1_example(tokenizer: LlamaSPTokenizer, findings: str, indication: str | None) -> Example:
    conversation = v1_conversation(indication, findings)
    ids = _ids(tokenizer, conversation)
    labels = list(ids)
    sep = V1_SEP + V1_ROLES[1] + ": "
    cur = 1
    labels[:cur] = [IGNORE_INDEX] * cur
    for rou in conversation.split(V1_SEP2):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        round_len = len(_ids(tokenizer, rou))
        instruction_len = len(_ids(tokenizer, parts[0] + sep)) - 2
        labels[cur:cur + instruction_len] = [IGNORE_INDEX] * len(labels[cur:cur + instruction_len])
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * len(labels[cur:])
    total = sum(1 for i in ids if i != tokenizer.unk_token_id)  # pad_token = unk_token in the released code
    if cur != total:
        return Example(ids, [IGNORE_INDEX] * len(ids), mismatch=True)
    return Example(ids, labels)


def text_example(tokenizer: LlamaSPTokenizer, findings: str, context: str | None = None) -> Example:
    if not context:
        ids = tokenizer.encode(findings) + [tokenizer.eos_token_id]
        return Example(ids, list(ids))
    prefix = tokenizer.encode(context + "\n")
    report = tokenizer.encode(findings, add_bos=False) + [tokenizer.eos_token_id]
    return Example(prefix + report, [IGNORE_INDEX] * len(prefix) + report)


def min_length(tokenizer: LlamaSPTokenizer, template: str) -> int:
    """The shortest ``max_length`` that keeps a template's ``<image>`` placeholder and one report token to learn.

    Truncation cuts from the end, and the report starts no earlier than in the shortest example of a template
    (no indication; the image comes before the report), so one prompt tells it for all of them. A shorter
    ``max_length`` trains on nothing: every loss is 0 and the model comes out as it went in.
    """
    if template == "plain":
        labels = plain_example(tokenizer, "x").labels
    elif template == "v1":
        labels = v1_example(tokenizer, "x", None).labels
    else:
        labels = text_example(tokenizer, "x").labels
    # a label is predicted from the ids before it: the first one (index 0) never is, so one id alone trains nothing
    return next(i for i, label in enumerate(labels) if label != IGNORE_INDEX and i >= 1) + 1


def build_example(tokenizer: LlamaSPTokenizer, template: str, findings: str, indication: str | None,
                  max_length: int, context: str | None = None) -> Example:
    """The example for a stage's template, truncated to ``max_length`` ids (``context``: text only)."""
    if template == "plain":
        ex = plain_example(tokenizer, findings)
    elif template == "v1":
        ex = v1_example(tokenizer, findings, indication)
    elif template == "text":
        ex = text_example(tokenizer, findings, context)
    else:
        fail(f"unknown training template '{template}' (plain, v1, text)")
    return Example(ex.input_ids[:max_length], ex.labels[:max_length], ex.mismatch)

"""The slow (sentencepiece) LLaMA tokenizer that LLaVA-Rad was trained and evaluated with.

LLaVA-Rad pins transformers 4.31 and loads Vicuna's tokenizer with ``use_fast=False``;
transformers 5 removed that class and the fast one can differ. This module reproduces 4.31's
``LlamaTokenizer`` on top of ``sentencepiece``: the ``legacy`` switch from ``tokenizer_config.json``
(Vicuna v1.5 sets ``false``), and text split on the special-token strings (``<s>``, ``</s>``,
``<unk>``), which become their ids as in the slow tokenizer. ``tests/test_tokenizer.py`` checks it
against ids produced once by transformers 4.31 (``tools/make_golden_tokenizer.py``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import sentencepiece as spm

from radtrt.errors import fail
from radtrt.model.io import read_json
from radtrt.outputs import make_dir

SPIECE_UNDERLINE = "\u2581"


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (applied only when the tokenizer config asks for it)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


class LlamaSPTokenizer:
    """Encode/decode like transformers 4.31 ``LlamaTokenizer`` (slow): BOS added, no EOS."""

    def __init__(self, model_proto: bytes, *, legacy: bool = True, clean_up_spaces: bool = False) -> None:
        self.legacy = legacy
        self.clean_up_spaces = clean_up_spaces
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.bos_token_id = self.sp.bos_id()
        self.eos_token_id = self.sp.eos_id()
        self.unk_token_id = self.sp.unk_id()
        self.special_ids = {i for i in (self.bos_token_id, self.eos_token_id, self.unk_token_id) if i >= 0}
        self._special_to_id = {self.sp.id_to_piece(i): i for i in self.special_ids}
        self._special_split = re.compile("(" + "|".join(re.escape(s) for s in self._special_to_id) + ")")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @classmethod
    def from_dir(cls, directory: Path) -> "LlamaSPTokenizer":
        """Load ``tokenizer.model`` (+ ``tokenizer_config.json`` for ``legacy``) from a model directory."""
        model_file = directory / "tokenizer.model"
        if not model_file.is_file():
            fail(f"no sentencepiece tokenizer.model in {directory}")
        cfg_file = directory / "tokenizer_config.json"
        cfg = read_json(cfg_file) if cfg_file.is_file() else {}
        proto = model_file.read_bytes()
        if not proto:  # sentencepiece loads an empty file and fails at the first encode
            fail(f"{model_file} is empty")
        try:
            return cls(proto, legacy=cfg.get("legacy") is not False,
                       clean_up_spaces=bool(cfg.get("clean_up_tokenization_spaces", False)))
        except RuntimeError as e:  # sentencepiece's error for a corrupt model file
            fail(f"{model_file} is not a valid sentencepiece model ({e})")

    def save(self, directory: Path) -> None:
        make_dir(directory, "tokenizer folder")
        (directory / "tokenizer.model").write_bytes(self.model_proto)
        config = {"tokenizer_class": "LlamaTokenizer", "legacy": self.legacy, "add_bos_token": True,
                  "add_eos_token": False, "clean_up_tokenization_spaces": self.clean_up_spaces,
                  "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
                  "model_max_length": 4096, "padding_side": "right"}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

    def _pieces(self, chunk: str) -> list[str]:
        """4.31's ``_tokenize`` for one chunk between special tokens."""
        if self.legacy:
            return self.sp.encode(chunk, out_type=str)
        is_first = chunk.startswith(SPIECE_UNDERLINE)
        if is_first:
            chunk = chunk[1:]
        pieces = self.sp.encode(chunk, out_type=str)
        if not is_first and not chunk.startswith(" ") and pieces and pieces[0].startswith(SPIECE_UNDERLINE):
            # sentencepiece's dummy prefix does not belong to a chunk that follows a special token
            pieces = ([pieces[0][1:]] if len(pieces[0]) > 1 else []) + pieces[1:]
        return pieces

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """``tokenizer(text).input_ids`` of the slow tokenizer."""
        if not self.legacy and text:
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        ids = [self.bos_token_id] if add_bos else []
        for chunk in self._special_split.split(text):
            if chunk in self._special_to_id:
                ids.append(self._special_to_id[chunk])
            elif chunk:
                ids.extend(self.sp.piece_to_id(p) for p in self._pieces(chunk))
        return ids

    def decode(self, ids: list[int]) -> str:
        """``decode(ids, skip_special_tokens=True)`` of the slow tokenizer.

        Ids past the tokenizer's vocabulary (only a random-weight model with a larger embedding
        table than its tokenizer can produce them) are dropped rather than crashing the decode.
        """
        size = self.vocab_size
        text = self.sp.decode([i for i in ids if i not in self.special_ids and 0 <= i < size])
        return clean_up_tokenization(text) if self.clean_up_spaces else text

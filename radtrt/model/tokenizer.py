"""The slow (sentencepiece) LLaMA tokenizer that LLaVA-Rad was trained and evaluated with.

transformers 5 removed the slow ``LlamaTokenizer`` (``use_fast=False``); its fast replacement can
tokenize some strings differently, and LLaVA-Rad's prompt ids must match exactly. This module
reproduces the slow tokenizer's behaviour on top of ``sentencepiece`` directly, including the
``legacy`` switch from ``tokenizer_config.json`` and the splitting of text on the special-token
strings (``<s>``, ``</s>``, ``<unk>``). ``tests/test_tokenizer.py`` checks it against ids produced
once by transformers 4.x's slow tokenizer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import sentencepiece as spm

from radtrt.errors import fail

SPIECE_UNDERLINE = "\u2581"


def _without_dummy_prefix(model_proto: bytes) -> bytes:
    """The same sentencepiece model with ``add_dummy_prefix`` off (what ``legacy=False`` loads)."""
    from sentencepiece import sentencepiece_model_pb2 as pb  # needs protobuf; only for legacy=False

    proto = pb.ModelProto()
    proto.ParseFromString(model_proto)
    proto.normalizer_spec.add_dummy_prefix = False
    return proto.SerializeToString()


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (applied only when the tokenizer config asks for it)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


class LlamaSPTokenizer:
    """Encode/decode like transformers 4.x ``LlamaTokenizer`` (slow), BOS added, no EOS."""

    def __init__(self, model_proto: bytes, *, legacy: bool = True, clean_up_spaces: bool = False) -> None:
        self.legacy = legacy
        self.clean_up_spaces = clean_up_spaces
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.sp_encode = self.sp if legacy else spm.SentencePieceProcessor(model_proto=_without_dummy_prefix(model_proto))
        self.bos_token_id = self.sp.bos_id()
        self.eos_token_id = self.sp.eos_id()
        self.unk_token_id = self.sp.unk_id()
        self.special_ids = {i for i in (self.bos_token_id, self.eos_token_id, self.unk_token_id) if i >= 0}
        specials = [self.sp.id_to_piece(i) for i in sorted(self.special_ids)]
        self._special_split = re.compile("(" + "|".join(re.escape(s) for s in specials) + ")")
        self._special_to_id = {self.sp.id_to_piece(i): i for i in self.special_ids}
        self._unk_len = len(self.sp_encode.encode(self.sp.id_to_piece(self.unk_token_id), out_type=str))

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
        cfg = {}
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text())
            except json.JSONDecodeError as e:
                fail(f"{cfg_file} is not valid JSON ({e})")
        try:
            return cls(model_file.read_bytes(), legacy=cfg.get("legacy") is not False,
                       clean_up_spaces=bool(cfg.get("clean_up_tokenization_spaces", False)))
        except RuntimeError as e:  # sentencepiece's error for a corrupt model file
            fail(f"{model_file} is not a valid sentencepiece model ({e})")

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.model").write_bytes(self.model_proto)
        config = {"tokenizer_class": "LlamaTokenizer", "legacy": self.legacy, "add_bos_token": True,
                  "add_eos_token": False, "clean_up_tokenization_spaces": self.clean_up_spaces,
                  "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
                  "model_max_length": 4096, "padding_side": "right"}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

    def _encode_piece(self, text: str, first: bool) -> list[int]:
        if self.legacy:
            return self.sp.encode(text)
        if first:
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        if not text.startswith((SPIECE_UNDERLINE, " ")):
            return self.sp_encode.encode(text)
        unk = self.sp.id_to_piece(self.unk_token_id)
        return self.sp_encode.encode(unk + text)[self._unk_len:]

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """``tokenizer(text).input_ids`` of the slow tokenizer."""
        ids = [self.bos_token_id] if add_bos else []
        first = True
        for part in self._special_split.split(text):
            if part in self._special_to_id:
                ids.append(self._special_to_id[part])
            elif part:
                ids.extend(self._encode_piece(part, first))
            first = False if part else first
        return ids

    def decode(self, ids: list[int]) -> str:
        """``decode(ids, skip_special_tokens=True)`` of the slow tokenizer."""
        text = self.sp.decode([i for i in ids if i not in self.special_ids])
        return clean_up_tokenization(text) if self.clean_up_spaces else text

"""Train a LLaMA-style sentencepiece tokenizer on a manifest's reports (for small models trained here).

Same recipe as ``radtrt.model.tiny.train_tiny_tokenizer`` (BPE, byte fallback, split digits, ids
0/1/2 = unk/bos/eos, non-legacy like Vicuna v1.5) but on the manifest's findings and indications
plus the prompt strings, which are repeated so that the fixed prompt becomes a few whole-word
pieces instead of many fragments.
"""

from __future__ import annotations

import io

import sentencepiece as spm

from radtrt.data.manifest import ManifestRow
from radtrt.errors import fail
from radtrt.model.prompt import QUERY, QUERY_WITH_INDICATION, SYSTEM_V1
from radtrt.model.tokenizer import LlamaSPTokenizer

PROMPT_REPEATS = 50


def tokenizer_corpus(rows: list[ManifestRow]) -> list[str]:
    """The sentences the tokenizer learns from: reports, indications and the prompt text."""
    prompt = [SYSTEM_V1, QUERY, QUERY_WITH_INDICATION.format(indication=""), "USER: ASSISTANT:"]
    lines = [row.findings for row in rows] + [row.indication for row in rows if row.indication]
    return lines + prompt * PROMPT_REPEATS


def train_tokenizer(rows: list[ManifestRow], vocab_size: int = 1024) -> LlamaSPTokenizer:
    """A tokenizer with at most ``vocab_size`` pieces (fewer when the corpus is small)."""
    if vocab_size < 300:
        fail(f"--vocab-size must be at least 300, got {vocab_size} (byte fallback alone takes 259 pieces)")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(tokenizer_corpus(rows)), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
            normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
            allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2, hard_vocab_limit=False,
            shuffle_input_sentence=False)
    # sentencepiece's own refusal (the corpus' characters need more pieces than asked for, say), after the
    # source location it prefixes: "INTERNAL: src/trainer_interface.cc(638) [...] Vocabulary size is ..."
    except RuntimeError as e:
        reason = str(e).rsplit("] ", 1)[-1].split(" Increase ", 1)[0].strip()  # its remedy names its own options
        fail(f"sentencepiece cannot train a {vocab_size}-piece tokenizer on this manifest ({reason}); give a larger "
             f"--vocab-size")
    return LlamaSPTokenizer(buf.getvalue(), legacy=False)

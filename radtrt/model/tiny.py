"""Tiny random-weight LLaVA-Rad models and tokenizers, built with the same code as the real sizes.

For tests and the first-run demo only: their reports are gibberish by construction.
"""

from __future__ import annotations

import io
import itertools

import sentencepiece as spm
import torch

from radtrt.model.config import LlavaRadConfig, preset
from radtrt.model.llava_rad import LlavaRad
from radtrt.model.prompt import QUERY, SYSTEM_V1
from radtrt.model.tokenizer import LlamaSPTokenizer

_SUBJECTS = ["The lungs", "The heart", "The cardiomediastinal silhouette", "The pleural spaces", "The osseous structures",
             "There", "The endotracheal tube", "A right PICC line"]
_PREDICATES = ["are clear", "is normal in size", "is within normal limits", "is no pleural effusion or pneumothorax",
               "is enlarged", "shows mild pulmonary edema", "terminates 4 cm above the carina", "are unremarkable",
               "demonstrate a left lower lobe consolidation", "show a 12 mm nodule in the right upper lobe"]


def tiny_corpus() -> list[str]:
    lines = [SYSTEM_V1, QUERY, "USER: ASSISTANT: indication: 65M with 3 days of cough, r/o pneumonia?"]
    for subject, predicate in itertools.product(_SUBJECTS, _PREDICATES):
        lines.append(f"{subject} {predicate}. No focal consolidation, 1-2 views, compared to 2019-03-04.")
    return lines


def train_tiny_tokenizer(vocab_size: int = 512) -> LlamaSPTokenizer:
    """A LLaMA-style sentencepiece BPE (byte fallback, digits split, ids 0/1/2 = unk/bos/eos)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus()), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2, hard_vocab_limit=False)
    return LlamaSPTokenizer(buf.getvalue(), legacy=False)


@torch.no_grad()
def random_model(cfg: LlavaRadConfig | None = None, seed: int = 0) -> LlavaRad:
    """Random weights scaled so every part changes the output (greedy tokens are not all equal)."""
    torch.manual_seed(seed)
    model = LlavaRad(cfg or preset("tiny")).eval()
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            p.normal_(0.0, 0.5)
        elif "norm" in name:
            p.copy_(1.0 + 0.2 * torch.randn_like(p)) if name.endswith("weight") else p.normal_(0.0, 0.1)
        elif p.dim() >= 2:
            p.normal_(0.0, 0.5 / p.shape[-1] ** 0.5 if "embed" not in name else 1.0)
        else:
            p.normal_(0.0, 0.05)
    return model

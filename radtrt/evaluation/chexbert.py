"""F1-CheXbert from local weights: the CheXbert labeler as the released LLaVA-Rad evaluator runs it.

The released ``rrg_eval/chexbert.py`` builds BERT-base with 13 four-way heads (blank, positive,
negative, uncertain) and one two-way "No Finding" head, loads ``chexbert.pth`` from the Hugging Face
hub, and labels each report from its [CLS] state. radtrt builds the same model with ``transformers``
from files the user already has (no hub access at run time): the CheXbert checkpoint and a local
``bert-base-uncased`` directory for the config and WordPiece vocabulary. Labels then go through the same
F1 code as the offline labeler.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # torch and transformers load only when CheXbert runs
    import torch
    import transformers

from radtrt.errors import fail
from radtrt.evaluation.labels import CONDITIONS

WHAT_TO_PROVIDE = ("F1-CheXbert needs local weights: --chexbert-checkpoint PATH (chexbert.pth, the CheXbert "
                   "labeler checkpoint) and --bert-dir DIR (a local bert-base-uncased with config.json and vocab.txt)")
MAX_TOKENS = 512


@dataclass(frozen=True)
class CheXbertConfig:
    """Where the CheXbert weights and the BERT vocabulary are on disk."""

    checkpoint: Path
    bert_dir: Path
    device: str = "cpu"
    batch_size: int = 32

    def check(self) -> None:
        from radtrt.runtime.backends import resolve_device

        resolve_device(self.device)
        problem = missing_input(self.checkpoint, self.bert_dir)
        if problem is not None:
            fail(f"{problem}; {WHAT_TO_PROVIDE}")


def missing_input(checkpoint: Path, bert_dir: Path) -> str | None:
    """Which of the two given paths is wrong, or None: a bare "needs local weights" left the user guessing
    which of the paths they did pass was the problem."""
    if not checkpoint.is_file():
        return f"--chexbert-checkpoint {checkpoint} is not a file"
    if not bert_dir.is_dir():
        return f"--bert-dir {bert_dir} is not a directory"
    for name in ("config.json", "vocab.txt"):
        if not (bert_dir / name).is_file():
            return f"--bert-dir {bert_dir} has no {name}"
    return None


def build_labeler(bert_config: transformers.BertConfig) -> torch.nn.Module:
    """BERT plus CheXbert's heads, with the released module names (``bert``, ``linear_heads``)."""
    import torch
    from transformers import BertModel

    class CheXbertLabeler(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel(bert_config)
            self.dropout = torch.nn.Dropout(0.1)
            hidden = bert_config.hidden_size
            heads = [torch.nn.Linear(hidden, 4) for _ in range(len(CONDITIONS) - 1)] + [torch.nn.Linear(hidden, 2)]
            self.linear_heads = torch.nn.ModuleList(heads)

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
            cls = self.dropout(self.bert(ids, attention_mask=mask)[0][:, 0, :])
            return [head(cls) for head in self.linear_heads]

    return CheXbertLabeler()


def _encode(tokenizer: object, report: str, limit: int = MAX_TOKENS) -> list[int]:
    """The released tokenization: whitespace-normalized text, WordPiece, [CLS] ... [SEP], cut at 512, or at the
    BERT's own position count where it has fewer (a longer report was a RuntimeError traceback)."""
    text = re.sub(r"\s+", " ", report.strip().replace("\n", " "))
    tokens = tokenizer.tokenize(text)  # type: ignore[attr-defined]
    ids = [tokenizer.cls_token_id, *tokenizer.convert_tokens_to_ids(tokens), tokenizer.sep_token_id]  # type: ignore[attr-defined]
    if len(ids) > limit:
        ids = ids[:limit - 1] + [tokenizer.sep_token_id]  # type: ignore[attr-defined]
    return ids


def shape_mismatches(state: dict[str, object], expected: dict[str, torch.Tensor]) -> list[str]:
    """``name: checkpoint shape vs model shape`` for each weight whose shape differs from the model built from
    --bert-dir: the names match for any BERT (a cased vocabulary of 28996 against 30522), so without this
    ``load_state_dict`` ended in a "size mismatch" traceback. A value that is no tensor counts as a mismatch."""
    out = []
    for name, want in expected.items():
        got = getattr(state[name], "shape", None)
        if got is None or tuple(got) != tuple(want.shape):
            shown = "no tensor" if got is None else tuple(got)
            out.append(f"{name}: {shown} in the checkpoint, {tuple(want.shape)} in the model")
    return out


def _one_line(exc: BaseException) -> str:
    """A library's error text on one short line (transformers and huggingface_hub indent a second one)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:200] + "..."


def _config_errors() -> tuple[type[BaseException], ...]:
    """What ``BertConfig.from_pretrained`` raises for a damaged config.json besides OSError: TypeError for JSON that
    is no object, and huggingface_hub's strict-dataclass error for a field of the wrong type (newer
    versions; older ones accept the value and fail in the model build, which ``_load_bert`` also catches)."""
    errors: tuple[type[BaseException], ...] = (TypeError, ValueError)
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return errors
    return (*errors, StrictDataclassError)


def _vocab_tokens(bert_dir: Path) -> set[str]:
    """The tokens of --bert-dir's vocab.txt, one a line as WordPiece reads them; bytes that are no UTF-8 made the
    tokenizer raise a bare Exception."""
    path = bert_dir / "vocab.txt"
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        fail(f"--bert-dir {bert_dir}: cannot read vocab.txt ({e.strerror or e})")
    except UnicodeDecodeError:
        fail(f"--bert-dir {bert_dir}: vocab.txt is not UTF-8 text (not a BERT WordPiece vocabulary)")
    return {line.rstrip() for line in text.split("\n")} - {""}


def _load_bert(bert_dir: Path) -> tuple[object, torch.nn.Module]:
    """Tokenizer and the labeler built from them, each file's damage refused in one line naming it: they
    were tracebacks (invalid JSON, a field of the wrong type, an empty vocabulary), or, for a vocabulary larger than
    the config's vocab_size, an IndexError once the first report was labelled."""
    from transformers import BertConfig, BertTokenizer

    try:
        bert_config = BertConfig.from_pretrained(str(bert_dir), local_files_only=True)
    except OSError:  # transformers' text repeats the path and suggests the hub
        fail(f"--bert-dir {bert_dir}: config.json cannot be read or is not valid JSON")
    except _config_errors() as e:
        fail(f"--bert-dir {bert_dir}: config.json is not a usable BERT config ({_one_line(e)})")
    vocab = _vocab_tokens(bert_dir)
    tokenizer = BertTokenizer.from_pretrained(str(bert_dir), local_files_only=True)
    unk = tokenizer.unk_token
    if unk not in vocab:
        fail(f"--bert-dir {bert_dir}: vocab.txt " + ("is empty" if not vocab else f"has no {unk} token") +
             " (not a BERT WordPiece vocabulary)")
    if len(tokenizer) > bert_config.vocab_size:
        fail(f"--bert-dir {bert_dir}: vocab.txt makes {len(tokenizer)} token ids, more than the vocab_size "
             f"{bert_config.vocab_size} of config.json: the two files are not from the same BERT")
    try:
        model = build_labeler(bert_config)
    except (ValueError, RuntimeError) as e:  # a hidden size the heads do not divide, a negative size
        fail(f"--bert-dir {bert_dir}: config.json does not describe a BERT that can be built ({_one_line(e)})")
    return tokenizer, model


def load(cfg: CheXbertConfig) -> tuple[torch.nn.Module, object]:
    """Labeler and tokenizer from local files only."""
    import torch

    from radtrt.model.io import load_weights_pickle

    cfg.check()
    tokenizer, model = _load_bert(cfg.bert_dir)
    checkpoint = load_weights_pickle(cfg.checkpoint)
    state = checkpoint.get("model_state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        fail(f"{cfg.checkpoint.name} is not a CheXbert checkpoint (no model_state_dict)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = model.state_dict()
    # Older transformers stored the position-id buffer; it carries no weights.
    state = {k: v for k, v in state.items() if k in expected or not k.endswith("position_ids")}
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        fail(f"{cfg.checkpoint.name} does not match the CheXbert architecture "
             f"({len(missing)} weights missing, {len(unexpected)} unexpected)")
    not_tensors = [name for name in expected if not isinstance(state[name], torch.Tensor)]
    if not_tensors:  # no BERT in --bert-dir can fix this: the file is something else
        more = f" (and {len(not_tensors) - 1} more values)" if len(not_tensors) > 1 else ""
        fail(f"{cfg.checkpoint} is not a CheXbert state dict: {not_tensors[0]} holds a "
             f"{type(state[not_tensors[0]]).__name__}, not a tensor{more}")
    differing = shape_mismatches(state, expected)
    if differing:
        fail(f"{cfg.checkpoint} does not match the BERT in --bert-dir {cfg.bert_dir} ({len(differing)} weights "
             f"differ in shape, e.g. {differing[0]}): give the bert-base-uncased the checkpoint was trained from")
    model.load_state_dict(state)
    return model.to(cfg.device).eval(), tokenizer


def chexbert_labels(reports: Sequence[str], cfg: CheXbertConfig) -> np.ndarray:
    """Label codes (n_reports, 14) in CheXbert's order (0 blank, 1 positive, 2 negative, 3 uncertain)."""
    import torch

    model, tokenizer = load(cfg)
    limit = min(MAX_TOKENS, int(model.bert.config.max_position_embeddings))
    encoded = [_encode(tokenizer, r, limit) for r in reports]
    out = np.zeros((len(reports), len(CONDITIONS)), dtype=np.int8)
    with torch.inference_mode():
        for start in range(0, len(encoded), cfg.batch_size):
            batch = encoded[start:start + cfg.batch_size]
            ids = torch.zeros(len(batch), max(len(b) for b in batch), dtype=torch.long)
            mask = torch.zeros_like(ids, dtype=torch.float32)
            for i, b in enumerate(batch):
                ids[i, :len(b)] = torch.tensor(b)
                mask[i, :len(b)] = 1.0
            logits = model(ids.to(cfg.device), mask.to(cfg.device))
            for j, head in enumerate(logits):
                out[start:start + len(batch), j] = head.argmax(dim=1).cpu().numpy()
    return out

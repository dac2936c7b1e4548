"""Reading prediction files: one JSON object per line, ``{"study", "reference", "prediction"}`` (or the released
LLaVA-Rad's ``{"id", "query", "reference", "prediction"}``).

Errors name the file and line number only, never report text or study identifiers, because both can be
patient data.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from radtrt.data.manifest import read_jsonl
from radtrt.errors import fail

FIELDS = ("study", "reference", "prediction")
# what a record of ``radtrt infer --json`` lacks to be scored, and where the README shows the join
INFER_RECORD_REMEDY = ("'radtrt infer --json' records carry no reference and call the prediction 'report': join each "
                       "with its ground-truth findings into {\"study\", \"reference\", \"prediction\"} (the "
                       "README's CLI table, 'radtrt eval' row)")
# ROUGE-L's table grows with the product of the two lengths: a runaway generation must not exhaust memory
MAX_REPORT_WORDS = 2000
# characters that show nothing beside those of the categories below: Unicode's default-ignorable fillers (the Hangul
# fillers among them), the combining grapheme joiner, the variation selectors, and the Braille blank (U+2800, a
# symbol that prints as a space)
_INVISIBLE = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180e\u180f\u2800\u3164\uffa0") \
    | frozenset(map(chr, [*range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0)]))
# controls, format (zero-width space, BOM), separators, marks (a lone combining acute accent has no letter to sit
# on: nothing a reader can score), private-use and unassigned code points (no glyph a reader shares)
_INVISIBLE_CATEGORIES = ("Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "Me", "Co", "Cn")
# rouge_score's tokenizer: lowercase, then runs of ASCII letters and digits (everything else separates). Counting
# whitespace-separated words let "effusion,effusion,..." (8000 ROUGE tokens) pass as one word.
_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")
# the metrics that read runs of ASCII letters and digits only (rouge_score's tokenizer, sacrebleu's 13a, which leaves
# unspaced CJK text one token, the offline phrase labeler), by the names a reader of their message knows: text with
# no such run is nothing to them. The CheXprompt judge reads any language, and CheXbert and RadGraph read their
# BERT's WordPiece tokens (which split CJK text into characters), so a reference need not have one for them.
ASCII_WORD_METRICS = {"rouge": "ROUGE", "bleu": "BLEU", "labels": "the offline labeler"}


@dataclass(frozen=True)
class ReportPair:
    """A generated findings section and the ground-truth one for the same study."""

    study: str
    reference: str
    prediction: str


def load_predictions(path: Path, metrics: Sequence[str] = tuple(ASCII_WORD_METRICS)) -> list[ReportPair]:
    """Parse a predictions JSONL file; every line must carry the three string fields, studies unique.

    ``metrics``: those the pairs will be scored with. A reference with no ASCII word is refused only when one of
    them reads ASCII words alone: a Chinese reference is ground truth for the CheXprompt judge.
    """
    ascii_readers = [key for key in ASCII_WORD_METRICS if key in metrics]
    if not path.is_file():
        fail(f"predictions file {path} " + ("is not a file" if path.exists() else "does not exist"))
    pairs: list[ReportPair] = []
    seen: set[str] = set()
    empty_references: list[int] = []  # line numbers, never study ids; empty: nothing visible
    wordless_references: list[int] = []  # visible, but nothing ROUGE or the labeler reads ("-", another script)
    for lineno, obj in read_jsonl(path, what="predictions file", row="predictions row",
                                  where=lambda n: f"{path.name} line {n}"):
        if "study" not in obj and isinstance(obj.get("id"), str):
            # the released LLaVA-Rad's own prediction files (llava/eval/model_mimic_cxr.py) name the study "id"
            obj = {**obj, "study": obj["id"]}
        for field in FIELDS:
            value = obj.get(field)
            if not isinstance(value, str):
                fail(f"{path.name} line {lineno}: field '{field}' is missing or not a string",
                     remedy=INFER_RECORD_REMEDY if field not in obj and "report" in obj else None)
            if not _is_unicode(value):
                fail(f"{path.name} line {lineno}: field '{field}' holds a lone surrogate escape (\\ud800-\\udfff), "
                     f"not text")
            words = report_words(value) if field != "study" else 0
            if words > MAX_REPORT_WORDS:
                fail(f"{path.name} line {lineno}: the {field} has {words} words (runs of letters and digits, as "
                     f"ROUGE counts them); reports up to {MAX_REPORT_WORDS} are scored (a findings section has a "
                     f"few hundred at most)")
        if obj["study"] in seen:
            fail(f"{path.name} line {lineno}: a study appears twice")
        seen.add(obj["study"])
        if not has_visible_text(obj["reference"]):
            empty_references.append(lineno)
        elif report_words(obj["reference"]) == 0:
            wordless_references.append(lineno)
        pairs.append(ReportPair(study=obj["study"], reference=obj["reference"], prediction=obj["prediction"]))
    if not pairs:
        fail(f"predictions file {path} has no records")
    if empty_references:
        # scored, an empty ground truth gave a perfect label F1 to any normal prediction, and went to the paid judge
        verb = "has" if len(empty_references) == 1 else "have"
        fail(f"{path.name}: {len(empty_references)} of {len(pairs)} rows {verb} an empty 'reference' (first at line "
             f"{empty_references[0]}), so there is no ground truth to score them against; usually the join of "
             f"predictions with the ground-truth findings failed for them: fix or drop those rows")
    if wordless_references and ascii_readers:
        # scored, a Chinese reference got ROUGE-L 0 against an identical prediction, and the offline labels read it
        # as "No Finding", a true positive for any prediction they could not read either
        verb = "has" if len(wordless_references) == 1 else "have"
        fail(f"{path.name}: {len(wordless_references)} of {len(pairs)} rows {verb} a 'reference' with no word to "
             f"score (first at line {wordless_references[0]}): {ascii_word_readers(metrics)} runs of ASCII letters "
             f"and digits only, so a reference in another script, or of punctuation alone such as '-', is no ground "
             f"truth for {'them' if len(ascii_readers) > 1 else 'it'}; give the English findings text, or drop "
             f"those rows; for references in another language, leave {','.join(ascii_readers)} out of --metrics "
             f"(the chexprompt judge reads any language)")
    return pairs


def ascii_word_readers(metrics: Sequence[str]) -> str:
    """Those of ``metrics`` that read ASCII words only, with the verb, for a message ("ROUGE and BLEU read", "BLEU
    reads"); "" if none: then text without an ASCII letter or digit is still something to score."""
    names = [name for key, name in ASCII_WORD_METRICS.items() if key in metrics]
    if not names:
        return ""
    return (f"{', '.join(names[:-1])} and {names[-1]} read" if len(names) > 1 else f"{names[0]} reads")


def has_visible_text(text: str) -> bool:
    """Whether ``text`` shows anything: a reference of zero-width spaces ("\\u200b") or other invisible
    characters passed the empty-reference check (``str.strip`` keeps them) and was scored as ground truth."""
    return any(not c.isspace() and c not in _INVISIBLE and unicodedata.category(c) not in _INVISIBLE_CATEGORIES
               for c in text)


def report_words(text: str) -> int:
    """How many tokens rouge_score makes of ``text`` (its ROUGE-L table is quadratic in them)."""
    return len(_ROUGE_TOKEN.findall(text.lower()))


def align_pairs(reference_arm: list[ReportPair], candidate_arm: list[ReportPair]
                ) -> tuple[list[ReportPair], list[ReportPair]]:
    """Order two arms by the same studies; they must cover the same studies with the same ground truth.

    A parity comparison over different study sets or different ground truth would compare nothing, so
    both are refused rather than silently intersected.
    """
    ref_by_study = {p.study: p for p in reference_arm}
    cand_by_study = {p.study: p for p in candidate_arm}
    only_ref = len(ref_by_study.keys() - cand_by_study.keys())
    only_cand = len(cand_by_study.keys() - ref_by_study.keys())
    if only_ref or only_cand:
        alike = len({_id_key(s) for s in ref_by_study.keys() - cand_by_study.keys()}
                    & {_id_key(s) for s in cand_by_study.keys() - ref_by_study.keys()})
        fail(f"the two prediction files cover different studies ({only_ref} only in the reference arm, "
             f"{only_cand} only in the candidate arm)" +
             (f"; {alike} of them are the same id written differently (a './' prefix, a doubled or trailing '/', "
              f"or accents composed (NFC) in one file and decomposed (NFD) in the other): write each study id the "
              f"same way in both files" if alike else ""))
    studies = [p.study for p in reference_arm]
    differing = sum(ref_by_study[s].reference != cand_by_study[s].reference for s in studies)
    if differing:
        fail(f"the ground-truth 'reference' text differs between the two files for {differing} studies")
    return [ref_by_study[s] for s in studies], [cand_by_study[s] for s in studies]


def _id_key(study: str) -> str:
    """A study id as it would compare had both files written it alike (paths normalised, Unicode composed): for the
    hint only, since ids are matched exactly (two ids of one file may share a key)."""
    return os.path.normpath(unicodedata.normalize("NFC", study))


def _is_unicode(text: str) -> bool:
    """JSON may escape a lone surrogate, which no encoder (the judge request, the cache key) accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True

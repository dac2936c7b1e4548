"""Findings text from structured labels (the paper's GPT-4 step), through a chat endpoint or templates.

Input: JSONL rows with ``image``, ``labels`` and optionally ``indication`` (other keys are kept).
``labels`` is either a list of positive label names or a CheXpert-style mapping
``{name: 1 | 0 | -1 | null}`` (positive, negative, uncertain, not mentioned).
Output: a training manifest, one row per input row in the same order, each marked with how its
text was made: ``synthesis: {"mode": "llm", "model", "endpoint"}`` or ``{"mode": "template", ...}``.

Resumable: rows already in the output are kept and skipped (checked to be the same images, made from the
same labels and indications with the same settings), and
the chat client's cache avoids paying twice for answers that were received but not yet written.
Template mode is deterministic: row ``i`` with seed ``s`` always gets the same text.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO
from urllib.parse import urlsplit

from rich.console import Console

from radtrt import interrupts
from radtrt.data.chat import ChatClient
from radtrt.data.manifest import optional_str, read_jsonl
from radtrt.data.reports import findings_text
from radtrt.data.vocabulary import DEVICE_LABELS, LABELS, NO_FINDING, Findings
from radtrt.errors import fail
from radtrt.locks import lock_file
from radtrt.outputs import check_file_target, make_dir, resolved
from radtrt.progress import make_progress, plain

PROMPT_VERSION = 1
# how a chat model's refusal begins ("I'm sorry, but I can't help with that."): never findings text. Not "I cannot
# exclude ...": a radiologist's first person is findings text
_I = r"i(?:['\u2019]?m| am)"  # I'm, Im, I am
_DECLINE = r"(?:help|assist|provide|comply|create|generate|write|fulfil|do that|produce|make)"
REFUSAL = re.compile(rf"^\W*(?:{_I} sorry|sorry\b|i apologi[sz]e|unfortunately,? i\b|{_I} afraid i|"
                     rf"i (?:can['\u2019]?t|cannot|can not|will not|won['\u2019]?t) {_DECLINE}|"
                     rf"(?:{_I} (?:unable|not able)|i['\u2019]?m not able) to {_DECLINE}|as an ai\b|"
                     rf"as a (?:large )?language model)", re.IGNORECASE)
# Recorded in every row, so a manifest begun under one version is not completed under another. What each
# version changed, for the refusal of a manifest an older radtrt began:
LABEL_RULE_CHANGES = {
    2: "rows whose findings were all uncertain were labelled no_finding",
    3: "rows whose only positive or uncertain findings were support devices were not labelled no_finding",
}
LABEL_RULES_VERSION = max(LABEL_RULE_CHANGES)
# CheXpert's No Finding ignores support devices; these are the phantom vocabulary's and CheXpert's names of them
DEVICE_NAMES = frozenset({*(_n.replace("_", " ") for _n in DEVICE_LABELS), "support devices"})
SYSTEM_PROMPT = ("You are an experienced radiologist. You write the findings section of chest radiograph reports "
                 "in the concise style of clinical reports.")
# CheXpert's 14 observations, phrased for template mode: (positive, negative, uncertain)
CHEXPERT_PHRASES = {
    "no finding": ("No acute cardiopulmonary abnormality.", "", ""),
    "enlarged cardiomediastinum": ("The cardiomediastinal silhouette is widened.",
                                   "The cardiomediastinal silhouette is within normal limits.",
                                   "The mediastinum may be slightly widened."),
    "cardiomegaly": ("The heart is enlarged.", "Heart size is normal.", "The heart is possibly enlarged."),
    "lung opacity": ("There is a pulmonary opacity.", "No focal opacity.", "A faint opacity cannot be excluded."),
    "lung lesion": ("There is a pulmonary nodule.", "No pulmonary nodules.", "A possible nodule is seen."),
    "edema": ("There is pulmonary edema.", "No pulmonary edema.", "Mild edema is possible."),
    "consolidation": ("There is focal consolidation.", "No focal consolidation.", "Possible early consolidation."),
    "pneumonia": ("Findings are concerning for pneumonia.", "No evidence of pneumonia.", "Pneumonia is possible."),
    "atelectasis": ("There is bibasilar atelectasis.", "No atelectasis.", "Possible minimal atelectasis."),
    "pneumothorax": ("There is a pneumothorax.", "No pneumothorax.", "A small pneumothorax cannot be excluded."),
    "pleural effusion": ("There is a pleural effusion.", "No pleural effusion.", "A small effusion is possible."),
    "pleural other": ("There is pleural thickening.", "", "Possible pleural thickening."),
    "fracture": ("There is a rib fracture.", "No acute fracture.", "A possible rib fracture is seen."),
    "support devices": ("Support devices are in place.", "", ""),
}


@dataclass(frozen=True)
class LabelSet:
    positive: tuple[str, ...]
    negative: tuple[str, ...] = ()
    uncertain: tuple[str, ...] = ()


def parse_labels(value: Any, where: str) -> LabelSet:
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        labels = LabelSet(tuple(value))
        _check_consistent(labels, where)
        return labels
    if isinstance(value, dict):
        groups: dict[int, list[str]] = {1: [], 0: [], -1: []}
        for name, v in value.items():
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v not in groups:
                fail(f"{where}: label '{name}' must be 1, 0, -1 or null")
            groups[v].append(str(name))
        labels = LabelSet(tuple(groups[1]), tuple(groups[0]), tuple(groups[-1]))
    else:
        fail(f"{where}: 'labels' must be a list of names or an object {{name: 1|0|-1|null}}")
    _check_consistent(labels, where)
    return labels


def _check_consistent(labels: LabelSet, where: str) -> None:
    """Refuse label rows that would make contradictory text ("The heart is enlarged. Heart size is normal.")."""
    named = Counter(_key(n) for n in (*labels.positive, *labels.negative, *labels.uncertain))
    repeated = sorted(n for n, times in named.items() if times > 1)  # counted once: list.count a name was quadratic
    if repeated:
        fail(f"{where}: label '{repeated[0]}' is given more than once (names differing only in case or spacing)")
    positive = {_key(n) for n in labels.positive}
    if "no finding" in positive and positive - DEVICE_NAMES - {"no finding"}:
        fail(f"{where}: 'No Finding' is positive together with other positive findings")
    uncertain = [n for n in labels.uncertain if _key(n) not in DEVICE_NAMES]  # No Finding ignores devices
    if "no finding" in positive and uncertain:  # CheXpert: No Finding only when nothing is even uncertain
        fail(f"{where}: 'No Finding' is positive together with uncertain findings ('{uncertain[0]}')")


def _key(name: str) -> str:
    return _readable(name).lower().strip()


def _readable(name: str) -> str:
    return name.replace("_", " ")


def llm_messages(labels: LabelSet, indication: str | None) -> list[dict[str, str]]:
    lines = ["Write the findings section of a frontal chest radiograph report consistent with these labels.",
             f"Positive findings: {', '.join(map(_readable, labels.positive)) or 'none'}."]
    if labels.negative:
        lines.append(f"Absent (state as negatives where a radiologist would): {', '.join(map(_readable, labels.negative))}.")
    if labels.uncertain:
        lines.append(f"Uncertain (hedge): {', '.join(map(_readable, labels.uncertain))}.")
    if indication:
        lines.append(f"Indication: {indication}")
    lines.append("Mention every positive finding with its side or location when the label gives one, state the "
                 "relevant negatives, invent no other findings, and answer with one paragraph of findings only "
                 "(no heading, no impression).")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n".join(lines)}]


def template_text(labels: LabelSet, rng: random.Random, where: str = "row") -> str:
    """Phantom-vocabulary labels get the phantom report generator (which states its own negatives, so a phantom
    label marked absent needs no sentence); CheXpert names get fixed phrases. ``where``: the row, for refusals."""
    phantom = set(LABELS)
    no_finding_negated = any(_key(n) == "no finding" for n in labels.negative)
    if not labels.positive and not labels.uncertain and no_finding_negated:
        # the fallback sentence below said "No acute cardiopulmonary abnormality." for {"No Finding": 0}
        fail(f"{where}: 'No Finding' is negated, yet no finding is positive or uncertain: no template text says "
             f"both; give the findings that make the study abnormal, or use --endpoint")
    if set(labels.positive) <= phantom and set(labels.negative) <= phantom and not labels.uncertain:
        # a 0 among phantom labels sent the row to CheXpert's phrases, which refused the phantom label as unknown
        return findings_text(Findings.from_labels(list(labels.positive)), rng)
    sentences = []
    for names, slot in ((labels.positive, 0), (labels.uncertain, 2), (labels.negative, 1)):
        for name in names:
            phrases = CHEXPERT_PHRASES.get(_readable(name).lower())
            if phrases is None and name in phantom:
                fail(f"{where}: template mode writes phantom labels ('{name}') as present or absent only, and "
                     f"without CheXpert's names beside them; use --endpoint for uncertain or mixed labels")
            if phrases is None:
                fail(f"{where}: template mode knows the phantom labels and CheXpert's 14 observations, not "
                     f"'{name}'; use --endpoint for other label sets")
            if phrases[slot]:
                sentences.append(phrases[slot])
    return " ".join(sentences) or CHEXPERT_PHRASES["no finding"][0]


def _positive_names(labels: LabelSet) -> list[str]:
    """The manifest's ``labels``: the positive findings (a manifest's list holds findings that are present), and
    ``no_finding`` by CheXpert's rule: only when no finding but support devices is positive or uncertain and
    No Finding is not negated. Uncertain findings are not listed as present, but a row of only uncertain or
    negative findings is no "no finding" either (it was, next to text such as "Pneumonia is possible"): it gets
    an empty list. Devices alone get no_finding beside them, as the phantom labeler reads such text."""
    positive = list(labels.positive)
    keys = {_key(n) for n in positive}
    if "no finding" in keys or keys - DEVICE_NAMES:
        return positive
    no_finding_negated = any(_key(n) == "no finding" for n in labels.negative)
    uncertain = [n for n in labels.uncertain if _key(n) not in DEVICE_NAMES]
    return positive if uncertain or no_finding_negated else [*positive, NO_FINDING]


def _has_lone_surrogate(value: Any) -> bool:
    """Whether a string anywhere in ``value`` (keys included) holds a lone surrogate, which JSON may escape
    ("\\ud800") but no encoder accepts. Walked without recursion: JSON as deep as the parser allows is no crash."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _check_unicode(obj: dict[str, Any], where: str) -> None:
    """Refuse a row with a lone surrogate escape before any request or output: writing the row failed with a
    UnicodeEncodeError traceback mid-run, after the endpoint was paid (template mode left an empty manifest)."""
    for key, value in obj.items():
        if _has_lone_surrogate(key) or _has_lone_surrogate(value):
            name = f"'{key}'" if not _has_lone_surrogate(key) else "a key"  # the message itself must encode
            fail(f"{where}: {name} holds a lone surrogate escape (\\ud800-\\udfff), not text")


def _text_or_none(value: Any) -> Any:
    """An indication as a manifest reader sees it (stripped, blank is none), so that a resume compares meaning."""
    return (value.strip() or None) if isinstance(value, str) else value


def _first_changed_input(done: list[dict[str, Any]], inputs: list[dict[str, Any]]) -> int | None:
    """Index of the first finished row whose labels or indication are not the label file's any more, or None.
    Why: a resume after the label file was edited (same images, other labels) kept the old findings and their
    old labels without a word; each row records what it was made from (``source_labels``, ``indication``)."""
    for index, (row, given) in enumerate(zip(done, inputs)):
        if row.get("source_labels") != given.get("labels") or \
                _text_or_none(row.get("indication")) != _text_or_none(given.get("indication")):
            return index
    return None


def _rebaser(source_dir: Path, out_dir: Path) -> Callable[[str], str]:
    """``image``, relative to the label file's folder, made relative to the output manifest's (absolute: as is).
    Resolved first: a reader joins the result to the manifest's real folder, where '..' follows symlinks. The two
    folders are resolved once, at the first relative image (not twice a row)."""
    bases: list[Path] = []

    def rebase(image: str) -> str:
        if Path(image).is_absolute():
            return image
        if not bases:
            bases.extend((resolved(source_dir), resolved(out_dir)))
        return os.path.relpath(bases[0] / image, bases[1])

    return rebase


def _same_image(written: Any, rebased: str, base: Path) -> bool:
    """A finished row's image against the label file's, both relative to the output's resolved folder ``base``:
    rows written by the radtrt before the rebasing spell an image in the same folder as given ('./png/a.png')."""
    if not isinstance(written, str):
        return False
    return os.path.normpath(base / written) == os.path.normpath(base / rebased)


def _older_rules(done: dict[str, Any], mode: dict[str, Any]) -> int | None:
    """The label-rules version of a row made with today's options under older rules (none recorded: 1)."""
    synthesis = done.get("synthesis")
    if not isinstance(synthesis, dict) or {**synthesis, "label_rules": mode["label_rules"]} != mode:
        return None
    version = synthesis.get("label_rules", 1)
    return version if isinstance(version, int) and not isinstance(version, bool) and version < mode[
        "label_rules"] else None


def _done_rows(out: Path, inputs: list[dict[str, Any]], mode: dict[str, Any], given: list[str]) -> int:
    """``given``: the label file's image paths as written (``inputs`` holds them rebased to the output)."""
    if not out.is_file():
        return 0
    done = [obj for _, obj in read_jsonl(out, complete_only=True)]  # checked before anything is changed
    base = resolved(out.parent) if done else out.parent
    for d, i, as_given in zip(done, inputs, given):
        if not _same_image(d.get("image"), i["image"], base):
            if d.get("image") == as_given:  # copied as written, relative to another folder than the manifest's
                fail(f"{out} was made by an older radtrt, which copied image paths as written ({as_given} names "
                     f"nothing beside it); delete it to make it again, or choose another -o")
            fail(f"{out} holds rows for other images than the label file; choose another -o")
    if len(done) > len(inputs):  # the label file's rows, and more: rows were removed from it since
        fail(f"{out} holds {len(done)} rows, more than the label file's {len(inputs)}; delete {out} to make it "
             f"again, or choose another -o")
    older = [v for v in (_older_rules(d, mode) for d in done) if v is not None]
    if older:  # the same options, an older radtrt: rerunning them cannot help
        changes = "; ".join(c for v, c in sorted(LABEL_RULE_CHANGES.items()) if v > min(older))
        fail(f"{out} was made with an older radtrt's label rules ({changes}); delete it to make it again, or "
             f"choose another -o")
    if any(d.get("synthesis") != mode for d in done):  # a resume must not mix two settings in one manifest
        fail(f"{out} holds rows made with other settings (template/endpoint, model, seed or temperature); "
             f"rerun with the same options, or choose another -o")
    changed = _first_changed_input(done, inputs)
    if changed is not None:
        fail(f"{out} holds rows made from other labels or indications than the label file's (first: row "
             f"{changed + 1}, image {given[changed]}); rerun with the label file they were made "
             f"from, or choose another -o")
    raw = out.read_bytes()
    if raw.strip() and not done:  # a file of someone else's (one line, no newline): never emptied
        fail(f"{out} exists and holds no finished manifest row; choose another -o (if a run was stopped while "
             f"writing its first row, delete {out} and rerun)")
    if raw and not raw.endswith(b"\n"):  # a run killed mid-line after its rows: drop the partial row, it is redone
        out.write_bytes(raw[: raw.rfind(b"\n") + 1])
    return len(done)


def _close_failed(handle: TextIO) -> None:
    """Close a handle whose last write failed. The row's unwritten rest is still buffered, so closing writes it
    again and fails again: left to the ExitStack, that second error (the same one) escaped the handler that names
    the file. The handle is closed even so, and what reached the file is at most a cut last line, which the rerun
    that completes the manifest drops."""
    try:
        handle.close()
    except OSError:  # the failure just caught, raised again by the flush inside close(): told by the caller
        return


def synthesize(labels_file: Path, out: Path, *, client: ChatClient | None, seed: int = 0, temperature: float = 0.0,
               console: Console | None = None) -> Path:
    """Write (or complete) the manifest ``out``; ``client`` None means template mode.

    Everything that can be refused (the output path, every row's labels, in template mode every
    row's text) is checked before ``out`` is opened, so a refusal leaves no empty manifest behind.
    Rows are written to ``OUT.partial`` and renamed to ``out`` once the last one is: a run stopped part way
    (an endpoint down, Ctrl-C) left an ordinary-looking manifest of its first rows under the final name, which
    training took as the whole set. A rerun completes ``OUT.partial``. An ``out`` short of the label file's rows
    (the label file grew since, or a radtrt before this wrote it row by row in place) is moved to ``OUT.partial``
    and completed there, so it too is never left short under its name.
    """
    check_file_target(out, "output manifest")
    target = out.with_name(out.name + ".partial")
    if target.is_dir():  # "give the file to write": the user gave -o OUT, and OUT.partial is radtrt's name
        fail(f"{target}, where the rows of -o {out} wait until the last is written, is a folder: move it away")
    check_file_target(target, "unfinished output manifest")
    for path, flag in ((out, "-o"), (target, f"-o {out}'s unfinished manifest")):
        if path.is_symlink():  # renamed into place, the link moved and the file it named was written in place
            fail(f"{flag} {path} is a symbolic link; give the path of the file itself")
        if path.exists() and path.samefile(labels_file):
            fail(f"{flag} {path} is the label file itself; choose another output manifest")
    if not (math.isfinite(temperature) and 0 <= temperature <= 2):
        fail(f"--temperature must be within 0-2, got {temperature}")
    rows = list(read_jsonl(labels_file, what="label file"))
    if not rows:
        fail(f"label file {labels_file} has no rows")
    inputs = [obj for _, obj in rows]
    parsed, indications = [], []
    for lineno, obj in rows:  # the file's own line numbers (blank lines included)
        where = f"{labels_file}:{lineno}"
        _check_unicode(obj, where)
        if not isinstance(obj.get("image"), str) or not obj["image"].strip():
            fail(f"{where}: 'image' is missing, empty or not a string")
        parsed.append(parse_labels(obj.get("labels"), where))
        indications.append(optional_str(obj, "indication", where))  # a number was turned into null silently
    # a manifest's relative paths are read against its own folder: kept as written, they broke when -o was elsewhere
    given = [obj["image"] for obj in inputs]
    rebase = _rebaser(labels_file.parent, out.parent)
    inputs = [{**obj, "image": rebase(obj["image"])} for obj in inputs]
    mode = ({"mode": "template", "generator": "radtrt.data.synthesize", "seed": seed} if client is None else
            {"mode": "llm", "model": client.model, "endpoint": urlsplit(client.url).netloc,
             "prompt_version": PROMPT_VERSION, "temperature": temperature, "seed": seed})
    mode["label_rules"] = LABEL_RULES_VERSION
    # every row's text before anything is moved: a refusal here left the manifest moved to OUT.partial
    templates = {i: template_text(parsed[i], random.Random(f"radtrt-synth-{seed}-{i}"), f"{labels_file}:{rows[i][0]}")
                 for i in range(len(inputs))} if client is None else {}
    make_dir(out.parent, "folder for the output manifest")
    kept = 0  # the rows in OUT.partial when an interrupt lands
    try:
        with contextlib.ExitStack() as stack:
            # two runs on one -o appended to one OUT.partial, and the first to end renamed it under the other
            stack.enter_context(lock_file(out.with_name(out.name + ".lock"), f"{{holder}} is writing {out} right now; "
                                          f"wait for it to end", "radtrt writes a manifest only where it can lock it, so "
                                          "that two runs never append to one: choose a folder on a local file system"))
            if out.exists():
                start = _done_rows(out, inputs, mode, given)
                if start == len(inputs):
                    return out  # whole already: nothing to ask
                if target.exists():
                    fail(f"both {out} and {target} exist, each an unfinished manifest; delete the one you do not want")
                try:
                    os.replace(out, target)  # checked (and a cut last line dropped) above: completed where it lands
                except OSError as e:
                    fail(f"cannot rename {out} to {target}: {e.strerror}")
            else:
                start = _done_rows(target, inputs, mode, given)
            progress = stack.enter_context(make_progress(console=console or Console(stderr=True), transient=True))
            handle: TextIO | None = None  # opened with the first row: an endpoint failing at once leaves no empty file
            task = progress.add_task("synthesizing reports", total=len(inputs), completed=start)
            kept = start
            for i in range(start, len(inputs)):
                obj, labels, indication = inputs[i], parsed[i], indications[i]
                if client is None:
                    text = templates[i]
                else:
                    text = client.complete(llm_messages(labels, indication), temperature=temperature, seed=seed,
                                           keep=lambda answer: not REFUSAL.match(answer))
                    if REFUSAL.match(text):  # written as findings, it went into training as a report; not quoted:
                        # a refusal may repeat the indication. Not cached: a rerun asks again
                        kept_rows = (f"the {kept} row{'s' if kept > 1 else ''} before it {'are' if kept > 1 else 'is'} kept in "
                                     f"{target}; " if kept else "")
                        reword = "reword that row's indication, or " if indication else ""
                        other = f" (with another, delete {target} first)" if kept else ""
                        again = ("at --temperature 0 a rerun is likely to get the same answer (it is not cached)"
                                 if temperature == 0 else "a rerun asks again (the refusal is not cached)")
                        fail(f"{labels_file}:{rows[i][0]}: the chat model declined to write findings (its answer "
                             f"begins like a refusal), which no manifest row may hold; {kept_rows}{again}: "
                             f"{reword}use a chat model that writes reports (--model){other}")
                row = {**obj, "findings": text, "indication": indication, "labels": _positive_names(labels),
                       "source_labels": obj.get("labels"), "synthesis": mode}
                if handle is None:
                    try:
                        handle = stack.enter_context(target.open("a", encoding="utf-8"))
                    except OSError as e:
                        fail(f"cannot write {target}: {e.strerror}")
                try:  # the rows before this one stay: a rerun completes the manifest
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                    handle.flush()
                    kept = i + 1
                except OSError as e:
                    _close_failed(handle)
                    fail(f"cannot write {target}: {e.strerror}")
                progress.advance(task)
            with interrupts.deferred():  # the rename and its record, as one
                try:
                    os.replace(target, out)  # under the lock: no other run appends to it meanwhile
                except OSError as e:
                    fail(f"cannot rename {target} to {out}: {e.strerror}")
                kept = 0
                interrupts.completed("manifest", out)
    except KeyboardInterrupt:  # the generic "interrupted" line was silent on the rows waiting in OUT.partial
        if kept:
            (console or Console(stderr=True)).print(
                plain(f"radtrt: interrupted; {kept} of {len(inputs)} rows are kept in {target}: run the same command "
                      f"again to complete it"), markup=False, highlight=False, soft_wrap=True)
            interrupts.explained()
        raise
    return out

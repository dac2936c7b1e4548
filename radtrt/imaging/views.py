"""Which projection a radiograph shows, read from its DICOM header by explicit, ordered rules.

LLaVA-Rad was trained and evaluated on frontal (PA/AP) chest radiographs; running it on a lateral
produces a confident but meaningless report. So the view must be known before a study folder is
reduced to one image, and the rules deciding it must be few and visible:

1. ``ViewPosition`` (0018,5101), upper-cased, when it is one of the projection terms of DICOM and
   common practice (``POSITION_TERMS``: "PA", "AP", "LL", "RL", "LAT", obliques, decubitus ...; "AP SUPINE",
   "AP ERECT" and "PA ERECT", the frontal projection with the posture added, read as AP or PA). Any
   other value is not echoed (a damaged or hand-edited header can hold a name there) and the next
   rules decide.
2. ``ViewCodeSequence`` (0054,0220) first item: by its coded concept from DICOM CID 4010 (code value and
   scheme, SNOMED CT or its legacy SNOMED-RT ids: the normative part of a code, and all some writers fill in),
   else by its code meaning ("postero-anterior" -> PA, "antero-posterior" -> AP, "left lateral" -> LL,
   "right lateral" -> RL, any other meaning containing "lateral" -> LATERAL). Where the two disagree (a
   writer that put "postero-anterior" beside AP's code) the code decides.
3. ``SeriesDescription`` then ``ProtocolName``: split into words on non-letters; the words
   LAT/LATERAL/LL/RL mean LATERAL, PA means PA, AP means AP. Used only when exactly one of these
   three is present ("CHEST PA" -> PA; "PA AND LAT" is ambiguous and gives nothing).
4. Otherwise "UNKNOWN".

Only "PA" and "AP" count as frontal. ImageLaterality is irrelevant to the projection and is
ignored. The free-text attributes are read, never logged or returned (they may hold PHI); only the
derived view code and the name of the rule that produced it leave this module.
"""

from __future__ import annotations

import re

from pydicom.dataset import Dataset

UNKNOWN_VIEW = "UNKNOWN"
FRONTAL_VIEWS: tuple[str, ...] = ("PA", "AP")  # in order of preference

_CODE_MEANINGS = {
    "posteroanterior": "PA",
    "anteroposterior": "AP",
    "leftlateral": "LL",
    "rightlateral": "RL",
}
# CID 4010 (DX View): (scheme, code value) -> view, SNOMED CT ("SCT") and the legacy SNOMED-RT ids ("SRT", "SNM3")
_CODES = {
    **dict.fromkeys((("SCT", "272479007"), ("SRT", "R-40888"), ("SNM3", "R-40888")), "PA"),
    **dict.fromkeys((("SCT", "399348003"), ("SRT", "R-10206"), ("SNM3", "R-10206")), "AP"),
    **dict.fromkeys((("SCT", "399173006"), ("SRT", "R-10236"), ("SNM3", "R-10236")), "LL"),
    **dict.fromkeys((("SCT", "399198007"), ("SRT", "R-10232"), ("SNM3", "R-10232")), "RL"),
    **dict.fromkeys((("SCT", "399067008"), ("SRT", "R-102CD"), ("SNM3", "R-102CD")), "LATERAL"),
}
_LATERAL_WORDS = frozenset({"LAT", "LATERAL", "LL", "RL"})
# ViewPosition's defined terms (PS3.3 C.8.11.5.1.1) and the other projections seen in chest practice
POSITION_TERMS = frozenset({"AP", "PA", "LL", "RL", "RLD", "LLD", "RLO", "LLO", "LAT", "LATERAL", "LAO", "RAO",
                            "LPO", "RPO", "OBL", "OBLIQUE", "LORDOTIC", "AP SUPINE", "AP ERECT", "PA ERECT"})
# the patient's posture added to a frontal projection: still the projection the model was trained on
_POSTURE_OF_FRONTAL = {"AP SUPINE": "AP", "AP ERECT": "AP", "PA ERECT": "PA"}


def is_frontal(view: str) -> bool:
    """True for the projections the model was trained on."""
    return view in FRONTAL_VIEWS


def _from_view_code(ds: Dataset) -> str | None:
    seq = ds.get("ViewCodeSequence")
    if not seq:
        return None
    item = seq[0]
    code = (str(item.get("CodingSchemeDesignator", "") or "").strip().upper(),
            str(item.get("CodeValue", "") or "").strip().upper())
    if code in _CODES:
        return _CODES[code]
    meaning = str(item.get("CodeMeaning", "") or "").lower()
    key = re.sub(r"[^a-z]", "", meaning)
    if not key:
        return None
    if key in _CODE_MEANINGS:
        return _CODE_MEANINGS[key]
    if "lateral" in key:
        return "LATERAL"
    return None


def _from_description(text: str) -> str | None:
    words = set(re.split(r"[^A-Z]+", text.upper()))
    found = set()
    if words & _LATERAL_WORDS:
        found.add("LATERAL")
    for view in FRONTAL_VIEWS:
        if view in words:
            found.add(view)
    return found.pop() if len(found) == 1 else None


def view_of(ds: Dataset) -> tuple[str, str]:
    """Return ``(view, rule)``: the projection and which header rule decided it.

    ``rule`` is one of "ViewPosition", "ViewCodeSequence", "SeriesDescription",
    "ProtocolName" or "none"; it lets callers report how much to trust the view.
    """
    position = " ".join(str(ds.get("ViewPosition", "") or "").split()).upper()
    if position in POSITION_TERMS:
        return _POSTURE_OF_FRONTAL.get(position, position), "ViewPosition"
    coded = _from_view_code(ds)
    if coded:
        return coded, "ViewCodeSequence"
    for keyword in ("SeriesDescription", "ProtocolName"):
        text = str(ds.get(keyword, "") or "")
        described = _from_description(text) if text else None
        if described:
            return described, keyword
    return UNKNOWN_VIEW, "none"

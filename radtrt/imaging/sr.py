"""Write the generated report as a DICOM Comprehensive SR that a PACS can file with the study.

Why Comprehensive SR (via highdicom): it is widely stored and displayed, highdicom builds and
validates it, and it allows every item needed here. The document is built after the pattern of
TID 2000 (Basic Diagnostic Imaging Report) without claiming that template:

    CONTAINER "Diagnostic Imaging Report" (LN 18748-4)
      HAS CONCEPT MOD  TEXT "Algorithm Name" / "Algorithm Version"  (TID 4019: the model)
      HAS OBS CONTEXT  observer type Device, device UID/name/manufacturer/model  (TID 1004)
      CONTAINS TEXT "Comment": research use only, not for diagnostic use, unverified
      CONTAINS CONTAINER "Findings" (DCM 121070)
        CONTAINS TEXT "Finding" (DCM 121071): the report text
          INFERRED FROM IMAGE "Best illustration of finding": the source image (DICOM input only)

Header: same Study Instance UID and patient/study modules as the source (copied by highdicom,
never logged), the source instance in the Current Requested Procedure Evidence Sequence,
VerificationFlag UNVERIFIED, CompletionFlag COMPLETE (PARTIAL for a report cut off at --max-new-tokens),
PreliminaryFlag PRELIMINARY,
Manufacturer "radtrt", ManufacturerModelName = model name, SoftwareVersions = (model version: which weights,
in which precision, on which backend; radtrt version), and a series description saying research use only. Character set UTF-8 so any
report text (and any source patient name) can be encoded.

PNG/JPEG input has no DICOM header: a new study is created with an anonymous patient, and no
evidence is referenced (there is no DICOM instance to point at).

The file is written to a temporary name in the output folder, flushed to disk and renamed, so an
interrupted run leaves either no SR or a complete one, never half a file.
"""

from __future__ import annotations

import datetime
import re
import warnings
from pathlib import Path
from typing import NoReturn

import highdicom as hd
from pydicom.charset import (CODES_TO_ENCODINGS, ESC, convert_encodings, default_encoding, handled_encodings,
                             python_encoding)
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid
from pydicom.valuerep import DA, TEXT_VR_DELIMS, TM

import radtrt
from radtrt.errors import fail
from radtrt.imaging.dicom import RAW_TEXT, TEXT_VRS, quiet
from radtrt.outputs import make_dir, remove_unfinished, replaced_atomically
from radtrt.imaging.study import SelectedImage

DISCLAIMER = (
    "RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE. This report was generated automatically by an "
    "AI model and has not been reviewed or verified by a physician."
)
MANUFACTURER = "radtrt"
_SERIES_NUMBER = 9901  # a high number keeps the AI series after the acquired ones in viewers
# Type 2 patient/study attributes highdicom reads from the evidence; absent ones become empty.
_TYPE2_DEFAULTS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                   "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                   "ReferringPhysicianName")
_BULK_GROUPS = (0x7FE0,)
_VALIDATED = ("PatientBirthDate", "StudyDate", "StudyTime", "PatientSex")  # highdicom parses these


def _conformant(keyword: str, value: object) -> bool:
    """Whether highdicom will accept the source's value of a patient/study attribute it validates."""
    if keyword == "PatientSex":
        return str(value) in ("", "M", "F", "O")
    try:
        (TM if keyword == "StudyTime" else DA)(value)
    except (ValueError, TypeError):
        return False
    return True


def _evidence_from_dicom(source: Dataset) -> Dataset:
    """The source header without pixel data, with missing Type 2 attributes filled as empty.

    A date, time or sex in the source that is not valid DICOM (``1980-01-02``, ``12:30:00``, ``Male``:
    common in hand-made exports) is left empty, as Type 2 allows: highdicom refuses to copy it, and its
    error would carry the value itself, patient data, into a message.
    """
    evidence = Dataset()
    for element in source:
        if element.tag.group not in _BULK_GROUPS:
            evidence.add(element)
    for keyword in _TYPE2_DEFAULTS:
        if keyword not in evidence:
            setattr(evidence, keyword, "")
    for keyword in _VALIDATED:
        if evidence.get(keyword) not in (None, "") and not _conformant(keyword, evidence.get(keyword)):
            setattr(evidence, keyword, "")
    return evidence


def _anonymous_evidence() -> Dataset:
    """A header for PNG/JPEG input: a fresh study of an anonymous patient."""
    now = datetime.datetime.now()
    evidence = Dataset()
    for keyword in _TYPE2_DEFAULTS:
        setattr(evidence, keyword, "")
    evidence.PatientName = "ANONYMOUS^"  # family name only; the caret makes that explicit
    evidence.StudyDate = now.strftime("%Y%m%d")
    evidence.StudyTime = now.strftime("%H%M%S")
    evidence.StudyInstanceUID = generate_uid()
    evidence.SeriesInstanceUID = generate_uid()
    evidence.SOPInstanceUID = generate_uid()
    evidence.SOPClassUID = SecondaryCaptureImageStorage
    return evidence


def _lo(text: str) -> str:
    """``text`` as a Long String (LO) value may hold it: 64 characters at most, no backslash (the value separator).
    A model folder's name went whole into the LO fields, and highdicom's ValueError (said as the source's header
    being at fault) stopped the SR of every study; the Algorithm Name item (free text) keeps it whole."""
    return text.replace("\\", "/")[:64]


def _content(report_text: str, model_name: str, model_version: str,
             source: Dataset | None) -> hd.sr.ContainerContentItem:
    root = hd.sr.ContainerContentItem(name=codes.LN.DiagnosticImagingReport)
    items = hd.sr.ContentSequence()
    items.extend(hd.sr.AlgorithmIdentification(name=model_name, version=model_version))
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[MANUFACTURER, model_name, model_version]),
        name=_lo(model_name),
        manufacturer_name=MANUFACTURER,
        model_name=_lo(model_name),
    )
    items.extend(hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device)))
    items.append(hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=DISCLAIMER,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))

    finding = hd.sr.TextContentItem(
        name=codes.DCM.Finding, value=report_text,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    if source is not None:
        finding.ContentSequence = hd.sr.ContentSequence([hd.sr.ImageContentItem(
            name=codes.DCM.BestIllustrationOfFinding,
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
            relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM)])
    findings = hd.sr.ContainerContentItem(
        name=codes.DCM.Findings, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    findings.ContentSequence = hd.sr.ContentSequence([finding])
    items.append(findings)
    root.ContentSequence = items
    return root


def build_sr(report_text: str, source: SelectedImage, *, model_name: str,
             model_version: str, complete: bool = True) -> hd.sr.ComprehensiveSR:
    """Build (but do not write) the SR document for one study; see the module docstring."""
    if not report_text.strip():
        fail("the model generated no findings text for it; no DICOM SR written (an empty report is not filed)")
    if not model_name.strip() or not model_version.strip():
        fail("model name and version are needed to write a DICOM SR")
    from_dicom = source.dataset is not None
    if from_dicom:
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            # the SR copies these: digits and dots, at most 64 (leading zeros, common in the field, pass)
            if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid := str(source.dataset.get(keyword, ""))) or len(uid) > 64:
                fail(f"{source.source_file.name}: its {keyword} is not a DICOM UID; no SR written")
    evidence = _evidence_from_dicom(source.dataset) if from_dicom else _anonymous_evidence()
    try:
        with quiet("highdicom|pydicom"):  # warnings of a header copied or written
            sr = _document(report_text, evidence, from_dicom, model_name, model_version, complete)
            if from_dicom:
                _check_decoded(sr, source)  # pydicom's warning on a value it cannot decode may quote it
    # the message may quote header values: not shown. KeyError: a SOP class highdicom has no IOD for (a vendor's)
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        why = "its SOP class is one highdicom cannot reference (a vendor's private class?)" if isinstance(e, KeyError) \
            else f"{type(e).__name__} from highdicom"
        fail(f"{source.source_file.name}: its DICOM header cannot be carried into an SR ({why}); no SR written")
    if not from_dicom and "CurrentRequestedProcedureEvidenceSequence" in sr:
        del sr.CurrentRequestedProcedureEvidenceSequence  # it would name a non-existent image
    return sr


def _check_decoded(sr: Dataset, source: SelectedImage) -> None:
    """Refuse an SR whose copied patient or study values the source's character set does not decode: pydicom
    decodes them anyway (its warning silenced above, since it could quote them), with replacement characters or,
    under the default repertoire (ASCII) or a term it does not know, as Latin-1 (UTF-8 bytes become ``MÃ¼ller``),
    and the SR, in UTF-8, would be filed under a patient name that differs from the source's, which a PACS cannot
    reconcile. The bytes :func:`radtrt.imaging.dicom.read_dicom` kept are decoded strictly; a header built in
    memory has none, and its values are looked at for replacement characters. The copied sequences' values are
    checked as ``_check_nested`` says (the report is radtrt's own text)."""
    raw: dict[int, bytes] = getattr(source.dataset, RAW_TEXT, {})
    value = source.dataset.get("SpecificCharacterSet")
    terms = [] if not value else [value] if isinstance(value, str) else list(value)
    for element in sr:
        if element.VR == "SQ" and element.tag in source.dataset:  # a sequence copied whole (OtherPatientIDsSequence,
            _check_nested(element, terms, source)  # ProcedureCodeSequence): its items' text was written unchecked
            continue
        if element.VR not in TEXT_VRS or element.value is None:
            continue
        copied = element.tag in source.dataset and source.dataset[element.tag].value == element.value
        data = raw.get(element.tag) if copied else None  # radtrt's own values (Manufacturer...) are not the source's
        # ESC left in a value: pydicom leaves some code extensions' escapes in (ISO 2022 IR 58, whose Python
        # codec it takes for one that reads them), and the SR would carry them as text
        if any(c in str(element.value) for c in ("\ufffd", "\x1b")) or (
                data is not None and not _decodes_strictly(data, terms)):
            _undecodable(source, element.keyword or str(element.tag))


def _check_nested(sequence: DataElement, terms: list[str], source: SelectedImage) -> None:
    """The copied sequence's text values, at any depth: read leniently like the top level's but without their bytes
    (``read_dicom`` keeps the top level's only), so refused where the decoding shows a guess: a replacement
    character or an escape left in, or anything beyond ASCII under the default repertoire (none declared)."""
    for item in sequence.value or []:
        for element in item:
            if element.VR == "SQ":
                _check_nested(element, terms, source)
            elif element.VR in TEXT_VRS and element.value is not None:
                text = str(element.value)
                if any(c in text for c in ("\ufffd", "\x1b")) or (not terms and not text.isascii()):
                    _undecodable(source, f"{sequence.keyword or sequence.tag} ({element.keyword or element.tag})")


def _undecodable(source: SelectedImage, what: str) -> NoReturn:
    fail(f"{source.source_file.name}: its {what} cannot be decoded in its character set "
         f"({_character_sets(source.dataset)}); no SR written (its report stands; a source whose SpecificCharacterSet "
         f"names its bytes' character set gets one)")


# pydicom's split of a value with code extensions: the run before the first escape, then one part per escape
_ESCAPED_PARTS = re.compile(b"(^[^\x1b]+|\x1b[^\x1b]*)")
_DEFAULT_AS_ASCII = {default_encoding: "ascii"}  # pydicom's default repertoire is Latin-1, the standard's ASCII


def _decodes_strictly(data: bytes, terms: list[str]) -> bool:
    """Whether the bytes of a text value decode in the declared character sets without a guess: pydicom's decoding
    (``pydicom.charset.decode_bytes``: code extensions, delimiters) with errors refused instead of replaced, the
    default repertoire taken as ASCII, and an undefined term decoding nothing but ASCII."""
    if data.isascii() and ESC not in data:
        return True  # the same text in every character set a header can declare
    defined = [_defined_term(term) for term in terms]
    if not terms or None in defined:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a stand-alone term among others: dropped, as when pydicom decoded the value
        encodings = [_DEFAULT_AS_ASCII.get(e, e) for e in convert_encodings(defined)]
    try:
        if ESC not in data:
            data.decode(encodings[0])
            return True
        for part in _ESCAPED_PARTS.findall(data):
            if not part.startswith(ESC):
                part.decode(encodings[0])
                continue
            length = 4 if part.startswith((b"\x1b$(", b"\x1b$)")) else 3
            encoding = CODES_TO_ENCODINGS.get(part[:length], "")
            encoding = _DEFAULT_AS_ASCII.get(encoding, encoding)
            if encoding not in encodings and encoding != "ascii":
                return False  # an escape to a character set the header does not declare, or to none at all
            if encoding in handled_encodings:  # Python's codec reads the escape sequences itself
                part.decode(encoding)
                continue
            body = part[length:]
            cut = next((i for i, byte in enumerate(body) if byte in TEXT_VR_DELIMS), len(body))
            body[:cut].decode(encoding)
            body[cut:].decode(encodings[0])  # a delimiter returns to the first character set
    except UnicodeDecodeError:
        return False
    return True


def _defined_term(term: str) -> str | None:
    """``term`` as a DICOM defined term, with the misspellings pydicom itself corrects (``ISO IR 100``,
    ``ISO-2022-IR-87``) read as the term meant; None for anything else (pydicom's fallback to any Python codec
    name is a guess a header cannot be held to)."""
    if term in python_encoding:
        return term
    if re.match("^ISO[^_]IR", term):
        patched = "ISO_IR" + term[6:]
    elif re.match("^(?=ISO.2022.IR.)(?!ISO 2022 IR )", term):
        patched = "ISO 2022 IR " + term[12:]
    else:
        return None
    return patched if patched in python_encoding else None


def _character_sets(dataset: Dataset) -> str:
    """The source's SpecificCharacterSet for a message: its defined terms, any other value only described (a
    hand-made header can hold anything there, a patient's name included)."""
    value = dataset.get("SpecificCharacterSet")
    if not value:
        return "ISO_IR 6, none given"
    terms = [value] if isinstance(value, str) else list(value)
    return "\\".join(t if _defined_term(t) is not None else "[not a DICOM defined term]" for t in terms)


def _document(report_text: str, evidence: Dataset, from_dicom: bool, model_name: str,
              model_version: str, complete: bool) -> hd.sr.ComprehensiveSR:
    return hd.sr.ComprehensiveSR(
        evidence=[evidence],
        content=_content(report_text, model_name, model_version,
                         evidence if from_dicom else None),
        series_instance_uid=generate_uid(),
        series_number=_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=_lo(model_name),
        # a list, not the tuple highdicom's hint suggests: pydicom warns on tuples for LO
        software_versions=[_lo(model_version), f"radtrt {radtrt.__version__}"],  # type: ignore[arg-type]
        series_description="AI draft report - research use only",
        is_complete=complete,  # PARTIAL: the report was cut off at --max-new-tokens
        is_final=False,
        is_verified=False,
        specific_character_set="ISO_IR 192",
    )


def write_sr(report_text: str, source: SelectedImage, out_dir: Path, *, model_name: str,
             model_version: str, complete: bool = True) -> Path:
    """Write one SR for the study into ``out_dir`` atomically; return its path.

    The file is named after the SR's own new SOP Instance UID (not the patient or the source
    file), so repeated runs never overwrite one another. It is created owner-read/write only,
    as befits a file carrying patient data.
    """
    sr = build_sr(report_text, source, model_name=model_name, model_version=model_version, complete=complete)
    out_dir = make_dir(Path(out_dir), "SR output folder")
    final = out_dir / f"SR_{sr.SOPInstanceUID}.dcm"
    try:
        with replaced_atomically(final, mode=0o600, held=True) as temp, quiet("highdicom|pydicom"):
            sr.save_as(temp, enforce_file_format=True)
    except OSError as exc:  # a full disk, say: this study's SR is not written, the others still are
        fail(f"cannot write an SR into folder {out_dir}: {exc.strerror or exc}")
    return final


def remove_unfinished_srs(out_dir: Path) -> int:
    """Remove the hidden half-written SRs (patient data, under temporary names) that a run killed while writing
    one left in ``out_dir``; how many. SRs that another run is writing right now stay."""
    try:
        return remove_unfinished(out_dir, r"SR_[0-9.]+\.dcm")
    except OSError as exc:
        fail(f"cannot clear the unfinished SRs in folder {out_dir}: {exc.strerror or exc}")

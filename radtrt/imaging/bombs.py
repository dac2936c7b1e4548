"""Decompression-bomb guards: how large a compressed DICOM will decode, read from its own headers before any decoder
allocates it.

Why: the Rows x Columns guard (``dicom._check_geometry``) trusts the DICOM header, and the decoders do not: a
deflated data set is inflated whole by pydicom before the header is even read (2 MB became 2 GiB in memory), and
a JPEG 2000 or JPEG codestream is decoded at the size its own SIZ / SOF marker declares (a 1.3 KB file declaring
60000 x 60000 peaked at 4 GB before the shape was found to disagree with the header). On a Jetson either ends
the process, with the study folder it was a stray file in.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pydicom.uid import (UID, DeflatedExplicitVRLittleEndian, JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes,
                         JPEGTransferSyntaxes)

from radtrt.errors import fail
from radtrt.imaging.pixels import MAX_PIXELS

# the largest data set radtrt reads: one frame of MAX_PIXELS pixels of 3 samples of 2 bytes, and a generous header
MAX_INFLATED = MAX_PIXELS * 3 * 2 + (64 << 20)
_PREAMBLE = 128 + 4  # preamble and 'DICM'
_GROUP_LENGTH = struct.Struct("<HH2sHI")  # (0002,0000) UL, explicit VR little endian: 12 bytes
_JP2_SIGNATURE = b"\x00\x00\x00\x0c\x6a\x50\x20\x20"


def check_inflated_size(path: Path, name: str) -> None:
    """Refuse a deflated data set that inflates to more than any image radtrt reads (:data:`MAX_INFLATED`), counted
    as it streams through zlib, never held. Other transfer syntaxes, and files whose file meta group has no group
    length (so no known end), are left to pydicom."""
    meta = read_file_meta_info(path)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return
    with path.open("rb") as f:
        f.seek(_PREAMBLE)
        head = f.read(_GROUP_LENGTH.size)
        if len(head) < _GROUP_LENGTH.size:
            return
        group, element, vr, _, length = _GROUP_LENGTH.unpack(head)
        if (group, element, vr) != (0x0002, 0x0000, b"UL"):
            return
        f.seek(length, 1)
        inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
        while not inflater.eof and (chunk := f.read(1 << 20)):
            while chunk and not inflater.eof:
                total += len(inflater.decompress(chunk, 1 << 24))
                if total > MAX_INFLATED:
                    fail(f"{name}: its deflated data set inflates to more than {MAX_INFLATED >> 20} MB, more than any "
                         f"radiograph holds (decompression bomb guard)")
                chunk = inflater.unconsumed_tail


def codestream_size(frame: bytes, transfer_syntax: UID) -> tuple[int, int] | None:
    """(width, height) that a compressed frame's own codestream declares (JPEG 2000's SIZ, JPEG's and JPEG-LS's SOF
    marker), or None where it cannot be read here (the decoder then judges it)."""
    try:
        if transfer_syntax in JPEG2000TransferSyntaxes:
            return _j2k_size(frame)
        if transfer_syntax in JPEGTransferSyntaxes or transfer_syntax in JPEGLSTransferSyntaxes:
            return _jpeg_size(frame)
    except (IndexError, struct.error):  # a codestream cut short: the decoder says so in its own words
        return None
    return None


def _j2k_size(frame: bytes) -> tuple[int, int] | None:
    """ISO/IEC 15444-1 A.5.1: SOC, then SIZ (Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz), after a JP2 file's boxes."""
    offset = 0
    if frame.startswith(_JP2_SIGNATURE):  # find the contiguous codestream box, 'jp2c'
        offset = 12
        while frame[offset + 4:offset + 8] != b"jp2c":
            (length,) = struct.unpack(">I", frame[offset:offset + 4])
            if length < 8:  # 0 (to the end) or 1 (a 64-bit length) before the codestream: not looked into
                return None
            offset += length
        offset += 8
    if frame[offset:offset + 4] != b"\xff\x4f\xff\x51":
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">4I", frame[offset + 8:offset + 24])
    return xsiz - xosiz, ysiz - yosiz


_SOF = {bytes([0xFF, marker]) for marker in (*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC),
                                             *range(0xCD, 0xD0), 0xF7)}  # JPEG's SOF0..15 but DHT/JPG/DAC, JPEG-LS's SOF55


def _jpeg_size(frame: bytes) -> tuple[int, int] | None:
    """ISO/IEC 10918-1 B.2.2 (and 14495-1's SOF55, laid out alike): the frame header's Y (lines) and X."""
    if frame[:2] != b"\xff\xd8":
        return None
    offset = 2
    while frame[offset:offset + 2] not in _SOF:
        if frame[offset] != 0xFF:
            return None
        marker = frame[offset + 1]
        if marker == 0xFF:  # a fill byte before a marker (B.1.1.2)
            offset += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            offset += 2
        elif marker == 0xDA:  # a scan before any frame header: not a frame this reads
            return None
        else:
            (length,) = struct.unpack(">H", frame[offset + 2:offset + 4])
            offset += 2 + length
    lines, samples = struct.unpack(">HH", frame[offset + 5:offset + 9])
    return (samples, lines) if lines else None  # 0 lines: given later, by a DNL marker after the first scan

"""Image sizes (and the JPEG EXIF orientation) from a file's first bytes, without decoding it: readers
turn normalised labels into pixels by the size a person saw, for 100k images in seconds."""

from __future__ import annotations

import struct
from pathlib import Path

# JPEG frame headers usually sit within the first few kB; EXIF thumbnails can push them to ~64 kB.
HEADER_BYTES = 1 << 17


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) in pixels of the image as displayed, from a JPEG or PNG header, or None if the bytes
    are neither or cut short. A JPEG whose EXIF orientation turns it by 90 degrees (5-8) is displayed, and
    labelled, with width and height swapped; the shard writer stores it turned that way.

    Reads the header only, so it costs microseconds rather than a full decode.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return (width, height) if width and height else None
    frame = jpeg_frame(data)
    if frame is None:
        return None
    width, height, orientation = frame
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return (width, height) if width and height else None


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(width, height) as stored and the EXIF orientation (1-8; 1 when absent) of a JPEG, from its header;
    None when the bytes are not a JPEG or are cut short before the frame header."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, orientation = 2, 1
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length field
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\x00\x00":
            orientation = exif_orientation(data[pos + 10 : pos + 2 + length])
        # SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return width, height, orientation
        pos += 2 + length
    return None


def exif_orientation(tiff: bytes) -> int:
    """The EXIF orientation tag (1-8; 1: as stored) of a JPEG's APP1 payload after ``Exif\0\0``; 1 when
    absent or unreadable."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", tiff[4:8])
    if ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
        tag, kind = struct.unpack(order + "HH", tiff[entry : entry + 4])
        if tag == 0x0112 and kind == 3:  # Orientation, SHORT
            (value,) = struct.unpack(order + "H", tiff[entry + 8 : entry + 10])
            return value if 1 <= value <= 8 else 1
    return 1


def header_size(path: Path) -> tuple[int, int] | None:
    """``image_size`` from the file's first bytes, reading the whole file only if the header runs longer."""
    try:
        with path.open("rb") as f:
            head = f.read(HEADER_BYTES)
            return image_size(head) or image_size(head + f.read())
    except OSError:
        return None

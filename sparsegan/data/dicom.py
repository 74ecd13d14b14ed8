"""DICOM OCT input for screening: every frame of a (multi-frame) DICOM file is one B-scan.

Ophthalmic Tomography Image Storage files (a volume: one frame per B-scan), and any other
grayscale DICOM image, are read with pydicom; each frame then goes through the conversion of image
files (:func:`sparsegan.data.preprocess.gray_from_array`: 8-bit as is, deeper data stretched from
its own min..max). MONOCHROME1 (low values white) is inverted first, so that bright is bright. A
DICOM file without pixel data, or with colour data, raises SkipImage naming what it holds.
"""

from __future__ import annotations

import os

import numpy as np

from . import DICOM_EXTENSIONS  # noqa: F401 - re-exported: the files this module reads
from .preprocess import SkipImage

OPHTHALMIC_TOMOGRAPHY = "1.2.840.10008.5.1.4.1.1.77.1.5.4"  # SOP class UID
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")


def is_dicom(path: str | os.PathLike) -> bool:
    """A DICOM Part 10 file: ``DICM`` after the 128-byte preamble (whatever its name)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _read(path: str | os.PathLike, pixels: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError) as exc:
        raise SkipImage(f"unreadable DICOM: {' '.join(str(exc).split())[:100]}") from None


def _what(ds) -> str:
    """The SOP class, by name when pydicom knows it."""
    uid = ds.get("SOPClassUID")
    return (getattr(uid, "name", "") or str(uid)) if uid else "no SOP class"


def _check_image(ds) -> None:
    if ds.get("Rows") is None:  # image data has rows (the pixels themselves may not be read)
        raise SkipImage(f"DICOM without image data ({_what(ds)})")
    pi = str(ds.get("PhotometricInterpretation", ""))
    if pi not in GRAYSCALE or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise SkipImage(f"DICOM {pi or 'without PhotometricInterpretation'} data, not grayscale "
                        f"B-scans ({_what(ds)})")


def read_header(path: str | os.PathLike) -> tuple[int, str]:
    """``(number of B-scans, series instance UID or "")`` of a DICOM file (header only; the
    series is the volume its frames belong to); SkipImage when it holds no grayscale image."""
    ds = _read(path, pixels=False)
    _check_image(ds)
    return max(1, int(ds.get("NumberOfFrames", 1) or 1)), str(ds.get("SeriesInstanceUID", ""))


def read_frames(path: str | os.PathLike) -> np.ndarray:
    """All frames of a grayscale DICOM image, ``(F, rows, columns)``, bright = high."""
    ds = _read(path, pixels=True)
    _check_image(ds)
    try:
        frames = np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - e.g. a compressed transfer syntax without a decoder
        raise SkipImage(f"DICOM pixel data cannot be decoded: "
                        f"{' '.join(str(exc).split())[:100]}") from None
    if frames.ndim == 2:
        frames = frames[None]
    if str(ds.PhotometricInterpretation) == "MONOCHROME1":
        frames = frames.max() - frames.astype(np.float32)
    return frames

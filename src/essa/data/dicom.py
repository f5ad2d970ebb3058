"""DICOM files through pydicom: one image per frame.

Grey images go through, in order: the modality LUT (``RescaleSlope`` / ``RescaleIntercept``: stored values to
e.g. Hounsfield units), a window (``window=(centre, width)`` from the config, else the file's first
``WindowCenter`` / ``WindowWidth``, else ``percentiles`` if given, else the file's min..max; see
``images.to_uint8``), then ``MONOCHROME1`` inversion (255 - v, so that higher values are brighter as in
``MONOCHROME2``). Colour images (``SamplesPerPixel`` 3) are used as decoded by pydicom, without LUTs.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut

from essa.data import images


def header(path: str) -> tuple[int, str | None]:
    """``(number of frames, PatientID or None)``, read without the pixel data."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return int(ds.get("NumberOfFrames") or 1), str(ds.get("PatientID") or "") or None


def _first(value) -> float:
    # WindowCenter / WindowWidth may hold several windows; the first is the default one.
    return float(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)


def tag_window(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """The file's default window ``(centre, width)``, or None when it has none."""
    if "WindowCenter" in ds and "WindowWidth" in ds:
        return _first(ds.WindowCenter), _first(ds.WindowWidth)
    return None


@functools.lru_cache(maxsize=2)
def _frames(path: str, mtime_ns: int, window, percentiles) -> np.ndarray:
    # Cached per process: a multi-frame file is read once, not once per frame.
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames == 1:
        pixels = pixels[None]
    if int(ds.get("SamplesPerPixel") or 1) == 3:
        return pixels.astype(np.uint8)
    values = apply_modality_lut(pixels, ds)
    lo, hi = images.intensity_range(values, window or tag_window(ds), percentiles)
    grey = images.to_uint8(values, lo, hi)
    return 255 - grey if ds.get("PhotometricInterpretation") == "MONOCHROME1" else grey


def frames(path: str, window=None, percentiles=None) -> np.ndarray:
    """All frames as uint8, shape (frames, H, W) for grey or (frames, H, W, 3) for colour."""
    return _frames(path, os.stat(path).st_mtime_ns, window, percentiles)

"""Decoding and intensity normalisation: any image becomes an 8-bit RGB ``PIL.Image``.

What the model sees (the documented normalisation, before ``transforms`` turns it into a float tensor):

- 8-bit grayscale (``L``), palette (``P``), bilevel (``1``), CMYK and alpha images (``LA``, ``RGBA``: the alpha
  channel is dropped, not composited) are converted with PIL; grey levels are copied into the 3 channels.
- 16-bit, 32-bit integer and float images (``I;16``, ``I``, ``F``), and DICOM / NIfTI intensities, are mapped
  linearly to 0..255 by ``to_uint8``: ``lo`` maps to 0, ``hi`` to 255, values outside are clipped. ``lo..hi`` is
  a window (centre ``c``, width ``w``: ``c - w/2 .. c + w/2``), or percentiles of the intensities, or by default
  the image's own min..max.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from essa.data.records import DataError

# PIL modes whose values do not fit 8 bits: rescaled through to_uint8 rather than clipped by PIL's convert.
_WIDE_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")


def intensity_range(
    values: np.ndarray,
    window: tuple[float, float] | None = None,
    percentiles: tuple[float, float] | None = None,
) -> tuple[float, float]:
    """``(lo, hi)``: the window ``(centre, width)`` if given, else these percentiles of ``values``, else min..max."""
    if window is not None:
        centre, width = (float(v) for v in window)
        if not width > 0:
            raise DataError(f"window width must be positive, got centre={centre:g} width={width:g}")
        return centre - width / 2, centre + width / 2
    if percentiles is not None:
        low, high = np.percentile(values, percentiles)
        return float(low), float(high)
    return float(np.min(values)), float(np.max(values))


def to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``lo..hi`` linearly to 0..255 (rounded, clipped); an empty range (constant image) gives zeros."""
    values = np.asarray(values, dtype=np.float32)
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)


def from_array(pixels: np.ndarray) -> Image.Image:
    """A uint8 array (H, W), (H, W, 1) or (H, W, 3) as an ``L`` or ``RGB`` image."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
        raise DataError(f"expected a uint8 image array of shape (H, W) or (H, W, 3), got {pixels.dtype} {pixels.shape}")
    return Image.fromarray(np.ascontiguousarray(pixels))


def to_rgb(image: Image.Image) -> Image.Image:
    """The 8-bit RGB image the model sees (see the module docstring for each mode)."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_MODES:
        values = np.asarray(image)
        image = Image.fromarray(to_uint8(values, *intensity_range(values)))
    return image.convert("RGB")


def open_image(path: str | Path) -> Image.Image:
    """Decode an ordinary image file completely, in its own mode (a truncated file raises ``OSError`` here)."""
    with Image.open(path) as image:
        image.load()
        return image

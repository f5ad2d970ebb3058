"""NIfTI volumes through nibabel: 2-D slices along one axis.

Volumes are first reoriented to the closest canonical (RAS+) orientation, so ``axis`` means the same in every
file: 0 sagittal, 1 coronal, 2 axial (the default). Slice ``k`` along ``axis`` is ``volume.take(k, axis)``,
rotated by 90 degrees (``np.rot90``) so that the last remaining axis points up: axial slices show anterior at
the top and the patient's right on the image's right (neurological convention).

Intensities: ``window=(centre, width)`` if given, else clipping to ``percentiles`` of the whole volume
(default 0.5 and 99.5, robust to a few extreme voxels), mapped to 0..255 (``images.to_uint8``). One mapping per
volume, so the slices of a volume stay comparable.
"""

from __future__ import annotations

import functools
import os

import nibabel as nib
import numpy as np

from essa.data import images
from essa.data.records import DataError

DEFAULT_PERCENTILES = (0.5, 99.5)


def _check_shape(path: str, shape: tuple[int, ...]) -> None:
    if len(shape) < 2 or (len(shape) > 3 and any(n != 1 for n in shape[3:])):
        raise DataError(f"{path}: expected a 2-D image or 3-D volume, got a NIfTI array of shape {shape}")


def _is_2d(shape: tuple[int, ...]) -> bool:
    return all(n == 1 for n in shape[2:])


def count(path: str, axis: int = 2) -> int:
    """Number of slices along ``axis`` (canonical orientation), read from the header only; 1 for a 2-D image."""
    if axis not in (0, 1, 2):
        raise DataError(f"NIfTI slicing axis must be 0, 1 or 2, got {axis!r}")
    img = nib.load(path)
    _check_shape(path, img.shape)
    if _is_2d(img.shape):
        return 1
    # io_orientation row i: the canonical axis that voxel axis i becomes.
    canonical_axis = nib.orientations.io_orientation(img.affine)[:, 0]
    return int(img.shape[int(np.flatnonzero(canonical_axis == axis)[0])])


@functools.lru_cache(maxsize=2)
def _slices(path: str, mtime_ns: int, axis: int, window, percentiles) -> np.ndarray:
    # Cached per process: a volume is decompressed once, not once per slice.
    img = nib.load(path)
    _check_shape(path, img.shape)
    if _is_2d(img.shape):  # one image, whatever the axis: no reorientation of a plane
        stack = np.asarray(img.dataobj, dtype=np.float32).reshape(1, *img.shape[:2])
    else:
        volume = np.asarray(nib.as_closest_canonical(img).dataobj, dtype=np.float32)
        stack = np.moveaxis(volume.reshape(volume.shape[:3]), axis, 0)
    lo, hi = images.intensity_range(stack, window, None if window else percentiles or DEFAULT_PERCENTILES)
    return np.ascontiguousarray(np.rot90(images.to_uint8(stack, lo, hi), axes=(1, 2)))


def slices(path: str, axis: int = 2, window=None, percentiles=None) -> np.ndarray:
    """All slices along ``axis`` as uint8, shape (slices, H, W)."""
    return _slices(path, os.stat(path).st_mtime_ns, axis, window, percentiles)

"""Writers for the small files the data tests make (PNG, DICOM, NIfTI, npz), and the shared real data."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import set_pixel_data
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from tests.conftest import SHARED


@pytest.fixture
def shared_data() -> Path:
    path = SHARED / "data"
    if not (path / "README.md").is_file():
        pytest.skip(f"shared real images not found at {path} (set ESSA_SHARED)")
    return path


def write_image(path: Path, value=0, size=(8, 8), mode="L", fmt=None) -> Path:
    """A constant image (``value`` a grey level or an RGB tuple), or ``value`` as the pixel array if an array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(value) if isinstance(value, np.ndarray) else Image.new(mode, size, value)
    image.save(path, format=fmt)
    return path


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **tags) -> Path:
    """A secondary-capture DICOM file with ``pixels`` ((H, W), (frames, H, W) or (H, W, 3)) and extra ``tags``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    set_pixel_data(ds, pixels, photometric, pixels.dtype.itemsize * 8)
    for name, value in tags.items():
        setattr(ds, name, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_nifti(path: Path, volume: np.ndarray, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, np.eye(4) if affine is None else affine), path)
    return path


def write_npz(path: Path, sizes=(6, 2, 2), labels_shape=lambda n: (n,), channels=None, classes=2) -> Path:
    """A MedMNIST-style npz: split s has images filled with their row number and labels ``row % classes``."""
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes):
        shape = (n, 4, 4) if channels is None else (n, 4, 4, channels)
        rows = np.arange(n, dtype=np.uint8).reshape(n, *[1] * (len(shape) - 1))
        arrays[f"{split}_images"] = rows * np.ones(shape, np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % classes).astype(np.uint8).reshape(labels_shape(n))
    np.savez(path, **arrays)
    return path

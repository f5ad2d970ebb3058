"""The file types essa reads, and how one file becomes records (frames, slices) and images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from essa.data import dicom, images, nifti
from essa.data.records import DataError, Record

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_EXTENSIONS = (".dcm", ".dicom")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")
EXTENSIONS = IMAGE_EXTENSIONS + DICOM_EXTENSIONS + NIFTI_EXTENSIONS
LOOKED_FOR = "looked for " + " ".join(EXTENSIONS)


def extension(path: str | Path) -> str:
    """Lower-case extension, ``.nii.gz`` counted as one."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def is_image(path: str | Path) -> bool:
    return extension(path) in EXTENSIONS


def _pair(value, name: str) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise DataError(f"{name} must be two numbers, got {value!r}") from None
    return low, high


@dataclass(frozen=True)
class Decode:
    """How DICOM and NIfTI intensities become grey levels (see ``essa.data.dicom`` and ``essa.data.nifti``).

    Attributes:
        window: ``(centre, width)`` in the file's units (e.g. Hounsfield units); overrides DICOM window tags.
        percentiles: clip to these percentiles of each file's intensities (NIfTI default: 0.5, 99.5).
        axis: NIfTI slicing axis in canonical orientation (0 sagittal, 1 coronal, 2 axial).
    """

    window: tuple[float, float] | None = None
    percentiles: tuple[float, float] | None = None
    axis: int = 2

    def __post_init__(self):
        # Tuples of floats: hashable, for the per-process caches of decoded volumes.
        object.__setattr__(self, "window", _pair(self.window, "window"))
        object.__setattr__(self, "percentiles", _pair(self.percentiles, "percentiles"))


def expand(file: str, decode: Decode, label=None, group: str | None = None, split: str | None = None) -> list[Record]:
    """The records of one file: one per DICOM frame or NIfTI slice, one for an ordinary image.

    DICOM records take the file's PatientID as group (when no group is given), NIfTI slices their volume's path,
    so that frames and slices of one scan never land in different splits. A file whose header cannot be read
    gives one record; reading it fails later and is reported as unreadable, not here.
    """
    kind = extension(file)
    if kind in DICOM_EXTENSIONS:
        try:
            frames, patient = dicom.header(file)
        except Exception:  # pydicom raises many types for damaged files
            frames, patient = 1, None
        group = group or patient or (file if frames > 1 else None)
        if frames == 1:
            return [Record(file, label, group, split)]
        return [Record(f"{file}#frame={i}", label, group, split, i) for i in range(frames)]
    if kind in NIFTI_EXTENSIONS:
        try:
            count = nifti.count(file, decode.axis)
        except DataError:
            raise
        except Exception:  # nibabel raises many types for damaged files
            count = 1
        return [Record(f"{file}#axis{decode.axis}={i}", label, group or file, split, i) for i in range(count)]
    return [Record(file, label, group, split)]


def read(record: Record, decode: Decode) -> Image.Image:
    """Decode one record of a file in its own mode (``L``/``RGB`` for DICOM and NIfTI, as stored for images)."""
    kind = extension(record.file)
    if kind in DICOM_EXTENSIONS:
        return images.from_array(dicom.frames(record.file, decode.window, decode.percentiles)[record.index or 0])
    if kind in NIFTI_EXTENSIONS:
        stack = nifti.slices(record.file, decode.axis, decode.window, decode.percentiles)
        return images.from_array(stack[record.index])
    return images.open_image(record.file)

import numpy as np
import pytest

from essa import data

from .conftest import write_dicom, write_nifti

STORED = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)


def grey(source, record=0) -> list:
    image = source.read(source.records[record])
    assert image.mode == "L"
    return np.asarray(image).tolist()


def test_dicom_rescale_then_window_from_tags(tmp_path):
    # Stored 0..4000, intercept -1024 -> -1024, -24, 976, 2976 HU; window 976 +- 1000 -> -24..1976.
    path = write_dicom(tmp_path / "ct.dcm", STORED, RescaleSlope=1, RescaleIntercept=-1024,
                       WindowCenter=976, WindowWidth=2000, PatientID="P7")
    source = data.open_source(path)
    assert grey(source) == [[0, 0], [128, 255]]
    assert source.records[0].group == "P7" and source.records[0].index is None


def test_dicom_window_from_config_overrides_tags_and_slope_applies(tmp_path):
    # Slope 0.5: 0, 500, 1000, 2000; window (1000, 1000) -> 500..1500.
    path = write_dicom(tmp_path / "ct.dcm", STORED, RescaleSlope=0.5, RescaleIntercept=0,
                       WindowCenter=40, WindowWidth=400)
    assert grey(data.open_source(path, window=(1000, 1000))) == [[0, 0], [128, 255]]


def test_dicom_monochrome1_is_inverted(tmp_path):
    path = write_dicom(tmp_path / "xr.dcm", STORED, photometric="MONOCHROME1")
    assert grey(data.open_source(path)) == [[255, 191], [127, 0]]  # min..max 0..4000, then 255 - v


def test_dicom_multi_frame_gives_one_record_per_frame(tmp_path):
    frames = np.stack([STORED, STORED // 2, np.full_like(STORED, 4000)])
    path = write_dicom(tmp_path / "cine.dcm", frames)
    source = data.open_source(path)
    assert [r.path for r in source.records] == [f"{path}#frame={i}" for i in range(3)]
    assert {r.group for r in source.records} == {str(path)}  # frames of one file stay in one split
    assert grey(source, 1) == [[0, 32], [64, 128]]  # one min..max for the whole file
    assert grey(source, 2) == [[255, 255], [255, 255]]


def test_dicom_colour(tmp_path):
    pixels = np.zeros((2, 2, 3), np.uint8)
    pixels[0, 1] = (200, 100, 50)
    source = data.open_source(write_dicom(tmp_path / "rgb.dcm", pixels, photometric="RGB"))
    assert np.asarray(source.load(source.records[0]))[0, 1].tolist() == [200, 100, 50]


def test_dicom_folder_with_classes_groups_by_patient(tmp_path):
    write_dicom(tmp_path / "a" / "1.dcm", STORED, PatientID="P1")
    write_dicom(tmp_path / "a" / "2.dcm", STORED, PatientID="P1")
    write_dicom(tmp_path / "b" / "3.dcm", STORED, PatientID="P2")
    source = data.open_source(tmp_path)
    assert [(r.label, r.group) for r in source.records] == [(0, "P1"), (0, "P1"), (1, "P2")]


def volume() -> np.ndarray:
    return np.arange(24, dtype=np.float32).reshape(2, 3, 4)  # value = 12 x + 4 y + z


def test_nifti_axial_slices_rotated_with_anterior_up(tmp_path):
    source = data.open_source(write_nifti(tmp_path / "v.nii.gz", volume()), percentiles=(0, 100))
    assert len(source) == 4 and source.records[1].path.endswith("v.nii.gz#axis2=1")
    assert {r.group for r in source.records} == {str(tmp_path / "v.nii.gz")}
    # Slice z=0 is [[0, 4, 8], [12, 16, 20]] (x down, y across); shown with y=2 on top and x across.
    expected = np.rint(np.array([[8, 20], [4, 16], [0, 12]]) * 255 / 23).astype(int).tolist()
    assert grey(source, 0) == expected


def test_nifti_is_reoriented_to_canonical_before_slicing(tmp_path):
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])  # voxel x runs right to left: canonical order reverses it
    plain = data.open_source(write_nifti(tmp_path / "a.nii", volume()), percentiles=(0, 100))
    mirrored = data.open_source(write_nifti(tmp_path / "b.nii", volume()[::-1].copy(), flipped), percentiles=(0, 100))
    assert grey(plain, 2) == grey(mirrored, 2)


def test_nifti_axis_and_window(tmp_path):
    source = data.open_source(write_nifti(tmp_path / "v.nii", volume()), axis=0, window=(16, 8))
    assert len(source) == 2
    # Sagittal slice x=1: values 12 + 4 y + z, superior (z) up, anterior (y) right; window 12..20.
    values = 12 + 4 * np.arange(3)[None, :] + np.arange(4)[::-1, None]
    assert grey(source, 1) == np.rint(np.clip((values - 12) / 8 * 255, 0, 255)).astype(int).tolist()


def test_nifti_default_clips_to_percentiles(tmp_path):
    values = np.zeros((10, 10, 2), np.float32)
    values[0, 0, 0] = 10_000  # one hot voxel must not set the scale
    values[:, :, 1] = 100
    source = data.open_source(write_nifti(tmp_path / "v.nii.gz", values))
    lo, hi = np.percentile(values, (0.5, 99.5))
    assert grey(source, 1)[0][0] == round((100 - lo) / (hi - lo) * 255) == 171  # min..max would give 3
    assert max(map(max, grey(source, 0))) == 255


def test_nifti_2d_and_bad_shapes(tmp_path):
    source = data.open_source(write_nifti(tmp_path / "flat.nii", volume()[:, :, :1]))
    assert len(source) == 1 and np.asarray(source.read(source.records[0])).shape == (3, 2)
    message = r"4d.nii: expected a 2-D image or 3-D volume, got a NIfTI array of shape \(2, 3, 4, 2\)"
    with pytest.raises(data.DataError, match=message):
        data.open_source(write_nifti(tmp_path / "4d.nii", np.zeros((2, 3, 4, 2), np.float32)))
    with pytest.raises(data.DataError, match="NIfTI slicing axis must be 0, 1 or 2, got 3"):
        data.open_source(tmp_path / "flat.nii", axis=3)

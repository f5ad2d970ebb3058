import re

import pytest

from essa import data
from essa.data.files import LOOKED_FOR

from .conftest import write_image


def make(root, files):
    """A tree of 8 x 8 grey images (and text files for names ending in .txt)."""
    for name in files:
        if name.endswith(".txt"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text("not an image")
        else:
            write_image(root / name)
    return root


def test_class_folders_without_splits(tmp_path):
    make(tmp_path, ["b/1.png", "a/2.jpg", "a/sub/3.png", "b/.hidden.png", "b/notes.txt", "README.txt"])
    source = data.open_source(tmp_path)
    assert source.classes == ["a", "b"] and source.task == "binary" and source.kind == "folder"
    assert [(r.path[len(str(tmp_path)) + 1:], r.label, r.split) for r in source.records] == [
        ("a/2.jpg", 0, None), ("a/sub/3.png", 0, None), ("b/1.png", 1, None)]
    assert source.ignored == [str(tmp_path / "README.txt"), str(tmp_path / "b" / "notes.txt")]


@pytest.mark.parametrize("names, splits", [
    (("train", "val", "test"), ["train", "val", "test"]),
    (("Training", "Testing"), ["train", "test"]),
])
def test_split_folders_are_official_splits(tmp_path, names, splits):
    make(tmp_path, [f"{n}/{c}/{i}.png" for n in names for c in ("x", "y", "z") for i in range(2)])
    source = data.open_source(tmp_path)
    assert source.classes == ["x", "y", "z"] and source.task == "multiclass"
    assert sorted({r.split for r in source.records}) == sorted(splits)
    assert all(r.label == "xyz".index(r.path.split("/")[-2]) for r in source.records)


def test_unlabelled_any_nesting(tmp_path):
    make(tmp_path, ["train/p1/s1/a.png", "train/b.png", "test/c/d/e/f.png"])
    source = data.open_source(tmp_path, labels=False)
    assert source.classes == [] and source.task is None
    assert [(r.label, r.split) for r in source.records] == [(None, "test"), (None, "train"), (None, "train")]
    assert len(data.open_source(tmp_path / "train")) == 2  # loose images: unlabelled unless asked


def test_empty_folder_names_what_it_looked_for(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "readme.txt").write_text("x")
    with pytest.raises(data.DataError) as info:
        data.open_source(tmp_path / "train")
    assert str(info.value) == f"{tmp_path / 'train'} has no images ({LOOKED_FOR})"
    assert LOOKED_FOR == "looked for .png .jpg .jpeg .bmp .tif .tiff .dcm .dicom .nii .nii.gz"


@pytest.mark.parametrize("files, options, message", [
    (["NORMAL/a.png"], {}, "has one class (NORMAL); a labelled dataset needs at least two"),
    (["a/x.png", "b/y.txt"], {}, "b has no images (looked for .png"),
    (["a/x.png", "b/y.png", "z.png"], {"labels": True},
     "has images directly inside it (z.png...); expected one folder per class"),
    (["train/a/x.png", "train/b/x.png", "extra/a/x.png"], {},
     "has split folders (train) and also extra; expected only split folders"),
    (["train/a/x.png", "Training/b/x.png"], {}, "has several folders for one split"),
])
def test_bad_layouts_are_explained(tmp_path, files, options, message):
    make(tmp_path, files)
    with pytest.raises(data.DataError, match=re.escape(message)):
        data.open_source(tmp_path, **options)


def test_missing_path_unsupported_file_and_unknown_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.png does not exist"):
        data.open_source(tmp_path / "nothing.png")
    (tmp_path / "scan.mha").write_bytes(b"x")
    with pytest.raises(data.DataError, match=r"scan.mha: unsupported file type .mha; expected a folder, a .csv"):
        data.open_source(tmp_path / "scan.mha")
    write_image(tmp_path / "a" / "x.png")
    message = "unknown option 'lables' for image folder .*; valid options: labels, window, percentiles, axis"
    with pytest.raises(data.DataError, match=message):
        data.open_source(tmp_path, lables=False)


def test_config_dict(tmp_path):
    make(tmp_path, ["a/x.png", "b/y.png"])
    assert len(data.open_source({"path": str(tmp_path), "labels": False})) == 2
    with pytest.raises(data.DataError, match="a source config needs a 'path'"):
        data.open_source({"labels": False})


def test_chest_xray_official_splits(shared_data):
    source = data.open_source(shared_data / "chest_xray_pneumonia")
    assert source.classes == ["NORMAL", "PNEUMONIA"] and source.task == "binary"
    counts = {(s, c): 0 for s in ("train", "test") for c in (0, 1)}
    for r in source.records:
        counts[r.split, r.label] += 1
    assert counts == {("train", 0): 1341, ("train", 1): 3875, ("test", 0): 234, ("test", 1): 390}
    image = source.load(source.records[0])
    assert image.mode == "RGB" and max(image.size) == 128


def test_brain_mri_and_busi(shared_data):
    brain = data.open_source(shared_data / "brain_tumor_mri")
    assert brain.classes == ["glioma", "meningioma", "notumor", "pituitary"]
    assert sum(r.split == "train" for r in brain.records) == 5708
    assert sum(r.split == "test" for r in brain.records) == 1311
    busi = data.open_source(shared_data / "busi")
    assert busi.classes == ["benign", "malignant", "normal"] and len(busi) == 780
    assert {r.split for r in busi.records} == {None}
    unlabelled = data.open_source(shared_data / "chest_xray_pneumonia" / "train", labels=False)
    assert len(unlabelled) == 5216 and unlabelled.task is None

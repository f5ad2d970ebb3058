import re
import sys
import types

import numpy as np
import pytest

from essa import data

from .conftest import write_npz


@pytest.mark.parametrize("name, mode, sizes, classes, task", [
    ("retinamnist", "RGB", (1080, 120, 400), ["0", "1", "2", "3", "4"], "ordinal"),  # labels (N, 1)
    ("breastmnist", "L", (546, 78, 156), ["malignant", "normal, benign"], "binary"),  # labels (N,)
])
def test_shared_medmnist_files(shared_data, name, mode, sizes, classes, task):
    path = shared_data / "medmnist" / f"{name}.npz"
    source = data.open_source(path)
    assert source.classes == classes and source.task == task
    assert [sum(r.split == s for r in source.records) for s in ("train", "val", "test")] == list(sizes)
    record = source.records[sizes[0] + 5]  # val row 5
    assert record.path == f"{path}#val/5" and record.index == 5 and record.file == str(path)
    with np.load(path) as npz:
        assert record.label == int(npz["val_labels"].reshape(-1)[5])
        pixels = npz["val_images"][5]
    assert source.read(record).mode == mode
    assert np.array_equal(np.asarray(source.read(record)), pixels)
    assert source.load(record).mode == "RGB"


def test_multi_label_npz_and_re_split_records_read_the_right_array(tmp_path):
    path = write_npz(tmp_path / "x.npz", labels_shape=lambda n: (n, 1), channels=3, classes=3)
    source = data.open_source(path)
    assert source.classes == ["0", "1", "2"] and source.task == "multiclass"
    splits = data.split(source.records, val=0.5, test=0, seed=1, official=False)
    moved = next(r for r in splits["val"] if r.path.endswith("#train/4"))
    assert np.asarray(source.read(moved))[0, 0].tolist() == [4, 4, 4]

    hot = np.zeros((6, 3), np.uint8)
    hot[0, [0, 2]] = 1
    np.savez(tmp_path / "chest.npz", train_images=np.zeros((6, 4, 4), np.uint8), train_labels=hot)
    chest = data.open_source(tmp_path / "chest.npz")
    assert chest.task == "multilabel" and chest.records[0].label == (0, 2) and chest.records[1].label == ()


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((2, 4, 4))}, "is not a MedMNIST file: expected arrays train_images and train_labels"),
    ({"train_images": np.zeros((2, 4, 4, 4), np.uint8), "train_labels": np.zeros(2)},
     "train_images has shape (2, 4, 4, 4); expected (N, H, W) or (N, H, W, 3) "
     "(3-D MedMNIST volumes are not supported)"),
    ({"train_images": np.zeros((2, 4, 4), np.uint8), "train_labels": np.zeros(3)},
     "train_labels has shape (3,); expected (2,), (2, 1) or (2, K)"),
])
def test_bad_npz_files_are_explained(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(data.DataError, match=re.escape(message)):
        data.open_source(tmp_path / "bad.npz")


def test_medmnist_name_without_the_package_says_how(monkeypatch):
    monkeypatch.setitem(sys.modules, "medmnist", None)  # import medmnist -> ImportError
    with pytest.raises(data.DataError) as info:
        data.open_source("pneumoniamnist")
    assert "pip install \"essa[medmnist]\"" in str(info.value) and "local .npz" in str(info.value)


def test_medmnist_name_downloads_through_the_package(monkeypatch, tmp_path):
    class BreastMNIST:  # the medmnist API essa relies on: INFO, the class, split/download/root
        def __init__(self, split, download, root):
            write_npz(tmp_path / "breastmnist.npz")

    fake = types.SimpleNamespace(INFO={"breastmnist": {"python_class": "BreastMNIST"}}, BreastMNIST=BreastMNIST)
    monkeypatch.setitem(sys.modules, "medmnist", fake)
    source = data.open_source("breastmnist", root=tmp_path)
    assert source.path == str(tmp_path / "breastmnist.npz") and len(source) == 10
    assert source.classes == ["malignant", "normal, benign"]
    with pytest.raises(data.DataError, match="'nomnist' is not a MedMNIST dataset; valid names: breastmnist"):
        data.open_source("nomnist", root=tmp_path)

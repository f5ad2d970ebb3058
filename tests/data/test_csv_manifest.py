import re

import pytest

from essa import data

from .conftest import write_image


def manifest(tmp_path, text, images=("a.png", "b.png", "c.png", "d.png"), name="labels.csv"):
    for image in images:
        write_image(tmp_path / "img" / image)
    path = tmp_path / name
    path.write_text(text)
    return path


def test_class_names_groups_and_splits(tmp_path):
    path = manifest(tmp_path, "File,Label,Patient,Split\nimg/a.png,tumour,p1,Training\nimg/b.png,normal,p1,train\n"
                              "img/c.png,tumour,p2,test\nimg/d.png,normal,,\n")
    source = data.open_source(path)
    assert source.kind == "csv" and source.classes == ["normal", "tumour"] and source.task == "binary"
    assert [(r.label, r.group, r.split) for r in source.records] == [
        (1, "p1", "train"), (0, "p1", "train"), (1, "p2", "test"), (0, None, None)]
    assert source.records[0].path == str(tmp_path / "img" / "a.png")


def test_integer_labels_are_class_indices(tmp_path):
    path = manifest(tmp_path, "path,label\nimg/a.png,0\nimg/b.png,2\nimg/c.png,2.0\n")
    source = data.open_source(path)
    assert source.classes == ["0", "1", "2"] and [r.label for r in source.records] == [0, 2, 2]


def test_multi_label_with_separator(tmp_path):
    path = manifest(tmp_path, "path,labels\nimg/a.png,effusion|mass\nimg/b.png,mass\nimg/c.png,nodule\n")
    source = data.open_source(path)
    assert source.task == "multilabel" and source.classes == ["effusion", "mass", "nodule"]
    assert [r.label for r in source.records] == [(0, 1), (1,), (2,)]


def test_multi_label_from_01_columns(tmp_path):
    path = manifest(tmp_path, "image\teffusion\tmass\nimg/a.png\t1\t1\nimg/b.png\t0\t1.0\nimg/c.png\t0\t0\n",
                    name="labels.tsv")
    source = data.open_source(path, label_columns=["effusion", "mass"])
    assert source.task == "multilabel" and source.classes == ["effusion", "mass"]
    assert [r.label for r in source.records] == [(0, 1), (1,), ()]


def test_paths_relative_to_root_and_unlabelled(tmp_path):
    path = manifest(tmp_path, "path,label\na.png,x\nb.png,y\n")
    source = data.open_source(path, root=tmp_path / "img", labels=False)
    assert source.task is None and [r.label for r in source.records] == [None, None]


@pytest.mark.parametrize("text, options, message", [
    ("path,label\nimg/a.png,x\nimg/zz.png,y\nimg/b.png,x\nimg/yy.png,x\n", {},
     "labels.csv: 2 row(s) point at missing files (paths are relative to {tmp}): "
     "row 3: {tmp}/img/zz.png; row 5: {tmp}/img/yy.png"),
    ("path,label\nimg/a.png,0\nimg/b.png,one\n", {},
     "labels.csv row 3: label 'one' is not a non-negative integer like row 2's '0'"),
    ("path,label\nimg/a.png,x\nimg/b.png,z\n", {"classes": ["x", "y"]},
     "labels.csv row 3: label 'z' is not one of the classes x, y"),
    ("path,m\nimg/a.png,maybe\n", {"label_columns": ["m"]}, "labels.csv row 2: column 'm' is 'maybe', expected 0 or 1"),
    ("path,label\nimg/a.png,\n", {}, "labels.csv row 2: empty label in column 'label'"),
    ("path,label\nnotes.txt,x\n", {}, "labels.csv row 2: notes.txt is not a supported image file (looked for .png"),
    ("path,label\nimg/a.png,x\nimg/b.png,x\n", {}, "labels.csv column label has one class (x)"),
    ("name,label\nimg/a.png,x\n", {},
     "labels.csv has no path column (looked for path, file, filename, image, image_path); "
     "its columns are: name, label"),
    ("path\nimg/a.png\n", {"labels": True}, "labels.csv has no label column"),
    ("path,label\n", {}, "labels.csv has no rows"),
    ("path,label,split\nimg/a.png,x,holdout\n", {},
     "labels.csv row 2: split 'holdout' is not one of test, testing, train"),
    ("path,label\nimg/a.png,x\n", {"group_column": "patient"},
     "labels.csv has no column 'patient'; its columns are: path, label"),
])
def test_bad_manifests_name_the_row_and_what_was_expected(tmp_path, text, options, message):
    path = manifest(tmp_path, text)
    with pytest.raises(data.DataError, match=re.escape(message.format(tmp=tmp_path))):
        data.open_source(path, **options)

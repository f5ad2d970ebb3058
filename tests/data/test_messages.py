"""Messages about data that say what happened and what to do (and never point at unsafe loading)."""

import numpy as np
import pytest
from PIL import Image

from essa import data
from essa.commands import main


def _images(folder, *names):
    for i, name in enumerate(names):  # distinct images: no exact duplicates
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / name)


def test_a_file_under_two_labels_is_refused_naming_it(tmp_path):
    _images(tmp_path, "a.png", "b.png", "c.png")
    (tmp_path / "m.csv").write_text("path,label\na.png,cat\nb.png,dog\na.png,dog\nc.png,cat\n")
    with pytest.raises(data.DataError, match=r"a.png \(rows 2 and 4\).*joined by '\|'"):
        data.open_source(tmp_path / "m.csv")


def test_repeated_rows_are_read_once_and_reported_as_rows(tmp_path, capsys):
    _images(tmp_path, "a.png", "b.png", "c.png")
    (tmp_path / "m.csv").write_text("path,label\na.png,cat\nb.png,dog\na.png,cat\nc.png,cat\n")
    source = data.open_source(tmp_path / "m.csv")
    assert len(source.records) == 3
    assert source.notes == ["1 duplicate row(s) repeat an earlier row and were read once: row 4 repeats row 2 (a.png)"]
    assert main(["data", "inspect", str(tmp_path / "m.csv")]) == 0
    out = capsys.readouterr().out
    assert "note: 1 duplicate row(s)" in out and "exact duplicates: 0 groups" in out


def test_an_unrecognised_label_column_is_named_with_label_column(tmp_path):
    from essa.task import TaskDataConfig, load_task

    _images(tmp_path, "a.png", "b.png")
    (tmp_path / "m.csv").write_text("path,finding\na.png,cat\nb.png,dog\n")
    source = data.open_source(tmp_path / "m.csv")
    assert not source.classes and "its columns are: path, finding" in source.notes[0]
    with pytest.raises(data.DataError, match=r"has no labels.*its columns are: path, finding.*label_column="):
        load_task(TaskDataConfig(root=str(tmp_path / "m.csv"), duplicates="skip"))
    assert data.open_source(tmp_path / "m.csv", label_column="finding").classes == ["cat", "dog"]


def test_garbage_npz_never_suggests_pickle_and_float_images_are_refused_at_load(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an archive at all" * 10)
    with pytest.raises(data.DataError) as info:
        data.open_source(garbage)
    assert "pickle" not in str(info.value) and "not a zip archive of numeric .npy arrays" in str(info.value)
    floats = tmp_path / "floats.npz"
    np.savez(floats, train_images=np.random.rand(4, 8, 8), train_labels=np.array([0, 1, 0, 1]))
    with pytest.raises(data.DataError, match=r"train_images are float64; MedMNIST images are uint8 .*astype"):
        data.open_source(floats)


def test_labels_false_is_no_unknown_option_for_sources_without_labels(tmp_path):
    _images(tmp_path, "one.png")
    source = data.open_source(tmp_path / "one.png", labels=False)  # what essa adapt passes for --data FILE
    assert len(source.records) == 1
    with pytest.raises(data.DataError, match="unknown option 'labels'"):
        data.open_source(tmp_path / "one.png", labels=True)  # asking for labels a file has not is still an error

import json
import shutil

import numpy as np
import pytest

from essa import data

from .conftest import write_image


def noise(seed: int, channels: int = 3) -> np.ndarray:
    shape = (32, 32, channels) if channels > 1 else (32, 32)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def copies(tmp_path):
    """Exact copies across and within splits, a grey image and its RGB copy, and a near copy."""
    a = write_image(tmp_path / "train/a/1.png", noise(1))
    shutil.copy(a, tmp_path / "train/a/2.png")
    write_image(tmp_path / "test/a/1.png", noise(1))
    write_image(tmp_path / "train/b/3.png", noise(2, channels=1))
    write_image(tmp_path / "test/b/4.png", np.repeat(noise(2, channels=1)[:, :, None], 3, axis=2))
    smooth = np.add.outer(np.arange(32), np.arange(32)).astype(np.uint8) * 4
    write_image(tmp_path / "train/a/5.png", smooth)
    write_image(tmp_path / "test/b/6.png", smooth + 3)  # a little brighter: not exact, near
    write_image(tmp_path / "train/b/7.png", noise(3))
    return data.open_source(tmp_path)


def last3(path: str) -> str:
    return "/".join(path.split("/")[-3:])


def names(records) -> list[str]:
    return sorted(last3(r.path) for r in records)


def test_exact_and_near_groups_with_their_splits(copies):
    report = data.find_duplicates(copies, near=True)
    exact = [g for g in report.groups if g.kind == "exact"]
    near = [g for g in report.groups if g.kind == "near"]
    assert [names(g.records) for g in exact] == [
        ["test/a/1.png", "train/a/1.png", "train/a/2.png"], ["test/b/4.png", "train/b/3.png"]]
    assert [g.splits for g in exact] == [["test", "train"], ["test", "train"]]
    assert [names(g.records) for g in near] == [["test/b/6.png", "train/a/5.png"]]
    assert near[0].labels == [0, 1]
    keys = ("groups", "files", "extra_copies", "groups_across_splits", "groups_with_several_labels")
    assert report.summary() == {
        "exact": dict(zip(keys, (2, 5, 3, 2, 0))), "near": dict(zip(keys, (1, 2, 1, 1, 1))), "dropped": 0,
    }
    assert json.loads(json.dumps(report.to_dict()))["groups"][2]["splits"] == ["test", "train"]
    assert data.find_duplicates(copies).summary()["near"]["groups"] == 0  # near is opt-in


def test_drop_keeps_the_test_copy(copies):
    report = data.find_duplicates(copies, near=True, policy="drop")
    assert names(report.dropped) == ["train/a/1.png", "train/a/2.png", "train/a/5.png", "train/b/3.png"]
    assert names(report.records) == ["test/a/1.png", "test/b/4.png", "test/b/6.png", "train/b/7.png"]
    splits = data.split(report.records, val=0, test=0)  # the kept records keep their splits
    assert [len(splits[s]) for s in ("train", "val", "test")] == [1, 0, 3]


def test_error_policy_and_scope(copies):
    with pytest.raises(data.DataError, match=r"2 duplicate group\(s\) across splits \(exact: 2, near: 0\), e\.g\. .*"
                                             r"use policy='drop'"):
        data.find_duplicates(copies, policy="error", scope="across")
    train_only = [r for r in copies.records if r.split == "train"]
    report = data.find_duplicates(copies, train_only, policy="drop", scope="across")
    assert report.dropped == [] and report.summary()["exact"]["groups"] == 1  # within train: reported only
    with pytest.raises(data.DataError, match="policy must be one of report, drop, error"):
        data.find_duplicates(copies, policy="ignore")


def test_unreadable_files_are_listed_not_fatal(copies, tmp_path):
    (tmp_path / "train/b/8.png").write_bytes(b"not a png")
    report = data.find_duplicates(data.open_source(tmp_path))
    assert [last3(u["path"]) for u in report.unreadable] == ["train/b/8.png"]
    assert "UnidentifiedImageError" in report.unreadable[0]["reason"]


def test_brain_mri_duplicates_cross_training_and_testing(shared_data):
    source = data.open_source(shared_data / "brain_tumor_mri")
    report = data.find_duplicates(source, policy="drop")
    assert report.summary()["exact"] == {
        "groups": 300, "files": 726, "extra_copies": 426, "groups_across_splits": 189, "groups_with_several_labels": 0,
    }
    assert len(report.dropped) == 426 and len(report.records) == 7019 - 426
    kept = {r.path for r in report.records}
    assert all(sum(r.path in kept for r in g.records) == 1 for g in report.groups)
    # Test copies are kept: the official test set loses only its own internal copies.
    test_left = sum(r.split == "test" for r in report.records)
    test_internal = sum(len([r for r in g.records if r.split == "test"]) - 1 for g in report.groups
                        if any(r.split == "test" for r in g.records))
    assert test_left == 1311 - test_internal

"""Labelled tasks on real images: task type and primary metric from the source or the config, checked splits."""

import shutil

import pytest

from essa.config import ConfigError, from_dict
from essa.data import DataError
from essa.task import TaskDataConfig, load_task
from tests.conftest import SHARED

MEDMNIST = SHARED / "data" / "medmnist"
BUSI = SHARED / "data" / "busi"
pytestmark = pytest.mark.skipif(not MEDMNIST.is_dir(), reason=f"shared MedMNIST files not found at {MEDMNIST}")


def _cfg(name, **kwargs):
    return TaskDataConfig(root=str(MEDMNIST / name), num_workers=0, **kwargs)


def test_the_source_names_the_task_and_the_config_overrides_it():
    retina = load_task(_cfg("retinamnist.npz", duplicates="skip"))
    assert (retina.task, retina.primary, retina.num_classes) == ("ordinal", "kappa", 5)
    assert [len(retina.splits[s]) for s in ("train", "val", "test")] == [1080, 120, 400]  # official splits
    assert load_task(_cfg("retinamnist.npz", duplicates="skip"), task="multiclass").primary == "balanced_accuracy"
    assert load_task(_cfg("retinamnist.npz", duplicates="skip"), metric="accuracy").primary == "accuracy"
    breast = load_task(_cfg("breastmnist.npz"))
    assert (breast.task, breast.primary) == ("binary", "auc")
    # BreastMNIST has one exact duplicate across its official splits; the report finds it, nothing is dropped
    assert breast.duplicates.summary()["exact"]["groups_across_splits"] == 1 and not breast.duplicates.dropped
    dropped = load_task(_cfg("breastmnist.npz", duplicates="drop"))
    assert len(dropped.duplicates.dropped) == 1
    assert sum(map(len, dropped.splits.values())) == sum(map(len, breast.splits.values())) - 1
    with pytest.raises(DataError, match="duplicate group"):
        load_task(_cfg("breastmnist.npz", duplicates="error"))


@pytest.mark.parametrize("task, metric, fragment", [
    ("binary", None, "task='binary' needs 2 classes, but .* has 5"),
    ("multilabel", None, "task='multilabel' does not fit .* one class per image"),
    ("nominal", None, "task='nominal'; valid choices: multiclass, binary, multilabel, ordinal"),
    (None, "f2", "metric 'f2' is not computed for ordinal tasks; expected one of accuracy"),
])
def test_a_task_or_metric_that_does_not_fit_is_explained(task, metric, fragment):
    with pytest.raises(ValueError, match=fragment):
        load_task(_cfg("retinamnist.npz", duplicates="skip"), task=task, metric=metric)


def test_missing_data_and_bad_options_are_explained():
    with pytest.raises(ConfigError, match="data.root is required"):
        load_task(TaskDataConfig())
    with pytest.raises(ConfigError, match="data.duplicates='keep'; valid choices: skip, report, drop, error"):
        from_dict(TaskDataConfig, {"duplicates": "keep"})


@pytest.mark.skipif(not BUSI.is_dir(), reason=f"shared BUSI images not found at {BUSI}")
def test_a_split_without_a_class_is_an_error(tmp_path):
    for split, cls, n in (("train", "benign", 6), ("train", "malignant", 6), ("test", "benign", 3)):
        (tmp_path / split / cls).mkdir(parents=True)
        for path in sorted((BUSI / cls).glob("*.png"))[:n]:
            shutil.copy(path, tmp_path / split / cls / path.name)
    with pytest.raises(DataError, match=r"the test split of .* has no images of class 'malignant' \(1\)"):
        load_task(TaskDataConfig(root=str(tmp_path), val=0.34, duplicates="skip", num_workers=0))


def test_max_train_subsamples_only_the_train_split():
    whole = load_task(_cfg("retinamnist.npz", duplicates="skip"))
    task = load_task(_cfg("retinamnist.npz", duplicates="skip", max_train=200))
    assert [len(task.splits[s]) for s in ("train", "val", "test")] == [200, 120, 400]
    assert task.splits["val"] == whole.splits["val"] and task.splits["test"] == whole.splits["test"]
    assert {r.path for r in task.splits["train"]} < {r.path for r in whole.splits["train"]}
    with pytest.raises(ConfigError, match="data.max_train=0 must be at least 1"):
        from_dict(TaskDataConfig, {"max_train": 0})

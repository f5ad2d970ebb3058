from collections import Counter

import pytest

from essa import data
from essa.data import Record


def records(n=100, classes=(70, 30), groups=None, split=None):
    """``n`` records; the first classes[0] have label 0 and so on; record i is in group i // groups."""
    labels = [c for c, count in enumerate(classes) for _ in range(count)]
    return [Record(f"r{i}.png", labels[i], None if groups is None else f"g{i // groups}", split) for i in range(n)]


def paths(result) -> dict:
    return {name: [r.path for r in rs] for name, rs in result.items()}


def test_seeded_stratified_exact_sizes():
    result = data.split(records(), val=0.1, test=0.2, seed=0)
    assert {k: len(v) for k, v in result.items()} == {"train": 70, "val": 10, "test": 20}
    assert Counter(r.label for r in result["test"]) == {0: 14, 1: 6}
    assert Counter(r.label for r in result["val"]) == {0: 7, 1: 3}
    assert all(r.split == name for name, rs in result.items() for r in rs)
    assert paths(result) == paths(data.split(records(), val=0.1, test=0.2, seed=0))
    assert paths(result) != paths(data.split(records(), val=0.1, test=0.2, seed=1))
    order = [r.path for r in result["train"]]
    assert order == sorted(order, key=lambda p: int(p[1:-4]))  # input order kept


def test_groups_never_cross_splits():
    result = data.split(records(groups=5), val=0.2, test=0.2, seed=3)
    where = {r.group: name for name, rs in result.items() for r in rs}
    assert all(where[r.group] == name for name, rs in result.items() for r in rs)
    assert {k: len(v) for k, v in result.items()} == {"train": 60, "val": 20, "test": 20}


def test_official_train_test_gets_val_carved_from_train():
    official = records(80, (60, 20), split="train") + [Record(f"t{i}.png", i % 2, None, "test") for i in range(10)]
    result = data.split(official, val=0.25, test=0.1, seed=0)
    assert [r.path for r in result["test"]] == [f"t{i}.png" for i in range(10)]
    assert len(result["val"]) == 20 and Counter(r.label for r in result["val"]) == {0: 15, 1: 5}
    assert len(result["train"]) == 60
    resplit = data.split(official, val=0.1, test=0.1, official=False)
    assert {k: len(v) for k, v in resplit.items()} == {"train": 72, "val": 9, "test": 9}


def test_official_splits_that_share_a_patient_are_an_error():
    bad = [Record("a.png", 0, "p1", "train"), Record("b.png", 1, "p1", "test"), Record("c.png", 1, "p2", "train")]
    message = "1 group.* in more than one official split, e.g. group 'p1' in test and train"
    with pytest.raises(data.DataError, match=message):
        data.split(bad)


def test_fractions_are_checked():
    with pytest.raises(data.DataError, match="val and test must be fractions with val \\+ test < 1"):
        data.split(records(), val=0.6, test=0.5)


def test_unlabelled_records_split_too():
    result = data.split([Record(f"{i}.png") for i in range(20)], val=0.1, test=0)
    assert {k: len(v) for k, v in result.items()} == {"train": 18, "val": 2, "test": 0}


def test_chest_xray_val_from_official_train(shared_data):
    source = data.open_source(shared_data / "chest_xray_pneumonia")
    result = data.split(source.records, val=0.1, seed=0)
    assert {k: len(v) for k, v in result.items()} == {"train": 4694, "val": 522, "test": 624}
    assert Counter(r.label for r in result["val"]) == {0: 134, 1: 388}  # 1341 and 3875 train images


def test_busi_without_official_split(shared_data):
    source = data.open_source(shared_data / "busi")
    result = data.split(source.records, val=0.15, test=0.15, seed=0)
    assert {k: len(v) for k, v in result.items()} == {"train": 546, "val": 117, "test": 117}
    assert Counter(r.label for r in result["test"]) == {0: 66, 1: 31, 2: 20}  # 437 / 210 / 133


def test_subsample_keeps_class_shares_groups_and_order():
    pool = records(100, (70, 30))
    kept = data.subsample(pool, 20, seed=0)
    assert len(kept) == 20 and Counter(r.label for r in kept) == {0: 14, 1: 6}
    assert [r.path for r in kept] == [r.path for r in pool if r in kept]  # input order kept
    assert [r.path for r in kept] == [r.path for r in data.subsample(pool, 20, seed=0)]
    assert [r.path for r in kept] != [r.path for r in data.subsample(pool, 20, seed=1)]
    grouped = data.subsample(records(100, (70, 30), groups=5), 40, seed=2)
    sizes = Counter(r.group for r in grouped)
    assert set(sizes.values()) == {5} and len(grouped) == 40  # whole groups only
    assert data.subsample(pool, 500) == pool
    with pytest.raises(data.DataError, match="at least 1 record"):
        data.subsample(pool, 0)

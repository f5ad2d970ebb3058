import numpy as np
import pytest
import torch

from essa import data
from essa.data.transforms import eval_transform

from .conftest import write_image


@pytest.fixture
def damaged(tmp_path):
    """Two good images and four bad files: truncated PNG and JPEG, garbage, and an empty file."""
    write_image(tmp_path / "a/good.png", 10)
    write_image(tmp_path / "b/good.png", 20)
    for name in ("a/cut.png", "b/cut.jpg"):
        full = write_image(tmp_path / name, np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        full.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    (tmp_path / "a/garbage.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "b/empty.dcm").write_bytes(b"")
    return data.open_source(tmp_path)


BAD = ["a/cut.png", "a/garbage.png", "b/cut.jpg", "b/empty.dcm"]


def short(path: str) -> str:
    return "/".join(path.split("/")[-2:])


def test_unreadable_files_are_replaced_and_reported(damaged):
    dataset = data.ImageDataset(damaged, transform=eval_transform(8))
    with pytest.warns(UserWarning, match="skipped unreadable image"):
        items = [dataset[i] for i in range(len(dataset))]
    assert len(items) == 6 and all(x.shape == (3, 8, 8) for x, _ in items)
    assert [short(r["path"]) for r in dataset.report] == BAD
    reasons = {short(r["path"]): r["reason"] for r in dataset.report}
    assert "truncated" in reasons["a/cut.png"] and "UnidentifiedImageError" in reasons["a/garbage.png"]


def test_failures_in_worker_processes_reach_the_report(damaged):
    dataset = data.ImageDataset(damaged, transform=eval_transform(8))
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2)
    batches = list(loader)  # the warnings are printed by the workers
    assert [len(labels) for _, labels in batches] == [3, 3]
    assert [short(r["path"]) for r in dataset.report] == BAD
    assert all(r["reason"] and "readable now" not in r["reason"] for r in dataset.report)


def test_nothing_readable_is_an_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    dataset = data.ImageDataset(data.open_source(tmp_path), transform=eval_transform(8))
    with pytest.warns(UserWarning), pytest.raises(data.DataError, match="none of the 1 images from .* could be read"):
        dataset[0]


def test_labels_multi_hot_and_unlabelled(tmp_path):
    for name in ("a.png", "b.png"):
        write_image(tmp_path / "img" / name)
    (tmp_path / "m.csv").write_text("path,labels\nimg/a.png,x|z\nimg/b.png,y\n")
    multi = data.ImageDataset(data.open_source(tmp_path / "m.csv"), transform=eval_transform(8))
    assert multi[0][1].tolist() == [1.0, 0.0, 1.0] and multi[1][1].tolist() == [0.0, 1.0, 0.0]
    plain = data.ImageDataset(data.open_source(tmp_path / "img"), transform=eval_transform(8))
    assert plain[0][1] == -1


def test_disk_cache_gives_the_same_tensors_and_skips_decoding(tmp_path, monkeypatch):
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    write_image(tmp_path / "img/a/x.png", pixels)
    write_image(tmp_path / "img/b/y.png", pixels[:, ::-1].copy())
    source = data.open_source(tmp_path / "img")
    cache = data.DiskCache(tmp_path / "cache", size=16)
    plain = data.ImageDataset(source, transform=eval_transform(16))
    cached = data.ImageDataset(source, transform=eval_transform(16), cache=cache)
    for i in range(2):
        assert torch.equal(plain[i][0], cached[i][0])
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 2
    assert cache.load(source, source.records[0]).size == (21, 16)  # shorter side 16, aspect kept
    expected = plain[1][0]
    monkeypatch.setattr(source, "load", lambda record: pytest.fail("decoded again"))
    assert torch.equal(cached[1][0], expected)

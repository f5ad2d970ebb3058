import json
import shutil

from essa.commands import main

from .conftest import write_image


def dataset(tmp_path):
    """Train/test folders with one copy across splits, grey and RGB images of two sizes, one empty file."""
    a = write_image(tmp_path / "train/cat/1.png", 10, size=(20, 10))
    (tmp_path / "test/cat").mkdir(parents=True)
    shutil.copy(a, tmp_path / "test/cat/1.png")
    write_image(tmp_path / "train/dog/2.png", 200, size=(12, 12), mode="RGB")
    write_image(tmp_path / "test/dog/3.png", 90, size=(20, 10))
    (tmp_path / "test/dog/4.png").write_bytes(b"")
    return tmp_path


def test_inspect_prints_a_dataset_card(tmp_path, capsys):
    assert main(["data", "inspect", str(dataset(tmp_path))]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{tmp_path}  (folder, binary, 2 classes, 5 images)"
    assert out[1].split() == ["split", "cat", "dog", "total"]
    assert out[2].split() == ["train", "1", "1", "2"] and out[3].split() == ["test", "1", "2", "3"]
    assert "sizes: 12x10 to 20x12; most common: 20x10 (3), 12x12 (1)" in out
    assert "modes: L (3), RGB (1)" in out
    assert "exact duplicates: 1 groups, 2 files (1 extra copies); 1 groups cross splits, 0 have several labels" in out
    assert out[-2] == "unreadable: 1" and out[-1].startswith(f"  {tmp_path / 'test/dog/4.png'}: UnidentifiedImageError")


def test_inspect_json(tmp_path, capsys):
    assert main(["data", "inspect", str(dataset(tmp_path)), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["counts"] == {"train": {"cat": 1, "dog": 1}, "test": {"cat": 1, "dog": 2}}
    assert card["images_per_split"] == {"train": 2, "test": 3} and card["task"] == "binary"
    assert card["duplicates"]["exact"]["groups_across_splits"] == 1
    assert card["duplicates"]["examples_across_splits"][0]["splits"] == ["test", "train"]
    assert [u["path"] for u in card["unreadable"]] == [str(tmp_path / "test/dog/4.png")]


def test_inspect_options_and_errors(tmp_path, capsys):
    write_image(tmp_path / "only/x.png")
    assert main(["data", "inspect", str(tmp_path), "-o", "labels=false", "--no-scan"]) == 0
    assert "unlabelled, 1 images" in capsys.readouterr().out
    assert main(["data", "inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"essa data: error: {tmp_path} has one class (only); a labelled dataset needs at least two " \
                  "(pass labels=False to read the images without labels)\n"
    assert main(["data", "inspect", str(tmp_path / "nope")]) == 2
    assert "nope does not exist" in capsys.readouterr().err
    assert main(["data", "inspect", str(tmp_path), "-o", "labels"]) == 2
    assert "-o expects KEY=VALUE" in capsys.readouterr().err


def test_inspect_shared_medmnist(shared_data, capsys):
    assert main(["data", "inspect", str(shared_data / "medmnist" / "retinamnist.npz")]) == 0
    out = capsys.readouterr().out
    assert "(medmnist, ordinal, 5 classes, 1600 images)" in out and "modes: RGB (1600)" in out

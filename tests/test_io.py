"""Atomic writes: the old file or the whole new one, never half, and no temporary file left behind."""

import json
import math

import pytest

from essa import io


def test_writes_replace_the_file_whole_and_leave_no_temporary(tmp_path):
    path = tmp_path / "out" / "results.json"  # the folder is created
    io.write_json(path, {"auc": math.nan, "path": tmp_path}, default=str)
    assert json.loads(path.read_text())["path"] == str(tmp_path) and math.isnan(io.read_json(path)["auc"])
    assert io.write_text(path, "ü\n") == path and path.read_bytes() == "ü\n".encode()
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]
    assert io.read_json(tmp_path / "missing.json") is None


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "figure.png"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), io.replacing(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".figure.png.")
        tmp.write_bytes(b"half a fig")
        raise KeyboardInterrupt
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["figure.png"]
    with pytest.raises(TypeError):
        io.write_json(path, {"not json": object()})
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["figure.png"]


def test_exports_and_reports_take_the_umask_mode_so_a_group_can_read_them(tmp_path):
    import os

    import torch

    from essa.export import save_weights

    old = os.umask(0o022)
    try:
        weights = save_weights({"w": torch.zeros(2)}, tmp_path / "backbone.safetensors")
        report = io.write_text(tmp_path / "report.md", "# report")
    finally:
        os.umask(old)
    assert oct(weights.stat().st_mode & 0o777) == oct(0o644)  # was 0600 (mkstemp)
    assert oct(report.stat().st_mode & 0o777) == oct(0o644)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.safetensors", "report.md"]

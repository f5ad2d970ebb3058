import numpy as np
import pytest

from essa.evaluate.plots import accuracy_vs_memory_png, confusion_matrix_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_bytes=5000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > min_bytes  # axes, labels and cells drawn, not an empty canvas


def test_confusion_matrix_png(tmp_path):
    cm = np.array([[50, 3, 0], [4, 20, 1], [0, 2, 5]])
    path = confusion_matrix_png(cm, ["nevus", "melanoma", "bcc"], tmp_path / "figs" / "cm.png", title="ISIC test")
    assert path == tmp_path / "figs" / "cm.png"
    assert_png(path)


def test_confusion_matrix_bad_input(tmp_path):
    with pytest.raises(ValueError, match="2 class names for a 3x3 confusion matrix"):
        confusion_matrix_png(np.eye(3, dtype=int), ["a", "b"], tmp_path / "cm.png")
    with pytest.raises(ValueError, match=r"must be square \(C, C\), got shape \(2, 3\)"):
        confusion_matrix_png(np.zeros((2, 3)), ["a", "b"], tmp_path / "cm.png")
    assert not (tmp_path / "cm.png").exists()


def test_accuracy_vs_memory_png(tmp_path):
    rows = [
        {"label": "full", "memory_mib": 9800, "mean": 0.812, "std": 0.013, "group": "full SSA"},
        {"label": "APLA r=32", "memory_mib": 5900, "mean": 0.824, "std": 0.009, "group": "APLA SSA"},
        {"label": "LoRA", "memory_mib": 6400, "mean": 0.805, "std": 0.011, "group": "APLA SSA"},
        {"label": "linear", "memory_mib": 2100, "mean": 0.74, "std": 0.0},
    ]
    path = accuracy_vs_memory_png(rows, tmp_path / "acc_mem.png", metric_name="balanced accuracy")
    assert_png(path)
    with pytest.raises(ValueError, match=r"row 1 \(LoRA\) lacks \['std'\]"):
        accuracy_vs_memory_png([rows[0], {"label": "LoRA", "memory_mib": 1, "mean": 0.5}], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"labels \['full'\] appear more than once"):
        accuracy_vs_memory_png([rows[0], rows[0]], tmp_path / "x.png")

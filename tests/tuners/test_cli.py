import json
import subprocess
import sys

from essa import backbones
from essa.commands import main


def test_tuners_table_counts_match_the_model(capsys):
    assert main(["tuners", "--backbone", "vit_tiny_patch16_224", "--img-size", "32",
                 "--options", '{"apla": {"r": 64}}', "--json"]) == 0
    rows = {row["tuner"]: row for row in json.loads(capsys.readouterr().out)}
    model = backbones.create("vit_tiny_patch16_224", img_size=32)
    total = sum(p.numel() for p in model.parameters())
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    assert set(rows) == {"adaptformer", "apla", "bitfit", "full", "linear", "lora", "ssf", "vpt"}
    assert rows["full"]["trainable"] == total and rows["full"]["percent"] == 100.0
    assert rows["linear"]["trainable"] == 0
    assert rows["bitfit"]["trainable"] == biases
    assert rows["apla"]["trainable"] == 12 * (64 * 192 + 64)
    assert rows["lora"]["trainable"] == 12 * 8 * (192 + 3 * 192)
    assert abs(rows["apla"]["percent"] - 100 * rows["apla"]["trainable"] / total) < 1e-9


def test_tuners_table_is_printed_for_people(capsys):
    assert main(["tuners", "--backbone", "vit_tiny_patch16_224", "--img-size", "32"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["tuner", "trainable", "%", "of", "backbone", "options"]
    assert any(line.startswith("apla ") and "r=None" in line for line in out.splitlines())


def test_bad_backbone_is_one_line_on_stderr():
    proc = subprocess.run([sys.executable, "-m", "essa", "tuners", "--backbone", "vit_tinny"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("essa tuners: error: unknown backbone 'vit_tinny'")
    assert "Traceback" not in proc.stderr


def test_tuners_takes_a_weights_file_alone_and_asks_for_one_of_the_two(tmp_path, capsys):
    from tests.conftest import SHARED

    weights = SHARED / "models" / "vit_tiny_p4_32_cifar10.safetensors"
    if not weights.is_file():
        import pytest

        pytest.skip(f"the shared ViT is not at {weights}")
    assert main(["tuners", "--weights", str(weights)]) == 0
    out = capsys.readouterr().out
    total = sum(p.numel() for p in backbones.create(weights=str(weights)).parameters())
    assert out.strip().splitlines()[-1] == f"backbone {weights}: {total:,} parameters"
    assert any(line.startswith("full ") and f"{total:,}" in line for line in out.splitlines())
    assert main(["tuners"]) == 2
    assert "give --backbone (a timm ViT name) or --weights" in capsys.readouterr().err

"""What a log file shows of a run (essa.train.progress): plain progress lines when the output is not a terminal,
one line per epoch, and no library chatter unless verbose."""

import io
import re
import subprocess
import sys

import pytest

from essa import config as config_mod
from essa.train.progress import ProgressLines, duration, progress_mode
from tests.train.test_adapt import XRAYS, _cfg, folders  # noqa: F401  (folders: the fixture)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_auto_progress_is_the_bar_on_a_terminal_and_lines_elsewhere():
    assert progress_mode("auto", _Terminal()) == "bar"
    assert progress_mode("auto", io.StringIO()) == "lines"
    assert progress_mode("none", _Terminal()) == "none" and progress_mode("lines", _Terminal()) == "lines"
    assert [duration(s) for s in (42, 720, 12_240)] == ["42 s", "12 min", "3.4 h"]


def test_a_bad_progress_setting_names_the_choices():
    from essa.config import TrainerConfig

    with pytest.raises(config_mod.ConfigError, match="trainer.progress='bars'; valid choices: auto, bar, lines, none"):
        config_mod.from_dict(TrainerConfig, {"progress": "bars"})
    with pytest.raises(config_mod.ConfigError, match="progress_every=-1.0 must be a number of seconds"):
        config_mod.from_dict(TrainerConfig, {"progress_every": -1})


@pytest.mark.skipif(not XRAYS.is_dir(), reason="shared chest X-rays not found")
def test_a_run_logged_to_a_file_shows_steps_epochs_and_no_library_chatter(folders, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    config_mod.dump(_cfg(folders, out, optim={"epochs": 2, "batch_size": 8}, trainer={"progress_every": 0}),
                    tmp_path / "given.yaml")
    proc = subprocess.run([sys.executable, "-m", "essa", "adapt", "--config", str(tmp_path / "given.yaml")],
                          capture_output=True, text=True, timeout=600)  # stdout a pipe, as in a log file
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    steps = [line for line in lines if line.startswith("[adapt] epoch") and "step" in line]
    # every step (progress_every 0): 3 steps per epoch of 24 images, 6 in all
    assert len(steps) == 6, proc.stdout
    assert re.fullmatch(r"\[adapt\] epoch 1/2, step 1/6 \(17 %\), loss \d+\.\d+, \d+\.\d images/s, about \d+ s left",
                        steps[0]), steps[0]
    assert steps[-1].startswith("[adapt] epoch 2/2, step 6/6 (100 %), loss ")
    done = [line for line in lines if re.match(r"\[adapt\] epoch \d/2 done: ", line)]
    assert len(done) == 2 and "knn_bal_acc " in done[0] and "dino " in done[0], done
    assert lines.index(done[0]) > lines.index(steps[2])  # after the epoch's last step line
    chatter = proc.stdout + proc.stderr
    for note in ("GPU available", "TPU available", "litlogger", "LeafSpec", "it/s]"):
        assert note not in chatter, note
    verbose = subprocess.run([sys.executable, "-m", "essa", "-v", "adapt", "--config", str(tmp_path / "given.yaml"),
                              "--set", f"out={tmp_path / 'verbose'}"], capture_output=True, text=True, timeout=600)
    assert verbose.returncode == 0 and "GPU available" in verbose.stdout + verbose.stderr


def test_progress_lines_come_from_global_rank_zero_only():
    class _Trainer:
        is_global_zero = False

    stream = io.StringIO()
    ProgressLines("adapt", stream=stream)._print(_Trainer(), "epoch 1/1 done")
    assert stream.getvalue() == ""


@pytest.mark.skipif(not XRAYS.is_dir(), reason="shared chest X-rays not found")
def test_the_default_csv_logger_records_steps_epochs_and_the_config_one_version_per_session(folders, tmp_path):  # noqa: F811
    import csv

    from essa.adaptation import adapt

    out = tmp_path / "run"
    sections = {"optim": {"epochs": 2, "batch_size": 8}, "trainer": {"log_every_n_steps": 1}}
    adapt(_cfg(folders, out, **sections, monitor={"knn_k": 5, "checkpoint_every_n_steps": 4}))
    rows = list(csv.DictReader(open(out / "logs" / "version_0" / "metrics.csv")))
    steps = [r for r in rows if r.get("loss")]
    assert len(steps) == 6 and all(float(r["loss"]) > 0 for r in steps)  # every step (3 per epoch)
    assert any(r.get("lr-AdamW/pg1") for r in rows)  # the learning rates of the optimizer's groups
    epochs = [r for r in rows if r.get("epoch/knn_bal_acc")]
    assert [int(r["step"]) for r in epochs] == [3, 6]  # at the history row's step: the steps done
    history = __import__("json").loads((out / "metrics.json").read_text())
    assert [float(r["epoch/dino"]) for r in epochs] == pytest.approx([r["dino"] for r in history])
    hparams = (out / "logs" / "version_0" / "hparams.yaml").read_text()
    assert "tuner.name: apla" in hparams and "optim.epochs: 2" in hparams
    # a resumed session logs into a version of its own
    before = (out / "logs" / "version_0" / "metrics.csv").read_text()
    adapt(_cfg(folders, out, **sections, monitor={"knn_k": 5, "checkpoint_every_n_steps": 4}), resume=True)
    assert (out / "logs" / "version_0" / "metrics.csv").read_text() == before
    assert (out / "logs" / "version_1" / "hparams.yaml").is_file()


def test_a_logger_whose_package_is_missing_names_the_extra(monkeypatch):
    import importlib.util

    from essa.config import TrainerConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(config_mod.ConfigError, match=r'trainer.logger=wandb needs the wandb package: pip install '
                                                     r'"essa\[wandb\]"'):
        config_mod.from_dict(TrainerConfig, {"logger": "wandb"})
    with pytest.raises(config_mod.ConfigError, match="trainer.logger='tb'; valid choices: csv, tensorboard, wandb"):
        config_mod.from_dict(TrainerConfig, {"logger": "tb"})


@pytest.mark.skipif(not XRAYS.is_dir(), reason="shared chest X-rays not found")
def test_the_tensorboard_logger_writes_event_files_in_the_run_directory(folders, tmp_path):  # noqa: F811
    pytest.importorskip("tensorboard", reason="TensorBoard is an extra: pip install 'essa[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from essa.adaptation import adapt

    out = tmp_path / "run"
    adapt(_cfg(folders, out, optim={"epochs": 1, "batch_size": 8},
               trainer={"logger": "tensorboard", "log_every_n_steps": 1}))
    events = EventAccumulator(str(out / "logs" / "version_0"))
    events.Reload()
    assert len(events.Scalars("loss")) == 3 and len(events.Scalars("epoch/knn_bal_acc")) == 1

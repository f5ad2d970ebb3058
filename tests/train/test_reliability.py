"""What a run guarantees (README, "What a run guarantees"): a run SIGKILLed right after any kind of checkpoint write,
or SIGKILLed or Ctrl-C'd (SIGINT) at a seeded random step, resumes to the uninterrupted run's metrics, export choice
and exported weights, bit for bit; one run at a time holds ``--out`` (its lock); operational problems with the run
directory are one line (exit code 2), not tracebacks."""

import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys

import pytest
import torch

from essa import config as config_mod
from essa.adaptation import adapt
from essa.commands import main
from essa.finetuning import finetune, resolve_config as finetune_config
from essa.train.run_dir import RunBusyError, RunDir, RunDirError, RunExistsError
from tests.train.test_adapt import XRAYS, _cfg, folders  # noqa: F401  (folders: the fixture)
from tests.train.test_finetune import BREAST, QUIET, SMALL, _sections

TIMING = {"train_seconds", "images_per_s", "peak_memory_mib"}
ADAPT = {"optim": {"epochs": 3, "batch_size": 8}}  # 24 images: 3 steps per epoch
FINETUNE = {**SMALL, "optim": {**SMALL["optim"], "epochs": 3}, "head": {"init": "random"}}  # 3 steps per epoch


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _killed(command: str, given, kill_after: str) -> None:
    """Run ``essa COMMAND --config GIVEN`` in a subprocess that SIGKILLs itself after the ``kill_after`` write."""
    env = {**os.environ, "ESSA_KILL_AFTER": kill_after}
    proc = subprocess.run([sys.executable, "-m", "essa", command, "--config", str(given)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"not killed after {kill_after}: rc {proc.returncode}\n{proc.stderr}"


def _signalled(command: str, given, signal_at: str) -> subprocess.CompletedProcess:
    """Run ``essa COMMAND --config GIVEN`` as the leader of a process group (a terminal's foreground job: its
    data-loader workers receive the group's signals too) that is sent ``signal_at`` (``INT:n``, ``KILL:n``) at the
    start of the batch after step n; a SIGINT must end it with 130 and one line."""
    env = {**os.environ, "ESSA_SIGNAL_AT": signal_at}
    proc = subprocess.run([sys.executable, "-m", "essa", command, "--config", str(given)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600,
                          start_new_session=True)
    if signal_at.startswith("KILL"):
        assert proc.returncode == -signal.SIGKILL, f"not killed at {signal_at}: rc {proc.returncode}\n{proc.stderr}"
    else:
        step = int(signal_at.split(":")[1]) + 1  # the step the signal fell in finishes first
        assert proc.returncode == 130, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"essa {command}: interrupted: stopped after optimisation step {step} "), last
        assert "; continue with --resume" in last
        assert "Traceback" not in proc.stderr
    return proc


#: (signal, step) pairs, the steps drawn from a seeded generator among the 9 steps of the runs (3 epochs of 3), but
#: the last (after which a Ctrl-C lets the run finish)
SIGNALS = list(zip(("INT", "INT", "KILL"), random.Random(20261201).sample(range(1, 8), 3)))


def _same_weights(a, b) -> None:
    from safetensors.torch import load_file

    sa, sb = load_file(a), load_file(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "the exported weights differ"


KILLS = ["step:4", "epoch:0", "best:0", "epoch:1"]  # last.ckpt mid-epoch (epoch 1), at epoch ends; best.ckpt


@pytest.fixture(scope="module")
def adapt_reference(folders, tmp_path_factory):  # noqa: F811
    return adapt(_cfg(folders, tmp_path_factory.mktemp("ref") / "run", **ADAPT))


@pytest.mark.skipif(not XRAYS.is_dir(), reason="shared chest X-rays not found")
@pytest.mark.parametrize("kill_after", KILLS)
def test_adapt_killed_after_any_checkpoint_write_resumes_to_the_same_export(folders, tmp_path, adapt_reference,  # noqa: F811
                                                                           kill_after):
    out = tmp_path / "killed"
    out.mkdir()
    config_mod.dump(_cfg(folders, out, **ADAPT), out / "given.yaml")
    _killed("adapt", out / "given.yaml", kill_after)
    assert not (out / "backbone.safetensors").exists()
    with pytest.warns(UserWarning, match="taking over the lock"):  # the killed process left its lock
        resumed = adapt(_cfg(folders, out, **ADAPT), resume=True)
    ref = adapt_reference
    assert _strip(resumed["metrics"]) == _strip(ref["metrics"])
    assert resumed["resources"]["exported"] == ref["resources"]["exported"]
    _same_weights(ref["backbone"], resumed["backbone"])
    _same_weights(ref["tuner"], resumed["tuner"])
    assert not (out / ".lock").exists()


@pytest.mark.skipif(not XRAYS.is_dir(), reason="shared chest X-rays not found")
@pytest.mark.parametrize("signal_name,step", SIGNALS)
def test_adapt_interrupted_or_killed_at_a_seeded_step_resumes_to_the_same_export(folders, tmp_path,  # noqa: F811
                                                                                adapt_reference, signal_name, step):
    out = tmp_path / "run"
    out.mkdir()
    # two loader workers (in the process group, as under a terminal), and last.ckpt at epoch ends only: a kill
    # loses the steps since, which the resumed run redoes
    given = _cfg(folders, out, **ADAPT, monitor={"knn_k": 5, "checkpoint_every_n_steps": 0})
    given.data.num_workers = 2
    config_mod.dump(given, out / "given.yaml")
    _signalled("adapt", out / "given.yaml", f"{signal_name}:{step}")
    assert not (out / "backbone.safetensors").exists()
    if signal_name == "INT":
        assert not (out / ".lock").exists()  # a clean stop releases the lock
        saved = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert saved["global_step"] == step + 1
    with pytest.warns(UserWarning, match="taking over the lock") if signal_name == "KILL" else _no_warning():
        resumed = adapt(out / "given.yaml", resume=True)
    ref = adapt_reference
    assert _strip(resumed["metrics"]) == _strip(ref["metrics"])
    assert resumed["resources"]["exported"] == ref["resources"]["exported"]
    _same_weights(ref["backbone"], resumed["backbone"])
    _same_weights(ref["tuner"], resumed["tuner"])


def _no_warning():
    import contextlib

    return contextlib.nullcontext()


@pytest.fixture(scope="module")
def finetune_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    return finetune(finetune_config(sections=_sections(out, **FINETUNE)), trainer_kwargs=QUIET)


@pytest.mark.skipif(not BREAST.is_file(), reason="shared BreastMNIST not found")
@pytest.mark.parametrize("kill_after", KILLS)
def test_finetune_killed_after_any_checkpoint_write_resumes_to_the_same_test(tmp_path, finetune_reference,
                                                                             kill_after):
    out = tmp_path / "killed"
    out.mkdir()
    config_mod.dump(finetune_config(sections=_sections(out, **FINETUNE)), out / "given.yaml")
    _killed("finetune", out / "given.yaml", kill_after)
    with pytest.warns(UserWarning, match="taking over the lock"):
        resumed = finetune(out / "given.yaml", resume=True, trainer_kwargs=QUIET)
    ref, res = finetune_reference["seeds"][0], resumed["seeds"][0]
    ref_rows = json.loads((ref["run_dir"] / "metrics.json").read_text())
    res_rows = json.loads((res["run_dir"] / "metrics.json").read_text())
    assert _strip(res_rows) == _strip(ref_rows)  # the test row names the tested epoch and step
    _same_weights(ref["classifier"], res["classifier"])


@pytest.mark.skipif(not BREAST.is_file(), reason="shared BreastMNIST not found")
@pytest.mark.parametrize("signal_name,step", SIGNALS)
def test_finetune_interrupted_or_killed_at_a_seeded_step_resumes_to_the_same_test(tmp_path, finetune_reference,
                                                                                  signal_name, step):
    out = tmp_path / "run"
    out.mkdir()
    config_mod.dump(finetune_config(sections=_sections(out, **FINETUNE, checkpoint_every_n_steps=0)),
                    out / "given.yaml")
    _signalled("finetune", out / "given.yaml", f"{signal_name}:{step}")
    resumed = finetune(out / "given.yaml", resume=True, trainer_kwargs=QUIET)
    ref, res = finetune_reference["seeds"][0], resumed["seeds"][0]
    ref_rows = json.loads((ref["run_dir"] / "metrics.json").read_text())
    res_rows = json.loads((res["run_dir"] / "metrics.json").read_text())
    assert _strip(res_rows) == _strip(ref_rows)
    _same_weights(ref["classifier"], res["classifier"])


# ----- the lock on --out ---------------------------------------------------------------------------------------
def test_a_busy_run_directory_is_refused_with_its_holder_and_a_dead_holder_is_taken_over(tmp_path):
    run = RunDir(tmp_path / "run")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run.path.mkdir()
        holder = {"pid": sleeper.pid, "host": socket.gethostname(), "start": "2026-01-01 00:00:00 UTC"}
        (run.path / ".lock").write_text(json.dumps(holder))
        with pytest.raises(RunBusyError, match=rf"in use by another run \(pid {sleeper.pid} on "
                                               rf"{socket.gethostname()}, started 2026-01-01 00:00:00 UTC\)"):
            with run.locked():
                pass
        assert json.loads((run.path / ".lock").read_text()) == holder  # untouched
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.warns(UserWarning, match="taking over the lock left by a process that is gone"):
        with run.locked():
            assert json.loads((run.path / ".lock").read_text())["pid"] == os.getpid()
    assert not (run.path / ".lock").exists()
    with pytest.raises(ZeroDivisionError):  # released on failure too
        with run.locked():
            1 / 0
    assert not (run.path / ".lock").exists()
    assert not list(run.path.glob(".lock.*"))


def test_a_second_command_on_a_busy_out_stops_with_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "start": "then"}))
    code = main(["adapt", "--data", str(tmp_path), "--out", str(out), "--epochs", "1", "--backbone",
                 "vit_tiny_patch16_224", "--set", "backbone.pretrained=false"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"pid {os.getppid()}" in err and "in use by another run" in err
    assert not (out / "config.yaml").exists()  # stopped before any work


# ----- operational errors as one line ---------------------------------------------------------------------------
class _Trainer:
    """What save_checkpoint needs of a Trainer; its save writes half a file, then the disk is full."""
    is_global_zero = True

    def save_checkpoint(self, path, weights_only=False):
        path.write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_partial_file(tmp_path):
    from essa.train.run_dir import save_checkpoint

    path = tmp_path / "checkpoints" / "last.ckpt"
    path.parent.mkdir()
    path.write_bytes(b"the previous checkpoint")
    with pytest.raises(RunDirError, match=r"cannot write .*last.ckpt: no space left on the device"):
        save_checkpoint(_Trainer(), path)
    assert path.read_bytes() == b"the previous checkpoint"
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_a_full_disk_while_writing_metrics_is_one_line_and_leaves_no_tmp(tmp_path, monkeypatch):
    run = RunDir(tmp_path)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pathlib.Path.write_text", full)
    with pytest.raises(RunDirError, match="no space left"):
        run.write_metrics([{"epoch": 0, "loss": 1.0}])
    assert not list(tmp_path.iterdir())


#: A backbone for the commands whose config must pass its checks (which come before the run directory) to reach
#: the run-directory error under test.
TINY_BACKBONE = ("--backbone", "vit_tiny_patch16_224", "--set", "backbone.pretrained=false")


def test_a_read_only_out_is_one_line(tmp_path, capsys, monkeypatch):
    # what a read-only folder raises (simulated: tests may run as root, who writes anyway)
    ro = tmp_path / "ro"
    real_mkdir = os.mkdir

    def denied(path, *args, **kwargs):
        if str(path).startswith(str(ro)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", denied)  # what Path.mkdir calls
    code = main(["adapt", "--data", str(tmp_path), "--out", str(ro / "run"), "--epochs", "1", *TINY_BACKBONE])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"cannot create the run directory {ro / 'run'}: permission denied" in err
    monkeypatch.setattr(os, "mkdir", real_mkdir)
    (ro / "run").mkdir(parents=True)

    def link_denied(src, dst, *args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system", str(dst))

    monkeypatch.setattr(os, "link", link_denied)  # the folder exists but cannot be written into
    code = main(["adapt", "--data", str(tmp_path), "--out", str(ro / "run"), "--epochs", "1", *TINY_BACKBONE])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"cannot write into the run directory {ro / 'run'}: permission denied" in err
    assert not list((ro / "run").iterdir())


def test_an_existing_run_without_resume_and_a_corrupt_last_ckpt_are_one_line(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    run.last.write_bytes(b"not a checkpoint at all")
    with pytest.raises(RunExistsError, match="already holds a run .* pass --resume to continue it or choose another"):
        run.prepare(None, resume=False)
    with pytest.raises(RunDirError, match=r"last.ckpt is corrupt and cannot be resumed .*delete it to restart"):
        run.check_last()
    torch.save({"a": torch.zeros(3)}, run.last)
    run.last.write_bytes(run.last.read_bytes()[:40])  # truncated
    with pytest.raises(RunDirError, match="is corrupt"):
        run.check_last()


def test_resume_on_a_directory_without_a_run_says_nothing_to_resume(tmp_path, capsys):
    code = main(["adapt", "--out", str(tmp_path / "new"), "--resume"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"nothing to resume in {tmp_path / 'new'}" in err


# ----- a real full disk and a real read-only file system (a small tmpfs; needs root) ----------------------------
@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs at ``tmp_path / "mnt"`` and give a function that remounts it with options; skipped unless this
    process may mount (root, outside a restricted container)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def mount(*options: str) -> None:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(mnt)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mnt, mount
    while subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
        pass


@pytest.mark.skipif(not XRAYS.is_dir(), reason="shared chest X-rays not found")
def test_a_really_full_disk_is_one_line_leaves_no_partial_file_and_resumes_once_freed(folders, tmp_path, tmpfs,  # noqa: F811
                                                                                      capsys):
    mnt, mount = tmpfs
    mount("size=64k")  # config.yaml and the lock fit; the first checkpoint does not
    out = mnt / "run"
    config_mod.dump(_cfg(folders, out, **ADAPT), tmp_path / "given.yaml")
    assert main(["adapt", "--config", str(tmp_path / "given.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoints/last.ckpt: no space left on the device" in err[0], err
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    # no partial checkpoint, no lock; the preprocessing record (essa.data.normalize) is written before training
    assert left == ["config.yaml", "logs/version_0/hparams.yaml", "preprocessing.json"], left
    mount("remount", "size=64m")
    assert main(["adapt", "--config", str(tmp_path / "given.yaml"), "--resume"]) == 0
    assert (out / "backbone.safetensors").is_file()


def test_a_really_read_only_out_is_one_line(tmp_path, tmpfs, capsys):
    mnt, mount = tmpfs
    mount("size=1m")
    (mnt / "runs").mkdir()
    mount("remount", "ro")
    code = main(["adapt", "--data", str(tmp_path), "--out", str(mnt / "runs" / "a"), "--epochs", "1",
                 *TINY_BACKBONE])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"cannot create the run directory {mnt / 'runs' / 'a'}: permission denied (read-only?)" in err


@pytest.mark.skipif(not XRAYS.is_dir(), reason="shared chest X-rays not found")
def test_keep_checkpoints_all_keeps_every_epoch_end_even_across_a_kill(folders, tmp_path, adapt_reference):  # noqa: F811
    """``all``: ``epoch_NNN.ckpt`` is each epoch end's ``last.ckpt`` (the same file); killed right after epoch 0's
    write, the resumed run has all three and the uninterrupted run's export."""
    out = tmp_path / "killed"
    out.mkdir()
    config_mod.dump(_cfg(folders, out, **ADAPT, trainer={"keep_checkpoints": "all"}), out / "given.yaml")
    _killed("adapt", out / "given.yaml", "epoch:0")
    assert sorted(p.name for p in (out / "checkpoints").glob("*.ckpt")) == ["best.ckpt", "epoch_000.ckpt",
                                                                             "last.ckpt"]
    with pytest.warns(UserWarning, match="taking over the lock"):
        resumed = adapt(out / "given.yaml", resume=True)
    _same_weights(adapt_reference["backbone"], resumed["backbone"])
    names = sorted(p.name for p in (out / "checkpoints").glob("*"))
    assert names == ["best.ckpt", "epoch_000.ckpt", "epoch_001.ckpt", "epoch_002.ckpt", "last.ckpt"]
    assert os.path.samefile(out / "checkpoints" / "epoch_002.ckpt", out / "checkpoints" / "last.ckpt")
    for epoch in range(3):
        saved = torch.load(out / "checkpoints" / f"epoch_{epoch:03d}.ckpt", map_location="cpu", weights_only=True)
        assert saved["epoch"] == epoch and saved["global_step"] == 3 * (epoch + 1)


@pytest.mark.skipif(not XRAYS.is_dir(), reason="shared chest X-rays not found")
@pytest.mark.parametrize("keep, kept", [("none", []), ("last", ["last.ckpt"])])
def test_keep_checkpoints_prunes_a_finished_run_and_says_what_is_left(folders, tmp_path, adapt_reference, keep,  # noqa: F811
                                                                      kept, capsys):
    out = tmp_path / "run"
    given = tmp_path / "given.yaml"
    config_mod.dump(_cfg(folders, out, **ADAPT), given)
    assert main(["adapt", "--config", str(given), "--keep-checkpoints", keep]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == kept
    assert config_mod.read_yaml(out / "config.yaml")["trainer"]["keep_checkpoints"] == keep
    _same_weights(adapt_reference["backbone"], out / "backbone.safetensors")  # pruning came after the export
    capsys.readouterr()
    # the run directory still refuses to be overwritten; a finished run without last.ckpt cannot be resumed
    again = ["adapt", "--config", str(given), "--keep-checkpoints", keep]
    assert main(again) == 2
    err = capsys.readouterr().err
    assert ("already holds a finished run; choose another --out" in err if keep != "last"
            else "already holds a run (checkpoints/last.ckpt)" in err)
    assert main([*again, "--resume"]) == 2
    assert (f"holds a finished run whose checkpoints were pruned (trainer.keep_checkpoints={keep}): there is "
            "nothing to resume") in capsys.readouterr().err


@pytest.mark.parametrize("keep, kept", [("last,best", ["best.ckpt", "last.ckpt"]), ("last", ["last.ckpt"]),
                                        ("best", ["best.ckpt"]), ("none", []),
                                        ("all", ["best.ckpt", "epoch_000.ckpt", "last.ckpt"])])
def test_prune_keeps_what_keep_checkpoints_names(tmp_path, keep, kept):
    run = RunDir(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    for name in ("last.ckpt", "best.ckpt", "epoch_000.ckpt"):
        (run.checkpoints / name).write_bytes(b"x")
    run.prune(keep)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == kept


def test_keep_checkpoints_refuses_other_values():
    with pytest.raises(config_mod.ConfigError, match=r"trainer.keep_checkpoints='some'; valid choices: last,best, "
                                                     "last, best, all, none"):
        config_mod.TrainerConfig(keep_checkpoints="some").validate()

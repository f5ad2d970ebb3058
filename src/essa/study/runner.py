"""Running a study: every unfinished cell in order (SSA and fine-tuning cells each in a fresh process of a fork
server), its status in ``cells.json``, progress with an estimate of the time left, and the results and report
rewritten after every cell."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from essa import config as config_mod, io
from essa.errors import InputError, Interrupted, NotFoundError
from essa.study.config import StudyConfig
from essa.study.grid import Cell, Grid
from essa.study.results import Results, WeightChanges, environment, load_average, study_results
from essa.train.progress import duration

#: The file that records every cell's status and duration.
CELLS_FILE = "cells.json"


class Study(Grid):
    """The cells of a study (:class:`~essa.study.grid.Grid`), run, and their results and report."""

    def __init__(self, config: StudyConfig | str | Path | None = None, *, overrides: list[str] | None = None,
                 trainer_kwargs: dict | None = None, **sections):
        super().__init__(config, overrides=overrides, trainer_kwargs=trainer_kwargs, **sections)
        self._weight_changes = WeightChanges(self.cfg.backbone, self.cfg.img_size)

    def check_inputs(self) -> None:
        """Fail before any work when a cell's config does not validate (a mistyped stage key such as
        ``ssa.config.ssl.protoypes``, a bad value), a dataset cannot be read or split, or the backbone cannot be
        built."""
        self.check_configs()
        for dataset in self.datasets:
            self.task_of(dataset)
        model = self.cfg.backbone.build(img_size=self.cfg.img_size)
        from essa.backbones import check_img_size

        check_img_size(self.cfg.img_size, model.patch_embed.patch_size[0], "img_size")

    def check_configs(self) -> None:
        """Resolve every cell's whole config (AdaptConfig, FinetuneConfig, EvalConfig) as its command will, which
        checks its keys and values; the first bad one is a ConfigError naming the cell."""
        from essa.adaptation import AdaptConfig
        from essa.evaluate.run import EvalConfig
        from essa.finetuning import FinetuneConfig

        kinds = {"ssa": (AdaptConfig, self.adapt_sections), "finetune": (FinetuneConfig, self.finetune_sections),
                 "probe": (EvalConfig, self.probe_sections)}
        checked: set[str] = set()
        for cell in self.cells:
            cls, sections = kinds[cell.kind]
            key = f"{cell.kind} {Path(cell.id).parent if cell.kind == 'finetune' else cell.id}"
            if key in checked:  # the seeds of one fine-tuning run share its config
                continue
            checked.add(key)
            try:
                config_mod.resolve(cls, None, sections(*cell.args))
            except config_mod.ConfigError as err:
                raise config_mod.ConfigError(f"cell {cell.path.relative_to(self.out).as_posix()}: {err}") from None

    def run(self, log: Callable[[str], None] = print) -> dict[str, Any]:
        """Run every unfinished cell; returns the results (also in ``results.json``), the report paths and
        ``failed`` (cell id -> error of each failed cell)."""
        self.check_inputs()
        self._session = (time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), load_average())
        self.out.mkdir(parents=True, exist_ok=True)
        config_mod.dump(self.cfg, self.out / "config.yaml")
        state = self.on_disk(io.read_json(self.out / CELLS_FILE) or {})
        failed: set[str] = set()
        for cell in self.cells:
            if self.finished(cell):
                if state.get(cell.id, {}).get("status") != "done":
                    state[cell.id] = {"status": "done", "seconds": None}  # finished outside this record
                continue
            if cell.needs is not None and cell.needs.id in failed:
                failed.add(cell.id)
                state[cell.id] = {"status": "failed", "seconds": None, "error": f"{cell.needs.id} failed"}
                continue
            if cell.finished():  # a record without its export, which cells still to run need: SSA runs again
                aside = cell.path.with_name(cell.path.name + ".record")
                shutil.rmtree(aside, ignore_errors=True)
                cell.path.rename(aside)
                log(f"[study] {cell.id}: its export is not here and cells still to run need it; it runs again "
                    f"(the same seed and config give the same export), its record moved to {aside}")
            log(self.progress(state, cell))
            start = time.perf_counter()
            try:
                if self.cfg.fresh_process and cell.kind != "probe" and not self.distributed:
                    _run_in_fresh_process(self.out / "config.yaml", cell.id)
                else:
                    cell.run()
                state[cell.id] = {"status": "done", "seconds": time.perf_counter() - start}
            except Interrupted as err:  # Ctrl-C: the cell saved where it stopped; the study stops here
                io.write_json(self.out / CELLS_FILE, state, default=str)
                raise Interrupted(f"interrupted in cell {cell.id}: {err.where}; rerun the same essa run command to "
                                  "continue (finished cells are kept, this one resumes)", err.where) from None
            except (ValueError, RuntimeError, OSError) as err:  # a broken cell must not stop the others
                failed.add(cell.id)
                state[cell.id] = {"status": "failed", "seconds": time.perf_counter() - start,
                                  "error": f"{type(err).__name__}: {err}"}
                log(f"[study] {cell.id} failed: {err}\n{traceback.format_exc(limit=3)}")
            io.write_json(self.out / CELLS_FILE, state, default=str)
            self.report(state)
        io.write_json(self.out / CELLS_FILE, state, default=str)
        results, paths = self.report(state)
        log(self.progress(state, None))
        failures = {c.id: state[c.id].get("error", "failed") for c in self.cells
                    if state.get(c.id, {}).get("status") == "failed"}
        return {"results": results, **paths, "failed": failures}

    def finished(self, cell: Cell) -> bool:
        """Whether ``cell`` need not run: its outputs are complete, or its record is (checkpoints and exports left
        out: :meth:`save_record`) and no cell still to run needs what the record leaves out (an SSA export)."""
        if cell.done():
            return True
        return cell.finished() and all(other.finished() for other in self.cells if other.needs is cell)

    def on_disk(self, state: dict) -> dict:
        """``cells.json``'s ``state`` as the run directory stands: a cell recorded done whose outputs and record
        are gone (moved or deleted, to be redone) is to run again, so it is neither counted done nor timed."""
        gone = {c.id for c in self.cells if state.get(c.id, {}).get("status") == "done" and not c.finished()}
        return {cell_id: entry for cell_id, entry in state.items() if cell_id not in gone}

    def save_record(self, dest: str | Path) -> Path:
        """Copy the study's record to ``dest``: every file of its directory but checkpoints, exports
        (``*.safetensors``) and locks, which is what its results and report read (a few MB where the whole
        directory holds GB). Kept in git, it carries a long study across machines: copy it back to the study's
        ``out`` and ``essa run`` skips every recorded cell, redoing an SSA run only where cells still to run need
        its export. Returns ``dest``."""
        dest = Path(dest)
        if not self.out.is_dir():
            raise NotFoundError(f"{self.out} holds no study to save the record of (run it first)")
        if dest.resolve() == self.out.resolve() or self.out.resolve() in dest.resolve().parents:
            raise InputError(f"--save-record {dest}: the record goes outside the study's directory {self.out}")
        for cell in self.cells:  # the weight change of each export, which the record keeps in its place
            if cell.kind == "ssa" and cell.done():
                self.weight_change(cell.path / "backbone.safetensors")
        shutil.copytree(self.out, dest, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("checkpoints", "*.ckpt", "*.safetensors", ".lock"))
        return dest

    def progress(self, state: dict, running: Cell | None) -> str:
        """``[study] 3/14 done, running: ..., 10 left, about 12 min left``; the estimate is the mean duration of
        the finished cells of each kind times the cells of that kind still to run."""
        done = [c for c in self.cells if state.get(c.id, {}).get("status") == "done"]
        failed = [c for c in self.cells if state.get(c.id, {}).get("status") == "failed"]
        left = [c for c in self.cells if c not in done and c not in failed]
        seconds: dict[str, list[float]] = {}
        for c in done:
            if state[c.id].get("seconds") is not None:
                seconds.setdefault(c.kind, []).append(state[c.id]["seconds"])
        known = [c for c in left if c.kind in seconds]
        estimate = sum(sum(seconds[c.kind]) / len(seconds[c.kind]) for c in known)
        eta = f"about {duration(estimate)} left" if known else "no estimate yet"
        if len(known) < len(left) and known:
            eta += f" for {len(known)} of them"
        parts = [f"[study] {len(done)}/{len(self.cells)} done"]
        if failed:
            parts.append(f"{len(failed)} failed")
        if running is not None:
            parts.append(f"running: {running.kind} {running.id}")
        if not left:
            return ", ".join(parts)
        parts.append(f"{len(left) - (running is not None)} left after it" if running else f"{len(left)} left")
        return ", ".join(parts) + f" ({eta})"

    def weight_change(self, export: Path) -> float | None:
        """How far SSA moved the backbone in ``export`` (:class:`~essa.study.results.WeightChanges`)."""
        return self._weight_changes(export)

    def results(self, state: dict) -> Results:
        """What :func:`essa.report.write_report` reads (the schema: :mod:`essa.study.results`)."""
        return study_results(self, state, self.weight_change)

    def report(self, state: dict) -> tuple[Results, dict]:
        from essa.report import write_report  # matplotlib: only once there is something to report

        results = self.results(state)
        results["environment"] = environment(*getattr(self, "_session", (None, None)))
        io.write_json(self.out / "results.json", results, default=str)
        return results, write_report(results, self.out)


class CellError(RuntimeError):
    """A cell run in a fresh process failed; the message is the child's error."""


def _cell_main(config: str, cell_id: str, errors) -> None:
    """The body of a fresh cell process: rebuild the study's grid from its saved config and run one cell.

    The cell leads a process group of its own: a terminal's Ctrl-C reaches the study, which passes each one on
    (:func:`_run_in_fresh_process`), so the cell sees one SIGINT per Ctrl-C and stops after its step."""
    import multiprocessing

    from essa._die_with_parent import die_with_parent

    die_with_parent()  # the fork server, which dies with the study
    os.setpgrp()
    multiprocessing.set_start_method("fork", force=True)  # data-loader workers as in a plain process
    cell = next(c for c in Grid(config).cells if c.id == cell_id)
    try:
        cell.run()
    except Interrupted as err:
        errors.put((True, err.where))
        raise
    except Exception as err:
        errors.put((False, f"{type(err).__name__}: {err}"))
        raise


def _run_in_fresh_process(config: Path, cell_id: str) -> None:
    """Run one cell in a child of a fork server that imported the training stack once (a child starts in well
    under a second, and never inherits this process's threads or heap). A SIGINT to the study while the cell runs
    is passed on to the cell, which stops after its step (:mod:`essa.train.interrupt`); then :class:`Interrupted`."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["essa._die_with_parent", "essa.adaptation", "essa.finetuning", "essa.train.ssa",
                                "essa.train.classify", "lightning", "timm"])
    errors = ctx.Queue()
    process = ctx.Process(target=_cell_main, args=(str(config), cell_id, errors))
    process.start()
    passed_on = []

    def pass_on(signum, frame):
        passed_on.append(signum)
        if process.exitcode is None:
            os.kill(process.pid, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, pass_on) if threading.current_thread() is threading.main_thread() else None
    try:
        process.join()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if process.exitcode != 0:
        interrupted, message = errors.get(timeout=1) if not errors.empty() else (
            False, f"exit code {process.exitcode}")
        if interrupted or passed_on:
            raise Interrupted(message, message)
        raise CellError(message)


def run(config: StudyConfig | str | Path | None = None, *, overrides: list[str] | None = None,
        trainer_kwargs: dict | None = None, log: Callable[[str], None] = print, **sections) -> dict[str, Any]:
    """Run a study (see :mod:`essa.study`). Returns {"results", "markdown", "html", "figures"}."""
    return Study(config, overrides=overrides, trainer_kwargs=trainer_kwargs, **sections).run(log)

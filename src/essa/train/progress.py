"""Progress a log file can show: plain lines instead of a redrawn bar when the output is not a terminal (nohup,
SLURM, CI), and quiet libraries.

- :class:`ProgressLines`: a line at the first step and then every ``every`` seconds of training (step/total, epoch,
  loss, images/s, time left), and one line per epoch with its metrics.
- :func:`progress_mode`: ``trainer.progress`` resolved: ``auto`` is the bar on a terminal and lines elsewhere.
- :func:`quiet_libraries`: Lightning's start-up notes (the accelerator block, its logger advert) and library
  deprecation warnings hidden, unless ``ESSA_VERBOSE=1`` (``essa -v``).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings

from lightning.pytorch.callbacks import Callback
#: Lightning's loggers of start-up notes (info level): hidden unless verbose.
_NOTE_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.accelerators.cuda")


def progress_mode(progress: str, stream=None) -> str:
    """``progress`` with ``auto`` resolved against ``stream`` (default stdout): ``bar`` on a terminal, else
    ``lines``."""
    if progress != "auto":
        return progress
    stream = sys.stdout if stream is None else stream
    return "bar" if getattr(stream, "isatty", lambda: False)() else "lines"


def verbose() -> bool:
    return os.environ.get("ESSA_VERBOSE", "") not in ("", "0")


def quiet_libraries() -> None:
    """Hide Lightning's start-up notes and library deprecation warnings (module docstring) unless verbose."""
    if verbose():
        return
    for name in _NOTE_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(lightning|torch|timm)(\.|$)")


def duration(seconds: float) -> str:
    """``42 s``, ``12 min``, ``3.4 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _number(value) -> str:
    value = float(value)
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    return f"{value:.4g}" if abs(value) >= 1e-3 else f"{value:.2e}"


class ProgressLines(Callback):
    """Plain progress lines on ``stream`` (default stdout), from global rank 0: ``[name] epoch 2/3, step 120/440
    (27 %), loss 5.412, 12.3 images/s, about 14 min left``, at the first step of a session and then at most every
    ``every`` seconds (images/s: of process 0 since the session started, data loading included); after each epoch, ``[name] epoch 2/3 done: `` and the epoch's history row (the module's
    ``history``, written by :class:`essa.train.run_dir.EpochEnd`, which must come first in the callbacks)."""

    def __init__(self, name: str, every: float = 30.0, stream=None):
        self.name, self.every, self.stream = name, every, stream
        self._start = self._last = None
        self._start_step = self._images = 0

    def _print(self, trainer, text: str) -> None:
        if trainer.is_global_zero:
            print(f"[{self.name}] {text}", file=self.stream or sys.stdout, flush=True)

    def on_train_start(self, trainer, pl_module):
        self._start, self._last, self._start_step = time.monotonic(), None, trainer.global_step
        self._images = 0  # of this process, since the session started: with loading, as the user waits for them

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        count = getattr(pl_module, "batch_images", None)
        self._images += count(batch) if count is not None else len(batch)
        now = time.monotonic()
        if self._last is not None and now - self._last < self.every:
            return
        self._last = now
        step, total = trainer.global_step, trainer.estimated_stepping_batches
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}",
                 f"step {step}/{total} ({100 * step / max(total, 1):.0f} %)"]
        loss = trainer.callback_metrics.get("loss")
        if loss is not None:
            parts.append(f"loss {_number(loss)}")
        done = step - self._start_step
        if done > 0 and now > self._start:
            parts.append(f"{self._images / (now - self._start):.1f} images/s")
        if done > 0 and math.isfinite(total):
            parts.append(f"about {duration((now - self._start) / done * (total - step))} left")
        self._print(trainer, ", ".join(parts))

    def on_train_epoch_end(self, trainer, pl_module):
        history = getattr(pl_module, "history", None)
        row = history[-1] if history else {}
        metrics = ", ".join(f"{k} {_number(v)}" for k, v in row.items()
                            if k not in ("epoch", "step") and isinstance(v, (int, float)) and not isinstance(v, bool))
        self._print(trainer, f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} done"
                             + (f": {metrics}" if metrics else ""))

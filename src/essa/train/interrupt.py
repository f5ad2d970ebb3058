"""Ctrl-C as a clean stop: the first SIGINT lets the running optimisation step finish, writes ``last.ckpt`` there and
ends the run with :class:`essa.errors.Interrupted` (one line, exit code 130), so ``--resume`` continues it exactly
and nothing since the last periodic checkpoint is lost; a second SIGINT stops at once (``--resume`` then continues
from the last checkpoint written).

A terminal's Ctrl-C reaches every process of the foreground group, the data-loader workers too: they ignore it
(:func:`worker_init`), so the batches the last step needs are still delivered; the main process decides.

Test hook: ``ESSA_SIGNAL_AT=<INT|KILL>:<n>`` sends that signal at the start of the batch after optimisation step
``n`` (to the process group when this process leads one, as a terminal's Ctrl-C does; else to this process alone).
Unset, it costs one dictionary look-up per batch.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from essa.errors import Interrupted


class StopRequest:
    """While entered (in the main thread; elsewhere it does nothing), SIGINT sets :attr:`requested` instead of
    raising; a second SIGINT raises :class:`Interrupted` at once. The previous handler comes back on exit."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            where = "stopped at once (a second Ctrl-C), at the last checkpoint written (checkpoints/last.ckpt)"
            raise Interrupted(f"interrupted: {where}; --resume continues from there", where)
        self.requested = True
        print("essa: interrupted: stopping after this step and saving checkpoints/last.ckpt "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)


def worker_init(worker_id: int) -> None:
    """A data-loader worker's start: SIGINT is the main process's to act on (module docstring); then Lightning's
    per-worker seeding, which it adds itself to a loader that has no ``worker_init_fn``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):  # set by seed_everything(workers=True)
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)


def signal_hook(step: int) -> None:
    """The test hook (module docstring), called at the start of each batch with the optimisation steps done."""
    spec = os.environ.get("ESSA_SIGNAL_AT")
    if not spec:
        return
    name, _, at = spec.partition(":")
    if int(at) != step:
        return
    os.environ.pop("ESSA_SIGNAL_AT")  # once: batches of one step (gradient accumulation), a resumed run's redo
    sig = {"INT": signal.SIGINT, "KILL": signal.SIGKILL}[name]
    if os.getpgid(0) == os.getpid():
        os.killpg(os.getpid(), sig)
    else:
        os.kill(os.getpid(), sig)

"""Training throughput of a LightningModule: the images and seconds of its optimisation steps."""

from __future__ import annotations

import time

import torch


class StepTiming:
    """Mixin: ``self.timing`` counts images and seconds of optimisation steps only (forward, backward, optimizer;
    no data loading, no validation). Call :meth:`start_step` when a batch starts and :meth:`end_step` right after
    the optimizer step, before any callback's ``on_train_batch_end``, so that a checkpoint saved there counts the
    step; keep ``self.timing`` in checkpoints so a resumed run goes on counting. With gradient accumulation a step
    spans several batches: the clock starts with the first and the images of all of them count."""

    timing: dict
    _step_images: int = 0

    def start_step(self, images: int) -> None:
        if not self._step_images:
            self._step_start = time.perf_counter()
        self._step_images += images

    def end_step(self, into: dict | None = None) -> None:
        """``into``: the counts to add the step to (default ``self.timing``), e.g. a warm-up's own."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timing = self.timing if into is None else into
        timing["seconds"] += time.perf_counter() - self._step_start
        timing["images"] += self._step_images
        self._step_images = 0

    @property
    def images_per_s(self) -> float:
        """Training throughput: images per second of optimisation steps."""
        return self.timing["images"] / self.timing["seconds"] if self.timing["seconds"] else float("nan")

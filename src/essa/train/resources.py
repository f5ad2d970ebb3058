"""What a training run costs: its throughput (images and seconds of its optimisation steps), its peak memory, and
the heap it hands back. The stages measure with these; ``essa.bench`` reads the same meters."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import time
from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=1)
def malloc_trim():
    """glibc's ``malloc_trim``, or None where there is none (not glibc)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``; a no-op elsewhere). The next allocations there
    fault fresh pages in: about a millisecond per 10 MiB."""
    trim = malloc_trim()
    if trim is not None:
        trim(0)


def restart_cpu_peak() -> None:
    """Make the next peak resident memory of this process its own: free what earlier work left in the heap (glibc
    keeps freed memory resident, where the next run would reuse it unseen), then restart the kernel's high-water
    mark (Linux ``clear_refs``; it also resets ``ru_maxrss``, which MemoryMeter reads on CPU)."""
    gc.collect()
    release_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: the peak then covers the process so far
        pass


class MemoryMeter:
    """Peak training memory in MiB from construction on: on CUDA the allocator's peak of allocated memory, on CPU
    the process's peak resident set size (``ru_maxrss``) above what it held at construction. ``restart``: on
    CPU, first :func:`restart_cpu_peak`, for several runs in one process (each then measures its own peak)."""

    def __init__(self, device: torch.device, restart: bool = False):
        self.device = device
        if restart and device.type == "cpu":
            restart_cpu_peak()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
        else:
            import psutil

            self.base = psutil.Process().memory_info().rss

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        return (peak - self.base) / 2**20


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

    def end_step(self, into: dict | tuple[dict, ...] | None = None) -> None:
        """``into``: the counts to add the step to (default ``self.timing``), e.g. a warm-up's own, or a tuple of
        counts that each get it (the whole run's and a phase's)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self._step_start
        for timing in into if isinstance(into, tuple) else (self.timing if into is None else into,):
            timing["seconds"] += seconds
            timing["images"] += self._step_images
        self._step_images = 0

    @property
    def images_per_s(self) -> float:
        """Training throughput: images per second of optimisation steps."""
        return self.timing["images"] / self.timing["seconds"] if self.timing["seconds"] else float("nan")

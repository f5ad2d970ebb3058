"""Reproducible, resumable data loading.

A run killed mid-epoch and resumed must see exactly the batches an uninterrupted run sees. Three pieces make that so:

- :class:`EpochSampler` draws a seeded permutation per epoch and yields keys ``(epoch, index)``;
- :class:`SeededDataset` seeds the random generators from ``(seed, epoch, index)`` before it reads an item,
  so random augmentation depends on neither the worker that runs it nor what ran before;
- :class:`ResumableLoader` keeps its position in the epoch and saves it in Lightning checkpoints (Lightning
  stores the ``state_dict`` of loaders that have one); on resume the sampler skips the batches already trained.

A run whose views change at given optimisation steps (``ssl.curriculum``: low-resolution crops first) keys its
samples by phase too (:meth:`EpochSampler.key_phases`): the sampler knows which step each sample's batch trains, so
the phase follows from the key as the augmentation does, and a resumed run gets the same views; the dataset hands
it to a :class:`PhasedTransform`.

:func:`training_loader` puts the three together for the training images of a stage (``essa adapt`` and
``essa finetune`` both build theirs with it).
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from essa.config import ConfigError
from essa.data import ImageDataset
from essa.train.interrupt import worker_init

Key = tuple[int, ...]  # (epoch, index), or (epoch, index, phase) with EpochSampler.key_phases


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64 steps): stable across processes and Python versions."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = (x ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x >> 1


class EpochSampler(Sampler[Key]):
    """Seeded shuffle per epoch, sharded over ``num_replicas`` ranks, with a mid-epoch resume point.

    Every rank draws the same permutation and takes every ``num_replicas``-th item of it; with ``drop_last`` the
    permutation is cut to a multiple of ``num_replicas * batch_size`` so all ranks run the same number of steps.
    Batch ``b`` of all ranks together is then exactly batch ``b`` of one process with batch size
    ``num_replicas * batch_size``: a sharded run trains on the same global batches as an unsharded one.
    """

    def __init__(self, size: int, seed: int, batch_size: int, shuffle: bool = True, drop_last: bool = True,
                 num_replicas: int = 1, rank: int = 0):
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.size, self.seed, self.batch_size = size, seed, batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, samples of this rank to skip)
        self.phase_starts: tuple[int, ...] = ()  # key_phases'
        self.accumulate = 1

    def shard(self, num_replicas: int, rank: int) -> None:
        """Sample the share of process ``rank`` of ``num_replicas`` from now on (set before the first epoch)."""
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"EpochSampler.shard: rank {rank} of {num_replicas} processes; need 0 <= rank < "
                             "num_replicas")
        self.num_replicas, self.rank = num_replicas, rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, samples: int) -> None:
        self.epoch, self._skip = epoch, (epoch, samples)

    def key_phases(self, starts: Sequence[int], accumulate: int = 1) -> None:
        """Key every sample ``(epoch, index, phase)`` from now on: ``phase`` counts the optimisation steps of
        ``starts`` (ascending) that the step training the sample's batch has reached (0 before the first). A step
        trains ``accumulate`` batches of this rank (Lightning's ``accumulate_grad_batches``; the last step of an
        epoch closes what is left), so steps count as the Trainer's ``global_step`` does. Call after :meth:`shard`."""
        starts = tuple(int(s) for s in starts)
        if list(starts) != sorted(starts) or any(s < 0 for s in starts) or accumulate < 1:
            raise ValueError(f"EpochSampler.key_phases: starts {starts} must be ascending steps >= 0 and accumulate "
                             f"{accumulate} at least 1")
        self.phase_starts, self.accumulate = starts, accumulate

    def steps_per_epoch(self, samples: int | None = None) -> int:
        """Optimisation steps in an epoch of ``samples`` of this rank (default: ``len(self)``)."""
        samples = len(self) if samples is None else samples
        batches = samples // self.batch_size if self.drop_last else math.ceil(samples / self.batch_size)
        return math.ceil(batches / self.accumulate)

    def phase(self, step: int) -> int:
        """The phase of optimisation step ``step`` (see :meth:`key_phases`)."""
        return bisect.bisect_right(self.phase_starts, step)

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        per_step = self.num_replicas * self.batch_size
        if self.drop_last:
            order = order[: len(order) // per_step * per_step]
        return order[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        return len(self._indices())

    def __iter__(self):
        indices = self._indices()
        start = self._skip[1] if self._skip is not None and self._skip[0] == self.epoch else 0
        self._skip = None
        if not self.phase_starts:
            return iter([(self.epoch, i) for i in indices[start:]])
        # a sample's step from its place in the whole epoch: the same whether the epoch is resumed or not
        first = self.epoch * self.steps_per_epoch(len(indices))
        return iter([(self.epoch, i, self.phase(first + p // self.batch_size // self.accumulate))
                     for p, i in enumerate(indices[start:], start)])


class PhasedTransform:
    """One transform per phase of a run (``ssl.curriculum``: the low-resolution views, then the full-size ones):
    ``transforms[phase]``, where :class:`SeededDataset` sets ``phase`` from the key of each item right before it
    reads it, in the process that reads it (as it seeds the random generators there)."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)
        self.phase: int | None = None

    def __call__(self, image):
        if self.phase is None:
            raise RuntimeError("PhasedTransform: no phase was given: the loader's EpochSampler must key its samples "
                               "by phase (EpochSampler.key_phases)")
        return self.transforms[min(self.phase, len(self.transforms) - 1)](image)


class SeededDataset(Dataset):
    """``(base[index], key)`` for keys ``(epoch, index)``, with torch / random / numpy seeded from
    ``(seed, epoch, index)`` first, so that the random transforms inside ``base`` are reproducible. A key
    ``(epoch, index, phase)`` also sets the phase of ``base.transform`` when that is a :class:`PhasedTransform`."""

    def __init__(self, base: Dataset, seed: int):
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: Key):
        epoch, index, *phase = key
        seed = mix_seed(self.seed, epoch, index)
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        transform = getattr(self.base, "transform", None)
        if phase and isinstance(transform, PhasedTransform):
            transform.phase = phase[0]
        return self.base[index], key


class ResumableLoader(DataLoader):
    """A DataLoader whose position within the epoch is saved in checkpoints and restored on resume.

    ``position`` counts the batches of the current epoch that were handed out; a consumer that reads ahead
    (Lightning's fetcher prefetches one batch) sets it to the number it has finished before a checkpoint
    (:class:`essa.train.run_dir.Checkpointing` does).
    """

    def __init__(self, dataset: Dataset, sampler: EpochSampler, **kwargs):
        super().__init__(dataset, sampler=sampler, batch_size=sampler.batch_size, drop_last=sampler.drop_last,
                         **kwargs)
        self.position = 0
        self._epoch = sampler.epoch

    def __iter__(self):
        sampler: EpochSampler = self.sampler
        skip = sampler._skip
        self._epoch = sampler.epoch
        self.position = skip[1] // self.batch_size if skip and skip[0] == sampler.epoch else 0
        for batch in super().__iter__():
            self.position += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume(state["epoch"], state["batches"] * self.batch_size)


def training_loader(source, records: list, transform, *, seed: int, batch_size: int, num_workers: int,
                    collate_fn=None, what: str) -> ResumableLoader:
    """A training stage's loader: ``records`` of ``source`` through ``transform`` (an :class:`essa.data.ImageDataset`,
    which replaces an unreadable file by the next readable one and lists it in its report), augmented as
    :class:`SeededDataset` seeds it, in the order of :class:`EpochSampler` (``batch_size`` per process), resumable
    mid-epoch; its workers leave Ctrl-C to the main process (:func:`essa.train.interrupt.worker_init`). Refuses
    fewer images than one batch (``what`` names them in the message)."""
    if len(records) < batch_size:
        raise ConfigError(f"{what} has {len(records)} images, fewer than one batch (optim.batch_size={batch_size}); "
                         "lower --batch-size")
    dataset = SeededDataset(ImageDataset(source, records, transform), seed)
    sampler = EpochSampler(len(records), seed, batch_size)
    return ResumableLoader(dataset, sampler, collate_fn=collate_fn, num_workers=num_workers, persistent_workers=False,
                           worker_init_fn=worker_init)

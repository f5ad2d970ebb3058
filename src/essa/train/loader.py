"""Reproducible, resumable data loading.

A run killed mid-epoch and resumed must see exactly the batches an uninterrupted run sees. Three pieces make that so:

- :class:`EpochSampler` draws a seeded permutation per epoch and yields keys ``(epoch, index)``;
- :class:`SeededDataset` seeds the random generators from ``(seed, epoch, index)`` before it reads an item,
  so random augmentation depends on neither the worker that runs it nor what ran before;
- :class:`ResumableLoader` keeps its position in the epoch and saves it in Lightning checkpoints (Lightning
  stores the ``state_dict`` of loaders that have one); on resume the sampler skips the batches already trained.

:func:`training_loader` puts the three together for the training images of a stage (``essa adapt`` and
``essa finetune`` both build theirs with it).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from essa.config import ConfigError
from essa.data import ImageDataset
from essa.train.interrupt import worker_init

Key = tuple[int, int]  # (epoch, index)


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
        if self._skip is not None and self._skip[0] == self.epoch:
            indices = indices[self._skip[1] :]
        self._skip = None
        return iter([(self.epoch, i) for i in indices])


class SeededDataset(Dataset):
    """``(base[index], key)`` for keys ``(epoch, index)``, with torch / random / numpy seeded from
    ``(seed, epoch, index)`` first, so that the random transforms inside ``base`` are reproducible."""

    def __init__(self, base: Dataset, seed: int):
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: Key):
        epoch, index = key
        seed = mix_seed(self.seed, epoch, index)
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
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

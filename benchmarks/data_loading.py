"""Data loading speed next to training speed: can decoding keep a ViT-S busy on this machine?

Reproduce (about a minute on 2 CPU cores)::

    python benchmarks/data_loading.py
    python benchmarks/data_loading.py --data ../shared/data/brain_tumor_mri --workers 0 2 4 --batches 20

Prints images/s of ``essa.data.ImageDataset`` with ``train_transform(224)`` through a torch DataLoader (batch 32)
for each worker count, with and without the on-disk cache (``DiskCache``, warm), then images/s of one
forward + backward + AdamW step of ``vit_small_patch16_224`` at 224 px on batch 32.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from essa import backbones, data

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ESSA_SHARED", REPO.parent / "shared"))
BATCH = 32


def loader_rate(dataset, workers: int, batches: int) -> float:
    """Images/s over ``batches`` batches, after a first batch that pays for starting the workers."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * BATCH / (time.perf_counter() - start)


def train_step_rate(steps: int) -> float:
    """Images/s of forward + backward + AdamW step of ViT-S/16 at 224 px (one warm-up step first)."""
    model = backbones.create("vit_small_patch16_224", img_size=224, num_classes=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, labels = torch.randn(BATCH, 3, 224, 224), torch.randint(0, 2, (BATCH,))

    def step():
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "data" / "chest_xray_pneumonia" / "train"))
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batches", type=int, default=10, help="timed batches per loader setting")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps")
    args = parser.parse_args()
    if not Path(args.data).exists():
        print(f"no data at {args.data}: give --data, or set ESSA_SHARED to the shared folder", file=sys.stderr)
        return 2

    print(f"# python benchmarks/data_loading.py --data {args.data} --workers {' '.join(map(str, args.workers))} "
          f"--batches {args.batches} --steps {args.steps}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, batch {BATCH}")
    source = data.open_source(args.data)
    transform = data.transforms.train_transform(224)
    print(f"data: {source}")
    with tempfile.TemporaryDirectory() as folder:
        cache = data.DiskCache(folder, size=224)
        for workers in args.workers:
            plain = loader_rate(data.ImageDataset(source, transform=transform), workers, args.batches)
            cached_dataset = data.ImageDataset(source, transform=transform, cache=cache)
            loader_rate(cached_dataset, workers, args.batches)  # fills the cache for the batches it reads
            cached = loader_rate(cached_dataset, workers, args.batches)
            print(f"loader, {workers} workers: {plain:8.1f} images/s decoding, {cached:8.1f} images/s from the cache")
    train = train_step_rate(args.steps)
    print(f"ViT-S/16 224 px train step (forward + backward + AdamW): {train:8.1f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

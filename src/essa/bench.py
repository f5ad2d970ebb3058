"""Memory and throughput of training steps, each configuration measured in a fresh process.

A fresh process per configuration keeps one configuration's allocator state (and, on CPU, its high-water mark of
resident memory) from leaking into the next. Memory is the training memory: on CUDA the peak of allocated memory
from model creation on; on CPU the peak resident set size minus the resident size before the model was built
(weights, gradients, optimizer state and activations, plus allocator slack).
"""

from __future__ import annotations

import importlib
import json
import resource
import subprocess
import sys
import time
from typing import Any, Callable

import torch

_RESULT_PREFIX = "ESSA_BENCH_RESULT "


class MemoryMeter:
    """Peak training memory in MiB from construction on (see module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
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


def time_steps(step: Callable[[], None], images_per_step: int, device: torch.device, warmup: int, steps: int) -> dict:
    """Run ``warmup`` untimed then ``steps`` timed calls of ``step``: images/s and seconds per step."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    return {"images_per_s": images_per_step * steps / elapsed, "step_s": elapsed / steps}


def supervised_step(
    backbone: str,
    tuner: str,
    options: dict | None = None,
    img_size: int = 224,
    batch_size: int = 16,
    num_classes: int = 10,
    warmup: int = 1,
    steps: int = 3,
    device: str = "cpu",
    lr: float = 1e-4,
) -> dict[str, Any]:
    """One supervised training step (forward, cross-entropy, backward, AdamW) of ``backbone`` with ``tuner``."""
    from essa import backbones, tuners

    dev = torch.device(device)
    torch.manual_seed(0)
    meter = MemoryMeter(dev)
    model = backbones.create(backbone, img_size=img_size, num_classes=num_classes).to(dev)
    tuners.apply(model, tuner, **(options or {}))
    params = list(tuners.trainable_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    x = torch.randn(batch_size, 3, img_size, img_size, device=dev)
    y = torch.randint(0, num_classes, (batch_size,), device=dev)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    timing = time_steps(step, batch_size, dev, warmup, steps)
    trainable, total = tuners.count_parameters(model)
    return {"peak_mib": meter.peak_mib(), **timing, "trainable": trainable, "total": total}


def run_in_fresh_process(target: str, kwargs: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Call ``module:function(**kwargs)`` in a new Python process and return its result dict."""
    cmd = [sys.executable, "-m", "essa.bench", target, json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_PREFIX):
            return json.loads(line[len(_RESULT_PREFIX):])
    raise RuntimeError(f"benchmark {target} {kwargs} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def ratio_table(rows: list[dict], reference: str, keys=("peak_mib", "images_per_s")) -> list[dict]:
    """Add ``<key>_ratio`` to each row: its value over the value of the row labelled ``reference``
    with the same ``model``."""
    for row in rows:
        ref = next(r for r in rows if r["model"] == row["model"] and r["label"] == reference)
        for key in keys:
            row[f"{key}_ratio"] = row[key] / ref[key]
    return rows


def _main(argv: list[str]) -> None:
    target, kwargs = argv[0], json.loads(argv[1])
    module, _, func = target.partition(":")
    result = getattr(importlib.import_module(module), func)(**kwargs)
    print(_RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1:])

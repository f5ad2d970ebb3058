"""One process of tests/train/test_distributed.py: runs the stages listed in a JSON file (``essa.adapt`` or
``essa.finetune`` with their config sections) and saves, per stage and process, what must agree across processes.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train/distributed_worker.py stages.json

The test also calls :func:`run_stages` in its own process for the single-process reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

from essa.adaptation import adapt
from essa.finetuning import finetune


class Probe(L.Callback):
    """Saves ``{out}/{stage}_rank{r}.pt``: the APLA rows this process drew, taken at ``setup`` (before DDP
    broadcasts anything from process 0), and the module's whole state (student, teacher, loss centers) at the
    end of training."""

    def __init__(self, out: Path, stage: str):
        self.out, self.stage = out, stage

    def setup(self, trainer, pl_module, stage):
        self.rows = {n: b.clone() for n, b in pl_module.named_buffers() if n.endswith(".rows")}

    def on_train_end(self, trainer, pl_module):
        state = {n: t.detach().clone() for n, t in pl_module.state_dict().items()}
        torch.save({"rows": self.rows, "state": state, "world_size": trainer.world_size},
                   self.out / f"{self.stage}_rank{trainer.global_rank}.pt")


def run_stages(stages: list[dict], probe_dir: Path) -> None:
    for stage in stages:
        kwargs = {"callbacks": [Probe(probe_dir, stage["name"])], "enable_progress_bar": False}
        run = adapt if stage["kind"] == "adapt" else finetune
        run(trainer_kwargs=kwargs, **stage["sections"])


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    run_stages(spec["stages"], Path(spec["probe_dir"]))
    if torch.distributed.is_initialized():  # gloo's threads stopped before interpreter teardown
        torch.distributed.destroy_process_group()

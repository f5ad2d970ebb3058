"""One LightlyTrain DINOv2 run, timed per optimisation step: run by LightlyTrain's own virtualenv's python.

Not part of essa and never imported by it (LightlyTrain is AGPL-3.0): ``benchmarks/peer_lightlytrain.py`` runs
this file with ``benchmarks/.venv-lightlytrain/bin/python`` and one JSON argument, and reads the line it prints
that starts with ``PEER_RESULT``. It only calls LightlyTrain's public ``lightly_train.pretrain`` with a model
wrapper of its own (LightlyTrain's DINOv2 method needs ``forward_features(x, masks)``, which its timm wrapper
lacks).

The model: a timm ViT (random weights, ``dynamic_img_size``) with a DINOv2 mask token (a parameter on the ViT, so
that LightlyTrain's optimizer gets it with the backbone, as essa trains its mask token with the backbone's part).
``tuner: apla``: every backbone parameter but ``blocks.*.attn.proj.*`` gets ``requires_grad=False`` before
LightlyTrain sees the model (its DINOv2 student is a deep copy of it and its optimizer takes only parameters that
require gradients); the mask token and the head stay trainable, as in essa. The driver checks it: it counts the
student's trainable parameters and those in the optimizer when training starts, and after the run lists the
backbone parameters whose values changed.

Timing, the rule essa.bench uses: each step timed on its own, from Lightning's ``on_train_batch_start`` (the batch
already loaded) to the end of the method's own ``on_train_batch_end`` (after the optimizer step and the teacher's
momentum update), wall clock and process CPU time; the first ``warmup`` steps are dropped and the median of the
next ``steps`` is reported. Data loading (``num_workers=0``, between steps) is not timed. Memory: peak resident set
size (``ru_maxrss``) minus the resident size just before the model was built.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

RESULT_PREFIX = "PEER_RESULT "


def main(args: dict) -> dict:
    os.environ.setdefault("LIGHTLY_TRAIN_EVENTS_DISABLED", "1")  # no telemetry (and no network here)
    work = tempfile.mkdtemp(prefix="peer-lightlytrain-")
    os.environ.setdefault("LIGHTLY_TRAIN_CACHE_DIR", os.path.join(work, "cache"))

    import psutil
    import pytorch_lightning as pl
    import timm
    import torch
    from torch import nn

    import lightly_train

    class MaskedTimmViT(nn.Module):
        """LightlyTrain model wrapper around a timm ViT: ``forward_features(x, masks)`` puts the mask token in
        place of masked patch embeddings before the position embeddings (as DINOv2 does) and returns the normed
        class token and patch tokens (B, D, H, W); registers are dropped from the output."""

        def __init__(self, vit: nn.Module):
            super().__init__()
            self._model = vit

        def forward_features(self, x, masks=None, n_blocks: int = 1):
            vit = self._model
            tokens = vit.patch_embed(x)  # (B, H, W, D) with dynamic_img_size
            b, h, w, d = tokens.shape
            if masks is not None:
                tokens = torch.where(masks.reshape(b, h, w, 1).bool(), vit.mask_token.to(tokens.dtype), tokens)
            tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(tokens)))
            tokens = vit.norm(vit.blocks(tokens))
            patches = tokens[:, vit.num_prefix_tokens:].transpose(1, 2).reshape(b, d, h, w)
            return {"features": patches, "cls_token": tokens[:, 0]}

        def forward_pool(self, x):
            return {"pooled_features": x["cls_token"][..., None, None]}

        def feature_dim(self) -> int:
            return int(self._model.embed_dim)

        def get_model(self) -> nn.Module:
            return self._model

        def make_teacher(self) -> None:  # the timm ViT is built without drop path: nothing to turn off
            pass

    class StepTimer(dict, pl.Callback):
        """Times each optimisation step (see the module docstring) and checks what trains. A (empty) dict too:
        LightlyTrain writes its arguments, ``trainer_args`` with this callback among them, to its log as JSON."""

        def __init__(self):
            super().__init__()
            self.wall: list[float] = []
            self.cpu: list[float] = []
            self.check: dict = {}
            self._start = None

        def on_fit_start(self, trainer, pl_module):
            inner = pl_module.on_train_batch_end

            def timed_end(*a, **k):  # the method's own hook: the teacher's momentum update
                out = inner(*a, **k)
                if self._start is not None:
                    self.wall.append(time.perf_counter() - self._start[0])
                    self.cpu.append(time.process_time() - self._start[1])
                    self._start = None
                return out

            pl_module.on_train_batch_end = timed_end

        def on_train_start(self, trainer, pl_module):
            backbone = pl_module.student_embedding_model.wrapped_model.get_model()
            in_optimizer = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
            trainable = [(n, p) for n, p in backbone.named_parameters() if p.requires_grad]
            head = [p for p in pl_module.student_head.parameters() if p.requires_grad]
            self._before = {n: _fingerprint(p) for n, p in backbone.named_parameters()}
            self.check = {
                "backbone_trainable": sum(p.numel() for n, p in trainable if n != "mask_token"),
                "backbone_total": sum(p.numel() for n, p in backbone.named_parameters() if n != "mask_token"),
                "mask_token_trainable": backbone.mask_token.requires_grad,
                "trainable_names": sorted({_pattern(n) for n, _ in trainable}),
                "head_trainable": sum(p.numel() for p in head),
                "optimizer_params": sum(p.numel() for n, p in [*trainable, *[("", q) for q in head]]
                                        if id(p) in in_optimizer),
                "optimizer_total": sum(p.numel() for opt in trainer.optimizers for g in opt.param_groups
                                       for p in g["params"]),
                "teacher_trainable": sum(p.numel() for p in pl_module.teacher_embedding_model.parameters()
                                         if p.requires_grad),
            }

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._start = (time.perf_counter(), time.process_time())

        def on_train_end(self, trainer, pl_module):
            backbone = pl_module.student_embedding_model.wrapped_model.get_model()
            changed = [n for n, p in backbone.named_parameters() if _fingerprint(p) != self._before[n]]
            self.check["changed_names"] = sorted({_pattern(n) for n in changed})

    def _fingerprint(p):
        flat = p.detach().flatten()
        return (float(flat.double().sum()), tuple(flat[:8].tolist()))

    def _pattern(name: str) -> str:  # blocks.3.attn.proj.weight -> blocks.*.attn.proj.weight
        parts = name.split(".")
        return ".".join("*" if part.isdigit() else part for part in parts)

    torch.manual_seed(0)
    base_rss = psutil.Process().memory_info().rss
    vit = timm.create_model(args["backbone"], pretrained=False, img_size=args["global_size"],
                            dynamic_img_size=True, num_classes=0)
    vit.patch_size = vit.patch_embed.patch_size[0]  # LightlyTrain's DINOv2 reads model.patch_size
    vit.mask_token = nn.Parameter(torch.zeros(vit.embed_dim))
    if args["tuner"] == "apla":
        for name, p in vit.named_parameters():
            p.requires_grad = name == "mask_token" or (name.startswith("blocks.") and ".attn.proj." in name)
    elif args["tuner"] != "full":
        raise ValueError(f"tuner {args['tuner']!r}: full or apla")

    timer = StepTimer()
    n_steps = args["warmup"] + args["steps"]
    per_epoch = max(len(args["images"]) // args["batch_size"], 1)
    g, loc = args["global_size"], args["local_size"]
    lightly_train.pretrain(
        out=os.path.join(work, "out"), data=args["images"], model=MaskedTimmViT(vit), method="dinov2",
        method_args={"hidden_dim": args["head_hidden"], "dino_bottleneck_dim": args["head_bottleneck"],
                     "ibot_bottleneck_dim": args["head_bottleneck"], "output_dim": args["prototypes"],
                     "ibot_separate_head": False,
                     # a step after the prototype freeze, as essa.bench's: the prototypes get their update
                     "student_freeze_last_layer_steps": 0},
        transform_args={"image_size": (g, g), "local_view": {"num_views": args["n_local"], "view_size": (loc, loc)}},
        epochs=-(-n_steps // per_epoch) + 1, batch_size=args["batch_size"], num_workers=0, accelerator="cpu",
        devices=1, precision="32-true", seed=0,
        loggers={"jsonl": None, "tensorboard": None},
        callbacks={"learning_rate_monitor": None, "early_stopping": None, "model_export": None,
                   "model_checkpoint": None},
        trainer_args={"max_steps": n_steps, "callbacks": timer, "enable_progress_bar": False,
                      "enable_checkpointing": False, "logger": False},
    )
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss) / 2**20
    shutil.rmtree(work, ignore_errors=True)  # its checkpoint-free output: the exported model, logs, the mmap
    wall, cpu = timer.wall[args["warmup"]:], timer.cpu[args["warmup"]:]
    if len(wall) < 1:
        raise RuntimeError(f"only {len(timer.wall)} steps timed, {args['warmup']} of them warm-up")
    step_s, cpu_s = statistics.median(wall), statistics.median(cpu)
    return {"peak_mib": peak_mib, "images_per_s": args["batch_size"] / step_s, "step_s": step_s,
            "images_per_cpu_s": args["batch_size"] / cpu_s, "steps_timed": len(wall), "steps_run": len(timer.wall),
            "head": {"hidden": args["head_hidden"], "bottleneck": args["head_bottleneck"],
                     "prototypes": args["prototypes"], "layers": 3},
            "lightly_train": lightly_train.__version__, "torch": torch.__version__, "timm": timm.__version__,
            **timer.check}


if __name__ == "__main__":
    result = main(json.loads(sys.argv[1]))
    print(RESULT_PREFIX + json.dumps(result), flush=True)

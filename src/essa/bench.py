"""Memory and throughput of training steps, each configuration measured in a fresh process.

The steps are the stages' own (:meth:`essa.train.stage.StageModule.standalone_step` of the SSA and fine-tuning
modules): what is timed is what ``essa adapt`` and ``essa finetune`` run, not a copy of it.

A fresh process per configuration keeps one configuration's allocator state (and, on CPU, its high-water mark of
resident memory) from leaking into the next. Memory is the training memory: on CUDA the peak of allocated memory
from model creation on; on CPU the peak resident set size minus the resident size before the model was built
(weights, gradients, optimizer state and activations, plus allocator slack).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch

from essa.train.memory import SavedActivations
from essa.train.resources import MemoryMeter

_RESULT_PREFIX = "ESSA_BENCH_RESULT "


def _mib(tensors) -> float:
    """MiB of the distinct storages behind ``tensors`` (a tensor shared by two modules counts once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(storages.values()) / 2**20


def live_peak_mib(step: Callable[[], None]) -> float:
    """MiB by which the live tensors of one call of ``step`` rise above those alive when it starts, at their peak:
    what CUDA's ``max_memory_allocated`` counts, without the allocator's slack that a CPU's resident size adds
    (freed memory glibc keeps). From the profiler's allocation and free events (CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak / 2**20


def step_flops(step: Callable[[], None]) -> float:
    """FLOPs of one call of ``step``: matrix products and attention, forward, backward and recomputation, as
    ``torch.utils.flop_counter`` counts them (CPU attention kernels included). Unlike seconds, the count does not
    depend on the machine or its load: the ratio of two counts bounds the speed-up one can bring where the matrix
    products dominate the time."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    # the counter hands formulas the shapes of the arguments
    def forward(query, key, value, *args, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    cpu_attention = {aten._scaled_dot_product_flash_attention_for_cpu: forward,
                     aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        step()
    return float(counter.get_total_flops())


def time_steps(step: Callable[[], None], images_per_step: int, device: torch.device, warmup: int, steps: int) -> dict:
    """Run ``warmup`` untimed then ``steps`` timed calls of ``step``, each timed on its own: images/s, images per
    CPU-second and seconds per step from the median step (LightlyTrain's rule too: a step slowed by other load, or
    by a one-off allocation, moves a mean but not the median)."""
    for _ in range(warmup):
        step()
    wall, cpu = [], []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    # CPU seconds (all threads of this process) are what a step costs whatever else shares the machine;
    # wall-clock images/s is what a user sees on an idle one.
    step_s, cpu_s = statistics.median(wall), statistics.median(cpu)
    return {"images_per_s": images_per_step / step_s, "step_s": step_s,
            "images_per_cpu_s": images_per_step / cpu_s if cpu_s > 0 else float("inf")}


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
    precision: str = "auto",
) -> dict[str, Any]:
    """One supervised training step of ``backbone`` with ``tuner``, as ``essa finetune`` runs it: the fine-tuning
    module's own step (:meth:`essa.train.stage.StageModule.standalone_step` of
    :class:`essa.train.classify.ClassifierModule`: cross-entropy, backward, gradient clipping, AdamW with the
    finetune defaults' weight decay and layer decay) at a constant ``lr``."""
    import numpy as np

    from essa import backbones, tuners
    from essa.finetuning import OptimConfig
    from essa.train.classify import ClassifierModule

    dev = torch.device(device)
    torch.manual_seed(0)
    meter = MemoryMeter(dev)
    model = backbones.create(backbone, img_size=img_size, num_classes=num_classes).to(dev)
    tuners.apply(model, tuner, **(options or {}))
    optim = OptimConfig(lr=lr)
    module = ClassifierModule(model, "multiclass", np.full(1, lr), optim.weight_decay, layer_decay=optim.layer_decay)
    opt = module.configure_optimizers()
    x = torch.randn(batch_size, 3, img_size, img_size, device=dev)
    y = torch.randint(0, num_classes, (batch_size,), device=dev)
    module.train()

    autocast = _autocast(dev, precision)

    def step():
        return module.standalone_step(((x, y), None), opt, optim.grad_clip, forward_context=autocast)

    loss = float(step())  # the first warm-up step: its loss compares precisions
    timing = time_steps(step, batch_size, dev, max(warmup - 1, 0), steps)
    trainable, total = tuners.count_parameters(model)
    return {"peak_mib": meter.peak_mib(), **timing, "trainable": trainable, "total": total, "loss": loss}


def ssa_step(
    backbone: str,
    tuner: str,
    options: dict | None = None,
    global_size: int = 224,
    local_size: int = 98,
    n_local: int = 8,
    batch_size: int = 4,
    prototypes: int = 65536,
    warmup: int = 1,
    steps: int = 2,
    device: str = "cpu",
    recompute_frozen: bool | str = "auto",
    memory_budget: str | float = "auto",
    loss_chunk: int | None | str = "default",
    objective: str = "dinov2",
    objective_options: dict | None = None,
    ssl_options: dict | None = None,
    precision: str = "auto",
    head_hidden: int = 2048,
    head_bottleneck: int = 256,
) -> dict[str, Any]:
    """One SSA step of the full objective on random images, as ``essa adapt`` runs it. ``objective``: the config's
    ``objective`` (``mae`` and ``simmim``: ``batch_size`` images of ``global_size`` px with their masks drawn by the
    objective's collate function, through :class:`essa.train.mim.ReconstructionModule`'s own step with its
    config section's defaults, updated by ``objective_options``; ``prototypes``, ``local_size``, ``n_local`` and
    ``loss_chunk`` are DINOv2's). For ``dinov2``: the SSA module's own step
    (:meth:`essa.train.stage.StageModule.standalone_step` of :class:`essa.train.ssa.SSAModule`: the schedules'
    learning rates and weight decay, the student on 2 masked global + ``n_local`` local crops, the teacher on the
    global crops, DINO + iBOT + KoLeo, backward, gradient clipping, AdamW, the teacher's momentum update), set up as
    ``essa adapt`` sets it up (``optim.recompute_frozen``, by default ``auto`` for ``memory_budget``
    (``trainer.memory_budget``), the plan in the result's ``recompute_frozen``; the loss's ``chunk_size`` unless
    ``loss_chunk`` is an int, or None for no chunking). The step is one of the tuner after the head warm-up and the prototype freeze
    (``ssl.head_warmup`` and ``ssl.freeze_prototypes`` 0): every trainable parameter gets its gradient.
    ``ssl_options``: more ``ssl`` keys (``patch_drop``, whose kept patches are drawn into the batch as the
    objective's collate draws them; ``truncated_backward``); a tuner option ``blocks: "last:N"`` is the model's last
    N blocks (as in any config). The result's ``truncated_backward`` is what the step did with the frozen prefix
    (dinov2).
    ``precision``: ``auto`` (bf16 autocast on CUDA, fp32 on CPU, as ``trainer.precision: auto``), ``bf16-mixed``
    (bf16 autocast on any device) or ``32-true``; the result's ``loss`` is the first step's, for comparing them.
    ``head_hidden`` and ``head_bottleneck``: the DINO head's hidden and bottleneck widths (default: the
    reference head's, 2048 and 256).

    Besides the peak and the timing, the result breaks the memory down (MiB): ``weights_mib`` (student, teacher
    and buffers; shared tensors once), ``grads_mib``, ``optimizer_mib`` (AdamW states), ``saved_mib`` (activations
    kept for the backward pass in one step). The rest of the peak is transient: logits, softmaxes and gradients in
    flight, and allocator slack. On CPU, ``live_peak_mib`` is the peak of live tensors alone (one more step, after
    the peak was read), the number CUDA's peak would report. ``gflop``: the FLOPs of one step (:func:`step_flops`),
    counted in one more step after the peak was read."""
    from essa import objectives, tuners
    from essa.adaptation import resolve_config
    from essa.ssl import block_masks
    from essa.ssl.patch_dropout import draw_batch_kept
    from essa.train.ssa import SSAModule

    dev = torch.device(device)
    torch.manual_seed(0)
    cfg = resolve_config(None, sections={
        "objective": objective, **({objective: objective_options} if objective_options else {}),
        "backbone": {"name": backbone, "pretrained": False}, "tuner": {"name": tuner, "options": options or {}},
        # the head's hidden and bottleneck widths (the reference's by default), and a step of the tuner, not of
        # the head warm-up or the prototype freeze
        "data": {"root": "unused"}, "ssl": {"prototypes": prototypes, "head_hidden": head_hidden,
                                            "head_bottleneck": head_bottleneck,
                                            "head_warmup": 0, "freeze_prototypes": 0, "global_size": global_size,
                                            "local_size": local_size, "n_local": n_local, **(ssl_options or {})},
        "optim": {"recompute_frozen": recompute_frozen}, "trainer": {"memory_budget": memory_budget},
        # random images and weights: the collapse watch runs, as in a run after the warm-ups, but never stops a step
        "monitor": {"collapse_patience": sys.maxsize},
    })
    meter = MemoryMeter(dev)
    model = cfg.backbone.build(img_size=global_size, dynamic_img_size=True)
    tuners.apply(model, tuner, **(options or {}))
    patch = model.patch_embed.patch_size[0]
    extra = {}
    if objective == "dinov2":
        module = SSAModule(cfg, model, iters_per_epoch=100).to(dev)
        if loss_chunk != "default":
            module.loss.chunk_size = loss_chunk
        grid = global_size // patch
        batch = {
            "global_crops": torch.randn(2 * batch_size, 3, global_size, global_size, device=dev),
            "local_crops": torch.randn(n_local * batch_size, 3, local_size, local_size, device=dev) if n_local else None,
            "masks": block_masks(2 * batch_size, (grid, grid), generator=torch.Generator().manual_seed(0)).to(dev),
        }
        if cfg.ssl.patch_drop:
            batch.update(draw_batch_kept(batch, patch, cfg.ssl.patch_drop, torch.Generator().manual_seed(1)))
        extra["truncated_backward"] = module.truncation.record()
        extra["recompute_frozen"] = module.stage_resources()["recompute_frozen"]
        extra["head"] = head_dims(module.student.head)
    else:
        module = objectives.get(objective).module(cfg, model, iters_per_epoch=100).to(dev)
        images = list(torch.randn(batch_size, 3, global_size, global_size))
        batch = {k: v.to(dev) for k, v in objectives.get(objective).collate(cfg, patch)(
            images, generator=torch.Generator().manual_seed(0)).items()}
    opt = module.configure_optimizers()
    saved = SavedActivations(module.parameters())
    autocast = _autocast(dev, precision)

    @contextlib.contextmanager
    def forward(count_saved: bool):
        with autocast, saved if count_saved else contextlib.nullcontext():
            yield

    def step(count_saved: bool = False):
        return module.standalone_step(batch, opt, cfg.optim.grad_clip, forward_context=forward(count_saved))

    loss = float(step(count_saved=True))  # the first step also counts what the backward keeps (unhooked: timed)
    timing = time_steps(step, batch_size, dev, max(warmup - 1, 0), steps)
    trainable, total = tuners.count_parameters(model)
    params = list(module.parameters())
    breakdown = {
        "weights_mib": _mib(params + list(module.buffers())),
        "grads_mib": _mib(p.grad for p in params),
        "optimizer_mib": _mib(t for state in opt.state.values() for t in state.values() if torch.is_tensor(t)),
        "saved_mib": saved.mib,
    }
    peak = meter.peak_mib()
    breakdown["gflop"] = step_flops(step) / 1e9
    if dev.type == "cpu":
        # alive when a step starts: weights, AdamW states, the last step's gradients, the batch
        start = sum(breakdown[k] for k in ("weights_mib", "optimizer_mib", "grads_mib"))
        breakdown["live_peak_mib"] = start + _mib(t for t in batch.values() if t is not None) + live_peak_mib(step)
    return {"peak_mib": peak, **timing, "trainable": trainable, "total": total, "loss": loss, **breakdown, **extra}


PRECISIONS = ("auto", "bf16-mixed", "32-true")


def _autocast(device: torch.device, precision: str):
    """The autocast of a benchmark step at ``precision`` (:data:`PRECISIONS`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; valid: {', '.join(PRECISIONS)}")
    bf16 = precision == "bf16-mixed" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def head_dims(head: torch.nn.Module) -> dict[str, int]:
    """A DINO head's widths as built (:class:`essa.ssl.heads.DINOHead`): ``hidden`` (of the hidden MLP layers),
    ``bottleneck``, ``prototypes``, ``layers`` (linear layers of the MLP) and ``params`` (all its parameters)."""
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    return {"hidden": linears[0].out_features if len(linears) > 1 else 0, "bottleneck": linears[-1].out_features,
            "prototypes": head.prototypes.weight.shape[0], "layers": len(linears),
            "params": sum(p.numel() for p in head.parameters())}


def run_in_fresh_process(target: str, kwargs: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Call ``module:function(**kwargs)`` in a new Python process and return its result dict."""
    cmd = [sys.executable, "-m", "essa.bench", target, json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_PREFIX):
            return json.loads(line[len(_RESULT_PREFIX):])
    raise RuntimeError(f"benchmark {target} {kwargs} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def measure_grid(target: str, models: list[str], configs: list[tuple], repeats: int = 1,
                 **kwargs) -> list[dict]:
    """Run ``target`` for every model and (label, tuner, options) config, or (label, tuner, options, keywords)
    where the config has ``target`` keywords of its own over ``kwargs``, each in a fresh process, ``repeats`` rounds
    over the whole grid; a row keeps the best throughput and the highest peak memory of its rounds (other load on a
    shared machine only ever slows a run down). Rows carry ``<key>_ratio`` against ``full``."""
    rows: dict[tuple[str, str], dict] = {}
    for round_ in range(repeats):
        for model in models:
            for label, tuner, options, *step in configs:
                result = run_in_fresh_process(target, dict(backbone=model, tuner=tuner, options=options,
                                                           **{**kwargs, **(step[0] if step else {})}))
                print(f"  round {round_ + 1}: {model} {label}: {result['images_per_s']:.3f} img/s, "
                      f"{result['peak_mib']:.0f} MiB", flush=True)
                row = rows.setdefault((model, label), {"model": model, "label": label, **result})
                row["images_per_s"] = max(row["images_per_s"], result["images_per_s"])
                row["images_per_cpu_s"] = max(row["images_per_cpu_s"], result["images_per_cpu_s"])
                row["step_s"] = min(row["step_s"], result["step_s"])
                row["peak_mib"] = max(row["peak_mib"], result["peak_mib"])
    return ratio_table(list(rows.values()), "full")


def measure_objectives(objectives: list[str], models: list[str], configs: list[tuple[str, str, dict]],
                       repeats: int = 1, **kwargs) -> list[dict]:
    """:func:`measure_grid` of :func:`ssa_step` once per SSA objective; with more than the one objective
    ``dinov2``, each row's label is ``"<objective> <label>"``, its ``objective`` is kept, and its ratios are against
    ``full`` with the same objective and model."""
    if objectives == ["dinov2"]:
        return measure_grid("essa.bench:ssa_step", models, configs, repeats=repeats, **kwargs)
    rows = []
    for objective in objectives:
        for row in measure_grid("essa.bench:ssa_step", models, configs, repeats=repeats, objective=objective,
                                **kwargs):
            rows.append({**row, "objective": objective, "label": f"{objective} {row['label']}"})
    return rows


def markdown_table(rows: list[dict], tuner_header: str = "tuner") -> str:
    lines = [f"| model | {tuner_header} | trainable params | peak memory (MiB) | images/s | images per CPU-s "
             "| memory vs full | speed vs full (wall / CPU) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['label']} | {r['trainable']:,} | {r['peak_mib']:.0f} | {r['images_per_s']:.3f} "
              f"| {r['images_per_cpu_s']:.3f} | {r['peak_mib_ratio']:.2f}x "
              f"| {r['images_per_s_ratio']:.2f}x / {r['images_per_cpu_s_ratio']:.2f}x |" for r in rows]
    return "\n".join(lines)


def breakdown_table(rows: list[dict], tuner_header: str = "tuner") -> str:
    """Where each row's peak memory goes (rows of :func:`ssa_step`, with their ``peak_mib_ratio``). "rest of the
    peak" is the peak less the other columns: transients (logits, gradients in flight) and allocator slack; it
    comes out small where not all gradients and saved activations are alive at once (full SSA)."""
    live = all("live_peak_mib" in r for r in rows)
    lines = [f"| model | {tuner_header} | peak (MiB) | weights | grads | AdamW states | saved activations "
             "| rest of the peak | memory vs full |" + (" live tensors at peak | live vs full |" if live else ""),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if live else "")]
    for r in rows:
        parts = [r["weights_mib"], r["grads_mib"], r["optimizer_mib"], r["saved_mib"]]
        line = (f"| {r['model']} | {r['label']} | {r['peak_mib']:.0f} | " + " | ".join(f"{v:.0f}" for v in parts)
                + f" | {r['peak_mib'] - sum(parts):.0f} | {r['peak_mib_ratio']:.2f}x |")
        if live:
            full = _reference_row(rows, r, "full")
            line += f" {r['live_peak_mib']:.0f} | {r['live_peak_mib'] / full['live_peak_mib']:.2f}x |"
        lines.append(line)
    return "\n".join(lines)


def compute_table(rows: list[dict], tuner_header: str = "tuner") -> str:
    """GFLOP per step of each row (rows with ``gflop``) and full's FLOPs over the row's: the speed-up the row can
    show where matrix products and attention dominate the time."""
    rows = ratio_table(rows, "full", keys=("gflop",))
    lines = [f"| model | {tuner_header} | GFLOP per step | full's FLOPs / these |", "|---|---|---:|---:|"]
    lines += [f"| {r['model']} | {r['label']} | {r['gflop']:.1f} | {1 / r['gflop_ratio']:.2f}x |" for r in rows]
    return "\n".join(lines)


def _reference_row(rows: list[dict], row: dict, reference: str) -> dict:
    """The row labelled ``reference`` with ``row``'s model (and its objective, in rows of
    :func:`measure_objectives`, whose labels are ``"<objective> <label>"``)."""
    label = f"{row['objective']} {reference}" if "objective" in row else reference
    return next(r for r in rows if r["model"] == row["model"] and r["label"] == label)


def ratio_table(rows: list[dict], reference: str, keys=("peak_mib", "images_per_s", "images_per_cpu_s")) -> list[dict]:
    """Add ``<key>_ratio`` to each row: its value over the value of the row labelled ``reference``
    with the same ``model`` (and objective: :func:`_reference_row`)."""
    for row in rows:
        ref = _reference_row(rows, row, reference)
        for key in keys:
            row[f"{key}_ratio"] = row[key] / ref[key]
    return rows


def preset_config(name: str) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
    """A row of :func:`measure_grid` for the SSA preset ``name`` (``essa.adaptation.PRESETS``): ("preset fast",
    its tuner, its tuner options, its ``ssl`` keys as ``ssl_options`` and its ``optim.recompute_frozen``)."""
    from essa.adaptation import PRESETS

    if name not in PRESETS:
        raise ValueError(f"--preset {name!r} is not a preset; valid choices: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    unknown = sorted(set(preset) - {"tuner", "ssl", "optim"}) + sorted(
        f"optim.{key}" for key in set(preset.get("optim", {})) - {"recompute_frozen"})
    if unknown:  # a preset key the step cannot set would be measured as if it were not there
        raise ValueError(f"preset {name!r} sets {', '.join(unknown)}, which essa bench's step does not take")
    tuner = preset.get("tuner", {"name": "apla"})
    step = {"ssl_options": dict(preset.get("ssl", {}))}
    if "recompute_frozen" in preset.get("optim", {}):
        step["recompute_frozen"] = preset["optim"]["recompute_frozen"]
    return f"preset {name}", tuner["name"], dict(tuner.get("options", {})), step


def parse_tuner(text: str) -> tuple[str, str, dict[str, Any]]:
    """``essa bench --tuner`` text -> (label, tuner, options): ``apla`` -> ("apla", "apla", {}); ``apla:r=64`` ->
    ("apla r=64", "apla", {"r": 64}); ``lora:r=8:targets=[qkv]``; ``apla:blocks=last:4`` (the last 4 blocks).
    Values are YAML; a combination's options are by part (``apla+lora:apla.r=64``)."""
    import yaml

    from essa.config import set_dotted

    name, *parts = text.split(":")
    options: dict[str, Any] = {}
    i = 0
    while i < len(parts):  # "blocks=last:4" was split at its colon: join it back
        part = parts[i]
        if part.startswith("blocks=last") and i + 1 < len(parts) and parts[i + 1].isdigit():
            part, i = f"{part}:{parts[i + 1]}", i + 1
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"--tuner {text!r}: options are key=value after the name, e.g. apla:r=64")
        set_dotted(options, key, value if value.startswith("last:") else yaml.safe_load(value))
        i += 1
    from essa.tuners.combined import option_words

    label = " ".join([name, *option_words(options)])
    return label, name, options


def plot(rows: list[dict], path, speed: str = "images_per_cpu_s"):
    """Peak memory against ``speed`` per row (one colour per model, each point labelled): where each tuner sits
    between memory and speed; written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        ax.scatter([r["peak_mib"] for r in mine], [r[speed] for r in mine], label=model)
        for r in mine:
            ax.annotate(r["label"], (r["peak_mib"], r[speed]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("peak training memory (MiB)")
    ax.set_ylabel({"images_per_cpu_s": "images per CPU-second", "images_per_s": "images/s"}.get(speed, speed))
    ax.set_title("memory vs throughput per tuner (up and left is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _main(argv: list[str]) -> None:
    target, kwargs = argv[0], json.loads(argv[1])
    module, _, func = target.partition(":")
    result = getattr(importlib.import_module(module), func)(**kwargs)
    print(_RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1:])

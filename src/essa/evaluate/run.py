"""``essa evaluate``: test metrics of frozen features (weighted kNN, linear probe) and of trained classifiers.

    from essa.evaluate.run import evaluate
    evaluate(backbone={"weights": "runs/ssa/backbone.safetensors"}, img_size=32,
             data={"root": "../shared/data/medmnist/breastmnist.npz"}, out="runs/eval-ssa")
    evaluate(checkpoint="runs/sa-apla", out="runs/eval-sa")     # data and splits from the run's config.yaml

Protocols (``protocols``; default: knn and linear for a backbone, classifier for a checkpoint):

- ``knn``: weighted kNN on the cosine similarity of CLS features (:func:`essa.evaluate.knn.knn_scores`, ``knn.k``,
  ``knn.temperature``); bank = the train split, queries = the test split. Single-label tasks only.
- ``linear``: logistic regression on the frozen CLS features of the train split, its C chosen on the val split by
  the primary metric (:func:`essa.evaluate.linear_probe.fit_linear_probe`), tested on the test split.
- ``classifier``: the class probabilities of trained classifiers on the test split. ``checkpoint`` is a finetune
  run directory (every finished ``seed_N/``), one seed's directory, or a ``classifier.safetensors``.

Features are the CLS token of ``forward_features`` in eval mode at ``img_size`` (default: the model's own input
size), cached in ``OUT/features/{split}.safetensors`` so that kNN and the probe share one extraction. Images are
normalised as ``data.normalize`` says: ``model`` (default) the mean and std of the model's own preprocessing (an
essa file's header: what it was trained with; else timm's pretrained config of the name), ``imagenet``, or
``dataset`` (the train split's statistics).

Output in ``OUT``: ``config.yaml``; ``preprocessing.json`` (per protocol or classifier: the mean, std and
interpolation used); ``metrics.json`` / ``metrics.csv`` (one row per protocol, or per classifier:
every test metric with its 95 % bootstrap interval); ``{name}_predictions.csv`` and ``{name}_confusion_matrix.png``;
with several classifiers, ``summary.json`` / ``summary.csv`` (mean ± std over them).
"""

from __future__ import annotations

import csv
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from essa import backbones, config as config_mod, data, io
from essa.config import BackboneConfig, ConfigError
from essa.errors import InputError, NotFoundError
from essa.evaluate import metrics
from essa.evaluate.features import Outputs, cached_cls_features, classifier_scores
from essa.evaluate.knn import knn_scores
from essa.evaluate.linear_probe import DEFAULT_CS, fit_linear_probe
from essa.evaluate.plots import confusion_matrix_png
from essa.task import Task, TaskDataConfig, check_task_key, load_task
from essa.train.run_dir import RunDir

PROTOCOLS = ("knn", "linear", "classifier")
CLASSIFIER_FILE = "classifier.safetensors"
#: Resource columns a finetune run adds to its test metrics (summarised over seeds like the metrics).
RESOURCES = ("peak_memory_mib", "images_per_s")


# ----- reporting, shared with essa finetune -----------------------------------------------------------------------
def write_predictions(path: Path, task: Task, outputs: Outputs) -> Path:
    """One CSV row per image: path, label, predicted (class indices; ``;``-joined for multilabel), and the score of
    each class (``score:<class name>``)."""
    scores = outputs.values.numpy()
    labels = outputs.labels.numpy()
    if task.task == "multilabel":
        def join(row):
            return ";".join(str(i) for i in np.flatnonzero(row))

        truth, predicted = [join(row) for row in labels], [join(row) for row in scores >= metrics.THRESHOLD]
    else:
        truth, predicted = labels.tolist(), scores.argmax(1).tolist()
    with io.replacing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "predicted", *(f"score:{c}" for c in task.classes)])
        for record, y, p, row in zip(outputs.records, truth, predicted, scores):
            writer.writerow([record.path, y, p, *(f"{s:.6g}" for s in row)])
    return path


def report_predictions(task: Task, outputs: Outputs, out_dir: Path, name: str, *,
                       bootstrap: int = 1000) -> dict[str, float]:
    """Test metrics of (N, C) class probabilities ``outputs.values``, each with a 95 % bootstrap interval
    (``bootstrap`` resamples, seeded: the same predictions give the same interval), written with
    ``{name}_predictions.csv`` and ``{name}_confusion_matrix.png`` (single-label tasks) in ``out_dir``."""
    values = metrics.compute_with_ci(task.task, outputs.labels, outputs.values, task.num_classes,
                                     ci_metrics="all", n=bootstrap)
    write_predictions(out_dir / f"{name}_predictions.csv", task, outputs)
    if task.task != "multilabel":
        cm = metrics.confusion(outputs.labels, outputs.values.argmax(1), task.num_classes)
        confusion_matrix_png(cm, task.classes, out_dir / f"{name}_confusion_matrix.png",
                             title=f"{name}: {task.primary} {values[task.primary]:.3f}")
    return values


def summarise(rows: dict[str, dict[str, float]], names: list[str]) -> dict[str, Any]:
    """Mean, std (ddof=1; NaN for one run) and count over runs (``rows``: run name -> metrics) of each metric in
    ``names`` (:func:`essa.evaluate.metrics.seed_summary`: a NaN run makes the mean NaN)."""
    stats = metrics.summarise_seeds([{k: row[k] for k in names if k in row} for row in rows.values()])
    return {"runs": list(rows), "metrics": stats}


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """``summary.json`` and ``summary.csv`` (metric, mean, std, n) in ``out``."""
    io.write_json(out / "summary.json", summary)
    with io.replacing(out / "summary.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", "mean", "std", "n"])
        for metric, s in summary["metrics"].items():
            writer.writerow([metric, s["mean"], s["std"], s["n"]])


def _digits(metric: str) -> int:
    """Decimals of the command's tables: 3 for metrics (the study report prints 4; the README quotes these tables as
    printed), 1 for resources."""
    return 1 if metric in RESOURCES else 3


def mean_std_column(summary: dict[str, Any]) -> dict[str, str]:
    """Table cells ``mean ± std (n=...)`` of a :func:`summarise` result (``mean (n=1)`` for one run)."""
    return {m: metrics.format_summary(metrics.Summary(**s), _digits(m)) for m, s in summary["metrics"].items()}


def ci_column(values: dict[str, float], names: list[str]) -> dict[str, str]:
    """Table cells ``value [low, high]`` of one run's metrics (the 95 % bootstrap interval where computed)."""
    cells = {}
    for m in names:
        if m not in values:
            continue
        d = _digits(m)
        cell = f"{values[m]:.{d}f}"
        if f"{m}_ci_low" in values:
            cell += f" [{values[f'{m}_ci_low']:.{d}f}, {values[f'{m}_ci_high']:.{d}f}]"
        cells[m] = cell
    return cells


def format_table(columns: dict[str, dict[str, str]], primary: str | None = None) -> str:
    """A plain-text table: one row per metric, one column per entry of ``columns`` (column -> metric -> cell), the
    primary metric starred, and a line saying what the cells are."""
    names = list(dict.fromkeys(m for column in columns.values() for m in column))
    label = {m: f"{m} *" if m == primary else m for m in names}
    widths = [max(len("metric"), *(len(v) for v in label.values()))]
    widths += [max(len(c), *(len(col.get(m, "")) for m in names)) for c, col in columns.items()]
    lines = ["  ".join(t.ljust(w) for t, w in zip(["metric", *columns], widths)).rstrip()]
    for m in names:
        cells = [label[m], *(col.get(m, "-") for col in columns.values())]
        lines.append("  ".join(t.ljust(w) for t, w in zip(cells, widths)).rstrip())
    cells = [cell for column in columns.values() for cell in column.values()]
    notes = ["* primary metric"] if primary else []
    notes += ["[95 % bootstrap interval]"] if any("[" in cell for cell in cells) else []
    notes += ["mean ± std over seeds"] if any("±" in cell for cell in cells) else []
    return "\n".join(lines + ["; ".join(["test split", *notes])])


# ----- configuration ----------------------------------------------------------------------------------------------
@dataclass
class KNNConfig:
    k: int = 20
    temperature: float = 0.07


@dataclass
class ProbeConfig:
    Cs: list[float] | None = None  # inverse regularisation strengths tried on the val split (None: 1e-4..1e2, 10)


@dataclass
class EvalConfig:
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(name=None))  # for knn and linear
    checkpoint: str | None = None  # for classifier: a finetune run dir, a seed_N dir or a classifier.safetensors
    data: TaskDataConfig = field(default_factory=TaskDataConfig)  # data.root None: the checkpoint run's data
    task: str | None = None  # None: the data source's hint (or the checkpoint run's task)
    metric: str | None = None  # primary metric override
    protocols: list[str] | None = None  # subset of knn, linear, classifier; None: what the inputs allow
    knn: KNNConfig = field(default_factory=KNNConfig)
    linear: ProbeConfig = field(default_factory=ProbeConfig)
    img_size: int | None = None  # None: the model's own input size
    batch_size: int = 64
    bootstrap: int = 1000  # resamples of the 95 % intervals
    device: str = "auto"  # auto: cuda when available
    out: str = "runs/evaluate"

    @property
    def has_backbone(self) -> bool:
        return bool(self.backbone.name or self.backbone.weights)

    def validate(self) -> None:
        check_task_key(self.task)
        unknown = sorted(set(self.protocols or []) - set(PROTOCOLS))
        if unknown:
            raise ConfigError(f"unknown protocol {unknown[0]!r}; valid choices: {', '.join(PROTOCOLS)}")
        wanted = set(self.protocols or [])
        if wanted & {"knn", "linear"} and not self.has_backbone:
            raise ConfigError("protocols knn and linear need a backbone: --backbone NAME or --weights FILE "
                              "(a classifier.safetensors works too: its head is ignored)")
        if "classifier" in wanted and not self.checkpoint:
            raise ConfigError("protocol classifier needs --checkpoint (a finetune run dir or a classifier.safetensors)")
        if not self.has_backbone and not self.checkpoint:
            raise ConfigError("nothing to evaluate: give --backbone NAME or --weights FILE (kNN, linear probe) "
                              "and/or --checkpoint RUN_DIR|classifier.safetensors (test metrics of a classifier)")
        if self.knn.k < 1 or self.knn.temperature <= 0:
            raise ConfigError(f"knn.k={self.knn.k} must be >= 1 and knn.temperature={self.knn.temperature} > 0")


# ----- classifiers ------------------------------------------------------------------------------------------------
def find_classifiers(checkpoint: str | Path) -> dict[str, Path]:
    """The classifiers a ``checkpoint`` names: a weights file; a run dir's ``classifier.safetensors``; or, for a
    multi-seed finetune dir, the ``seed_N/classifier.safetensors`` of every finished seed (ordered by N)."""
    path = Path(checkpoint)
    if path.is_file():
        return {"classifier": path}
    if not path.is_dir():
        raise NotFoundError(f"checkpoint {str(path)!r} does not exist (expected a finetune run directory or "
                                f"a {CLASSIFIER_FILE})")
    if (path / CLASSIFIER_FILE).is_file():
        return {"classifier": path / CLASSIFIER_FILE}
    seeds = sorted((p for p in path.glob(f"seed_*/{CLASSIFIER_FILE}") if re.fullmatch(r"seed_\d+", p.parent.name)),
                   key=lambda p: int(p.parent.name.split("_")[1]))
    if not seeds:
        raise NotFoundError(f"{path} holds no {CLASSIFIER_FILE} (nor seed_N/{CLASSIFIER_FILE}): is it a finished "
                                "essa finetune run?")
    return {f"classifier_{p.parent.name}": p for p in seeds}


def _run_config(checkpoint: str | Path) -> dict[str, Any] | None:
    """The raw config.yaml of the finetune run a checkpoint belongs to, if there is one."""
    path = Path(checkpoint)
    found = path / "config.yaml" if path.is_dir() else path.parent / "config.yaml"
    return config_mod.read_yaml(found) if found.is_file() else None


def load_classifier(path: Path, task: Task) -> torch.nn.Module:
    """A classifier from its weights file (architecture and head size from the header), checked against the task."""
    model = backbones.create(weights=path)
    if model.num_classes == 0:
        raise InputError(f"{path} holds no classification head (no num_classes in its header): it is a backbone. "
                         "Evaluate its features with --weights (knn, linear) instead of --checkpoint")
    if model.num_classes != task.num_classes:
        raise InputError(f"{path} classifies {model.num_classes} classes, but {task.source.path} has "
                         f"{task.num_classes} ({', '.join(task.classes)}): evaluate it on the data it was trained for")
    return model


# ----- the command ------------------------------------------------------------------------------------------------
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _task_for(cfg: EvalConfig) -> Task:
    """The task from ``cfg.data``, or, without ``data.root``, from the config of the checkpoint's finetune run."""
    data_cfg, task, metric = cfg.data, cfg.task, cfg.metric
    if data_cfg.root is None and cfg.checkpoint:
        run = _run_config(cfg.checkpoint)
        if run is None:
            raise ConfigError(f"data.root is required (--data): {cfg.checkpoint} has no finetune config.yaml beside "
                              "it to take the data from")
        data_cfg = config_mod.from_dict(TaskDataConfig, run.get("data", {}), "data")
        task, metric = task or run.get("task"), metric or run.get("metric")
    return load_task(data_cfg, task, metric)


def _identity(cfg: BackboneConfig) -> dict[str, Any]:
    """What identifies a backbone's weights, for the feature cache: its config, and its weights file's size and time."""
    identity = asdict(cfg)
    if cfg.weights:
        stat = Path(cfg.weights).stat()
        identity["weights_stat"] = [stat.st_size, stat.st_mtime_ns]
    return identity


def _preprocessing(cfg: EvalConfig, model, task: Task, out: Path, img_size: int) -> data.normalize.Preprocessing:
    """What ``model``'s images are normalised with (``data.normalize``; ``dataset``: the train split's statistics,
    cached in ``OUT/features``)."""
    return data.normalize.resolve(cfg.data.normalize, data.normalize.of_model(model), task.source,
                                  task.splits["train"], img_size=img_size, max_images=cfg.data.normalize_images,
                                  cache=out / "features" / "dataset_stats.json")


def _feature_protocols(cfg: EvalConfig, task: Task, out: Path, wanted: list[str], device,
                       used: dict[str, data.normalize.Preprocessing]) -> dict[str, dict]:
    """kNN and linear-probe test metrics of the backbone's CLS features (``used``: protocol -> preprocessing,
    filled in)."""
    backbone = cfg.backbone.build(img_size=cfg.img_size, num_classes=0).to(device)
    img_size = cfg.img_size or backbone.patch_embed.img_size[0]
    preprocessing = _preprocessing(cfg, backbone, task, out, img_size)
    splits = ["train", "test"] + (["val"] if "linear" in wanted else [])
    feats = {
        split: cached_cls_features(backbone, task.source, task.splits[split], out / "features" / f"{split}.safetensors",
                                   _identity(cfg.backbone), img_size=img_size, batch_size=cfg.batch_size,
                                   num_workers=cfg.data.num_workers, preprocessing=preprocessing)
        for split in splits
    }
    used.update({protocol: preprocessing for protocol in ("knn", "linear") if protocol in wanted})
    train, test = feats["train"], feats["test"]
    rows = {}
    if "knn" in wanted:
        scores = knn_scores(train.values, train.labels, test.values, k=cfg.knn.k, temperature=cfg.knn.temperature,
                            num_classes=task.num_classes)
        rows["knn"] = {**report_predictions(task, test._replace(values=scores), out, "knn", bootstrap=cfg.bootstrap),
                       "k": cfg.knn.k, "temperature": cfg.knn.temperature}
    if "linear" in wanted:
        val = feats["val"]
        probe = fit_linear_probe(train.values, train.labels, val.values, val.labels,
                                 Cs=cfg.linear.Cs or DEFAULT_CS, task=task.task, metric=task.primary,
                                 num_classes=task.num_classes)
        scores = torch.from_numpy(probe.predict_scores(test.values)).float()
        rows["linear"] = {**report_predictions(task, test._replace(values=scores), out, "linear",
                                               bootstrap=cfg.bootstrap), "C": probe.C}
    return rows


def evaluate(config: EvalConfig | str | Path | None = None, *, overrides: list[str] | None = None,
             **sections) -> dict[str, Any]:
    """Evaluate a backbone's frozen features and/or trained classifiers on a task's test split.

    ``config``: an EvalConfig, a YAML path, or None; ``sections`` override it by section (``knn={"k": 10}``) or
    top-level key (``checkpoint=...``, ``out=...``). Returns {"out", "task", "rows" (name -> test metrics),
    "summary" (over several classifiers, else None), "table" (the text printed by the command)}.
    """
    cfg = config_mod.resolve(EvalConfig, config, sections, overrides)
    if cfg.img_size is not None and cfg.has_backbone:
        cfg.backbone.check_img_size("img_size (--img-size)", cfg.img_size)
    task = _task_for(cfg)
    wanted = cfg.protocols or (
        ([p for p in ("knn", "linear") if p != "knn" or task.task != "multilabel"] if cfg.has_backbone else [])
        + (["classifier"] if cfg.checkpoint else [])
    )
    if "knn" in wanted and task.task == "multilabel":
        raise ConfigError("protocol knn is for single-label tasks; use linear for multilabel")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    config_mod.dump(cfg, out / "config.yaml")
    device = _device(cfg.device)

    rows: dict[str, dict] = {}
    used: dict[str, data.normalize.Preprocessing] = {}
    if {"knn", "linear"} & set(wanted):
        rows.update(_feature_protocols(cfg, task, out, wanted, device, used))
    classifiers = {}
    if "classifier" in wanted:
        for name, path in find_classifiers(cfg.checkpoint).items():
            model = load_classifier(path, task).to(device)
            img_size = cfg.img_size or model.patch_embed.img_size[0]
            used[name] = _preprocessing(cfg, model, task, out, img_size)
            outputs = classifier_scores(model, task.source, task.splits["test"], task=task.task, img_size=img_size,
                                        batch_size=cfg.batch_size, num_workers=cfg.data.num_workers,
                                        preprocessing=used[name])
            classifiers[name] = rows[name] = report_predictions(task, outputs, out, name, bootstrap=cfg.bootstrap)
    io.write_json(out / "preprocessing.json", {name: pre.to_dict() for name, pre in used.items()})

    RunDir(out).write_metrics([{"name": name, **row} for name, row in rows.items()])
    names = list(metrics.metric_names(task.task))
    columns = {name: ci_column(row, names) for name, row in rows.items() if name not in classifiers}
    summary = None
    if len(classifiers) > 1:
        summary = summarise(classifiers, names)
        write_summary(out, summary)
        columns["classifier (mean ± std)"] = mean_std_column(summary)
    else:
        columns.update({name: ci_column(row, names) for name, row in classifiers.items()})
    table = f"{task.describe()}\n{format_table(columns, task.primary)}"
    return {"out": out, "task": task, "rows": rows, "summary": summary, "table": table}

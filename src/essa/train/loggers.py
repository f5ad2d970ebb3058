"""Experiment loggers through Lightning (``trainer.logger``): each step's loss and learning rates every
``trainer.log_every_n_steps`` steps, each epoch's history row (``epoch/`` metrics, :class:`essa.train.run_dir.EpochEnd`)
and the resolved config as hyperparameters.

- ``csv`` (the default): ``RUN_DIR/logs/version_N/metrics.csv``, one version per session of a resumed run.
- ``tensorboard``: ``RUN_DIR/logs/version_N/`` event files (``pip install "essa[tensorboard]"``).
- ``wandb``: offline into ``RUN_DIR/wandb`` unless ``WANDB_MODE=online`` (then ``wandb sync`` is not needed);
  project ``essa`` or ``WANDB_PROJECT`` (``pip install "essa[wandb]"``).
- ``mlflow``: ``MLFLOW_TRACKING_URI``, else ``RUN_DIR/mlruns``; experiment ``essa`` (``pip install "essa[mlflow]"``).
- ``none``: no logger (``metrics.csv`` and ``metrics.json`` of the run directory are written anyway).
"""

from __future__ import annotations

import os
from pathlib import Path

from essa.config import ConfigError, check_logger

def build_loggers(name: str, run_dir: Path | None, run_name: str, config: dict | None = None) -> list:
    """The Lightning loggers of ``trainer.logger`` = ``name`` for a run in ``run_dir`` (none without a run
    directory), with ``config`` logged as hyperparameters."""
    if name == "none" or run_dir is None:
        return []
    check_logger(name)
    from lightning.pytorch import loggers

    run_dir = Path(run_dir)
    if name == "csv":
        logger = loggers.CSVLogger(save_dir=run_dir, name="logs")
    elif name == "tensorboard":
        logger = loggers.TensorBoardLogger(save_dir=run_dir, name="logs", default_hp_metric=False)
    elif name == "wandb":
        logger = loggers.WandbLogger(save_dir=str(run_dir), name=run_name, project=os.environ.get("WANDB_PROJECT", "essa"),
                                     offline=os.environ.get("WANDB_MODE", "offline") != "online")
    elif name == "mlflow":
        logger = loggers.MLFlowLogger(experiment_name="essa", run_name=run_name,
                                      tracking_uri=os.environ.get("MLFLOW_TRACKING_URI", f"file:{run_dir / 'mlruns'}"))
    else:
        raise ConfigError(f"trainer.logger={name!r}; valid choices: csv, tensorboard, wandb, mlflow, none")
    if config is not None:
        logger.log_hyperparams(_flat(config))
    return [logger]


def _flat(config: dict, prefix: str = "") -> dict:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}`` (lists and None as text: every logger takes them)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def log_epoch(trainer, row: dict) -> None:
    """An epoch's history row to every logger of ``trainer``, as ``epoch/<key>`` at the epoch's last step."""
    values = {f"epoch/{k}": float(v) for k, v in row.items()
              if k not in ("epoch", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    for logger in trainer.loggers:
        logger.log_metrics({"epoch": row["epoch"], **values}, step=row["step"])

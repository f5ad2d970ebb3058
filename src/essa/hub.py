"""Hub-ready exports: an essa run's model as a folder that timm loads by itself, with a model card.

    essa export runs/ssa-apla --out exports/ssa-apla            # an essa adapt run: its backbone
    essa export runs/sa-apla/seed_0 --out exports/sa-apla       # one seed of essa finetune: its classifier
    essa export runs/ssa-apla --out exports/ssa-apla --push-to-hub me/ssa-apla

The folder is the Hugging Face Hub layout timm reads (written by timm's own ``save_for_hf``):

- ``model.safetensors``: the merged weights, plain timm keys;
- ``config.json``: the architecture, its arguments and the pretrained config, with the preprocessing the run used
  (mean, std, interpolation, input size, centre crop), so that ``timm.data.resolve_data_config`` gives it back;
- ``README.md``: a model card: the base model and its licence, the recipe (objective or task, tuner, epochs, image
  size, batch), the data, the metrics (with their 95 % intervals), memory and speed.

``timm.create_model("local-dir:FOLDER", pretrained=True)`` loads it as it is, and after ``--push-to-hub REPO``
``timm.create_model("hf-hub:REPO", pretrained=True)``. Pushing needs the network and a token (``HF_TOKEN`` or
``huggingface-cli login``); offline it is one clear error, and the folder stays complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from essa import config as config_mod, io
from essa.errors import EssaError, NotFoundError
from essa.io import read_json

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"

#: Licences the Hub knows by these ids (anything else is written as ``license: other`` with its name).
HUB_LICENCES = {"apache-2.0", "mit", "cc-by-4.0", "cc-by-nc-4.0", "cc-by-sa-4.0", "cc-by-nc-sa-4.0", "bsd-3-clause",
                "openrail", "llama2", "gpl-3.0", "agpl-3.0", "unknown"}


class ExportError(EssaError, ValueError):
    """A run that cannot be exported as asked (nothing exported yet, several seeds, a model timm cannot rebuild),
    or a push to the Hub that could not be made."""


def run_kind(run_dir: Path) -> tuple[str, Path]:
    """``("adapt", backbone.safetensors)`` or ``("finetune", classifier.safetensors)`` of a finished run directory."""
    from essa.finetuning import CLASSIFIER_FILE

    if not run_dir.is_dir():
        raise NotFoundError(f"no run directory at {run_dir}")
    if (run_dir / "backbone.safetensors").is_file():
        return "adapt", run_dir / "backbone.safetensors"
    if (run_dir / CLASSIFIER_FILE).is_file():
        return "finetune", run_dir / CLASSIFIER_FILE
    seeds = sorted(p for p in run_dir.glob("seed_*") if (p / CLASSIFIER_FILE).is_file())
    if seeds:
        raise ExportError(f"{run_dir} is an essa finetune run of {len(seeds)} seeds: export one of them, e.g. "
                          + ", ".join(str(p) for p in seeds[:3]))
    raise ExportError(f"{run_dir} holds no exported model (backbone.safetensors of a finished essa adapt run, or "
                      f"{CLASSIFIER_FILE} of a finished essa finetune seed)")


def export(run_dir: str | Path, out: str | Path, *, repo_id: str | None = None) -> Path:
    """Write the Hub folder of the finished run in ``run_dir`` (an ``essa adapt`` run, or one ``essa finetune``
    seed) to ``out``, which must not exist yet (or be empty); ``repo_id`` names the model in its card's usage. The
    folder appears whole or not at all."""
    from timm.models import save_for_hf

    from essa import backbones
    from essa.data import normalize

    run_dir, out = Path(run_dir), Path(out)
    kind, weights = run_kind(run_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists; choose another --out or delete it")
    model = backbones.create(weights=weights).eval()
    if getattr(model, "global_pool", None) == backbones.TOKEN_AVG_POOL:
        raise ExportError(f"{weights} pools the CLS token with the mean of the patch tokens (head.pool=token+avg), "
                          "which timm cannot rebuild from a config alone; fine-tune with head.pool=token or avg to "
                          "export it for the Hub (the essa file itself loads with essa.backbones.create)")
    pre = normalize.of_model(model)
    size = tuple(model.patch_embed.img_size)
    data_config = {"input_size": (3, *size), "mean": pre.mean, "std": pre.std, "interpolation": pre.interpolation,
                   "crop_pct": 1.0, "crop_mode": "center"}  # essa's evaluation: resize, centre crop, normalise
    arch = getattr(model, "essa_arch", None) or {}
    model_args = {k: v for k, v in arch.get("model_args", {}).items() if _jsonable(v)}
    # the base weights' tag (the run's backbone.name; a model rebuilt from a file has its architecture's default
    # tag) and licence
    from timm.models import split_model_name_tag

    named = (_run_config(run_dir).get("backbone") or {}).get("name") or arch.get("timm_name") or ""
    name_arch, tag = split_model_name_tag(named)
    base_cfg = {"tag": tag} if tag and name_arch == split_model_name_tag(arch.get("timm_name") or "")[0] else {}
    licence = _base_licence(arch, named or None)
    if licence:
        base_cfg["license"] = licence
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_for_hf(model, str(tmp), model_config={"pretrained_cfg": base_cfg}, model_args=model_args,
                    safe_serialization=True, data_config=data_config)
        card = model_card(run_dir, kind, weights, model, pre.to_dict(), repo_id or out.name)
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        for path in tmp.iterdir():
            io.umask_mode(path)  # safetensors writes 0600: colleagues on shared storage must read it
        os.chmod(tmp, 0o777 & ~io.umask())
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _run_config(run_dir: Path) -> dict:
    return config_mod.read_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else {}


def _read(path: Path, default):
    return read_json(path) if path.is_file() else default


def _base_licence(meta: dict[str, str], timm_name: str | None) -> str | None:
    """The licence of the base model's weights: the export header's (``licence``), else timm's pretrained config of
    its name."""
    if meta.get("licence"):
        return meta["licence"]
    if not timm_name:
        return None
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(timm_name)
    except Exception:  # an unknown tag: no licence to name
        return None
    return getattr(cfg, "license", None) if cfg is not None else None


def model_card(run_dir: Path, kind: str, weights: Path, model, preprocessing: dict, name: str) -> str:
    """The model card (``README.md``) of a run's export: YAML front matter and details as timm's ``generate_readme``
    writes them, then what essa knows of the run."""
    from timm.models._hub import generate_readme

    import essa
    from essa.export import load_weights

    _, meta = load_weights(weights)
    cfg = _run_config(run_dir)
    resources = _read(run_dir / "resources.json", {})
    rows = _read(run_dir / "metrics.json", [])
    backbone = cfg.get("backbone") or {}
    timm_name = meta.get("timm_name") or backbone.get("name")
    base = backbone.get("name") or timm_name
    if backbone.get("weights"):
        base = f"{base or 'the architecture in its header'} with the weights {backbone['weights']}"
    licence = _base_licence(meta, backbone.get("name") or timm_name)
    tuner = cfg.get("tuner") or {}
    tuner_text = tuner.get("name", "?") + (f" {json.dumps(tuner['options'])}" if tuner.get("options") else "")
    optim = cfg.get("optim") or {}
    data = cfg.get("data") or {}

    details: dict[str, Any] = {"Base model": base or "unknown",
                               "Base model licence": licence or "not recorded: check the base model's own terms",
                               "Adapted with": f"essa {meta.get('essa_version', essa.__version__)}"}
    if kind == "adapt":
        objective = cfg.get("objective", "dinov2")
        ssl = cfg.get("ssl") or {}
        exported = resources.get("exported") or {}
        details["Model type"] = "image feature backbone (self-supervised adaptation)"
        details["Recipe"] = {
            "objective": objective, "tuner": tuner_text, "epochs": optim.get("epochs"),
            "batch size": optim.get("batch_size"), "image size": ssl.get("global_size"),
            "exported": (f"epoch {exported.get('epoch')} (step {exported.get('step')}): {exported.get('reason')}"
                         if exported else "the last epoch"),
        }
        details["Data"] = (f"{resources.get('images', '?')} unlabelled images of {data.get('root')}"
                           + (f" (the {data['split']} split; labels unused)" if data.get("split") else ""))
        metric_lines = _knn_lines(rows, exported.get("epoch"))
        task_name = "image-feature-extraction"
    else:
        test = rows[-1] if rows and rows[-1].get("split") == "test" else {}
        details["Model type"] = f"image classifier ({cfg.get('task') or 'task from the data'})"
        details["Recipe"] = {"tuner": tuner_text, "epochs": optim.get("epochs"), "batch size": optim.get("batch_size"),
                             "image size": cfg.get("img_size"), "head": json.dumps(cfg.get("head") or {}),
                             "seed": (cfg.get("seeds") or ["?"])[0],
                             "tested checkpoint": f"epoch {test.get('epoch')} (step {test.get('step')}), the best on "
                                                  "the val split"}
        details["Data"] = f"{data.get('root')} (val and test splits held out; test used once)"
        metric_lines = _test_lines(test)
        task_name = "image-classification"
    details["Preprocessing"] = (f"resize and centre crop to {tuple(model.patch_embed.img_size)}, "
                                f"{preprocessing['interpolation']}; mean {preprocessing['mean']}, std "
                                f"{preprocessing['std']} ({preprocessing['source']})")
    card: dict[str, Any] = {"tags": [task_name, "timm", "essa", "medical-imaging"], "details": details,
                            "description": _description(kind, base, tuner_text)}
    hub_id = (licence or "unknown").lower()
    if hub_id in HUB_LICENCES:
        card["license"] = hub_id
    else:
        card["license"], card["license_name"] = "other", licence
    card["usage"] = _usage(name)
    text = generate_readme(card, name, task_name=task_name)
    text += "\n## Metrics\n\n" + ("\n".join(metric_lines) if metric_lines else "None recorded.") + "\n"
    text += "\n## Resources (training)\n\n" + "\n".join(_resource_lines(resources)) + "\n"
    return text


def _description(kind: str, base: str | None, tuner: str) -> str:
    if kind == "adapt":
        return (f"{base} adapted to a medical-imaging domain by self-supervised adaptation with essa, training only "
                f"what the {tuner} tuner trains; its tuner is merged into these plain timm weights.")
    return f"A classifier fine-tuned with essa from {base}, training what the {tuner} tuner trains (merged)."


def _usage(name: str) -> str:
    return ("```python\nimport timm\n\n"
            f'model = timm.create_model("hf-hub:{name}", pretrained=True)  # once pushed to the Hub\n'
            '# or from this folder: timm.create_model("local-dir:/path/to/this/folder", pretrained=True)\n'
            "config = timm.data.resolve_data_config({}, model=model)  # the preprocessing above\n"
            "transform = timm.data.create_transform(**config)\n```\n")


def _knn_lines(rows: list[dict], epoch) -> list[str]:
    out = []
    for row in rows:
        if row.get("knn_bal_acc") is not None:
            mark = " (exported)" if row.get("epoch") == epoch else ""
            out.append(f"- epoch {row['epoch']}: kNN balanced accuracy on the val images {row['knn_bal_acc']:.4f}{mark}")
    return out


def _test_lines(test: dict) -> list[str]:
    out = []
    for key, value in test.items():
        low, high = test.get(f"{key}_ci_low"), test.get(f"{key}_ci_high")
        if low is None or high is None or not isinstance(value, (int, float)):
            continue
        out.append(f"- test {key}: {value:.4f} (95 % bootstrap interval {low:.4f}-{high:.4f})")
    return out


def _resource_lines(resources: dict) -> list[str]:
    names = {"trainable_params": "trainable parameters", "peak_memory_mib": "peak memory (MiB)",
             "images_per_s": "images/s", "train_seconds": "training time (s)"}
    out = []
    for key, label in names.items():
        value = resources.get(key)
        if isinstance(value, (int, float)):
            out.append(f"- {label}: {value:,.0f}" if float(value).is_integer() or value > 100 else f"- {label}: {value:.3g}")
    return out or ["None recorded."]


def push(folder: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Upload an exported folder to the Hugging Face Hub as ``repo_id`` (created if needed); returns its URL.
    Offline (``HF_HUB_OFFLINE``, or no network) it raises :class:`ExportError` saying so; the folder is untouched."""
    folder = Path(folder)
    hint = f"the folder {folder} is complete: push it later with `huggingface-cli upload {repo_id} {folder}`"
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise ExportError(f"cannot push to the Hugging Face Hub: HF_HUB_OFFLINE is set; {hint}")
    from huggingface_hub import HfApi

    try:
        api = HfApi(library_name="essa")
        repo = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message="essa export")
    except Exception as err:  # offline, no token, no right to the repo: say which, keep the folder
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ExportError(f"could not push to the Hugging Face Hub as {repo_id} ({type(err).__name__}: {first}); "
                          f"{hint}") from None
    return f"https://huggingface.co/{repo}"

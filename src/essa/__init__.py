"""essa: efficient self-supervised adaptation of vision foundation models to medical imaging.

The Python API mirrors the command line::

    import essa
    ssa = essa.adapt(backbone={"name": "vit_small_patch14_dinov2.lvd142m"}, data={"root": "xrays/train"},
                     tuner={"name": "apla"}, out="runs/ssa-apla")
    essa.finetune(backbone={"weights": str(ssa["backbone"])}, data={"root": "xrays"}, tuner={"name": "apla"},
                  seeds=[0, 1, 2], out="runs/sa-apla")

``essa.backbones``, ``essa.tuners``, ``essa.data``, ``essa.ssl`` and ``essa.evaluate`` are the building blocks;
``essa.study`` and ``essa.report`` run and report a whole comparison. Each is imported on first use (``import essa``
imports neither torch nor timm), as numpy and torch do with their submodules.
"""

__version__ = "0.1.0"

# Stage functions and submodules, imported on first use so that ``import essa`` stays light.
_STAGES = {"adapt": "essa.adaptation", "finetune": "essa.finetuning"}
_SUBMODULES = ("adaptation", "backbones", "bench", "config", "data", "evaluate", "export", "finetuning", "report",
               "ssl", "study", "task", "train", "tuners")


def __getattr__(name: str):
    import importlib

    if name in _STAGES:
        return getattr(importlib.import_module(_STAGES[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"essa.{name}")
    raise AttributeError(f"module 'essa' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_STAGES, *_SUBMODULES])

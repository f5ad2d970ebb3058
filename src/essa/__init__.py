"""essa: efficient self-supervised adaptation of vision foundation models to medical imaging.

The Python API mirrors the command line::

    import essa
    ssa = essa.adapt(backbone={"name": "vit_small_patch14_dinov2.lvd142m"}, data={"root": "xrays/train"},
                     tuner={"name": "apla"}, out="runs/ssa-apla")
    essa.finetune(backbone={"weights": str(ssa["backbone"])}, data={"root": "xrays"}, tuner={"name": "apla"},
                  seeds=[0, 1, 2], out="runs/sa-apla")

``essa.backbones``, ``essa.tuners``, ``essa.data``, ``essa.ssl`` and ``essa.evaluate`` are the building blocks.
"""

__version__ = "0.1.0"

# Stage functions, imported on first use so that ``import essa`` stays light.
_STAGES = {"adapt": "essa.adaptation", "finetune": "essa.finetuning"}


def __getattr__(name: str):
    if name in _STAGES:
        import importlib

        return getattr(importlib.import_module(_STAGES[name]), name)
    raise AttributeError(f"module 'essa' has no attribute {name!r}")

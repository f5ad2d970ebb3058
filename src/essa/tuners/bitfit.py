"""BitFit: train every bias term of the backbone (linear, convolution and normalisation biases)."""

from __future__ import annotations

from essa.tuners.base import Tuner, register


@register("bitfit")
class BitFit(Tuner):
    def inject(self, model):
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.requires_grad_(True)

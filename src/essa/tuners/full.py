"""Full fine-tuning: every parameter trains (the baseline APLA is measured against)."""

from __future__ import annotations

from essa.tuners.base import Tuner, register


@register("full")
class Full(Tuner):
    def inject(self, model):
        model.requires_grad_(True)

"""Linear probing: the backbone stays frozen; only a head trains (the model's own, or an external one)."""

from __future__ import annotations

from essa.tuners.base import Tuner, register


@register("linear")
class Linear(Tuner):
    def inject(self, model):
        """Nothing in the backbone trains; ``apply`` unfreezes the classification head."""

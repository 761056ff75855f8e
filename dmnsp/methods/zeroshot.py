"""Zero-shot CLIP (Continual-CLIP): no training; every task is evaluated with the initial adapters,
which output zero at init, so the model is the backbone itself."""

from __future__ import annotations

from .base import Method
from .registry import register


@register
class ZeroShot(Method):
    name = "zeroshot"
    description = "zero-shot CLIP (Continual-CLIP): no training, the backbone's prompts only"
    order = 0
    color = "#7f7f7f"
    trains = False

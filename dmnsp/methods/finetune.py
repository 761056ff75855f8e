"""Plain adapter fine-tuning: the generic loop's cross-entropy on the current task, nothing else
(the lower bound every continual-learning method should beat)."""

from __future__ import annotations

from .base import Method
from .registry import register


@register
class Finetune(Method):
    name = "finetune"
    description = "adapter fine-tuning on each task, no protection against forgetting"
    order = 1
    color = "#ff7f0e"

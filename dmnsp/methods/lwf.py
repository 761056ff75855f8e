"""Learning without Forgetting (Li & Hoiem, ECCV 2016) on the adapters.

On task t the loss is the cross-entropy on the current task's prompts plus
``alpha * T**2 * KL(softmax(old / T) || softmax(new / T))``, where ``old`` and ``new`` are the logits
of the current images against the prompts of the classes of tasks 0..t-1, from the model as it was
after task t-1 and from the model being trained. The backbone is frozen, so the old model is a
frozen copy of the adapters swapped into the same CLIP (no second CLIP in memory). It runs without
adapter dropout, so its targets are fixed, like the recorded responses of Li & Hoiem, and its text
features of the previous prompts are computed once per task. Nothing is kept across tasks beyond
the adapters every checkpoint holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .base import Method, MethodState, TaskContext
from .registry import register

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch loads inside the functions: the planner reads the class attributes without it.


def distillation_loss(new_logits: torch.Tensor, old_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T**2 * KL(softmax(old / T) || softmax(new / T))``, averaged over the batch (rows)."""
    import torch.nn.functional as F

    old_log_p = F.log_softmax(old_logits / temperature, dim=-1)
    new_log_p = F.log_softmax(new_logits / temperature, dim=-1)
    kl = F.kl_div(new_log_p, old_log_p, log_target=True, reduction="batchmean")
    return temperature**2 * kl


@contextmanager
def swapped_adapters(model: nn.Module, replacement: list[nn.Module]) -> Iterator[None]:
    """Run ``model`` with ``replacement`` as its adapters (both towers, layer order), then restore them.

    Module references are swapped, no tensor is written, so a graph already built through the
    live adapters stays valid for its backward pass.
    """
    from ..adapters import TOWERS, tower_blocks

    blocks = [block for tower in TOWERS for block in tower_blocks(model, tower)]
    live = [block.adapter for block in blocks]
    for block, adapter in zip(blocks, replacement, strict=True):
        block.adapter = adapter
    try:
        yield
    finally:
        for block, adapter in zip(blocks, live, strict=True):
            block.adapter = adapter


@register
class LwF(Method):
    name = "lwf"
    description = "Learning without Forgetting: distils the previous model's softened old-class logits"
    order = 2
    color = "#9467bd"
    own_keys = ("lwf.",)

    def start_task(self, ctx: TaskContext) -> None:
        import copy

        import torch

        from ..adapters import TOWERS, tower_blocks
        from ..model import encode_text, tokenize_prompts

        self.frozen: list[nn.Module] | None = None
        self.terms: list[float] = []
        if not ctx.previous_class_names:  # task 0: nothing to remember
            return
        blocks = [block for tower in TOWERS for block in tower_blocks(ctx.model, tower)]
        self.frozen = [copy.deepcopy(block.adapter).eval().requires_grad_(False) for block in blocks]
        template = ctx.cfg["prompt_template"]
        self.old_tokens = tokenize_prompts(ctx.tokenizer, list(ctx.previous_class_names), template).to(
            ctx.device
        )
        with (
            torch.no_grad(),
            swapped_adapters(ctx.model, self.frozen),
            torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.amp),
        ):
            self.old_text = encode_text(ctx.model, self.old_tokens)

    def extra_loss(self, ctx: TaskContext, images: torch.Tensor, image_features: torch.Tensor):
        import torch

        from ..model import clip_logits, encode_image, encode_text, logit_scale

        if self.frozen is None:
            return None
        scale = logit_scale(ctx.model, ctx.cfg["logit_scale"])
        autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.amp)
        with torch.no_grad(), swapped_adapters(ctx.model, self.frozen), autocast:
            old = clip_logits(encode_image(ctx.model, images), self.old_text, scale)
        with autocast:
            new = clip_logits(image_features, encode_text(ctx.model, self.old_tokens), scale)
        lwf = ctx.cfg["lwf"]
        term = distillation_loss(new.float(), old.float(), lwf["temperature"])
        self.terms.append(float(term.detach()))
        return lwf["alpha"] * term

    def end_task(self, ctx: TaskContext) -> tuple[MethodState, dict]:
        terms = self.terms
        summary = {"first": terms[0], "last": terms[-1], "mean": sum(terms) / len(terms)} if terms else None
        return ctx.state, {"distillation": summary}

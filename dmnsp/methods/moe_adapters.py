"""MoE-Adapters4CL (Yu et al., CVPR 2024), as its official class-incremental code runs it.

Every residual block of both towers gets a mixture of ``moe.experts`` parallel adapters (each one
the project's adapter, bottleneck ``adapter_dim``) behind a noisy top-k router that reads one
token of the block's post-attention stream (token 0: the CLS token of an image, the SOT token of
a prompt). Experts, routers and noise weights train with the generic loop (AdamW, warm-up/cosine,
the cross-entropy on the current task's prompts, one epoch); nothing happens between tasks.

Faithful (``projection.mode: faithful``) keeps the official code's odd behaviours, each reported in
the task's diagnostics: the gate noise is drawn in evaluation too (the blocks' ``is_train`` flag is
never cleared), so evaluation is random and seeded like the random-crop evaluation transform;
the text router reads the SOT token, the same for every prompt under the causal mask; the schedule
runs ``T + 1`` steps with a 30-step warm-up whatever ``T`` is. Clean mode turns the evaluation
noise off, evaluates on the centre crop and caps the warm-up at ``T // 2`` over ``T`` steps;
``moe.text_router_token: eot`` routes prompts by their EOT token.

The block and its gate maths are in :mod:`dmnsp.moe`; this file, which the planner reads without
torch, installs it and reports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Logits, Method, MethodState, Schedule, TaskContext, fill_nulls
from .registry import register

if TYPE_CHECKING:
    import torch
    from torch import nn

#: ``moe.eval_noise`` and ``moe.schedule`` when the config leaves them null.
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "faithful": {"eval_noise": True, "schedule": "reference"},
    "clean": {"eval_noise": False, "schedule": "capped"},
}


def moe_modules(model: nn.Module, tower: str) -> list[nn.Module]:
    """The :class:`dmnsp.moe.MoEAdapter` blocks of one tower, layer order."""
    from ..adapters import adapters

    return adapters(model, tower)


def install_experts(model: nn.Module, cfg: dict[str, Any]) -> None:
    """Replace each block's adapter by a mixture of ``moe.experts`` adapters (the original one first,
    the others drawn from their own seed) with zero router and noise weights (:func:`dmnsp.moe.install`)."""
    import torch

    from .. import moe as block
    from ..adapters import tower_blocks
    from ..loaders import derive_seed

    opts = cfg["moe"]
    towers = {
        "visual": (tower_blocks(model, "visual"), getattr(model.visual.transformer, "batch_first", True)),
        "text": (tower_blocks(model, "text"), getattr(model.transformer, "batch_first", True)),
    }
    with torch.random.fork_rng(devices=[]):  # the global stream stays as the model build left it
        torch.manual_seed(derive_seed(cfg["seed"], "init", "moe"))
        block.install(model, towers, opts["experts"], opts["top_k"], opts["eval_noise"])
    if opts["text_router_token"] == "eot":
        block.route_by_eot(model, moe_modules(model, "text"))


@register
class MoEAdapters(Method):
    name = "moe_adapters"
    label = "moe_adapters"
    description = (
        "MoE-Adapters4CL: a noisy-routed mixture of adapters in every block of both towers (CVPR 2024)"
    )
    order = 3
    color = "#2ca02c"
    own_keys = ("moe.",)
    variants = {
        "moe-clean": {"projection.mode": "clean"},
        "moe-eot-router": {"moe.text_router_token": "eot"},
    }
    # The official configs (cil/configs/class/*.yaml): one epoch, AdamW 1e-3 without decay, no
    # label smoothing, batch 128 (64 for CIFAR100 2-2 and TinyImageNet); evaluation in batches of 64
    # (cil/main.py), which matters in faithful mode: each batch draws its own text-gate noise.
    defaults = (
        (
            "*",
            "*",
            {
                "epochs": 1,
                "batch_size": 128,
                "lr": 1e-3,
                "weight_decay": 0.0,
                "ls": 0.0,
                "prompt_template": "a bad photo of a {}.",
                "eval_batch_size": 64,
            },
        ),
        ("cifar100", "2-2", {"batch_size": 64}),
        ("tinyimagenet", "*", {"batch_size": 64}),
    )

    @classmethod
    def resolve(cls, cfg: dict[str, Any]) -> None:
        from ..errors import ConfigError

        moe = cfg["moe"]
        fill_nulls(moe, MODE_DEFAULTS[cfg["projection"]["mode"]])
        if moe["top_k"] > moe["experts"]:
            raise ConfigError(
                f"'moe.top_k': {moe['top_k']} is more than moe.experts ({moe['experts']}); "
                f"set moe.top_k to at most {moe['experts']}"
            )

    @classmethod
    def label_parts(cls, cfg: dict[str, Any]) -> list[str]:
        moe = cfg["moe"]
        defaults = {"experts": 2, "top_k": 2, "text_router_token": "first"}
        defaults.update(MODE_DEFAULTS[cfg["projection"]["mode"]])
        return [f"{key}={moe[key]}" for key in defaults if moe.get(key) != defaults[key]]

    def prepare_model(self, model: nn.Module, cfg: dict[str, Any]) -> None:
        install_experts(model, cfg)

    def schedule(self, cfg: dict[str, Any], n_batches: int) -> Schedule:
        if cfg["moe"]["schedule"] == "reference":
            return super().schedule(cfg, n_batches)
        from ..optim import lr_at

        total = cfg["epochs"] * n_batches
        warmup = min(cfg["warmup_steps"], total // 2)
        n_steps = total if cfg["max_steps"] is None else min(total, cfg["max_steps"])
        return n_steps, lambda step: lr_at(step, total, cfg["lr"], warmup)

    def start_task(self, ctx: TaskContext) -> None:
        from ..adapters import TOWERS

        for tower in TOWERS:
            for m in moe_modules(ctx.model, tower):
                m.stats.reset()

    def end_task(self, ctx: TaskContext) -> tuple[MethodState, dict]:
        from ..adapters import TOWERS

        cfg = ctx.cfg
        n_steps, lr_of = self.schedule(cfg, ctx.n_batches)
        lrs = [lr_of(s) for s in range(n_steps)]
        per_block = {t: [m.stats.summary() for m in moe_modules(ctx.model, t)] for t in TOWERS}
        return ctx.state, {
            "gates": {t: [b.get("mean_gate") for b in blocks] for t, blocks in per_block.items()},
            "gate_entropy": {t: [b.get("entropy") for b in blocks] for t, blocks in per_block.items()},
            "selections": {t: [b.get("selections") for b in blocks] for t, blocks in per_block.items()},
            "text_gate_spread": text_gate_spread(ctx),
            # The official code's odd behaviours in force (moe-adapters.md section 6).
            "moe": {
                "experts": cfg["moe"]["experts"],
                "top_k": cfg["moe"]["top_k"],
                "eval_noise": cfg["moe"]["eval_noise"],
                "eval_transform": cfg["eval_transform"],
                "text_router_token": cfg["moe"]["text_router_token"],
                "schedule": cfg["moe"]["schedule"],
                "steps_planned": n_steps,
                "peak_lr": max(lrs) if lrs else None,
                "last_lr": lrs[-1] if lrs else None,
            },
        }

    def evaluator(
        self,
        model: nn.Module,
        tokens: torch.Tensor,
        state: MethodState,
        cfg: dict[str, Any],
        scale: torch.Tensor,
    ) -> Logits:
        from ..model import clip_logits, encode_image, encode_text

        if not any(m.eval_noise and m.noisy_gating for m in moe_modules(model, "text")):
            return super().evaluator(model, tokens, state, cfg, scale)

        # The official evaluation encodes the prompts with every batch: fresh text-gate noise each time.
        def logits(images: torch.Tensor) -> torch.Tensor:
            image_features = encode_image(model, images)
            return clip_logits(image_features, encode_text(model, tokens), scale)

        return logits


def text_gate_spread(ctx: TaskContext) -> float:
    """Largest spread (max - min over the task's prompts) of any text gate without noise, in eval
    mode: 0 when the routers read the SOT token, which the causal mask makes the same for every
    prompt (the official text routing is input-independent)."""
    import torch

    from ..adapters import TOWERS
    from ..moe import GateStats

    modules = [m for t in TOWERS for m in moe_modules(ctx.model, t)]
    was_training = ctx.model.training
    saved = [(m.noisy_gating, m.stats) for m in modules]
    spread = 0.0
    ctx.model.eval()
    try:
        for m in modules:
            m.noisy_gating, m.stats = False, GateStats()
        text = moe_modules(ctx.model, "text")
        seen: list[torch.Tensor] = []

        def keep(module, args, _out) -> None:
            seen.append(module.gates(args[0]).detach())

        hooks = [m.register_forward_hook(keep) for m in text]
        with torch.no_grad():
            ctx.model.encode_text(ctx.tokens)
        for h in hooks:
            h.remove()
        spread = max((float((g.max(0).values - g.min(0).values).max()) for g in seen), default=0.0)
    finally:
        for m, (noisy, stats) in zip(modules, saved, strict=True):
            m.noisy_gating, m.stats = noisy, stats
        ctx.model.train(was_training)
    return spread

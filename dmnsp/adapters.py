"""Parallel bottleneck adapters injected into open_clip's residual blocks (both towers).

The block itself is left untouched: a forward pre-hook on its second LayerNorm captures the
post-attention residual stream h', and a thin wrapper adds ``adapter(h')`` to the block's output,
so ``out = h' + MLP(LN2(h')) + s * up(dropout(relu(down(h'))))`` (method.md section 1).
"""

from __future__ import annotations

import math

import torch
from torch import nn

TOWERS = ("visual", "text")


class Adapter(nn.Module):
    """``s * (W_up · Dropout(ReLU(W_down h + b_down)) + b_up)``; zero output at init."""

    def __init__(self, width: int, bottleneck: int, scale: float = 0.1, dropout: float = 0.1) -> None:
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.dropout(torch.relu(self.down(h))))


class AdaptedBlock(nn.Module):
    """Wraps an open_clip ``ResidualAttentionBlock``; keeps its call signature.

    ``record = True`` keeps the last adapter output (detached) in ``last_output`` for the
    null-space statistics; it is off during ordinary steps so no activations pile up.
    """

    def __init__(self, block: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.block = block
        self.adapter = adapter
        self.record = False
        self.last_output: torch.Tensor | None = None
        self._h: torch.Tensor | None = None
        block.ln_2.register_forward_pre_hook(self._capture)

    def _capture(self, _module: nn.Module, args: tuple) -> None:
        self._h = args[0]

    def get_weight_dtype(self) -> torch.dtype:  # open_clip asks resblocks[0] for the cast dtype
        return self.block.get_weight_dtype()

    def forward(
        self,
        q_x: torch.Tensor,
        k_x: torch.Tensor | None = None,
        v_x: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = self.block(q_x, k_x, v_x, attn_mask)
        h, self._h = self._h, None
        a = self.adapter(h)
        if self.record:
            self.last_output = a.detach()
        return out + a


def tower_blocks(model: nn.Module, tower: str) -> nn.ModuleList:
    """The residual blocks of one tower of an open_clip CLIP."""
    if tower == "visual":
        return model.visual.transformer.resblocks
    if tower == "text":
        return model.transformer.resblocks
    raise ValueError(f"unknown tower {tower!r}; expected one of {TOWERS}")


def add_adapters(model: nn.Module, bottleneck: int, scale: float = 0.1, dropout: float = 0.1) -> nn.Module:
    """Wrap every residual block of both towers with an adapter and freeze everything else.

    Args:
        model: an open_clip CLIP with ViT visual tower and transformer text tower.
        bottleneck: adapter width r.
        scale: output scale s.
        dropout: dropout probability inside the adapter.

    Returns:
        The same model, modified in place; only adapter parameters require grad.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for tower in TOWERS:
        blocks = tower_blocks(model, tower)
        for i, block in enumerate(blocks):
            if isinstance(block, AdaptedBlock):
                raise ValueError("model already has adapters")
            width = block.ln_2.normalized_shape[0]
            ref = next(block.parameters())
            adapter = Adapter(width, bottleneck, scale, dropout).to(device=ref.device, dtype=ref.dtype)
            blocks[i] = AdaptedBlock(block, adapter)
    return model


def adapters(model: nn.Module, tower: str) -> list[Adapter]:
    """The adapters of one tower, layer order."""
    return [b.adapter for b in tower_blocks(model, tower)]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter parameters (the trainable state), cloned to CPU."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if ".adapter." in k}


class AdapterMismatchError(ValueError):
    """Saved adapter state (or method state) that does not fit the model's adapters."""


def adapter_widths(model: nn.Module) -> dict[str, list[int]]:
    """Per tower, the output width of each layer's adapter: the residual stream it adds to (read from
    the block, so a method's own adapter module, MoE's mixture or RAPF's empty slot, has one too)."""
    return {tower: [b.block.ln_2.normalized_shape[0] for b in tower_blocks(model, tower)] for tower in TOWERS}


def state_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """Why ``state`` (adapter parameters) does not fit ``model``'s adapters, or None when it does.
    (A method's own state is checked by the method: :meth:`dmnsp.methods.Method.state_mismatch`.)"""
    own = {k: v for k, v in model.state_dict().items() if ".adapter." in k}
    if set(state) != set(own):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        return f"adapter names differ (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, value in state.items():
        if tuple(value.shape) != tuple(own[name].shape):
            return f"adapter {name} is {list(value.shape)}, the model's is {list(own[name].shape)}"
    return None


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter parameters saved by :func:`adapter_state_dict` (strict on adapter names and shapes).

    Raises:
        AdapterMismatchError: names or shapes differ from the model's adapters.
    """
    why = state_mismatch(model, state)
    if why is not None:
        raise AdapterMismatchError(f"adapter state does not match the model: {why}")
    model.load_state_dict(state, strict=False)


def set_recording(model: nn.Module, tower: str, on: bool) -> None:
    """Turn adapter-output recording on or off for one tower (clears old records)."""
    for b in tower_blocks(model, tower):
        b.record = on
        b.last_output = None


def recorded_outputs(model: nn.Module, tower: str) -> list[torch.Tensor]:
    """Adapter outputs of the last forward pass, one tensor per layer (requires recording on)."""
    outs = [b.last_output for b in tower_blocks(model, tower)]
    if any(o is None for o in outs):
        raise RuntimeError(f"no recorded adapter outputs for the {tower} tower; call set_recording first")
    return outs


def count_trainable(model: nn.Module) -> dict[str, int]:
    """Trainable parameter counts per tower."""
    return {t: sum(p.numel() for a in adapters(model, t) for p in a.parameters()) for t in TOWERS}

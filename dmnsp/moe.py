"""The mixture-of-adapters block of MoE-Adapters4CL (moe-adapters.md section 1), for
:mod:`dmnsp.methods.moe_adapters`.

:class:`MoEAdapter` takes the place of one residual block's adapter (``block.adapter``): it receives
the block's post-attention stream h' and returns ``sum_e g_e(h') A_e(h')``, which the adapted block
adds to its output. Its router reads one token per sample (token 0 by default: the CLS token of an
image, the SOT token of a prompt): logits ``c W_g`` plus, with noisy gating, ``N(0, 1) *
(softplus(c W_n) + 0.01)``; the gates are a softmax over each sample's top-k logits. Each expert is
the project's adapter and processes every token of its samples. The maths is in small functions
(:func:`router_input`, :func:`gate_logits`, :func:`top_k_gates`, :func:`mix`) testable on
hand-made tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import Adapter

#: Added to the noise's softplus scale (the official ``noise_epsilon``).
NOISE_EPSILON = 1e-2


def router_input(
    h: torch.Tensor, index: torch.Tensor | None = None, batch_first: bool = True
) -> torch.Tensor:
    """The token each sample's router reads, (B, D): token 0 of every sequence, or per sample the
    position ``index[b]`` (the EOT token of a prompt)."""
    seq = h if batch_first else h.transpose(0, 1)  # (B, L, D)
    if index is None:
        return seq[:, 0, :]
    return seq[torch.arange(seq.shape[0], device=seq.device), index]


def gate_logits(
    c: torch.Tensor, w_gate: torch.Tensor, w_noise: torch.Tensor | None, eps: float = NOISE_EPSILON
) -> torch.Tensor:
    """Router logits ``c W_g``, plus ``N(0, 1) * (softplus(c W_n) + eps)`` per sample and expert
    when ``w_noise`` is given (noisy gating): one (B, E) normal draw from torch's generator."""
    clean = c @ w_gate.to(c)
    if w_noise is None:
        return clean
    scale = F.softplus(c @ w_noise.to(c)) + eps
    return clean + torch.randn_like(clean) * scale


def top_k_gates(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Gates (B, E): a softmax over each row's ``k`` largest logits, zero elsewhere. With k = E this
    is a dense softmax over the experts, computed over the sorted logits as the official code does."""
    top, idx = logits.topk(min(k + 1, logits.shape[1]), dim=1)
    gates = torch.softmax(top[:, :k], dim=1)
    return torch.zeros_like(logits).scatter(1, idx[:, :k], gates)


def mix(gates: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
    """``sum_e gates[:, e] * outputs[e]`` for outputs of shape (B, ...), accumulated expert by
    expert in float32 (the official dispatcher's ``index_add``); a zero gate adds exactly zero."""
    y = None
    for e, out in enumerate(outputs):
        g = gates[:, e].reshape(-1, *([1] * (out.dim() - 1)))
        term = (g * out).float()
        y = term if y is None else y + term
    return y


def gate_entropy(gates: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row of gates."""
    return -torch.xlogy(gates, gates).sum(dim=1)


class GateStats:
    """Running gate statistics of one block (never saved): per expert the gate sum and the samples
    it was selected for (gate > 0, the official ``choose_map``), and the summed gate entropy."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.samples = 0
        self.gate_sum: torch.Tensor | None = None
        self.selected: torch.Tensor | None = None
        self.entropy: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, gates: torch.Tensor) -> None:
        g = gates.detach().float()
        parts = (g.sum(0), (g > 0).sum(0), gate_entropy(g).sum())
        if self.gate_sum is None:
            self.gate_sum, self.selected, self.entropy = parts
        else:
            self.gate_sum, self.selected, self.entropy = (
                self.gate_sum + parts[0],
                self.selected + parts[1],
                self.entropy + parts[2],
            )
        self.samples += g.shape[0]

    def summary(self) -> dict:
        """Mean gate per expert, mean entropy, selection counts (JSON-able)."""
        if not self.samples:
            return {"samples": 0, "mean_gate": None, "entropy": None, "selections": None}
        return {
            "samples": self.samples,
            "mean_gate": (self.gate_sum / self.samples).tolist(),
            "entropy": float(self.entropy) / self.samples,
            "selections": self.selected.tolist(),
        }


class MoEAdapter(nn.Module):
    """A mixture of adapters behind a noisy top-k router: one residual block's adapter.

    ``noisy_gating`` draws the gate noise in training, and in eval mode too when ``eval_noise``
    (the official code's behaviour: its blocks never clear their ``is_train`` flag).
    ``token_index`` (per sample, or None for token 0) is the position the router reads.

    Args:
        experts: the adapters (:class:`dmnsp.adapters.Adapter`, same width and bottleneck).
        top_k: experts mixed per sample.
        eval_noise: draw the gate noise in eval mode too.
        batch_first: the layout of h' (open_clip's transformers are batch-first).
    """

    def __init__(
        self, experts: list[Adapter], top_k: int, eval_noise: bool = True, batch_first: bool = True
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= len(experts):
            raise ValueError(f"top_k must lie in 1..{len(experts)}, got {top_k}")
        ref = experts[0].down.weight
        width = experts[0].down.in_features
        self.experts = nn.ModuleList(experts)
        # W_g, W_n: D x E zeros (one pair per block; the official task index is always 0).
        self.router = nn.Parameter(torch.zeros(width, len(experts), device=ref.device, dtype=ref.dtype))
        self.noise = nn.Parameter(torch.zeros(width, len(experts), device=ref.device, dtype=ref.dtype))
        self.top_k = top_k
        self.eval_noise = eval_noise
        self.noisy_gating = True
        self.batch_first = batch_first
        self.token_index: torch.Tensor | None = None
        self.stats = GateStats()

    def gates(self, h: torch.Tensor) -> torch.Tensor:
        """The gates (B, E) of a stream h' (draws the noise when it is on)."""
        noisy = self.noisy_gating and (self.training or self.eval_noise)
        c = router_input(h, self.token_index, self.batch_first)
        return top_k_gates(gate_logits(c, self.router, self.noise if noisy else None), self.top_k)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gates = self.gates(h)  # the noise is drawn before the experts' dropout, as officially
        self.stats.add(gates)
        if self.batch_first:
            return mix(gates, [expert(h) for expert in self.experts]).to(h.dtype)
        outs = [expert(h).transpose(0, 1) for expert in self.experts]
        return mix(gates, outs).transpose(0, 1).to(h.dtype)


def install(
    model: nn.Module, towers: dict[str, tuple[nn.Module, bool]], n_experts: int, top_k: int, eval_noise: bool
) -> None:
    """Replace each block's adapter of the given towers by a :class:`MoEAdapter` of ``n_experts``
    adapters: the original one first, the others new (from torch's generator, so seed it first).

    Args:
        towers: per tower name, its residual blocks (a ModuleList of adapted blocks) and whether
            its transformer is batch-first.
    """
    for blocks, batch_first in towers.values():
        for block in blocks:
            first = block.adapter
            ref = first.down.weight
            others = [
                Adapter(first.down.in_features, first.down.out_features, first.scale, first.dropout.p).to(
                    device=ref.device, dtype=ref.dtype
                )
                for _ in range(n_experts - 1)
            ]
            block.adapter = MoEAdapter([first, *others], top_k, eval_noise, batch_first)


def route_by_eot(model: nn.Module, modules: list[MoEAdapter]) -> None:
    """Make ``modules`` (the text tower's) read each prompt's EOT token, the largest token id as
    open_clip pools it: the token ids are caught on their way into the token embedding."""
    embedding = model.token_embedding if hasattr(model, "token_embedding") else model.text.token_embedding

    def catch(_module: nn.Module, args: tuple) -> None:
        index = args[0].argmax(dim=-1)
        for m in modules:
            m.token_index = index

    embedding.register_forward_pre_hook(catch)

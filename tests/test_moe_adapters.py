"""MoE-Adapters4CL: the gate maths restated on hand-made tensors, and the checks of
moe-adapters.md section 9 on the tiny CLIP: (a) zero-shot at init, (b) one expert without noise is
fine-tuning bit for bit, (c) gates, (d) first-step gradients, (e) text routing, (f) parameter
counts, (g) random faithful evaluation, (h) the official learning-rate sequence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from dmnsp import methods
from dmnsp.adapters import TOWERS, Adapter, adapters, count_trainable
from dmnsp.architectures import tower_widths
from dmnsp.checkpoint import TaskState, load_checkpoint, save_checkpoint
from dmnsp.methods import TaskContext
from dmnsp.methods.moe_adapters import text_gate_spread
from dmnsp.model import logit_scale
from dmnsp.moe import MoEAdapter, gate_logits, mix, router_input, top_k_gates
from dmnsp.runner import Session, check_state_fits


def moe_config(make_config=tiny_config, **changes):
    return make_config(method="moe_adapters", **changes)


@pytest.fixture(scope="module")
def faithful_run(fake_data):
    """A faithful MoE session after task 0: (session, state, row, diagnostics)."""
    session = Session(moe_config(), progress=False, data=fake_data)
    return (session, *session.run_task(0, TaskState()))


def moe_blocks(model) -> list[MoEAdapter]:
    return [m for tower in TOWERS for m in adapters(model, tower)]


def randomise_routers(model, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in moe_blocks(model):
            m.router.copy_(torch.randn(m.router.shape, generator=gen))
            m.noise.copy_(torch.randn(m.noise.shape, generator=gen))


# ------------------------------------------------------------------------------ hand-made maths
def test_router_reads_token_zero_of_each_sample_or_the_given_positions():
    h = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)  # (B, L, D)
    assert torch.equal(router_input(h), torch.tensor([[0.0, 1.0], [6.0, 7.0]]))
    assert torch.equal(router_input(h, torch.tensor([2, 1])), torch.tensor([[4.0, 5.0], [8.0, 9.0]]))
    # A sequence-first stream (L, B, D) gives the same tokens.
    assert torch.equal(router_input(h.transpose(0, 1), batch_first=False), router_input(h))


def test_gate_logits_without_and_with_noise():
    c = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    w_gate = torch.tensor([[0.2, -0.1], [0.3, 0.4]])
    w_noise = torch.tensor([[1.0, 0.0], [-0.5, 2.0]])
    clean = np.array([[1 * 0.2 - 2 * 0.3, 1 * -0.1 - 2 * 0.4], [0.5 * 0.2 + 3 * 0.3, 0.5 * -0.1 + 3 * 0.4]])
    np.testing.assert_allclose(gate_logits(c, w_gate, None).numpy(), clean, rtol=1e-6)
    torch.manual_seed(3)
    noisy = gate_logits(c, w_gate, w_noise)
    torch.manual_seed(3)
    eps = torch.randn(2, 2).numpy()  # the same single (B, E) draw
    raw = np.array([[2.0, -4.0], [-1.0, 6.0]])  # c @ w_noise
    scale = np.log1p(np.exp(raw)) + 0.01  # softplus + noise_epsilon
    np.testing.assert_allclose(noisy.numpy(), clean + eps * scale, rtol=1e-5)


def test_top_k_gates_are_a_softmax_over_each_rows_largest_logits():
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0], [0.5, 0.5, 0.5]])
    g = top_k_gates(logits, 2).numpy()
    e = np.exp
    np.testing.assert_allclose(g[0], [e(1) / (e(1) + e(2)), e(2) / (e(1) + e(2)), 0.0], rtol=1e-6)
    np.testing.assert_allclose(g[1], [e(0) / (e(0) + e(3)), 0.0, e(3) / (e(0) + e(3))], rtol=1e-6)
    assert sorted(g[2]) == pytest.approx([0.0, 0.5, 0.5])
    # Check (c): every row's gates are non-negative and sum to 1; k = E is the dense softmax.
    many = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)) * 3
    for k in (1, 2, 4):
        gates = top_k_gates(many, k)
        assert (gates >= 0).all() and ((gates > 0).sum(1) == k).all()
        torch.testing.assert_close(gates.sum(1), torch.ones(64))
    torch.testing.assert_close(top_k_gates(many, 4), torch.softmax(many, dim=1))
    assert torch.equal(top_k_gates(many[:, :1], 1), torch.ones(64, 1))


def test_mix_weights_each_experts_output_by_its_gate():
    gates = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    a = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])  # (B, L, D) = (2, 1, 2)
    b = torch.tensor([[[-4.0, 8.0]], [[5.0, 1.0]]])
    y = mix(gates, [a, b])
    assert torch.equal(y[0], torch.tensor([[0.25 * 1 + 0.75 * -4, 0.25 * 2 + 0.75 * 8]]))
    assert torch.equal(y[1], torch.tensor([[3.0, 4.0]]))  # a zero gate adds exactly nothing


# ------------------------------------------------------------------------------ on the tiny CLIP
def test_at_init_the_model_is_zero_shot_clip_whatever_the_gates(make_config, fake_data):
    """Check (a): every expert's up-projection is zero, so noisy gates change nothing, in train
    mode (dropout, noise) and in faithful evaluation (noise) alike."""
    moe = Session(moe_config(make_config), progress=False, data=fake_data).model
    zero = Session(make_config(method="zeroshot"), progress=False, data=fake_data).model
    randomise_routers(moe)
    images = torch.rand(6, 3, 28, 28)
    tokens = torch.randint(1, 400, (5, 16))
    for train in (True, False):
        moe.train(train)
        zero.train(train)
        with torch.no_grad():
            assert torch.equal(moe.encode_image(images), zero.encode_image(images))
            assert torch.equal(moe.encode_text(tokens), zero.encode_text(tokens))


def test_one_expert_top_one_without_noise_trains_exactly_as_finetune(make_config, fake_data):
    """Check (b): the mixture of one expert is the finetune adapter, bit for bit, over two tasks."""
    ft = Session(make_config(method="finetune"), progress=False, data=fake_data)
    cfg = moe_config(make_config, moe={"experts": 1, "top_k": 1, "eval_noise": False})
    moe = Session(cfg, progress=False, data=fake_data)
    for m in moe_blocks(moe.model):
        m.noisy_gating = False
    s_ft, s_moe = TaskState(), TaskState()
    for t in range(2):
        s_ft, row_ft, _ = ft.run_task(t, s_ft)
        s_moe, row_moe, _ = moe.run_task(t, s_moe)
        assert row_moe["accuracy_per_task"] == row_ft["accuracy_per_task"]
        assert row_moe["predictions_per_class"] == row_ft["predictions_per_class"]
    experts = {k.replace(".experts.0.", "."): v for k, v in s_moe.adapters.items() if ".experts.0." in k}
    assert experts.keys() == s_ft.adapters.keys()
    assert all(torch.equal(experts[k], s_ft.adapters[k]) for k in experts)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in experts.items() if ".up." in k)


def test_first_step_gradients_reach_only_the_up_projections(make_config, fake_data):
    """Check (d): with every U_e = 0 the routers, noise weights and down-projections get exactly
    zero gradient on the first step; the up-projections and their biases do not."""
    session = Session(moe_config(make_config), progress=False, data=fake_data)
    model = session.model
    images, labels = zip(*[session._train_set(0)[i] for i in range(8)], strict=True)
    tokens = session.bundle.tokenizer([f"a bad photo of a {n}." for n in session.class_names(0)])
    model.train()
    torch.manual_seed(0)
    image = F.normalize(model.encode_image(torch.stack(images)), dim=-1)
    text = F.normalize(model.encode_text(tokens), dim=-1)
    F.cross_entropy(100 * image @ text.t(), torch.tensor(labels)).backward()
    for m in moe_blocks(model):
        for p in (m.router, m.noise, *(e.down.weight for e in m.experts), *(e.down.bias for e in m.experts)):
            assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))
        for e in m.experts:
            assert e.up.weight.grad.abs().sum() > 0 and e.up.bias.grad.abs().sum() > 0


def _text_gates(model, tokens) -> list[torch.Tensor]:
    seen = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: seen.append(mod.gates(args[0])))
        for m in adapters(model, "text")
    ]
    with torch.no_grad():
        model.encode_text(tokens)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("token", ["first", "eot"])
def test_text_routing_reads_the_sot_token_the_same_for_every_prompt(make_config, fake_data, token):
    """Check (e): without noise, routers reading token 0 (SOT) give every prompt the same text gates
    (the causal mask); the EOT ablation gives them different ones. Diagnostics report the spread."""
    cfg = moe_config(make_config, moe={"text_router_token": token})
    session = Session(cfg, progress=False, data=fake_data)
    model = session.model.eval()
    randomise_routers(model)
    for m in moe_blocks(model):
        m.noisy_gating = False
    tokens = session.bundle.tokenizer([f"a bad photo of a {n}." for n in session.scenario.class_names])
    gates = _text_gates(model, tokens)
    assert len(gates) == 12
    same = [all(torch.equal(g[0], row) for row in g) for g in gates]
    assert all(same) if token == "first" else not any(same)
    for m in moe_blocks(model):
        m.noisy_gating = True  # the spread is measured without noise whatever the run draws
    ctx = TaskContext(model.train(), session.bundle.tokenizer, None, cfg, 0, {}, session.device, tokens)
    assert (text_gate_spread(ctx) == 0.0) == (token == "first")
    assert all(m.noisy_gating for m in moe_blocks(model)) and model.training


def test_trainable_parameter_counts():
    """Check (f): per block 2 experts (2 D r + r + D each) and W_g, W_n (D x 2 each)."""
    session_cfg = {"visual": 64, "text": 64}  # the tiny CLIP, adapter_dim 16

    def block(width: int, r: int) -> int:
        m = MoEAdapter([Adapter(width, r), Adapter(width, r)], top_k=2)
        return sum(p.numel() for p in m.parameters() if p.requires_grad)

    assert block(64, 16) == 2 * (2 * 64 * 16 + 16 + 64) + 2 * 2 * 64 == 4_512
    assert 12 * (block(session_cfg["visual"], 16) + block(session_cfg["text"], 16)) == 108_288
    widths = tower_widths("ViT-B-16")
    assert widths == {"visual": 768, "text": 512}
    assert block(768, 64) == 201_344 and block(512, 64) == 134_272
    assert 12 * (block(widths["visual"], 64) + block(widths["text"], 64)) == 4_027_392


def test_the_installed_model_counts_108288_trainable_parameters(make_config, fake_data):
    session = Session(moe_config(make_config), progress=False, data=fake_data)
    assert count_trainable(session.model) == {"visual": 54_144, "text": 54_144}
    trainable = sum(p.numel() for p in session.model.parameters() if p.requires_grad)
    assert trainable == 108_288
    assert sum(v.numel() for v in session.initial_adapters.values()) == 108_288


def _eval_logits(session, seed: int) -> torch.Tensor:
    """Evaluation logits of four fixed images (one crop each, the same for every seed), with torch's
    generator at ``seed`` when the evaluator runs."""
    method = methods.get("moe_adapters")()
    model = session.model.eval()
    tokens = session.bundle.tokenizer([f"a bad photo of a {n}." for n in session.class_names(0)])
    torch.manual_seed(0)
    images = torch.stack([session.heldout(0)[i][0] for i in range(4)])
    torch.manual_seed(seed)
    with torch.no_grad():
        scale = logit_scale(model, session.cfg["logit_scale"])
        return method.evaluator(model, tokens, {}, session.cfg, scale)(images)


def test_faithful_evaluation_draws_gate_noise_clean_does_not(fake_data, faithful_run):
    """Check (g): after training, evaluation logits of the same images differ between seeds in
    faithful mode (the gate noise) and are identical in clean mode."""
    session, state, _, diag = faithful_run
    a = _eval_logits(session, 1)
    assert torch.equal(a, _eval_logits(session, 1)) and not torch.equal(a, _eval_logits(session, 2))
    assert diag["moe"]["eval_noise"] is True and diag["moe"]["eval_transform"] == "train"
    clean = Session(moe_config(projection={"mode": "clean"}), progress=False, data=fake_data)
    clean.model.load_state_dict(session.model.state_dict())  # the same trained experts
    assert torch.equal(_eval_logits(clean, 1), _eval_logits(clean, 2))
    assert clean.cfg["moe"]["eval_noise"] is False and clean.cfg["eval_transform"] == "center"


def official_cosine_lr(step: int, steps: int, base: float = 1e-3, warmup: int = 30) -> float:
    """cil/continual_clip/utils.py: cosine_lr, restated."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * (1 + np.cos(np.pi * (step - warmup) / (steps - warmup))) * base


@pytest.mark.parametrize("total", [16, 20, 40, 79, 782])
def test_schedule_is_the_official_cosine_lr_over_t_plus_one_steps(make_config, total):
    """Check (h), and the clean schedule: T steps, warm-up at most T // 2."""
    method = methods.get("moe_adapters")()
    cfg = moe_config(make_config, warmup_steps=30)
    n_steps, lr_of = method.schedule(cfg, total)
    assert n_steps == total + 1
    lrs = [lr_of(s) for s in range(n_steps)]
    assert lrs == pytest.approx([official_cosine_lr(s, total) for s in range(n_steps)], rel=1e-12, abs=1e-18)
    if total > 30:
        assert lrs[-1] == pytest.approx(0.0, abs=1e-18)
    else:
        assert max(lrs) == pytest.approx((total + 1) / 30 * 1e-3)
    clean = moe_config(make_config, warmup_steps=30, projection={"mode": "clean"})
    n_clean, lr_clean = method.schedule(clean, total)
    warmup = min(30, total // 2)
    assert n_clean == total
    assert lr_clean(warmup - 1) == pytest.approx(1e-3 * warmup / warmup)
    assert lr_clean(warmup) == pytest.approx(1e-3) and lr_clean(total - 1) > 0
    assert [lr_clean(s) for s in range(warmup)] == pytest.approx(
        [1e-3 * (s + 1) / warmup for s in range(warmup)]
    )


def test_diagnostics_report_gates_entropy_and_selections(faithful_run):
    _, _, _, diag = faithful_run
    for tower in TOWERS:
        assert len(diag["gates"][tower]) == 12
        for gates, entropy, selected in zip(
            diag["gates"][tower], diag["gate_entropy"][tower], diag["selections"][tower], strict=True
        ):
            assert sum(gates) == pytest.approx(1.0) and min(gates) > 0
            assert 0 < entropy <= math.log(2) + 1e-6
            assert selected[0] == selected[1] > 0  # top 2 of 2: both experts for every sample
    assert diag["text_gate_spread"] == 0.0
    assert diag["moe"]["schedule"] == "reference" and diag["moe"]["steps_planned"] == diag["steps"]


def test_a_checkpoint_resumes_the_experts_bit_for_bit(fake_data, faithful_run, tmp_path):
    """The experts and routers are installed before a checkpoint is restored: a resumed task
    equals the task run in one process."""
    one, s0, _, _ = faithful_run
    cfg = one.cfg
    s1, row1, _ = one.run_task(1, s0)
    save_checkpoint(tmp_path / "task0.pt", s0, cfg)
    loaded = load_checkpoint(tmp_path / "task0.pt", cfg, expect_task=0)
    other = Session(cfg, progress=False, data=fake_data)
    check_state_fits(other.model, loaded, tmp_path / "task0.pt", cfg)
    r1, again, _ = other.run_task(1, loaded)
    assert again["accuracy_per_task"] == row1["accuracy_per_task"]
    assert r1.adapters.keys() == s1.adapters.keys()
    assert all(torch.equal(r1.adapters[k], s1.adapters[k]) for k in s1.adapters)
    assert any(".router" in k for k in s1.adapters) and any(".experts.1." in k for k in s1.adapters)

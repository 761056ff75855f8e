"""LwF on the adapters: the distillation term restated with numpy, its zeros, its pull towards the
old model, and the method in the training loop (frozen copy of the adapters, no state kept)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmnsp import methods
from dmnsp.adapters import Adapter, tower_blocks
from dmnsp.checkpoint import TaskState
from dmnsp.methods.lwf import distillation_loss, swapped_adapters
from dmnsp.runner import Session


def kl_old_new_numpy(new: np.ndarray, old: np.ndarray, t: float) -> float:
    """T^2 * mean over rows of sum_c p_old,c (log p_old,c - log p_new,c), softmax at temperature T."""

    def softmax(z):
        e = np.exp(z / t - (z / t).max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p_old, p_new = softmax(old), softmax(new)
    return t * t * float(np.mean(np.sum(p_old * (np.log(p_old) - np.log(p_new)), axis=1)))


NEW = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
OLD = np.array([[1.0, 1.5, -0.5], [2.0, -1.0, 0.5]])


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_distillation_is_t_squared_kl_of_old_to_new(t):
    got = distillation_loss(torch.tensor(NEW), torch.tensor(OLD), t)
    assert float(got) == pytest.approx(kl_old_new_numpy(NEW, OLD, t), rel=1e-9)
    # Hand value for the first row alone at T = 1 (softmaxes written out).
    p = np.exp([1.0, 1.5, -0.5]) / np.exp([1.0, 1.5, -0.5]).sum()
    q = np.exp([2.0, 0.5, -1.0]) / np.exp([2.0, 0.5, -1.0]).sum()
    one = distillation_loss(torch.tensor(NEW[:1]), torch.tensor(OLD[:1]), 1.0)
    assert float(one) == pytest.approx(float(np.sum(p * np.log(p / q))), rel=1e-9)


def test_distillation_is_zero_for_equal_logits_and_positive_otherwise():
    assert float(distillation_loss(torch.tensor(OLD), torch.tensor(OLD), 2.0)) == pytest.approx(
        0.0, abs=1e-12
    )
    shifted = torch.tensor(OLD) + 5.0  # softmax ignores a constant per row
    assert float(distillation_loss(shifted, torch.tensor(OLD), 2.0)) == pytest.approx(0.0, abs=1e-12)
    assert float(distillation_loss(torch.tensor(NEW), torch.tensor(OLD), 2.0)) > 0.01


def test_distillation_pulls_the_new_logits_towards_the_old():
    t = 2.0
    new = torch.tensor(NEW, requires_grad=True)
    distillation_loss(new, torch.tensor(OLD), t).backward()
    # d/dz_new of T^2 KL(p_old || p_new(z/T)) = T (p_new - p_old) / batch, restated here.
    p_old = torch.softmax(torch.tensor(OLD) / t, dim=1)
    p_new = torch.softmax(torch.tensor(NEW) / t, dim=1)
    torch.testing.assert_close(new.grad, t * (p_new - p_old) / len(NEW))
    # A small step against the gradient moves the new distribution towards the old one.
    stepped = (new - 0.5 * new.grad).detach()
    assert (torch.softmax(stepped / t, dim=1) - p_old).abs().sum() < (p_new - p_old).abs().sum()
    assert kl_old_new_numpy(stepped.numpy(), OLD, t) < kl_old_new_numpy(NEW, OLD, t)


def test_swapped_adapters_run_the_frozen_copy_and_restore_the_live_ones(make_config, fake_data):
    session = Session(make_config(method="lwf", max_steps=1), progress=False, data=fake_data)
    model = session.model
    blocks = [b for tower in ("visual", "text") for b in tower_blocks(model, tower)]
    live = [b.adapter for b in blocks]
    frozen = [Adapter(a.down.in_features, a.down.out_features) for a in live]
    with swapped_adapters(model, frozen):
        assert [b.adapter for b in blocks] == frozen
    assert [b.adapter for b in blocks] == live


def _task1_diagnostics(cfg, data):
    session = Session(cfg, progress=False, data=data)
    state, _, diag0 = session.run_task(0, TaskState())
    state, _, diag1 = session.run_task(1, state)
    assert state.bases == {}  # the old model is the previous checkpoint's adapters: nothing else kept
    return diag0, diag1


def test_lwf_term_is_zero_at_task_0_and_when_the_model_equals_its_frozen_copy(make_config, fake_data):
    # Without adapter dropout, the first step of task 1 runs the very adapters that were frozen.
    cfg = make_config(method="lwf", max_steps=2, adapter_dropout=0.0)
    diag0, diag1 = _task1_diagnostics(cfg, fake_data)
    assert diag0["distillation"] is None  # task 0: no previous classes, nothing distilled
    assert diag1["distillation"]["first"] == pytest.approx(0.0, abs=1e-7)
    assert diag1["distillation"]["last"] > 1e-6  # after one step the model has moved away
    assert diag1["steps"] == 2 and diag1["update_norm"]["visual"] > 0


def test_lwf_alpha_weighs_the_term_into_the_loss(make_config, fake_data):
    base = dict(max_steps=2, adapter_dropout=0.0)
    _, plain = _task1_diagnostics(make_config(method="finetune", **base), fake_data)
    _, zero = _task1_diagnostics(make_config(method="lwf", lwf={"alpha": 0.0}, **base), fake_data)
    _, heavy = _task1_diagnostics(make_config(method="lwf", lwf={"alpha": 50.0}, **base), fake_data)
    # alpha = 0: the loss is finetune's; a large alpha changes the training.
    assert zero["loss"]["curve"] == pytest.approx(plain["loss"]["curve"], rel=1e-6)
    assert heavy["loss"]["last"] != pytest.approx(plain["loss"]["last"], rel=1e-6)


def test_lwf_keeps_no_state_and_reads_only_its_own_keys():
    assert methods.reads_key("lwf", "lwf.alpha") and methods.reads_key("lwf", "lr")
    assert not methods.reads_key("dmnsp", "lwf.temperature")
    assert not methods.reads_key("lwf", "LAMBDA_SCALE") and not methods.reads_key("lwf", "projection.layers")

"""RAPF: its maths restated on hand-made tensors (shrinkage, sampling, statistics, hard pairs,
hinge, fusion, schedule, optimiser) and the checks of rapf.md section 9 on the tiny CLIP, among them
the first step of a task restated from scratch through the whole training loop."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from dmnsp import methods
from dmnsp.checkpoint import CheckpointError, TaskState, load_checkpoint, save_checkpoint
from dmnsp.loaders import derive_seed, make_loader
from dmnsp.methods import Method, TaskContext
from dmnsp.methods.rapf import (
    COVS,
    MAP,
    MEANS,
    cholesky_factors,
    class_statistics,
    classes_per_batch,
    epoch_rates,
    fuse,
    hard_pairs,
    hinge_loss,
    replay_classes,
    sample,
    shrink_cov,
)
from dmnsp.runner import Session, check_state_fits


def rapf_config(**changes):
    return tiny_config(method="rapf", **changes)


# ------------------------------------------------------------------------------ hand-made maths
def test_shrink_cov_on_a_hand_made_matrix():
    cov = torch.tensor([[2.0, 1.0, 0.0], [1.0, 4.0, 3.0], [0.0, 3.0, 6.0]])
    # Mean diagonal 4 on the diagonal; mean of the nonzero off-diagonal entries (1, 1, 3, 3) = 2 off it.
    expected = torch.tensor([[6.0, 3.0, 2.0], [3.0, 8.0, 5.0], [2.0, 5.0, 10.0]])
    assert torch.equal(shrink_cov(cov), expected)


def test_samples_have_the_class_mean_and_covariance():
    mean = torch.tensor([1.0, -2.0, 0.5])
    cov = torch.tensor([[2.0, 0.6, 0.0], [0.6, 1.0, -0.3], [0.0, -0.3, 0.5]])
    torch.manual_seed(0)
    x = sample(mean, torch.linalg.cholesky(cov), 100_000).double().numpy()
    np.testing.assert_allclose(x.mean(0), mean.numpy(), atol=0.02)
    np.testing.assert_allclose(np.cov(x.T), cov.numpy(), atol=0.03)


def test_class_statistics_are_unbiased_with_the_ridge():
    features = torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, -1.0], [2.0, 2.0], [4.0, 0.5]])
    labels = torch.tensor([7, 3, 7, 7, 3])
    means, covs = class_statistics(features, labels)
    rows = {3: features.numpy()[[1, 4]], 7: features.numpy()[[0, 2, 3]]}
    for i, label in enumerate((3, 7)):  # increasing label order
        np.testing.assert_allclose(means[i].numpy(), rows[label].mean(0), rtol=1e-6)
        np.testing.assert_allclose(
            covs[i].numpy(), np.cov(rows[label].T, ddof=1) + 1e-4 * np.eye(2), rtol=1e-5
        )
    # Half-precision features (the faithful GPU run): means and covariances are computed in fp16 and
    # the ridge promotes the covariance to float32.
    means16, covs16 = class_statistics(features.half(), labels)
    assert means16.dtype == torch.float32 and covs16[0].dtype == torch.float32
    torch.testing.assert_close(covs16[1], covs[1], rtol=2e-3, atol=2e-3)


def test_a_covariance_that_is_not_positive_definite_stops_with_the_fixes():
    from dmnsp.train import NonFiniteError

    good = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    (factor,) = cholesky_factors([good], shrinkage=False)
    torch.testing.assert_close(factor @ factor.T, good)
    bad = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1
    with pytest.raises(NonFiniteError, match=r"class 1 is not positive definite.*rapf.precision: fp32"):
        cholesky_factors([good, bad], shrinkage=False)
    # Shrinkage adds the mean diagonal (1) on the diagonal and the mean off-diagonal (2) off it:
    # [[2, 4], [4, 2]], still indefinite; the error names the same fixes.
    with pytest.raises(NonFiniteError, match="rapf.shrinkage: true"):
        cholesky_factors([bad], shrinkage=True)


def test_hard_pairs_on_hand_made_text_features():
    """Old classes 0, 1; new 2, 3 (global labels). Distances: |u0 - u2| = 0.2, |u1 - u2| = 1.28,
    |u0 - u3| = 1.118, |u1 - u3| = 0.5; the threshold is strict."""
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.2], [0.5, 1.0]])
    assert hard_pairs(u, 2, 0.5).tolist() == [[0, 2]]  # |u1 - u3| = 0.5 exactly: not below
    assert hard_pairs(u, 2, 0.5001).tolist() == [[0, 2], [1, 3]]
    assert hard_pairs(u, 2, 1.2).tolist() == [[0, 2], [0, 3], [1, 3]]  # by old class, then new class
    assert hard_pairs(u, 2, 1.5).tolist() == [[0, 2], [0, 3], [1, 2], [1, 3]]
    assert hard_pairs(u, 2, 0.1).shape == (0, 2)
    assert hard_pairs(u, 0, 10.0).shape == (0, 2)
    assert hard_pairs(u, 3, 10.0).tolist() == [[0, 3], [1, 3], [2, 3]]  # one new class works


def test_hinge_on_hand_made_vectors():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    pos = torch.tensor([[1.0, 0.0]] * 3)
    neg = torch.tensor([[0.0, 1.0]] * 3)
    # max(0, -<z,pos> + <z,neg> + 0.1) = 0, 1.1, 0.3
    assert float(hinge_loss(z, pos, neg)) == pytest.approx((0.0 + 1.1 + 0.3) / 3)
    assert float(hinge_loss(z[:1], pos[:1], neg[:1], margin=2.0)) == pytest.approx(1.0)


def test_fusion_hand_computed_2x2():
    w_old = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # U = V = I, S = (2, 1)
    w_new = torch.tensor([[3.0, 0.2], [0.1, 2.0]])
    # |P_new - P_old| = [[1, .2], [.1, 1]] -> mask min(. / 1 + 0.6, 1) = [[1, .8], [.7, 1]]
    # W = [[3, .2 * .8 + 0 * .2], [.1 * .7 + 0 * .3, 2]]
    fused, info = fuse(w_new, w_old, 0.6)
    torch.testing.assert_close(fused, torch.tensor([[3.0, 0.16], [0.07, 2.0]]))
    assert info == {"guarded": False, "mask_mean": pytest.approx((1 + 0.8 + 0.7 + 1) / 4)}


def test_fusion_keeps_the_new_map_at_mix_bias_one_and_ignores_singular_vector_signs():
    gen = torch.Generator().manual_seed(0)
    w_old, w_new = torch.randn(6, 6, generator=gen), torch.randn(6, 6, generator=gen)
    for bias in (1.0, 1.5):
        torch.testing.assert_close(fuse(w_new, w_old, bias)[0], w_new, rtol=1e-5, atol=1e-5)
    u, s, vh = torch.linalg.svd(w_old)
    flip = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0])
    fused = fuse(w_new, w_old, 0.6, (u, s, vh))[0]
    flipped = fuse(w_new, w_old, 0.6, (u * flip, s, vh * flip[:, None]))[0]
    torch.testing.assert_close(flipped, fused, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fused, w_new, atol=1e-3) and not torch.allclose(fused, w_old, atol=1e-3)


def test_fusion_of_an_unchanged_map_keeps_it_instead_of_dividing_zero_by_zero():
    w = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    fused, info = fuse(w.clone(), w, 0.6)
    assert info["guarded"] is True and torch.equal(fused, w)


def test_every_old_class_is_replayed_each_epoch():
    for n_old, m, batches in [(7, 2, 12), (10, 2, 50), (4, 4, 3), (90, 2, 50), (95, 4, 100)]:
        order = list(range(n_old))
        random.Random(n_old).shuffle(order)
        drawn = [c for b in range(batches) for c in replay_classes(order, b, m)]
        assert len(drawn) == m * batches
        counts = np.bincount(drawn, minlength=n_old)
        assert counts.min() >= m * batches // n_old and counts.max() - counts.min() <= 1


def test_classes_per_batch_follows_the_official_rule():
    assert classes_per_batch("cifar100", 5) == 4
    assert classes_per_batch("cifar100", 10) == classes_per_batch("cifar100", 2) == 2
    assert classes_per_batch("tinyimagenet", 5) == classes_per_batch("fashion-mnist", 5) == 2


def test_schedule_is_multisteplr_stepped_per_epoch():
    cfg = rapf_config(epochs=15, lr=1e-3)
    n_steps, lr_of = methods.get("rapf")().schedule(cfg, 3)
    assert n_steps == 45  # epochs x batches, no extra step, no warm-up
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([w], lr=1e-3)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [4, 10], gamma=0.1)
    expected = []
    for _ in range(15):
        expected += [opt.param_groups[0]["lr"]] * 3
        opt.step()
        sched.step()
    assert [lr_of(s) for s in range(n_steps)] == expected
    assert epoch_rates(1e-3, [4, 10], 15)[3:5] == [1e-3, pytest.approx(1e-4)]


@pytest.mark.parametrize("decay", [0.0, 0.1])
def test_the_optimiser_steps_as_adam(decay):
    cfg = rapf_config(weight_decay=decay, optimizer={"numerics": "cpu"})
    ctx = TaskContext(None, None, None, cfg, 0, {}, torch.device("cpu"), None)
    ours, ref = (torch.nn.Parameter(torch.linspace(-1, 1, 12).reshape(3, 4)) for _ in range(2))
    opt = methods.get("rapf")().optimizer(ctx, [ours])
    adam = torch.optim.Adam([ref], lr=1e-3, weight_decay=decay)
    for step in range(3):
        for p, o in ((ours, opt), (ref, adam)):
            p.grad = torch.cos(torch.arange(12.0) + step).reshape(3, 4)
            o.step()
    assert torch.equal(ours, ref)


# ------------------------------------------------------------------------------ on the tiny CLIP
@pytest.fixture(scope="module")
def two_tasks(fake_data):
    """A clean (fp32) RAPF session after tasks 0 and 1 (one step each) with a threshold between the
    tiny CLIP's smallest and largest old-new prompt distances: (session, state0, state1, diag1, cut)."""
    session = Session(rapf_config(projection={"mode": "clean"}, max_steps=1), progress=False, data=fake_data)
    unit = _unit_prompts(session, 4)
    dist = torch.cdist(unit[2:], unit[:2])
    cut = float(dist.min() + dist.max()) / 2
    session.cfg["rapf"]["threshold"] = cut  # the run's setting, chosen to give some pairs, not all
    s0, _, _ = session.run_task(0, TaskState())
    s1, _, diag1 = session.run_task(1, s0)
    return session, s0, s1, diag1, cut


def _unit_prompts(session, n: int) -> torch.Tensor:
    names = session.scenario.class_names[:n]
    tokens = session.bundle.tokenizer([f"a good photo of a {n}." for n in names])
    with torch.no_grad():
        raw = session.model.encode_text(tokens)
    return raw / raw.norm(dim=-1, keepdim=True)


def test_first_step_of_a_task_restated_through_the_loop(two_tasks):
    """The loss the loop reports for task 1's first step, rebuilt from the checkpointed state: the
    CE over all four seen prompts with global labels on the real batch and the pseudo-features of
    the old classes, plus the hinge on the hard pairs' draws (rapf.md sections 3.2-3.3)."""
    session, s0, _, diag, cut = two_tasks
    cfg, model = session.cfg, session.model
    assert cfg["rapf"]["precision"] == "fp32" and cfg["prompt_template"] == "a good photo of a {}."
    train = session._train_set(1)
    assert torch.equal(train[0][0], train[0][0])  # the deterministic transform
    images, local = next(
        iter(
            make_loader(
                train,
                cfg["batch_size"],
                shuffle=True,
                seed=derive_seed(cfg["seed"], 1, "loader"),
                device=session.device,
            )
        )
    )
    w, means, covs = s0.bases[MAP][0], s0.bases[MEANS][0], s0.bases[COVS]
    text = _unit_prompts(session, 4)
    order = [0, 1]
    random.Random(derive_seed(cfg["seed"], 1, "rapf")).shuffle(order)
    pairs = [(k, j) for k in (0, 1) for j in (2, 3) if float((text[j] - text[k]).norm()) < cut]
    assert 0 < len(pairs) < 4 and diag["rapf"]["hard_pairs"] == len(pairs)

    torch.manual_seed(derive_seed(cfg["seed"], 1, "train"))
    with torch.no_grad():
        rows = [model.encode_image(images)]
    targets = [local + 2]
    for c in order:  # m = 2 old classes per batch, 20 draws each (beta 2)
        rows.append(torch.randn(20, 64) @ torch.linalg.cholesky(covs[c]).T + means[c])
        targets.append(torch.full((20,), c))
    for k, _ in pairs:  # 40 draws of class k per hard pair
        rows.append(torch.randn(40, 64) @ torch.linalg.cholesky(covs[k]).T + means[k])
    z = torch.cat(rows) @ w.T
    z = z / z.norm(dim=1, keepdim=True)
    n_ce = len(images) + 40
    ce = F.cross_entropy(100 * z[:n_ce] @ text.T, torch.cat(targets))
    edge = z[n_ce:]
    pos = torch.cat([text[k].expand(40, -1) for k, _ in pairs])
    neg = torch.cat([text[j].expand(40, -1) for _, j in pairs])
    hinge = torch.clamp((edge * neg).sum(1) - (edge * pos).sum(1) + 0.1, min=0).mean()
    assert diag["loss"]["first"] == pytest.approx(float(ce + hinge), rel=1e-5)
    assert diag["rapf"]["rows_last_step"] == {
        "ce_rows": n_ce,
        "real_rows": len(images),
        "edge_rows": 40 * len(pairs),
    }
    assert diag["rapf"]["pseudo_rows_per_step"] == 40


def test_class_statistics_of_the_frozen_features(two_tasks):
    """After a task: per class the mean and unbiased covariance (+ 1e-4 I) of the frozen features of
    all its training images (deterministic transform), appended after the old classes."""
    session, s0, s1, _, _ = two_tasks
    for task, state in ((0, s0), (1, s1)):
        train = session._train_set(task)
        images = torch.stack([train[i][0] for i in range(len(train))])
        labels = np.array([train[i][1] for i in range(len(train))])
        with torch.no_grad():
            feats = session.model.encode_image(images).double().numpy()
        assert len(state.bases[COVS]) == len(state.bases[MEANS][0]) == 2 * (task + 1)
        for c in range(2):
            rows = feats[labels == c]
            np.testing.assert_allclose(state.bases[MEANS][0][2 * task + c].numpy(), rows.mean(0), atol=1e-5)
            cov = np.cov(rows.T, ddof=1) + 1e-4 * np.eye(64)
            np.testing.assert_allclose(state.bases[COVS][2 * task + c].numpy(), cov, atol=1e-5)


def test_the_map_is_fused_after_task_one(two_tasks):
    session, s0, s1, diag, _ = two_tasks
    fusion = diag["rapf"]["fusion"]
    assert fusion["guarded"] is False and 0.6 <= fusion["mask_mean"] <= 1
    assert fusion["change_norm"] > 0 and fusion["fused_change_norm"] <= fusion["change_norm"] + 1e-6
    assert diag["update_norm"] == {"visual": 0.0, "text": 0.0}  # no adapters train
    assert s0.adapters == {} and session.initial_adapters == {}


def test_clean_identity_map_evaluates_as_zero_shot_clip(two_tasks):
    session, _, _, _, _ = two_tasks
    model = session.model.eval()
    tokens = session.bundle.tokenizer([f"a good photo of a {n}." for n in session.scenario.class_names[:4]])
    images = torch.stack([session.heldout(0)[i][0] for i in range(6)])
    state = {MAP: [torch.eye(64)], MEANS: [torch.zeros(4, 64)], COVS: [torch.eye(64)] * 4}
    scale = torch.tensor(100.0)  # the head is checked here, not the scale
    with torch.no_grad():
        ours = methods.get("rapf")().evaluator(model, tokens, state, session.cfg, scale)(images)
        zero = Method().evaluator(model, tokens, {}, session.cfg, scale)(images)
        half = methods.get("rapf")().evaluator(model, tokens, state, rapf_config(), scale)(images)
    torch.testing.assert_close(ours, zero, rtol=1e-6, atol=1e-5)
    assert half.dtype == torch.float16  # faithful: fp16 logits
    torch.testing.assert_close(half.float(), zero, rtol=1e-2, atol=0.1)


def test_a_checkpoint_resumes_the_task_bit_for_bit(fake_data, two_tasks, tmp_path):
    session, s0, s1, _, _ = two_tasks
    cfg = session.cfg
    save_checkpoint(tmp_path / "task0.pt", s0, cfg)
    loaded = load_checkpoint(tmp_path / "task0.pt", cfg, expect_task=0)
    other = Session(cfg, progress=False, data=fake_data)
    check_state_fits(other.model, loaded, tmp_path / "task0.pt", cfg)
    again, _, _ = other.run_task(1, loaded)
    for key in (MAP, MEANS, COVS):
        assert all(torch.equal(a, b) for a, b in zip(again.bases[key], s1.bases[key], strict=True))
    bad = TaskState(0, {}, {**s0.bases, MAP: [torch.zeros(64, 32)]}, [0, 1])
    with pytest.raises(CheckpointError, match="RAPF map"):
        check_state_fits(other.model, bad, tmp_path / "task0.pt", cfg)
    short = TaskState(0, {}, {**s0.bases, COVS: s0.bases[COVS][:1]}, [0, 1])
    with pytest.raises(CheckpointError, match="1 covariances for 2 classes seen"):
        check_state_fits(other.model, short, tmp_path / "task0.pt", cfg)


def test_faithful_run_in_half_precision_reports_its_odd_behaviours(fake_data):
    cfg = rapf_config(max_steps=2)
    assert (cfg["rapf"]["precision"], cfg["rapf"]["init"], cfg["eval_transform"]) == (
        "fp16",
        "random",
        "center",
    )
    session = Session(cfg, progress=False, data=fake_data)
    s0, row, diag = session.run_task(0, TaskState())
    assert diag["rapf"]["precision"] == "fp16" and diag["rapf"]["hard_pairs"] == 0
    assert diag["rapf"]["map_change_norm"] > 0 and diag["steps"] == 2
    assert s0.bases[MAP][0].dtype == torch.float32 and s0.bases[COVS][0].dtype == torch.float32
    # The random init: task 0 does not start at the identity.
    assert not torch.allclose(s0.bases[MAP][0], torch.eye(64), atol=0.05)


def test_the_state_contract_names_every_way_a_crafted_state_differs(two_tasks):
    """The classmethod contract (checked before a checkpoint's state is used, without the model):
    the map, means and covariances RAPF writes after each task fit it; each of them off in shape,
    class count, dtype or finiteness does not."""
    session, s0, s1, _, _ = two_tasks
    cfg, contract = session.cfg, methods.get("rapf").state_mismatch
    widths = {"visual": [64] * 12, "text": [64] * 12}
    assert contract(cfg, 0, s0.bases, widths) is None and contract(cfg, 1, s1.bases, widths) is None
    assert contract(cfg, -1, {}, widths) is None
    assert "before task 0" in contract(cfg, -1, s0.bases, widths)
    assert "expected one rapf_map" in contract(cfg, 0, {}, widths)
    assert "2 classes seen" in contract(cfg, 0, {**s1.bases}, widths)  # the state of task 1 at task 0
    small = {MAP: [torch.eye(32)], MEANS: [torch.zeros(2, 32)], COVS: [torch.eye(32)] * 2}
    assert "embedding width 64" in contract(cfg, 0, small, widths)  # self-consistent, not the model's
    nan = {**s0.bases, COVS: [s0.bases[COVS][0], s0.bases[COVS][1] * float("nan")]}
    assert "rapf_cov 1 is not finite float32" in contract(cfg, 0, nan, widths)
    half = {**s0.bases, MAP: [s0.bases[MAP][0].half()]}
    assert "rapf_map is not finite float32" in contract(cfg, 0, half, widths)

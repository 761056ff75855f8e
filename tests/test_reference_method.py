"""The method checked from the outside: method.md sections 3-6 restated as literal loops, against what
the real training path of the tiny model does.

Nothing here imports dmnsp's maths (no nullspace functions, no lambda or basis helpers, no lr
schedule, no optimizer internals). The run is driven through its entry points (config validation,
``Session.run_task``); what it does is observed with forward hooks on the ``Adapter`` modules, a
pre-hook on the visual tower, gradient hooks on the adapter parameters (the raw gradients) and a
wrapper around the optimizer factory (the gradients the optimizer receives, its learning rates and
its state). Every expectation is recomputed here from those observations:

- which tensors are projected: the visual adapters' down and up weights; not biases, not text;
- G ← G·P_0⋯P_11·Π_k λ[l][k] (down) and G ← P_11⋯P_0·G·Π_k λ[l][k] (up), with λ's row = the
  layer whose gradient is scaled; in faithful mode computed as the reference computes it, one
  layer's basis and coefficient at a time in float32 (bit for bit);
- λ[j][k] = LAMBDA_SCALE·exp(−mean of the top-m signed cosines between u_j and V_k's columns),
  u_j from layer j's adapter outputs on the task's first training batch;
- V_l: one U[:, 1:] block of svd(Σ a aᵀ) per task, concatenated, from the adapter *outputs* of
  one training batch with dropout on;
- the warm-up / cosine learning rate, a new AdamW per task, its first step in the CUDA foreach
  order (g·g rounded first);
- faithful evaluation through the training transform (a random crop).
"""

from __future__ import annotations

import math
import re
import sys

import pytest
import torch

import dmnsp.optim
from dmnsp.adapters import Adapter
from dmnsp.checkpoint import TaskState
from dmnsp.runner import Session

# Three tasks: t = 2 projects through two concatenated blocks. LAMBDA_SCALE 60 (not 30) makes the
# projected gradients pass 1e19 (where the CUDA and CPU orders part) already at t = 1 and 2.
N_TASKS = 3
LAMBDA_SCALE = 60.0
L = 12


# ----------------------------------------------------------------------------- observation
class Probe:
    """Hooks on one session's model and optimizer factory; records one task at a time."""

    def __init__(self, session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
        self.model = session.model
        self.name = {id(p): n for n, p in self.model.named_parameters() if p.requires_grad}
        for name, module in self.model.named_modules():
            if isinstance(module, Adapter):
                tower = "visual" if name.startswith("visual.") else "text"
                layer = int(re.search(r"resblocks\.(\d+)\.", name).group(1))
                module.register_forward_hook(self._adapter_hook(tower, layer))
        self.model.visual.register_forward_pre_hook(self._image_hook)
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                p.register_hook(self._grad_hook(name))
        original = dmnsp.optim.make_optimizer
        for module in list(sys.modules.values()):  # wherever the training loop took it from
            if (
                module
                and module.__name__.startswith("dmnsp")
                and getattr(module, "make_optimizer", None) is original
            ):
                monkeypatch.setattr(module, "make_optimizer", self._wrap(original))
        self.reset()

    def reset(self) -> None:
        self.passes: list[dict] = []  # visual forward passes: grad mode, steps done, per-layer (h, a, module)
        self.steps: list[dict] = []
        self.raw: dict[str, torch.Tensor] = {}
        self.images: list[dict] = []
        self.optimizers: list[torch.optim.Optimizer] = []

    def _adapter_hook(self, tower: str, layer: int):
        def hook(module, inputs, output):
            if tower != "visual":
                return
            if layer == 0:
                self.passes.append({"grad": torch.is_grad_enabled(), "steps": len(self.steps), "layers": {}})
            self.passes[-1]["layers"][layer] = (inputs[0].detach().clone(), output.detach().clone(), module)

        return hook

    def _image_hook(self, module, inputs):
        self.images.append(
            {"grad": torch.is_grad_enabled(), "steps": len(self.steps), "x": inputs[0].detach().clone()}
        )

    def _grad_hook(self, name: str):
        def hook(grad):
            self.raw[name] = grad.detach().clone()

        return hook

    def _wrap(self, original):
        def make(params, cfg):
            opt = original(params, cfg)
            self.optimizers.append(opt)
            inner = opt.step

            def step(*args, **kwargs):
                params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
                rec = {
                    "lr": [g["lr"] for g in opt.param_groups],
                    "fresh": len(opt.state) == 0,
                    "raw": dict(self.raw),
                    "seen": {self.name[id(p)]: p.grad.detach().clone() for p in params},
                }
                out = inner(*args, **kwargs)
                if rec["fresh"]:
                    rec["state"] = {
                        self.name[id(p)]: (
                            opt.state[p]["exp_avg"].clone(),
                            opt.state[p]["exp_avg_sq"].clone(),
                        )
                        for p in params
                    }
                self.steps.append(rec)
                return out

            opt.step = step
            return opt

        return make

    def task_record(self) -> dict:
        n = len(self.steps)
        train = [p for p in self.passes if p["grad"]]
        after = [p for p in self.passes if not p["grad"] and p["steps"] == n]
        images_after = [i for i in self.images if not i["grad"] and i["steps"] == n]
        return {
            "steps": self.steps,
            "first_batch": train[0]["layers"] if train else None,
            "basis_pass": after[0]["layers"] if after else None,  # the first no-grad pass after training
            "images_after": [i["x"] for i in images_after],  # the basis pass (dmnsp), then evaluation
            "n_optimizers": len(self.optimizers),
        }


def _run(cfg: dict, data, tasks: int) -> tuple[list[dict], list[TaskState], list[dict], Session]:
    with pytest.MonkeyPatch.context() as mp:
        session = Session(cfg, progress=False, data=data)
        probe = Probe(session, mp)
        state, records, states, diags = TaskState(), [], [], []
        for t in range(tasks):
            probe.reset()
            state, _, diag = session.run_task(t, state)
            records.append(probe.task_record())
            states.append(state)
            diags.append(diag)
    return records, states, diags, session


@pytest.fixture(scope="module")
def faithful(fake_data):
    from conftest import tiny_config

    # faithful defaults: concat basis, multi-layer, dynamic lambda, svd, cuda-foreach AdamW
    cfg = tiny_config(method="dmnsp", LAMBDA_SCALE=LAMBDA_SCALE)
    records, states, diags, session = _run(cfg, fake_data, N_TASKS)
    return {"cfg": cfg, "records": records, "states": states, "diags": diags, "session": session}


# ------------------------------------------------------------------- the reference, restated
def gram(a: torch.Tensor) -> torch.Tensor:
    """C = Σ over batch and tokens of a aᵀ (uncentred), D × D."""
    flat = a.reshape(-1, a.shape[-1]).float()
    return flat.t() @ flat


def svd_u(c: torch.Tensor) -> torch.Tensor:
    """U of U, S, V = svd(C): the reference's call."""
    return torch.linalg.svd(c)[0]


def projector_from_tops(tops: list[torch.Tensor]) -> torch.Tensor:
    """V Vᵀ for V = [U_0[:, 1:], U_1[:, 1:], ...]: Σ_t (I − u_t u_tᵀ), in float64."""
    d = tops[0].shape[0]
    p = torch.zeros(d, d, dtype=torch.float64)
    for u in tops:
        u = u.double()
        p += torch.eye(d, dtype=torch.float64) - torch.outer(u, u)
    return p


def reference_lambda(u_top: list[torch.Tensor], bases: list[torch.Tensor], ratio: float, scale: float):
    """λ[j][k] = scale · exp(−mean of the int(ratio·n_k) largest signed cosines of u_j with V_k's columns)."""
    lam = torch.zeros(len(u_top), len(bases), dtype=torch.float64)
    for j, u in enumerate(u_top):
        un = u / torch.norm(u)
        for k, v in enumerate(bases):
            cosines = [float(torch.dot(un, col / torch.norm(col))) for col in v.t()]
            m = max(1, int(ratio * len(cosines)))
            top = sorted(cosines, reverse=True)[:m]
            lam[j, k] = scale * math.exp(-sum(top) / m)
    return lam


def reference_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1))) * base


def _tops_until(records: list[dict], t: int) -> list[list[torch.Tensor]]:
    """Per layer, the protected direction u of each task < t, from its basis pass's adapter outputs."""
    return [[svd_u(gram(records[s]["basis_pass"][layer][1]))[:, 0] for s in range(t)] for layer in range(L)]


def _lambda_of_task(run: dict, t: int) -> torch.Tensor:
    cfg, rec = run["cfg"], run["records"][t]
    u_top = [svd_u(gram(rec["first_batch"][j][1]))[:, 0] for j in range(L)]
    bases = run["states"][t - 1].bases["visual"]  # the columns as they are (signs matter for λ)
    return reference_lambda(u_top, bases, cfg["TOP_K_RATIO"], cfg["LAMBDA_SCALE"])


def _key(layer: int, tail: str) -> str:
    return f"visual.transformer.resblocks.{layer}.adapter.{tail}"


# ------------------------------------------------------------------------------------ tests
def test_learning_rate_schedule_and_a_new_optimizer_per_task(faithful, fake_data):
    cfg = faithful["cfg"]
    for t, rec in enumerate(faithful["records"]):
        assert rec["n_optimizers"] == 1  # a new AdamW for every task
        assert rec["steps"][0]["fresh"] and not any(s["fresh"] for s in rec["steps"][1:])
        n_train = 2 * 24  # two classes of the fake data per task
        total = cfg["epochs"] * math.ceil(n_train / cfg["batch_size"])
        assert len(rec["steps"]) == total + 1, t  # T + 1 steps
        for s, step in enumerate(rec["steps"]):
            want = reference_lr(s, total, cfg["lr"], cfg["warmup_steps"])
            assert all(lr == pytest.approx(want, rel=1e-12, abs=1e-15) for lr in step["lr"]), (t, s)


def test_first_adamw_step_of_each_task_rounds_g_squared_first(faithful):
    # From zero state: exp_avg = 0.1·g, exp_avg_sq = 0.001·fl(g·g) (the CUDA foreach order, float32).
    beta1_w = torch.tensor(1 - 0.9, dtype=torch.float32)
    beta2_w = torch.tensor(1 - 0.999, dtype=torch.float32)
    in_between = 0
    for rec in faithful["records"]:
        first = rec["steps"][0]
        for name, (m, v) in first["state"].items():
            g = first["seen"][name]
            assert torch.equal(m, g * beta1_w), name
            assert torch.equal(v, (g * g) * beta2_w), name
            in_between += int(((g.abs() > 1.9e19) & (g.abs() < 5.8e20)).sum())
    # Gradients where the CUDA and CPU orders disagree on overflow did occur (and overflowed).
    assert in_between > 0


def test_only_visual_adapter_weights_are_projected(faithful):
    for t, rec in enumerate(faithful["records"]):
        for step in rec["steps"]:
            for name, seen in step["seen"].items():
                raw = step["raw"][name]
                projected = t > 0 and name.startswith("visual.") and name.endswith("weight")
                if projected:
                    assert not torch.allclose(seen, raw, rtol=1e-3), name
                else:  # biases, the text tower, and everything during task 0: untouched
                    assert torch.equal(seen, raw), (t, name)


def test_lambda_is_the_reference_formula_row_by_scaled_layer(faithful):
    for t in range(1, N_TASKS):
        lam = _lambda_of_task(faithful, t)
        reported = torch.tensor(faithful["diags"][t]["lambda"], dtype=torch.float64)
        assert torch.allclose(reported, lam, atol=1e-4), t
        assert (lam - lam.t()).abs().max() > 0.1  # not symmetric: the orientation is testable


def test_projected_gradients_are_the_reference_loops(faithful):
    for t in range(1, N_TASKS):
        rec = faithful["records"][t]
        lam = _lambda_of_task(faithful, t)
        projectors = [projector_from_tops(tops) for tops in _tops_until(faithful["records"], t)]
        for step in rec["steps"]:
            for layer in range(L):
                factor = math.prod(float(x) for x in lam[layer])  # Π_k λ[layer][k]
                g = step["raw"][_key(layer, "down.weight")].double()
                for p in projectors:  # G P_0 P_1 ⋯ P_11
                    g = g @ p
                _close(step["seen"][_key(layer, "down.weight")], g * factor, (t, layer, "down"))
                g = step["raw"][_key(layer, "up.weight")].double()
                for p in projectors:  # P_11 ⋯ P_1 P_0 G
                    g = p @ g
                _close(step["seen"][_key(layer, "up.weight")], g * factor, (t, layer, "up"))


def test_faithful_projection_is_the_reference_loop_bit_for_bit(faithful):
    # The reference's own float32 order: for each layer k in turn, G ← mm(mm(G, V_k), V_kᵀ) · λ[l][k]
    # (down), G ← mm(V_k, mm(V_kᵀ, G)) · λ[l][k] (up), with the bases and coefficients of the run.
    for t in range(1, N_TASKS):
        bases = faithful["states"][t - 1].bases["visual"]
        lam = torch.tensor(faithful["diags"][t]["lambda"], dtype=torch.float32)  # float32 values, exact
        for step in faithful["records"][t]["steps"][:3]:
            for layer in range(L):
                down = step["raw"][_key(layer, "down.weight")]
                up = step["raw"][_key(layer, "up.weight")]
                for k, v in enumerate(bases):
                    down = torch.mm(torch.mm(down, v), v.T) * lam[layer, k]
                    up = torch.mm(v, torch.mm(v.T, up)) * lam[layer, k]
                assert torch.equal(step["seen"][_key(layer, "down.weight")], down), (t, layer)
                assert torch.equal(step["seen"][_key(layer, "up.weight")], up), (t, layer)


def _close(got: torch.Tensor, want: torch.Tensor, where) -> None:
    scale = want.abs().max().item()
    assert scale > 0, where
    err = (got.double() - want).abs().max().item()
    assert err <= 2e-3 * scale, (where, err / scale)


def test_bases_come_from_adapter_outputs_of_a_training_batch_with_dropout_on(faithful):
    cfg, records, states = faithful["cfg"], faithful["records"], faithful["states"]
    for t in range(N_TASKS):
        basis_pass = records[t]["basis_pass"]
        assert basis_pass is not None and sorted(basis_pass) == list(range(L))
        for layer in range(L):
            h, a, module = basis_pass[layer]
            # One batch of min(128, all) of the task's 48 training images (17 tokens each), whatever
            # batch_size (16 here) is: the reference's basis batch.
            assert a.numel() // a.shape[-1] == 17 * min(128, 2 * 24) != 17 * cfg["batch_size"]
            # Dropout on: the output is not what the same adapter gives without dropout.
            no_dropout = module.scale * (
                torch.relu(h @ module.down.weight.t() + module.down.bias) @ module.up.weight.t()
                + module.up.bias
            )
            assert not torch.allclose(a, no_dropout, atol=1e-6), (t, layer)
        # V_l V_lᵀ = Σ_s (I − u_s u_sᵀ) with u_s from those outputs; t + 1 blocks of D − 1 columns.
        for layer, tops in enumerate(_tops_until(records, t + 1)):
            v = states[t].bases["visual"][layer]
            assert v.shape == (a.shape[-1], (t + 1) * (a.shape[-1] - 1))
            assert torch.allclose(v.double() @ v.double().t(), projector_from_tops(tops), atol=2e-4), (
                t,
                layer,
            )
        assert "text" not in states[t].bases  # the text tower keeps no bases


def _eval_images_match_center_crop(session: Session, record: dict, data, n_eval: int) -> list[bool]:
    """For each of the last ``n_eval`` images the visual tower saw (the evaluation's), whether it is
    exactly the deterministic centre-crop transform of some test image."""
    candidates = torch.stack([session.bundle.eval_transform(data.test[i][0]) for i in range(len(data.test))])
    seen = torch.cat(record["images_after"])[-n_eval:]
    return [bool(((candidates - x).abs().amax(dim=(1, 2, 3)) == 0).any()) for x in seen]


def test_faithful_evaluation_uses_the_random_training_crop(faithful, fake_data):
    from conftest import tiny_config

    matches = _eval_images_match_center_crop(faithful["session"], faithful["records"][0], fake_data, 16)
    # 2 classes × 8 test images, randomly cropped: a crop of scale 0.9-1 of a 28 px image is
    # sometimes the whole image (then identical to the centre crop), mostly not.
    assert len(matches) == 16 and matches.count(False) >= 8, matches
    # Control: with the centre crop (clean mode) every evaluation image is found among the candidates.
    clean = tiny_config(method="finetune", max_steps=1, projection={"mode": "clean"})
    records, _, _, session = _run(clean, fake_data, 1)
    matches = _eval_images_match_center_crop(session, records[0], fake_data, 16)
    assert len(matches) == 16 and all(matches)

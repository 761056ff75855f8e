"""The harness checked from the outside: method.md sections 1-3 and 8 restated, against what one
short tiny run of every method does.

tests/test_reference_method.py restates the null-space maths; this file restates the *loop* around
it, where one-line bugs pass every maths test. No expectation here comes from the helpers under
test (no ``clip_logits``, loaders, scenario helpers, metrics or transforms of dmnsp; the run's
metrics are computed by ``dmnsp.metrics`` only to be checked): the run is driven through its entry
points (config validation, ``Session.run_task``) and watched from outside:

- every image the datasets hand out (a recording wrapper around the raw train and test sets);
- every pass of each tower (the model's ``encode_image`` / ``encode_text`` wrapped: inputs,
  outputs, grad mode, train/eval mode, and the adapters' dropout modules as they are at call time,
  so LwF's swapped-in frozen copy is seen too);
- each visual block's input and output (hooks on the residual blocks);
- every cross-entropy call (``torch.nn.functional.cross_entropy`` wrapped);
- every optimiser the loop makes (``make_optimizer`` wrapped: its parameters, settings, the
  gradients it receives and the parameters before and after its first two steps).

Against that, restated from method.md with torch, torchvision and open_clip's tokenizer only:
the scenario (class order split into tasks, labels as positions in the order), the data order
(one shuffled permutation of the task's images per epoch, T + 1 steps), which logits the loss
sees (``exp(logit_scale)`` of the loaded checkpoint in faithful mode, 100 in clean, times cosines,
over the current task's prompts only, task-local targets, no label smoothing), the adapter
(post-attention residual stream, no LayerNorm, dropout 0.1 between down and up, scale 0.1 on the
up bias too), AdamW (lr schedule, betas, eps, no weight decay, a new one per task), train/eval
mode and the transforms at every phase (random crop while training, in the basis pass and, in
faithful mode, at evaluation; centre crop in clean evaluation), the basis batch (128 images
whatever ``batch_size`` is), evaluation (seen classes' test images against seen classes' prompts,
sample-weighted accuracy) and LwF's old model (a frozen copy of the previous task's adapters with
dropout off, its image features, the previous tasks' classes).
"""

from __future__ import annotations

import copy
import math
import re
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from torch import nn

import dmnsp.optim
from dmnsp.checkpoint import TaskState
from dmnsp.runner import Session

sys.path.insert(0, str(Path(__file__).parent))
from fakes import make_fake_splits  # noqa: E402

# ----------------------------------------------------------------------------- the restatement
#: A class order that is not the identity, tasks of unequal size (4, then 3), two tasks run.
CLASS_ORDER = [7, 2, 9, 0, 4, 1, 3, 8, 5, 6]
FIRST, STEP = 4, 3
TASKS = 2
N_TRAIN, N_TEST = 48, 8  # per class: 192 / 144 training images per task, more than the basis batch
BATCH = 16  # batch_size: not the reference's 128, so the basis batch must differ from it
BASIS_BATCH = 128  # method.md §4: one shuffled batch of 128 training images
TEMPLATE = "a bad photo of a {}."
CKPT_LOG_SCALE = 2.6612  # the checkpoint's logit_scale: exp = 14.31 (not CLIP's 100 nor 1/0.07)
CLEAN_SCALE = 100.0
ADAPTER_SCALE, DROPOUT = 0.1, 0.1
LR, BETAS, EPS, WARMUP = 1e-3, (0.9, 0.999), 1e-8, 2
MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation
STD = (0.26862954, 0.26130258, 0.27577711)
RES = 28
L = 12


def task_classes(t: int) -> list[int]:
    """Original label ids of task t: order[:FIRST], then chunks of STEP."""
    start = 0 if t == 0 else FIRST + (t - 1) * STEP
    return CLASS_ORDER[start : (FIRST if t == 0 else start + STEP)]


def seen_classes(t: int) -> list[int]:
    return [c for s in range(t + 1) for c in task_classes(s)]


def position(label: int) -> int:
    """Labels are remapped to their position in the class order."""
    return CLASS_ORDER.index(label)


def tokens_of(classes: list[int], names: list[str]) -> torch.Tensor:
    return open_clip.get_tokenizer("dmnsp-tiny")([TEMPLATE.format(names[c]) for c in classes])


def logits(scale: float, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """scale · norm(f_img) · norm(f_txt)ᵀ (float64)."""
    img = F.normalize(image_features.double(), dim=-1)
    txt = F.normalize(text_features.double(), dim=-1)
    return scale * img @ txt.t()


def lr_at(step: int, total: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / max(total - WARMUP, 1))) * LR


def _finish(img) -> torch.Tensor:
    return TF.normalize(TF.to_tensor(img.convert("RGB")), MEAN, STD)


def random_crops(img) -> torch.Tensor:
    """Every image RandomResizedCrop(RES, scale=(0.9, 1), bicubic) can produce from ``img``: all
    crops of area ≥ 0.85 of the image (rounding of the sampled sides included), resized back."""
    w0, h0 = img.size
    out = []
    for h in range(1, h0 + 1):
        for w in range(1, w0 + 1):
            if h * w < 0.85 * w0 * h0 or not 0.7 <= w / h <= 1.45:
                continue
            for i in range(h0 - h + 1):
                for j in range(w0 - w + 1):
                    crop = TF.resized_crop(img, i, j, h, w, [RES, RES], T.InterpolationMode.BICUBIC)
                    out.append(_finish(crop))
    return torch.stack(out)


def centre_crop(img) -> torch.Tensor:
    return _finish(TF.center_crop(TF.resize(img, RES, T.InterpolationMode.BICUBIC), RES))


# ----------------------------------------------------------------------------- observation
class Logged(torch.utils.data.Dataset):
    """A raw split that records every index handed out."""

    def __init__(self, base, split: str, log: list) -> None:
        self.base, self.split, self.log = base, split, log
        self.targets = base.targets

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        self.log.append({"kind": "fetch", "split": self.split, "index": int(i)})
        return self.base[i]


def _dropouts(tower: nn.Module) -> list[bool]:
    """The training flag of every dropout module in the tower's blocks, as they are now."""
    return [m.training for m in tower.modules() if isinstance(m, nn.Dropout)]


class Recorder:
    """Wraps one session's model, its datasets, cross-entropy and the optimizer factory."""

    def __init__(self, session: Session, log: list, mp: pytest.MonkeyPatch) -> None:
        self.log = log
        model = self.model = session.model
        self.copy = copy.deepcopy(model)  # a clean copy to restate features with any adapters
        image, text = model.encode_image, model.encode_text

        def encode_image(images, *args, **kwargs):
            blocks: list = []
            adapters: list = []
            self._blocks, self._adapters = blocks, adapters
            out = image(images, *args, **kwargs)
            self._blocks = self._adapters = None
            self.log.append(
                {
                    "kind": "image",
                    "x": images.detach().clone(),
                    "features": out.detach().clone(),
                    "grad": torch.is_grad_enabled(),
                    "training": model.training,
                    "dropout": _dropouts(model.visual),
                    "blocks": blocks,
                    "adapters": adapters,
                }
            )
            return out

        def encode_text(tokens, *args, **kwargs):
            out = text(tokens, *args, **kwargs)
            self.log.append(
                {
                    "kind": "text",
                    "tokens": tokens.detach().clone(),
                    "features": out.detach().clone(),
                    "grad": torch.is_grad_enabled(),
                    "training": model.training,
                    "dropout": _dropouts(model.transformer),
                }
            )
            return out

        model.encode_image, model.encode_text = encode_image, encode_text
        self._blocks = self._adapters = None
        for layer, block in enumerate(model.visual.transformer.resblocks):
            block.register_forward_hook(self._block_hook(layer, "_blocks"))
            # The adapter as the model names it (its parameters' prefix in the checkpoint).
            adapter = model.get_submodule(f"visual.transformer.resblocks.{layer}.adapter")
            adapter.register_forward_hook(self._block_hook(layer, "_adapters"))

        ce = F.cross_entropy

        def cross_entropy(input, target, *args, **kwargs):
            self.log.append(
                {
                    "kind": "ce",
                    "input": input.detach().clone(),
                    "target": target.detach().clone(),
                    "args": args,
                    "kwargs": kwargs,
                }
            )
            return ce(input, target, *args, **kwargs)

        mp.setattr(F, "cross_entropy", cross_entropy)
        original = dmnsp.optim.make_optimizer
        for module in list(sys.modules.values()):
            if (
                module
                and module.__name__.startswith("dmnsp")
                and getattr(module, "make_optimizer", None) is original
            ):
                mp.setattr(module, "make_optimizer", self._wrap(original))

    def _block_hook(self, layer: int, into: str):
        def hook(module, inputs, output):
            where = getattr(self, into)
            if where is not None and not torch.is_grad_enabled():  # basis pass, evaluation, LwF
                where.append((layer, inputs[0].detach().clone(), output.detach().clone()))

        return hook

    def _wrap(self, original):
        def make(params, cfg):
            params = list(params)
            opt = original(params, cfg)
            self.log.append({"kind": "optimizer", "params": [id(p) for p in params], "optimizer": opt})
            inner, steps = opt.step, []

            def step(*args, **kwargs):
                ps = [p for g in opt.param_groups for p in g["params"]]
                first = len(steps) < 2
                rec = {
                    "kind": "step",
                    "lr": [g["lr"] for g in opt.param_groups],
                    "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
                    "fresh": len(opt.state) == 0,
                    "grads": [p.grad.detach().clone() if p.grad is not None else None for p in ps]
                    if first
                    else None,
                    "before": [p.detach().clone() for p in ps] if first else None,
                }
                out = inner(*args, **kwargs)
                rec["after"] = [p.detach().clone() for p in ps] if first else None
                steps.append(rec)
                self.log.append(rec)
                return out

            opt.step = step
            return opt

        return make


def _config(method: str, pretrained: str, **changes):
    from conftest import tiny_config

    return tiny_config(
        method=method,
        pretrained=pretrained,
        class_order=CLASS_ORDER,
        initial_increment=FIRST,
        increment=STEP,
        batch_size=BATCH,
        epochs=1,
        warmup_steps=WARMUP,
        **changes,
    )


def _split_phases(log: list[dict]) -> list[dict]:
    """Per task: the events of its training steps, of the passes after training, of evaluation."""
    tasks, current = [], []
    for event in log:
        if event["kind"] == "task":
            current = []
            tasks.append(current)
        else:
            current.append(event)
    out = []
    for events in tasks:
        last_step = max((i for i, e in enumerate(events) if e["kind"] == "step"), default=-1)
        # Evaluation starts with the first pass in eval mode after training.
        tail = events[last_step + 1 :]
        first_eval = next(
            i for i, e in enumerate(tail) if e["kind"] in ("image", "text") and not e["training"]
        )
        steps, chunk = [], []
        for event in events[: last_step + 1]:
            chunk.append(event)
            if event["kind"] == "step":
                steps.append(chunk)
                chunk = []
        out.append(
            {
                "before": chunk,  # nothing expected: every event belongs to a step
                "steps": steps,
                "after_training": tail[:first_eval],
                "evaluation": tail[first_eval:],
                "all": events,
            }
        )
    return out


class Runs:
    """One short run per method, made on first use (so -k selections run only what they need)."""

    def __init__(self, data, checkpoint: str) -> None:
        self.data, self.checkpoint, self.cache = data, checkpoint, {}

    # Fine-tuning runs every step of both tasks (T + 1 = 13 and 10); the others stop after
    # STEPS_CAPPED steps per task (max_steps, the smoke-test cap) to keep this file fast.
    SETTINGS = {
        "zeroshot": ("zeroshot", {}),
        "finetune": ("finetune", {}),
        "lwf": ("lwf", {"max_steps": 4}),
        "dmnsp": ("dmnsp", {"max_steps": 4}),
        "dmnsp-clean": ("dmnsp", {"max_steps": 4, "projection": {"mode": "clean"}}),
    }

    def __getitem__(self, name: str) -> dict:
        if name not in self.cache:
            method, changes = self.SETTINGS[name]
            self.cache[name] = self._run(_config(method, self.checkpoint, **changes))
        return self.cache[name]

    def _run(self, cfg: dict) -> dict:
        log: list[dict] = []
        data = copy.copy(self.data)
        data.train, data.test = Logged(self.data.train, "train", log), Logged(self.data.test, "test", log)
        with pytest.MonkeyPatch.context() as mp:
            session = Session(cfg, progress=False, data=data)
            rec = Recorder(session, log, mp)
            state, states, rows, diags = TaskState(), [], [], []
            for t in range(TASKS):
                log.append({"kind": "task", "task": t})
                state, row, diag = session.run_task(t, state)
                states.append(state)
                rows.append(row)
                diags.append(diag)
        return {
            "cfg": cfg,
            "phases": _split_phases(log),
            "states": states,
            "rows": rows,
            "diags": diags,
            "copy": rec.copy,
            "data": self.data,
        }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A local checkpoint of the tiny CLIP (random weights) whose logit_scale is its own."""
    from dmnsp.model import register_package_models

    register_package_models()
    torch.manual_seed(0)
    model = open_clip.create_model("dmnsp-tiny", pretrained=None)
    with torch.no_grad():
        model.logit_scale.fill_(CKPT_LOG_SCALE)
    path = tmp_path_factory.mktemp("harness") / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def runs(checkpoint) -> Runs:
    data = make_fake_splits(
        n_classes=10,
        n_train_per_class=N_TRAIN,
        n_test_per_class=N_TEST,
        size=RES,
        name="fashion-mnist",
        grayscale=False,
    )
    return Runs(data, checkpoint)


def _scale(run: dict) -> float:
    faithful = run["cfg"]["projection"]["mode"] == "faithful"
    return float(torch.exp(torch.tensor(CKPT_LOG_SCALE, dtype=torch.float32))) if faithful else CLEAN_SCALE


def _indices_of(events: list[dict], split: str) -> list[int]:
    return [e["index"] for e in events if e["kind"] == "fetch" and e["split"] == split]


def _train_indices(data, t: int) -> set[int]:
    return {i for i, y in enumerate(data.train.targets) if int(y) in task_classes(t)}


def _test_indices(data, t: int) -> set[int]:
    return {i for i, y in enumerate(data.test.targets) if int(y) in seen_classes(t)}


def _passes(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["kind"] == kind]


TRAINED = ["finetune", "lwf", "dmnsp", "dmnsp-clean"]
ALL = ["zeroshot", *TRAINED]


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("name", TRAINED)
def test_data_order_is_one_shuffled_permutation_per_epoch_for_t_plus_one_steps(runs, name):
    run = runs[name]
    cap = run["cfg"]["max_steps"]
    for t, phase in enumerate(run["phases"]):
        task = _train_indices(run["data"], t)
        batches = [_indices_of(step, "train") for step in phase["steps"]]
        n_batches = math.ceil(len(task) / BATCH)
        # T + 1 steps, T = epochs · batches (capped by max_steps where a run sets it).
        assert len(batches) == (n_batches + 1 if cap is None else min(cap, n_batches + 1)), (name, t)
        assert not phase["before"], (name, t)
        flat = [i for b in batches for i in b]
        epoch = flat[: len(task)]
        assert len(set(epoch)) == len(epoch) and set(epoch) <= task and epoch != sorted(epoch), (name, t)
        sizes = [len(b) for b in batches[:n_batches]]
        full = [BATCH] * (n_batches - 1) + [len(task) - BATCH * (n_batches - 1)]
        assert sizes == full[: len(sizes)], (name, t)
        if cap is None:  # a whole epoch: a shuffled permutation of the task, then reshuffled
            assert sorted(epoch) == sorted(task), (name, t)
            assert len(batches[-1]) == BATCH and batches[-1] != epoch[:BATCH], (name, t)


@pytest.mark.parametrize("name", TRAINED)
def test_the_loss_sees_the_current_tasks_prompts_with_task_local_targets(runs, name):
    run = runs[name]
    names, scale = run["data"].class_names, _scale(run)
    for t, phase in enumerate(run["phases"]):
        want_tokens = tokens_of(task_classes(t), names)
        for s, step in enumerate(phase["steps"]):
            ces = _passes(step, "ce")
            assert len(ces) == 1, (name, t, s)
            ce = ces[0]
            assert not ce["args"] and ce["kwargs"].get("label_smoothing", 0.0) == 0.0
            images = [e for e in _passes(step, "image") if e["grad"]]
            texts = [e for e in _passes(step, "text") if e["grad"] and torch.equal(e["tokens"], want_tokens)]
            assert len(images) == 1 and len(texts) == 1, (name, t, s)
            want = logits(scale, images[0]["features"], texts[0]["features"])
            fetched = _indices_of(step, "train")
            assert (
                ce["input"].shape
                == (len(fetched), len(want_tokens))
                == (len(images[0]["x"]), len(want_tokens))
            )
            assert torch.allclose(ce["input"].double(), want, rtol=1e-5, atol=1e-5), (name, t, s)
            labels = [int(run["data"].train.targets[i]) for i in fetched]
            local = [task_classes(t).index(y) for y in labels]
            assert ce["target"].tolist() == local, (name, t, s)


@pytest.mark.parametrize("name", TRAINED)
def test_train_mode_with_dropout_during_steps_and_the_random_training_crop(runs, name):
    run = runs[name]
    for t, phase in enumerate(run["phases"]):
        for s, step in enumerate(phase["steps"]):
            for e in _passes(step, "image") + _passes(step, "text"):
                if e["grad"]:  # the live model: train mode, every adapter dropout on
                    assert e["training"] and e["dropout"] and all(e["dropout"]), (name, t, s)
        # The first step's images are random crops of the images fetched for it, in that order.
        step = phase["steps"][0]
        image = next(e for e in _passes(step, "image") if e["grad"])
        _assert_transformed(run, "train", _indices_of(step, "train")[:6], image["x"][:6], random_crops)


def _assert_transformed(run, split: str, indices: list[int], x: torch.Tensor, transform) -> None:
    raw = run["data"].train if split == "train" else run["data"].test
    assert len(indices) == len(x) > 0
    for i, img in zip(indices, x, strict=True):
        candidates = transform(raw[i][0]).reshape(-1, *img.shape)
        assert float((candidates - img).abs().amax(dim=(1, 2, 3)).min()) < 1e-5, (split, i)


@pytest.mark.parametrize("name", ["finetune", "dmnsp", "dmnsp-clean"])
def test_adamw_settings_a_new_optimizer_per_task_and_its_first_two_steps(runs, name):
    run = runs[name]
    model = run["copy"]
    adapter_ids = None
    for t, phase in enumerate(run["phases"]):
        made = [e for e in phase["all"] if e["kind"] == "optimizer"]
        assert len(made) == 1, (name, t)  # a new AdamW for every task
        opt = made[0]["optimizer"]
        if adapter_ids is None:
            adapter_ids = set(made[0]["params"])
        assert set(made[0]["params"]) == adapter_ids and len(adapter_ids) == 2 * L * 4  # every adapter tensor
        total = math.ceil(len(_train_indices(run["data"], t)) / BATCH)  # T = epochs · batches, epochs 1
        steps = [step[-1] for step in phase["steps"]]
        assert steps[0]["fresh"] and not any(s["fresh"] for s in steps[1:]), (name, t)
        for s, rec in enumerate(steps):
            assert rec["lr"] == [pytest.approx(lr_at(s, total), rel=1e-12)] * len(rec["lr"]), (name, t, s)
            for group in rec["groups"]:
                assert tuple(group["betas"]) == BETAS and group["eps"] == EPS and group["weight_decay"] == 0
        if t == 0:
            _assert_adamw_steps(steps[:2], name)
    assert len(opt.param_groups) >= 1 and model is not None


def _assert_adamw_steps(steps: list[dict], name: str) -> None:
    """AdamW restated in float64 from the gradients it received: p ← p − lr·m̂/(sqrt(v̂)+eps),
    m, v from betas (0.9, 0.999), no weight decay."""
    b1, b2 = BETAS
    first, second = steps
    checked = 0
    for k, p0 in enumerate(first["before"]):
        g1, g2 = first["grads"][k], second["grads"][k]
        if g1 is None or g2 is None:
            continue
        g1, g2 = g1.double(), g2.double()
        m = (1 - b1) * g1
        v = (1 - b2) * g1 * g1
        p1 = p0.double() - first["lr"][0] * (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + EPS)
        assert torch.allclose(first["after"][k].double(), p1, rtol=0, atol=2e-8), (name, k, "step 1")
        m = b1 * m + (1 - b1) * g2
        v = b2 * v + (1 - b2) * g2 * g2
        p2 = second["before"][k].double() - second["lr"][0] * (m / (1 - b1**2)) / (
            (v / (1 - b2**2)).sqrt() + EPS
        )
        assert torch.allclose(second["after"][k].double(), p2, rtol=0, atol=2e-8), (name, k, "step 2")
        checked += int((p0 != 0).any())
    assert checked > 0  # weights that are not zero: a weight decay would show on them


def _restated_adapter(h: torch.Tensor, params: dict, layer: int) -> torch.Tensor:
    """a = s · (W_up · ReLU(W_down h + b_down) + b_up) (eval mode: no dropout)."""

    def p(name):
        return params[f"visual.transformer.resblocks.{layer}.adapter.{name}"].double()

    z = torch.relu(h.double() @ p("down.weight").t() + p("down.bias"))
    return ADAPTER_SCALE * (z @ p("up.weight").t() + p("up.bias"))


def _block_parts(model: nn.Module, layer: int) -> dict[str, nn.Module]:
    """The backbone block's own modules (ln_1, attn, ls_1, ln_2, mlp, ls_2), wherever wrapped."""
    block = model.visual.transformer.resblocks[layer]
    named = dict(block.named_modules())
    out = {}
    for part in ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2"):
        keys = [k for k in named if k.split(".")[-1] == part and ".adapter" not in f".{k}"]
        out[part] = named[min(keys, key=len)]
    return out


def _post_attention(model: nn.Module, layer: int, x: torch.Tensor) -> torch.Tensor:
    """h' = x + Attn(LN1(x)) of the backbone block (eval: no dropout anywhere in it)."""
    m = _block_parts(model, layer)
    y = m["ln_1"](x)
    return x + m["ls_1"](m["attn"](y, y, y, need_weights=False)[0])


def _backbone_out(model: nn.Module, layer: int, h: torch.Tensor) -> torch.Tensor:
    m = _block_parts(model, layer)
    return h + m["ls_2"](m["mlp"](m["ln_2"](h)))


@pytest.mark.parametrize("name", ["finetune", "dmnsp"])
def test_adapter_reads_the_post_attention_stream_and_scales_its_up_bias(runs, name):
    # At evaluation after task 0 (eval mode, trained adapters with non-zero biases):
    # out = h' + MLP(LN2(h')) + a, a = s·(W_up ReLU(W_down h' + b_down) + b_up), h' = x + Attn(LN1(x)).
    run = runs[name]
    params = run["states"][0].adapters
    model = run["copy"]
    model.eval()
    image = next(e for e in _passes(run["phases"][0]["evaluation"], "image"))
    assert not image["training"] and len(image["blocks"]) == len(image["adapters"]) == L
    assert any(float(v.abs().max()) > 1e-4 for k, v in params.items() if k.endswith("up.bias"))
    with torch.no_grad():
        for (layer, x, out), (layer_a, h_in, a) in zip(image["blocks"], image["adapters"], strict=True):
            assert layer == layer_a
            h = _post_attention(model, layer, x)
            assert torch.allclose(h_in, h, atol=1e-5), (name, layer)  # the post-attention stream, no LN
            want = _restated_adapter(h, params, layer)
            assert torch.allclose(a.double(), want, atol=1e-6, rtol=1e-5), (name, layer)
            rest = out.double() - _backbone_out(model, layer, h).double()
            assert torch.allclose(rest, a.double(), atol=2e-5), (name, layer)  # added to the block output


def test_adapter_dropout_sits_between_down_and_up_at_p_0_1(runs):
    # In the basis pass (train mode, no grad) a / s − b_up lies in W_up's column space, with
    # coefficients ReLU(W_down h' + b_down) masked and scaled by 1 / (1 − p).
    run = runs["dmnsp"]
    params = run["states"][0].adapters
    image = next(e for e in _passes(run["phases"][0]["after_training"], "image"))
    assert image["training"] and not image["grad"] and len(image["adapters"]) == L
    kept = dropped = 0
    for layer, h, a in image["adapters"]:
        key = f"visual.transformer.resblocks.{layer}.adapter."
        y = (a.double() / ADAPTER_SCALE - params[key + "up.bias"].double()).reshape(-1, a.shape[-1])
        w_up = params[key + "up.weight"].double()
        coef = torch.linalg.lstsq(w_up, y.t()).solution.t()
        residual = (coef @ w_up.t() - y).abs().max()
        assert residual < 1e-4 * float(y.abs().max()), (layer, float(residual))
        z = torch.relu(
            h.double() @ params[key + "down.weight"].double().t() + params[key + "down.bias"].double()
        )
        z = z.reshape(-1, z.shape[-1])
        live = z > 1e-2 * z.max()
        ratio = coef[live] / z[live]
        on = (ratio - 1 / (1 - DROPOUT)).abs() < 1e-2
        off = ratio.abs() < 1e-2
        assert bool((on | off).all()), (layer, ratio[~(on | off)][:5])
        kept += int(on.sum())
        dropped += int(off.sum())
    assert 0.07 < dropped / (kept + dropped) < 0.13  # p = 0.1


@pytest.mark.parametrize("name", ALL)
def test_evaluation_eval_mode_seen_test_images_seen_prompts_sample_weighted(runs, name):
    run = runs[name]
    names, scale = run["data"].class_names, _scale(run)
    faithful = run["cfg"]["projection"]["mode"] == "faithful"
    R: list[list[float]] = []
    A: list[float] = []
    for t, phase in enumerate(run["phases"]):
        ev = phase["evaluation"]
        texts, images = _passes(ev, "text"), _passes(ev, "image")
        assert len(texts) == 1 and images, (name, t)
        for e in texts + images:
            assert not e["grad"] and not e["training"] and not any(e["dropout"]), (name, t)
        assert torch.equal(texts[0]["tokens"], tokens_of(seen_classes(t), names)), (name, t)
        fetched = _indices_of(ev, "test")
        assert sorted(fetched) == sorted(_test_indices(run["data"], t)), (name, t)  # each seen image once
        assert not _indices_of(ev, "train")
        x = torch.cat([e["x"] for e in images])
        feats = torch.cat([e["features"] for e in images])
        transform = random_crops if faithful else centre_crop
        _assert_transformed(run, "test", fetched[:8], x[:8], transform)
        if faithful:  # the random crop, not the centre crop, on most images
            centre = [
                bool((centre_crop(run["data"].test[i][0]) - img).abs().max() < 1e-5)
                for i, img in zip(fetched[:8], x[:8], strict=True)
            ]
            assert centre.count(False) >= 4, centre
        predicted = logits(scale, feats, texts[0]["features"]).argmax(-1)
        labels = torch.tensor([position(int(run["data"].test.targets[i])) for i in fetched])
        correct = predicted == labels
        task_of = torch.tensor(
            [
                next(s for s in range(t + 1) if int(run["data"].test.targets[i]) in task_classes(s))
                for i in fetched
            ]
        )
        row = run["rows"][t]
        per_task = [float(correct[task_of == s].double().mean()) for s in range(t + 1)]
        assert row["accuracy_per_task"] == pytest.approx(per_task, abs=1e-12), (name, t)
        # A_t: sample-weighted over all seen test images (not the mean of the tasks' accuracies).
        assert row["accuracy"] == pytest.approx(float(correct.double().mean()), abs=1e-12), (name, t)
        R.append(per_task)
        A.append(float(correct.double().mean()))
    # Tasks of unequal size (32 and 24 test images) and accuracy: the two means differ here.
    assert run["rows"][1]["n_samples_per_task"] == [FIRST * N_TEST, STEP * N_TEST]
    assert R[1][0] != R[1][1] and A[1] != pytest.approx(sum(R[1]) / 2, abs=1e-9)
    # The run's metrics: Avg = mean over steps of A_t, Last = A of the last step, R as restated.
    from dmnsp.metrics import metrics_from_rows

    metrics = metrics_from_rows(run["rows"], run["diags"])  # 2 of the 3 tasks: scored on those
    assert metrics["n_tasks_done"] == TASKS and metrics["avg"] == pytest.approx(sum(A) / len(A), abs=1e-12)
    assert metrics["last"] == pytest.approx(A[-1], abs=1e-12)
    assert metrics["accuracy_per_step"][:TASKS] == pytest.approx(A, abs=1e-12)
    assert metrics["accuracy_matrix"][1][:TASKS] == pytest.approx(R[1], abs=1e-12)
    assert metrics["accuracy_matrix"][0][0] == pytest.approx(R[0][0], abs=1e-12)


def test_zeroshot_trains_nothing(runs):
    run = runs["zeroshot"]
    for t, phase in enumerate(run["phases"]):
        assert (
            not phase["steps"] and not _passes(phase["all"], "optimizer") and not _passes(phase["all"], "ce")
        )
        assert not [e for e in _passes(phase["all"], "image") if e["grad"]]
        assert not _indices_of(phase["all"], "train")
        assert all(float(v.abs().max()) == 0 for k, v in run["states"][t].adapters.items() if ".up." in k)


@pytest.mark.parametrize("name", ["dmnsp", "dmnsp-clean"])
def test_basis_batch_is_128_shuffled_training_images_in_train_mode(runs, name):
    run = runs[name]
    for t, phase in enumerate(run["phases"]):
        after = phase["after_training"]
        images = _passes(after, "image")
        assert len(images) == 1, (name, t)
        image = images[0]
        assert image["training"] and all(image["dropout"]) and not image["grad"], (name, t)
        fetched = _indices_of(after, "train")
        assert len(fetched) == len(set(fetched)) == len(image["x"]) == BASIS_BATCH != BATCH, (name, t)
        assert set(fetched) <= _train_indices(run["data"], t) and fetched != sorted(fetched), (name, t)
        _assert_transformed(run, "train", fetched[:6], image["x"][:6], random_crops)
        # Every visual layer's adapter outputs over those 128 images: 128 · tokens rows each.
        assert (
            run["diags"][t]["basis_columns"]["visual"]
            == [(t + 1) * 63 if run["cfg"]["projection"]["basis"] == "concat" else 64 - (t + 1)] * L
        )


def _restated_features(model: nn.Module, adapters: dict, images=None, tokens=None) -> torch.Tensor:
    model.load_state_dict(adapters, strict=False)
    model.eval()
    with torch.no_grad():
        return model.encode_image(images) if images is not None else model.encode_text(tokens)


def test_lwf_old_model_is_the_previous_adapters_frozen_without_dropout_over_old_classes(runs):
    run = runs["lwf"]
    names, scale = run["data"].class_names, _scale(run)
    lwf = run["cfg"]["lwf"]
    alpha, temp = lwf["alpha"], lwf["temperature"]
    phase = run["phases"][1]
    old_tokens = tokens_of(seen_classes(0), names)
    cur_tokens = tokens_of(task_classes(1), names)
    previous = run["states"][0].adapters
    old_text = _restated_features(run["copy"], previous, tokens=old_tokens)
    # The old prompts' text features of the frozen copy: once, before the steps, dropout off.
    before = [
        e
        for e in phase["all"]
        if e["kind"] == "text" and torch.equal(e["tokens"], old_tokens) and not e["grad"]
    ]
    assert len(before) == 1 and not any(before[0]["dropout"])
    assert torch.allclose(before[0]["features"], old_text, atol=1e-5)
    losses = run["diags"][1]["loss"]["curve"]
    assert len(losses) == len(phase["steps"])
    for s, step in enumerate(phase["steps"]):
        images = _passes(step, "image")
        live = [e for e in images if e["grad"]]
        frozen = [e for e in images if not e["grad"]]
        assert len(live) == 1 and len(frozen) == 1, s
        assert torch.equal(frozen[0]["x"], live[0]["x"])  # the same images, the same crops
        assert not any(frozen[0]["dropout"]) and all(live[0]["dropout"]), s
        old_img = _restated_features(run["copy"], previous, images=live[0]["x"])
        assert torch.allclose(frozen[0]["features"], old_img, atol=1e-5), s  # the frozen copy's features
        texts = [e for e in _passes(step, "text") if e["grad"]]
        by_tokens = {len(e["tokens"]): e for e in texts}
        assert len(texts) == 2 and torch.equal(by_tokens[len(old_tokens)]["tokens"], old_tokens), s
        assert torch.equal(by_tokens[len(cur_tokens)]["tokens"], cur_tokens), s
        old = logits(scale, old_img, old_text)
        new = logits(scale, live[0]["features"], by_tokens[len(old_tokens)]["features"])
        kl = (
            (F.softmax(old / temp, -1) * (F.log_softmax(old / temp, -1) - F.log_softmax(new / temp, -1)))
            .sum(-1)
            .mean()
        )
        labels = [
            task_classes(1).index(int(run["data"].train.targets[i])) for i in _indices_of(step, "train")
        ]
        ce = F.cross_entropy(
            logits(scale, live[0]["features"], by_tokens[len(cur_tokens)]["features"]), torch.tensor(labels)
        )
        assert losses[s] == pytest.approx(float(ce + alpha * temp**2 * kl), rel=1e-4, abs=1e-6), s
    assert run["diags"][1]["distillation"]["mean"] > 0
    assert re.match(r"lwf", run["cfg"]["method"])


def test_logit_scale_is_the_checkpoints_in_faithful_and_100_in_clean(runs):
    faithful, clean = runs["dmnsp"], runs["dmnsp-clean"]
    assert faithful["diags"][0]["logit_scale"] == pytest.approx(math.exp(CKPT_LOG_SCALE), rel=1e-6)
    assert clean["diags"][0]["logit_scale"] == CLEAN_SCALE
    assert np.isclose(_scale(faithful), 14.31, atol=0.01)

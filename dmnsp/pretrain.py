"""Give a small CLIP its image-text alignment: train the whole model (no adapters) on the dataset's
pretraining slice, disjoint from every scenario sample (method.md section 10).

The result is an ordinary open_clip checkpoint (``{"state_dict": ...}``) that runs load through
the same local-checkpoint path as real weights.

Two failure modes are stopped here rather than passed on as a table of noise: a non-finite loss
(nothing is written), and a backbone left at chance or predicting one class for every image (the
health gate, :func:`health`): every method would then tie. ``pretrain.accept_weak: true`` lets a weak backbone through on purpose.
"""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import ConfigError, run_schema
from .datasets import load_dataset
from .devices import pick_device, set_threads
from .evaluate import class_counts, predict
from .io import atomic_save, atomic_write_json
from .loaders import cycle, derive_seed, make_loader
from .metrics import CHANCE_MARGIN, step_health
from .model import create_clip, encode_image, encode_text, tokenize_prompts
from .scenario import TaskDataset, build_scenario
from .train import NonFiniteError, lr_at

# The loss counts as still on the ln(C) plateau when its mean over the last tenth of the steps is
# within this many nats of ln(C) (uniform logits: every prompt has the same text feature).
PLATEAU_NATS = 0.05
# Zero-shot accuracy must beat chance by this much, and by three binomial standard errors (the
# rule of every run's health facts, dmnsp.metrics.chance_threshold).
MIN_GAIN_OVER_CHANCE = CHANCE_MARGIN


class PretrainHealthError(ConfigError):
    """Pretraining left the model at chance; the message names the cause and the settings to change."""


def check_pretrain_config(cfg: dict) -> None:
    """What pretraining needs beyond the schema, checked before any data or model is loaded."""
    if cfg["pretrain_per_class"] < 1:
        raise ConfigError(
            "'pretrain_per_class': pretraining needs images: set it to at least 1 "
            "(e.g. 500 for Fashion-MNIST; it is taken from every class's training images)"
        )


def health(
    accuracy: float,
    n_test: int,
    n_classes: int,
    losses: list[float],
    predictions_per_class: list[int] | None = None,
    labels_per_class: list[int] | None = None,
) -> tuple[list[str], dict]:
    """Why a pretrained model is unusable (empty when it is fine): zero-shot accuracy at chance or
    predictions collapsed to one class (:func:`dmnsp.metrics.step_health`, the same rule as every
    run's ``metrics.json``), or a loss that never left the ln(C) plateau.

    Returns:
        ``(problems, facts)``; facts: chance, the accuracy needed, the share of predictions in the
        most frequent class, ln C and the late loss (the mean over the last tenth of the steps).
    """
    step = step_health(accuracy, n_classes, n_test, predictions_per_class, labels_per_class)
    chance, needed = step["chance"], step["needed_accuracy"]
    late_loss = float(np.mean(losses[-max(1, len(losses) // 10) :]))
    ln_c = math.log(n_classes)
    facts = {
        "chance": chance,
        "needed_accuracy": needed,
        "top_class_share": step["top_class_share"],
        "collapsed": step["collapsed"],
        "ln_classes": ln_c,
        "late_loss": late_loss,
    }
    problems = []
    if step["at_chance"]:
        problems.append(
            f"zero-shot accuracy {accuracy:.3f} is within {needed - chance:.3f} of chance {chance:.3f}"
        )
    if step["collapsed"]:
        problems.append(
            f"{step['top_class_share']:.0%} of the test images are predicted as one class"
            f" (class {step['top_class']})"
        )
    if late_loss > ln_c - PLATEAU_NATS:
        problems.append(f"the loss stayed at ln C = {ln_c:.3f} (last tenth of the steps: {late_loss:.3f})")
    return problems, facts


def _weak_message(cfg: dict, problems: list[str], collapsed_only: bool) -> str:
    p = cfg["pretrain"]
    state = "predicting one class for most images" if collapsed_only else "at chance"
    default = run_schema()["properties"]["pretrain"]["properties"]["lr"]["default"]
    if p["lr"] == default:
        lr = f"or try another pretrain.seed (now {p['seed']})"
    else:
        lr = f"or {'lower' if p['lr'] > default else 'raise'} pretrain.lr (now {p['lr']:g}, default {default:g})"
    return (
        f"pretraining left {cfg['model_name']} {state} ({'; '.join(problems)}), so every method would tie; "
        f"raise pretrain.steps (now {p['steps']}) or pretrain_per_class (now {cfg['pretrain_per_class']}), "
        f"{lr}; set pretrain.accept_weak: true to use the weak model anyway"
    )


def pretrain(cfg: dict, out: str | Path, progress: bool = True) -> dict:
    """Train ``cfg['model_name']`` from seeded random weights on the pretraining slice.

    Args:
        cfg: resolved run config (dataset keys, ``pretrain_per_class`` > 0, the ``pretrain`` section).
        out: checkpoint path; a JSON summary is written beside it (same stem, ``.json``).

    Returns:
        The summary: zero-shot accuracy on the test set, health facts, steps, seconds, slice size.

    Raises:
        ConfigError: bad settings (before any data is read).
        NonFiniteError: the loss became NaN/inf (nothing is written).
        PretrainHealthError: the model ended at chance and ``pretrain.accept_weak`` is false
            (nothing is written).
    """
    p = cfg["pretrain"]
    check_pretrain_config(cfg)
    t0 = time.perf_counter()
    set_threads(cfg["threads"])
    device = pick_device(cfg["device"])
    data = load_dataset(cfg["dataset"], cfg["dataset_root"], cfg["download"])
    scenario = build_scenario(data, cfg)
    bundle = create_clip(
        cfg["model_name"], None, cache_dir=cfg["cache_dir"], device=device, seed=p["seed"], adapter_dim=None
    )
    model = bundle.model
    # Every template's prompts, tokenized (and checked for cut-off class names) before training.
    prompt_tokens = {t: tokenize_prompts(bundle.tokenizer, data.class_names, t) for t in p["templates"]}
    tokenize_prompts(bundle.tokenizer, data.class_names, cfg["prompt_template"])
    for param in model.parameters():
        param.requires_grad_(True)
    # Standard CLIP training learns its temperature (init 1/0.07); downstream runs use the
    # reference's fixed scale 100 whatever this ends at (argmax does not depend on it).
    n_classes = len(data.class_names)
    train_set = TaskDataset(
        data.train, scenario.pretrain_indices, {c: c for c in range(n_classes)}, bundle.train_transform
    )
    loader = make_loader(
        train_set, p["batch_size"], shuffle=True, seed=derive_seed(p["seed"], "pretrain"), device=device
    )
    torch.manual_seed(derive_seed(p["seed"], "pretrain-steps"))
    pick = random.Random(p["seed"])
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=p["lr"], weight_decay=0.0)
    model.train()
    batches = cycle(loader)
    losses = []
    for step in tqdm(range(p["steps"]), desc="pretrain", disable=not progress):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, p["steps"], p["lr"], p["warmup_steps"])
        images, labels = next(batches)
        template = pick.choice(p["templates"])
        tokens = prompt_tokens[template].to(device)
        feats = encode_image(model, images.to(device)) @ encode_text(model, tokens).t()
        loss = F.cross_entropy(model.logit_scale.exp() * feats, labels.to(device))
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteError(
                f"pretraining step {step}: loss is {value}; lower pretrain.lr (now {p['lr']:g}) "
                "(nothing was written)"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(value)
    bad = [name for name, q in model.named_parameters() if not bool(torch.isfinite(q).all())]
    if bad:
        raise NonFiniteError(
            f"pretraining ended with non-finite values in {bad[0]}; lower pretrain.lr (now {p['lr']:g}) "
            "(nothing was written)"
        )
    # Zero-shot accuracy on the (subsampled) test set of all classes, with the run's template.
    test_idx = np.sort(np.concatenate(scenario.test_indices))
    test_set = TaskDataset(data.test, test_idx, {c: c for c in range(n_classes)}, bundle.eval_transform)
    preds, labels = predict(
        model,
        bundle.tokenizer,
        test_set,
        data.class_names,
        cfg["prompt_template"],
        device,
        cfg["eval_batch_size"],
        progress=progress,
    )
    acc = float((preds == labels).mean())
    counts = class_counts(preds, labels, n_classes)
    problems, facts = health(acc, len(test_set), n_classes, losses, **counts)
    if problems:
        message = _weak_message(cfg, problems, collapsed_only=len(problems) == 1 and bool(facts["collapsed"]))
        if not p["accept_weak"]:
            raise PretrainHealthError(message)
        print(f"warning: {message} (accepted: pretrain.accept_weak is true)", file=sys.stderr)
    out = Path(out)
    # Atomic: a failed write (disk full) leaves the previous model.pt, if any, and no partial file.
    atomic_save(
        out, lambda fh: torch.save({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}, fh)
    )
    summary = {
        "model_name": cfg["model_name"],
        "dataset": cfg["dataset"],
        "steps": p["steps"],
        "pretrain_images": int(len(scenario.pretrain_indices)),
        "zero_shot_accuracy": acc,
        "test_images": int(len(test_set)),
        "healthy": not problems,
        **facts,
        **counts,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "loss_curve": losses[:: max(1, len(losses) // 50)],
        "seconds": time.perf_counter() - t0,
        "checkpoint": str(out),
    }
    try:
        atomic_write_json(out.with_suffix(".json"), summary)
    except BaseException:  # the new model without its summary (or beside an older one's): neither stays
        out.unlink(missing_ok=True)
        out.with_suffix(".json").unlink(missing_ok=True)
        raise
    return summary

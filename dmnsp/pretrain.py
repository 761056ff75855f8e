"""Give a small CLIP its image-text alignment: train the whole model (no adapters) on the dataset's
pretraining slice, disjoint from every scenario sample (method.md section 10).

The result is an ordinary open_clip checkpoint (``{"state_dict": ...}``) that runs load through
the same local-checkpoint path as real weights.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .datasets import load_dataset
from .devices import pick_device
from .evaluate import predict
from .io import atomic_save, atomic_write_json
from .loaders import cycle, derive_seed, make_loader
from .model import create_clip, encode_image, encode_text, prompts
from .scenario import TaskDataset, build_scenario
from .train import lr_at


def pretrain(cfg: dict, out: str | Path, progress: bool = True) -> dict:
    """Train ``cfg['model_name']`` from seeded random weights on the pretraining slice.

    Args:
        cfg: resolved run config (dataset keys, ``pretrain_per_class`` > 0, the ``pretrain`` section).
        out: checkpoint path; a JSON summary is written beside it (same stem, ``.json``).

    Returns:
        The summary: zero-shot accuracy on the test set, steps, seconds, slice size.
    """
    p = cfg["pretrain"]
    if cfg["pretrain_per_class"] <= 0:
        raise ValueError("pretrain needs pretrain_per_class > 0 (the images reserved for it)")
    t0 = time.perf_counter()
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = pick_device(cfg["device"])
    data = load_dataset(cfg["dataset"], cfg["dataset_root"], cfg["download"])
    scenario = build_scenario(data, cfg)
    bundle = create_clip(
        cfg["model_name"], None, cache_dir=cfg["cache_dir"], device=device, seed=p["seed"], adapter_dim=None
    )
    model = bundle.model
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
        tokens = bundle.tokenizer(prompts(data.class_names, template)).to(device)
        feats = encode_image(model, images.to(device)) @ encode_text(model, tokens).t()
        loss = F.cross_entropy(model.logit_scale.exp() * feats, labels.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
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
    out = Path(out)
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
        "final_loss": losses[-1],
        "seconds": time.perf_counter() - t0,
        "checkpoint": str(out),
    }
    atomic_write_json(out.with_suffix(".json"), summary)
    return summary

"""Evaluation after a task: test images of all seen classes against prompts of all seen classes,
logits as the method forms them (:meth:`dmnsp.methods.Method.evaluator`; CLIP's by default)."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset
from tqdm.auto import tqdm

from . import methods
from .loaders import make_loader
from .methods import Method, MethodState
from .model import logit_scale, tokenize_prompts


@torch.no_grad()
def predict(
    model: nn.Module,
    tokenizer,
    dataset: Dataset,
    class_names: list[str],
    template: str,
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 0,
    seed: int = 0,
    amp: bool = False,
    progress: bool = True,
    scale: str | float = "checkpoint",
    method: Method | None = None,
    state: MethodState | None = None,
    cfg: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Argmax predictions and labels over ``dataset`` (labels are positions in ``class_names``);
    ``scale``: the logit scale (run key ``logit_scale``, resolved).

    ``method`` forms the logits from its ``state``, the run config ``cfg`` and the logit scale (None:
    CLIP's logits).
    """
    model.eval()
    factor = logit_scale(model, scale)
    tokens = tokenize_prompts(tokenizer, class_names, template).to(device)
    method = method if method is not None else Method()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        logits_of = method.evaluator(model, tokens, state or {}, cfg or {}, factor)
    loader = make_loader(
        dataset, batch_size, shuffle=False, seed=seed, num_workers=num_workers, device=device
    )
    preds, labels = [], []
    for images, y in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = logits_of(images.to(device))
        preds.append(logits.float().argmax(-1).cpu().numpy())
        labels.append(y.numpy())
    return np.concatenate(preds), np.concatenate(labels)


def class_counts(preds: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, list[int]]:
    """How predictions and labels spread over the classes, by class position: the health facts of
    an evaluation (:func:`dmnsp.metrics.step_health`; a collapse to one class shows here)."""
    return {
        "predictions_per_class": np.bincount(preds, minlength=n_classes).tolist(),
        "labels_per_class": np.bincount(labels, minlength=n_classes).tolist(),
    }


def evaluate_seen(
    model: nn.Module,
    tokenizer,
    task_sets: list[Dataset],
    class_names: list[str],
    cfg: dict,
    task: int,
    n_tasks: int,
    device: torch.device,
    seed: int,
    num_workers: int = 0,
    progress: bool = True,
    state: MethodState | None = None,
) -> dict:
    """Accuracy row after training ``task``: R[task][j] for j <= task and the sample-weighted A_task.

    Args:
        task_sets: held-out data of tasks 0..task (labels = class-order positions).
        class_names: names of all seen classes, by position.
        state: the method's state after ``task`` (what its evaluation head reads), on ``device``.
    """
    t0 = time.perf_counter()
    torch.manual_seed(seed)  # the faithful eval transform is a random crop: make it reproducible
    sizes = [len(s) for s in task_sets]
    preds, labels = predict(
        model,
        tokenizer,
        ConcatDataset(task_sets),
        class_names,
        cfg["prompt_template"],
        device,
        cfg["eval_batch_size"],
        num_workers,
        seed,
        cfg["precision"] == "amp_bf16",
        progress,
        cfg["logit_scale"],
        methods.get(cfg["method"])(),
        state,
        cfg,
    )
    correct = preds == labels
    bounds = np.cumsum([0] + sizes)
    # None (JSON null) for a task without held-out images, e.g. an empty validation split.
    per_task = [
        float(correct[a:b].mean()) if b > a else None for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return {
        "task": task,
        "n_tasks": n_tasks,
        "accuracy_per_task": per_task,
        "n_samples_per_task": sizes,
        "accuracy": float(correct.mean()) if len(correct) else None,
        "n_samples": int(len(correct)),
        **class_counts(preds, labels, len(class_names)),
        "seconds": time.perf_counter() - t0,
    }

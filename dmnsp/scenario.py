"""Class-incremental scenario: class order, task split and the seeded choice of samples.

Which images go to the pretraining slice, validation, training and test is a pure function of
``data_seed``, the labels and the per-class limits, drawn with numpy only, so it never depends
on the training seed, the class order or the task split.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data

from .config import ConfigError, read_class_order_file, run_schema
from .datasets import DatasetSplits

# Run-config keys read here; missing ones take the schema default (handy for partial test configs).
SCENARIO_KEYS = (
    "class_order",
    "class_order_seed",
    "initial_increment",
    "increment",
    "max_train_per_class",
    "max_test_per_class",
    "val_fraction",
    "pretrain_per_class",
    "data_seed",
)

# Independent random streams per class: train-side split (pretrain/val/train) and test subsample.
_TRAIN_STREAM, _TEST_STREAM = 0, 1


# Bounds of a scenario, far above real ones (CIFAR100 100 classes, TinyImageNet 200, 50 tasks): a class
# order longer than MAX_CLASSES (the run schema's class_order maxItems) or a split into more than
# MAX_TASKS tasks is a mistake or an attack (the accuracy matrix alone grows with tasks squared).
MAX_CLASSES = 100_000
MAX_TASKS = 1_000
# A scenario of one class measures nothing: every prediction is that class, every accuracy 100%.
MIN_CLASSES = 2


class ScenarioError(ConfigError):
    """The class order, task split or sample budget cannot form a scenario; says what to change."""


# ------------------------------------------------------------------------------------ class order


def _ids(values: list[int]) -> str:
    shown = ", ".join(str(v) for v in values[:20])
    return shown + (f", ... ({len(values)} in all)" if len(values) > 20 else "")


def check_class_order(raw: Sequence[Any], source: str, n_classes: int | None = None) -> list[int]:
    """The class ids of a class order, checked: integers, each once, at most :data:`MAX_CLASSES`;
    with ``n_classes`` (the dataset's class count, when known) every id in 0..n-1 exactly once.

    Planning calls it without the data (``n_classes`` from the dataset's fixed count, or None), the
    job with the loaded dataset's count, so both refuse the same orders with the same words.

    Raises:
        ScenarioError: naming ``source`` and the offending ids.
    """
    if len(raw) > MAX_CLASSES:
        raise ScenarioError(f"{source} lists {len(raw):,} class ids, more than the {MAX_CLASSES:,} allowed")
    bad = [v for v in raw if isinstance(v, bool) or not isinstance(v, int | np.integer)]
    if bad:
        raise ScenarioError(f"{source} must list integer class ids; got {_ids_repr(bad)}")
    order = [int(v) for v in raw]
    dups = sorted(c for c, k in Counter(order).items() if k > 1)
    if dups:
        raise ScenarioError(f"{source} lists class ids more than once: {_ids(dups)}")
    limit = MAX_CLASSES if n_classes is None else n_classes
    unknown = sorted(c for c in order if not 0 <= c < limit)
    if unknown:
        having = f"the dataset has {n_classes} classes" if n_classes is not None else "ids are class numbers"
        raise ScenarioError(f"{source} has ids outside 0..{limit - 1} ({having}): {_ids(unknown)}")
    if n_classes is not None:
        missing = sorted(set(range(n_classes)) - set(order))
        if missing:
            raise ScenarioError(
                f"{source} leaves out {len(missing)} of the dataset's {n_classes} classes: {_ids(missing)}; "
                "every class must appear exactly once"
            )
    return order


def _ids_repr(values: list) -> str:
    """The first few offending values, each cut short (a hostile file may hold megabyte strings)."""
    return "[" + ", ".join(repr(v)[:40] for v in values[:5]) + (", ...]" if len(values) > 5 else "]")


def resolve_class_order(
    cfg_class_order: Sequence[int] | str | Path | None,
    n_classes: int,
    default_order: Sequence[int],
    class_order_seed: int | None = None,
) -> list[int]:
    """The class order of a run, as original label ids.

    Args:
        cfg_class_order: a list of ids, a path to a YAML file holding one (a bare list or a
            ``class_order:`` mapping, :func:`dmnsp.config.class_order_list`), or None for
            ``default_order``.
        n_classes: number of classes in the dataset; the order must hold each id in 0..n-1 once.
        default_order: the dataset's standard order.
        class_order_seed: when not None, the order is ``np.random.default_rng(seed).permutation``
            of the resolved one.

    Raises:
        ScenarioError: on duplicates, unknown ids or missing classes.
    """
    if cfg_class_order is None:
        raw, source = list(default_order), "the dataset's default class order"
    elif isinstance(cfg_class_order, str | Path):
        raw = read_class_order_file(cfg_class_order, ScenarioError)
        source = f"class_order file {cfg_class_order}"
    else:
        raw, source = list(cfg_class_order), "class_order"
    order = check_class_order(raw, source, n_classes)
    if class_order_seed is not None:
        if class_order_seed < 0:
            raise ScenarioError(f"class_order_seed must be >= 0, got {class_order_seed}")
        order = [int(c) for c in np.random.default_rng(class_order_seed).permutation(order)]
    return order


# ------------------------------------------------------------------------------------- task split


def _check_split(n_classes: int, initial_increment: int, increment: int) -> None:
    if n_classes < MIN_CLASSES:
        raise ScenarioError(
            f"the scenario has {n_classes} class{'es' if n_classes != 1 else ''}: with fewer than {MIN_CLASSES} "
            "every prediction is right and every accuracy 100%, which measures nothing; use a dataset or "
            f"class_order with at least {MIN_CLASSES} classes"
        )
    if initial_increment < 1 or increment < 1:
        raise ScenarioError(
            f"initial_increment and increment must be >= 1, got {initial_increment} and {increment}"
        )
    if initial_increment > n_classes:
        raise ScenarioError(
            f"initial_increment {initial_increment} is larger than the {n_classes} classes in the order"
        )
    rest = n_classes - initial_increment
    if rest % increment:
        small = [d for d in range(1, math.isqrt(rest) + 1) if rest % d == 0]  # O(sqrt): rest may be huge
        fits = sorted({*small, *(rest // d for d in small)})
        raise ScenarioError(
            f"split {initial_increment}-{increment} does not fit {n_classes} classes: the {rest} classes "
            f"after the first task are not a multiple of increment {increment} "
            f"(increments that fit: {', '.join(map(str, fits))})"
        )
    tasks = 1 + rest // increment
    if tasks > MAX_TASKS:
        raise ScenarioError(
            f"split {initial_increment}-{increment} of {n_classes} classes makes {tasks:,} tasks, more than the "
            f"{MAX_TASKS:,} allowed; use larger increments"
        )


def num_tasks(n_classes: int, initial_increment: int, increment: int) -> int:
    """Number of tasks of an ``initial_increment``-``increment`` split (validated like split_tasks)."""
    _check_split(n_classes, initial_increment, increment)
    return 1 + (n_classes - initial_increment) // increment


def split_tasks(class_order: Sequence[int], initial_increment: int, increment: int) -> list[list[int]]:
    """``order[:initial_increment]``, then consecutive chunks of ``increment`` classes."""
    order = [int(c) for c in class_order]
    _check_split(len(order), initial_increment, increment)
    tasks = [order[:initial_increment]]
    for start in range(initial_increment, len(order), increment):
        tasks.append(order[start : start + increment])
    return tasks


# --------------------------------------------------------------------------------------- scenario


def _sha256(indices: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(indices, dtype="<i8").tobytes()).hexdigest()


@dataclass(frozen=True, eq=False)  # eq=False: numpy fields make field-wise == ambiguous
class Scenario:
    """Class order, tasks and per-task sample indices of one run (labels remapped by position)."""

    class_order: list[int]
    tasks: list[list[int]]
    class_names: list[str]
    train_indices: list[np.ndarray]
    val_indices: list[np.ndarray]
    test_indices: list[np.ndarray]
    pretrain_indices: np.ndarray
    label_map: dict[int, int]

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def _check_task(self, t: int) -> None:
        if not 0 <= t < len(self.tasks):
            raise IndexError(
                f"task {t} out of range: the scenario has {len(self.tasks)} tasks (0..{len(self.tasks) - 1})"
            )

    def task_classes(self, t: int) -> list[int]:
        """Remapped labels (order positions) of task ``t``."""
        self._check_task(t)
        start = sum(len(task) for task in self.tasks[:t])
        return list(range(start, start + len(self.tasks[t])))

    def seen_classes(self, t: int) -> list[int]:
        """Remapped labels of every class up to and including task ``t``."""
        self._check_task(t)
        return list(range(sum(len(task) for task in self.tasks[: t + 1])))

    def provenance(self) -> dict:
        """JSON-able record of the scenario: order, tasks, sample counts and index hashes."""
        return {
            "class_order": list(self.class_order),
            "tasks": [list(task) for task in self.tasks],
            "class_names": list(self.class_names),
            "counts": {
                "train": [len(a) for a in self.train_indices],
                "val": [len(a) for a in self.val_indices],
                "test": [len(a) for a in self.test_indices],
                "pretrain": len(self.pretrain_indices),
            },
            "sha256": {
                "train": [_sha256(a) for a in self.train_indices],
                "val": [_sha256(a) for a in self.val_indices],
                "test": [_sha256(a) for a in self.test_indices],
                "pretrain": _sha256(self.pretrain_indices),
            },
        }


def _by_class(targets: np.ndarray, n_classes: int, what: str) -> list[np.ndarray]:
    """Indices of each class, ascending (stable sort keeps the dataset's order within a class)."""
    targets = np.asarray(targets, dtype=np.int64)
    if targets.size and (targets.min() < 0 or targets.max() >= n_classes):
        raise ScenarioError(
            f"{what} labels must lie in 0..{n_classes - 1}; found {targets.min()}..{targets.max()}"
        )
    order = np.argsort(targets, kind="stable")
    counts = np.bincount(targets, minlength=n_classes)
    return np.split(order, np.cumsum(counts)[:-1])


def _rng(data_seed: int, cls: int, stream: int) -> np.random.Generator:
    # One seed sequence per (seed, class, stream): classes and streams never share draws.
    return np.random.default_rng([data_seed, cls, stream])


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.empty(0, dtype=np.int64)


def build_scenario(data: DatasetSplits, cfg: Mapping[str, Any]) -> Scenario:
    """Build the scenario of a run from a dataset and a (validated) run config.

    Per class, the training images are shuffled with a generator seeded by ``data_seed`` and the
    class id; the first ``pretrain_per_class`` form the pretraining slice, the next
    ``round(val_fraction * rest)`` (half up) the validation split, and up to
    ``max_train_per_class`` of the remainder the training set. The test set keeps the first
    ``max_test_per_class`` of a separate seeded shuffle (all of it when null).

    Raises:
        ScenarioError: for a bad class order or split, or a class with too few images.
    """
    schema = run_schema()["properties"]
    c = {key: cfg.get(key, schema[key]["default"]) for key in SCENARIO_KEYS}
    if "dataset" in cfg and cfg["dataset"] != data.name:
        raise ScenarioError(
            f"the config names dataset {cfg['dataset']!r} but the data given is {data.name!r}"
        )
    n = len(data.class_names)
    if c["class_order"] is None and len(data.default_class_order) != n:
        raise ScenarioError(
            f"the standard {data.name} class order covers {len(data.default_class_order)} classes but "
            f"this copy has {n}; set class_order explicitly"
        )
    order = resolve_class_order(c["class_order"], n, data.default_class_order, c["class_order_seed"])
    tasks = split_tasks(order, c["initial_increment"], c["increment"])
    seed = int(c["data_seed"])
    if seed < 0:
        raise ScenarioError(f"data_seed must be >= 0, got {seed}")
    n_pre, val_fraction = int(c["pretrain_per_class"]), float(c["val_fraction"])
    max_train, max_test = c["max_train_per_class"], c["max_test_per_class"]

    pretrain, val, train = [], {}, {}
    for cls, idx in enumerate(_by_class(data.train_targets, n, "training")):
        shuffled = _rng(seed, cls, _TRAIN_STREAM).permutation(idx)
        name = f"class {cls} ({data.class_names[cls]})"
        if len(shuffled) < n_pre:
            raise ScenarioError(
                f"{name} has {len(shuffled)} training images, fewer than pretrain_per_class={n_pre}; lower it"
            )
        rest = shuffled[n_pre:]
        n_val = math.floor(val_fraction * len(rest) + 0.5)
        pretrain.append(shuffled[:n_pre])
        val[cls] = rest[:n_val]
        train[cls] = rest[n_val:] if max_train is None else rest[n_val : n_val + int(max_train)]
        if len(train[cls]) == 0:
            raise ScenarioError(
                f"{name} has no training images left: {len(idx)} in all, {n_pre} for pretraining and "
                f"{n_val} for validation; lower pretrain_per_class or val_fraction"
            )
    test = {}
    for cls, idx in enumerate(_by_class(data.test_targets, n, "test")):
        test[cls] = (
            idx if max_test is None else _rng(seed, cls, _TEST_STREAM).permutation(idx)[: int(max_test)]
        )

    return Scenario(
        class_order=order,
        tasks=tasks,
        class_names=[data.class_names[cls] for cls in order],
        train_indices=[_concat([train[cls] for cls in task]) for task in tasks],
        val_indices=[_concat([val[cls] for cls in task]) for task in tasks],
        test_indices=[_concat([test[cls] for cls in task]) for task in tasks],
        pretrain_indices=_concat(pretrain),
        label_map={cls: pos for pos, cls in enumerate(order)},
    )


class TaskDataset(torch.utils.data.Dataset):
    """A subset of a base dataset with labels remapped to order positions.

    Images pass through ``transform`` only (open_clip's transforms convert grayscale to RGB);
    with ``transform=None`` the base dataset's image is returned unchanged.
    """

    def __init__(
        self,
        base: torch.utils.data.Dataset,
        indices: Sequence[int] | np.ndarray,
        label_map: Mapping[int, int],
        transform: Callable | None = None,
    ) -> None:
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.label_map = dict(label_map)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img, label = self.base[int(self.indices[i])]
        if self.transform is not None:
            img = self.transform(img)
        return img, self.label_map[int(label)]

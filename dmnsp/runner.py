"""A run in one process: config → data/scenario → model → per-task train + evaluate → state.

The same :meth:`Session.run_task` serves ``dmnsp run`` (all tasks in one process) and the
training jobs of the workflow (``dmnsp train-task``: one task, or ``--tasks`` for several in one
process, resuming from the previous checkpoint); each task reseeds from (seed, task), so every
path gives bitwise-identical results on CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import methods
from .adapters import adapter_state_dict, adapter_widths, load_adapter_state_dict, state_mismatch
from .checkpoint import CheckpointError, TaskState, load_checkpoint
from .config import ConfigError
from .datasets import DatasetSplits, load_dataset
from .devices import available_cores, check_workers, pick_device, set_threads
from .evaluate import evaluate_seen
from .layout import task_dir, write_task_outputs
from .loaders import derive_seed
from .methods import MethodState
from .model import create_clip, tokenize_prompts
from .scenario import TaskDataset, build_scenario
from .train import peak_memory_mb, train_task


def _num_workers(spec: int | str) -> int:
    if spec != "auto":
        return check_workers(int(spec))
    cores = available_cores()
    # Tiny images decode in microseconds: extra processes only pay off with spare cores.
    return 0 if cores <= 2 else min(8, cores - 1)


class Session:
    """Data, scenario and model of one run configuration, built once per process."""

    def __init__(
        self,
        cfg: dict,
        progress: bool = True,
        data: DatasetSplits | None = None,
        pretrained_file: str | Path | None = None,
    ) -> None:
        """``pretrained_file``: where this process reads the checkpoint the config's ``pretrained``
        names (a copy staged elsewhere, e.g. by remote storage); the config, and so the run's
        identity, keeps its own value."""
        self.cfg = cfg
        self.progress = progress
        set_threads(cfg["threads"])
        self.device = pick_device(cfg["device"])
        self.num_workers = _num_workers(cfg["num_workers"])
        self.bundle = create_clip(
            cfg["model_name"],
            str(pretrained_file) if pretrained_file is not None else cfg["pretrained"],
            cache_dir=cfg["cache_dir"],
            device=self.device,
            seed=derive_seed(cfg["seed"], "init"),
            adapter_dim=cfg["adapter_dim"],
            adapter_scale=cfg["adapter_scale"],
            adapter_dropout=cfg["adapter_dropout"],
        )
        # The method changes the model (MoE's experts) before anything reads its parameters.
        self.method = methods.get(cfg["method"])()
        self.method.prepare_model(self.bundle.model, cfg)
        self.initial_adapters = adapter_state_dict(self.bundle.model)
        # Data after the model, so missing weights fail before the (slower) data load.
        self.data = (
            data if data is not None else load_dataset(cfg["dataset"], cfg["dataset_root"], cfg["download"])
        )
        self.scenario = build_scenario(self.data, cfg)
        self.n_tasks = len(self.scenario.tasks)
        # Prompts cut to identical tokens by a short text context stop the run before training.
        tokenize_prompts(self.bundle.tokenizer, self.scenario.class_names, cfg["prompt_template"])

    @property
    def model(self) -> torch.nn.Module:
        return self.bundle.model

    def heldout(self, t: int) -> TaskDataset:
        """Task ``t``'s held-out images (test, or validation with ``evaluate_on: val``)."""
        sc = self.scenario
        tf = (
            self.bundle.train_transform
            if self.cfg["eval_transform"] == "train"
            else self.bundle.eval_transform
        )
        if self.cfg["evaluate_on"] == "val":
            return TaskDataset(self.data.train, sc.val_indices[t], sc.label_map, tf)
        return TaskDataset(self.data.test, sc.test_indices[t], sc.label_map, tf)

    def method_state(self, state: TaskState) -> MethodState:
        """The method's state of a checkpoint (the ``bases`` field), on the run's device."""
        return {k: [v.to(self.device) for v in vs] for k, vs in state.bases.items()}

    def evaluate(self, t: int, state: MethodState | None = None) -> dict:
        """Accuracy row of the current model after task ``t`` on the held-out data of tasks 0..t,
        with the method's state after task ``t`` (what its evaluation head reads)."""
        sc, cfg = self.scenario, self.cfg
        return evaluate_seen(
            self.model,
            self.bundle.tokenizer,
            [self.heldout(j) for j in range(t + 1)],
            [sc.class_names[i] for i in sc.seen_classes(t)],
            cfg,
            t,
            self.n_tasks,
            self.device,
            derive_seed(cfg["seed"], t, "eval"),
            self.num_workers,
            self.progress,
            state,
        )

    def class_names(self, t: int) -> list[str]:
        """Names of task ``t``'s classes, in label order."""
        sc = self.scenario
        return [sc.class_names[sc.label_map[c]] for c in sc.tasks[t]]

    def _train_set(self, t: int) -> TaskDataset:
        sc = self.scenario
        local = {
            orig: i for i, orig in enumerate(sc.tasks[t])
        }  # task-local targets, as the reference shifts them
        tf = (
            self.bundle.eval_transform
            if self.method.train_transform == "eval"
            else self.bundle.train_transform
        )
        return TaskDataset(self.data.train, sc.train_indices[t], local, tf)

    def run_task(self, t: int, state: TaskState) -> tuple[TaskState, dict, dict]:
        """Train task ``t`` from ``state`` (the state after task t-1), then evaluate.

        Returns:
            ``(new_state, eval_row, diagnostics)``.
        """
        if state.task != t - 1:
            raise ConfigError(
                f"task {t} must resume from the state after task {t - 1}, got task {state.task}"
            )
        if not 0 <= t < self.n_tasks:
            raise ConfigError(f"task {t} does not exist: this scenario has tasks 0..{self.n_tasks - 1}")
        cfg, sc = self.cfg, self.scenario
        load_adapter_state_dict(self.model, state.adapters if t > 0 else self.initial_adapters)
        # The method's state (DMNSP: per-layer bases) travels in the checkpoint's `bases` field.
        method_state = self.method_state(state)
        method_state, diag = train_task(
            self.model,
            self.bundle.tokenizer,
            self._train_set(t),
            self.class_names(t),
            cfg,
            t,
            method_state,
            self.device,
            self.num_workers,
            self.progress,
            previous_class_names=[name for j in range(t) for name in self.class_names(j)],
        )
        row = self.evaluate(t, method_state)
        diag["seconds"]["eval"] = row["seconds"]
        diag["peak_mem_mb"] = row["peak_mem_mb"] = peak_memory_mb(self.device)
        new_state = TaskState(t, adapter_state_dict(self.model), method_state, sc.seen_classes(t))
        return new_state, row, diag


def _resumed(
    cfg: dict,
    first: int,
    resume: str | Path | None,
    progress: bool,
    pretrained_file: str | Path | None = None,
) -> tuple[Session, TaskState]:
    """The session and the state after task ``first - 1`` (checked before the slow model and data build)."""
    if first > 0 and resume is None:
        raise ConfigError(f"task {first} needs --resume with the checkpoint of task {first - 1}")
    state = load_checkpoint(resume, cfg, expect_task=first - 1) if first > 0 else TaskState()
    session = Session(cfg, progress, pretrained_file=pretrained_file)
    if first > 0:
        check_state_fits(session.model, state, resume, cfg)
    return session, state


def run_one_task(
    cfg: dict,
    task: int,
    resume: str | Path | None,
    out_dir: str | Path,
    progress: bool = True,
    pretrained_file: str | Path | None = None,
) -> dict:
    """``dmnsp train-task``: resume from task-1's checkpoint, train and evaluate task, write its folder
    (``pretrained_file``: see :class:`Session`)."""
    session, state = _resumed(cfg, task, resume, progress, pretrained_file)
    state, row, diag = session.run_task(task, state)
    write_task_outputs(out_dir, state, row, diag, cfg)
    return row


def check_state_fits(model: torch.nn.Module, state: TaskState, path: str | Path, cfg: dict) -> None:
    """A checkpoint whose adapters or method state (DMNSP: the bases' layers, rows and columns) do not
    fit the model and the method (a valid checksum, but crafted or altered contents: the config hash
    already matched) is a :class:`CheckpointError` naming the file."""
    why = state_mismatch(model, state.adapters) or methods.get(cfg["method"]).state_mismatch(
        cfg, state.task, state.bases, adapter_widths(model)
    )
    if why is not None:
        raise CheckpointError(
            f"checkpoint {path} does not fit {cfg['model_name']} with adapter_dim {cfg['adapter_dim']} ({why}); "
            f"it was altered or damaged: delete it and rerun task {state.task} (or start the run again)"
        )


def run_tasks(
    cfg: dict,
    first: int,
    last: int,
    resume: str | Path | None,
    run_dir: str | Path,
    progress: bool = True,
    on_task_end: Callable[[int, dict], None] | None = None,
    pretrained_file: str | Path | None = None,
) -> list[dict]:
    """``dmnsp train-task --tasks first-last``: tasks ``first..last`` in this process (a workflow job of
    ``tasks_per_job`` tasks), resuming from task first-1's checkpoint; every task's folder under
    ``run_dir`` is written as soon as the task ends, as a per-task job would write it.

    The state passes from task to task in memory, as in :func:`run_all`; each task reseeds from
    (seed, task) and checkpoints keep each tensor's memory layout, so the results are bitwise those
    of one job per task on CPU (tests/test_chunks.py).
    """
    if not 0 <= first <= last:
        raise ConfigError(
            f"--tasks {first}-{last} is not a range of tasks; give FIRST-LAST with FIRST <= LAST"
        )
    session, state = _resumed(cfg, first, resume, progress, pretrained_file)
    if last >= session.n_tasks:
        raise ConfigError(f"task {last} does not exist: this scenario has tasks 0..{session.n_tasks - 1}")
    rows = []
    for t in range(first, last + 1):
        state, row, diag = session.run_task(t, state)
        write_task_outputs(task_dir(run_dir, t), state, row, diag, cfg)
        rows.append(row)
        if on_task_end is not None:
            on_task_end(t, row)
    return rows


def run_all(
    cfg: dict,
    out_dir: str | Path | None = None,
    on_task_end: Callable[[int, dict, dict], None] | None = None,
    progress: bool = True,
    session: Session | None = None,
) -> list[dict]:
    """``dmnsp run``: every task in one process. ``on_task_end(t, row, diag)`` may raise to stop early
    (the search's pruner does). Writes the same per-task folders as the workflow when ``out_dir`` is set.
    """
    t0 = time.perf_counter()
    session = session or Session(cfg, progress)
    state, rows = TaskState(), []
    for t in range(session.n_tasks):
        state, row, diag = session.run_task(t, state)
        rows.append(row)
        if out_dir is not None:
            write_task_outputs(task_dir(out_dir, t), state, row, diag, cfg)
        if on_task_end is not None:
            on_task_end(t, row, diag)
    if rows:
        rows[-1]["run_seconds"] = time.perf_counter() - t0
    return rows

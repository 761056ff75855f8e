"""Glue shared by ``benchmarks/parity.py`` and its per-method harnesses (``parity_<method>.py``).

What is here: recognising a local checkout of an official repository and the packages its modules
import, importing those modules from it at run time, a register of the patches applied to the
official code (every one named, with the reason, and printed), the project's data in the shape the
official loops read (``(image, label, task id)`` triples, a scenario object sliced by task), the
mapping of the project's tiny open_clip weights onto the official (OpenAI) CLIP layout, running the
project's own method with its predictions recorded, and the comparisons (prediction agreement).

Nothing here is part of the ``dmnsp`` package, and the package never imports official code.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class ParityError(Exception):
    """A condition the parity benchmark reports in one line (bad checkout, missing package, ...)."""


# ------------------------------------------------------------------------------- the checkouts


@dataclass(frozen=True)
class OfficialRepo:
    """How to recognise one official repository: files (relative to the code root) and strings
    each must contain. ``subdir``: where the code root lies inside the repository, if not at its top."""

    name: str
    markers: Mapping[str, tuple[str, ...]]
    modules: tuple[str, ...]
    subdir: str = ""
    install: str = ""


OFFICIAL: dict[str, OfficialRepo] = {
    "dmnsp": OfficialRepo(
        "RL-VIG/DMNSP",
        {
            "continual_clip/models.py": ("LAMBDA_SCALE", "visual_U", "class ClassIncremental"),
            "clip/model.py": ("lora_feature", "class ResidualAttentionBlock"),
            "main.py": ("DistributedSampler", "adaptation"),
        },
        ("omegaconf", "hydra", "continuum", "ftfy", "regex", "yaml", "tqdm"),
        install="pip install omegaconf hydra-core continuum ftfy regex",
    ),
    "moe_adapters": OfficialRepo(
        "JiazuoYu/MoE-Adapters4CL",
        {
            "clip/model.py": ("SparseDispatcher", "router_list", "class ResidualAttentionBlock"),
            "continual_clip/models.py": ("adaptmlp", "class ClassIncremental"),
            "main.py": ("adaptation",),
        },
        ("omegaconf", "hydra", "continuum", "ftfy", "regex", "yaml", "tqdm", "pandas"),
        subdir="cil",
        install="pip install omegaconf hydra-core continuum ftfy regex pandas",
    ),
    "rapf": OfficialRepo(
        "linlany/RAPF",
        {
            "continual_clip/models.py": ("class ClassIncrementalCLIP", "mix_matrix", "analyze_mean_cov"),
            "main.py": ("run_class_incremental", "hard_pairs"),
        },
        ("omegaconf", "hydra", "continuum", "yaml", "tqdm", "clip"),
        install="pip install omegaconf hydra-core continuum clip-anytorch (OpenAI's `clip` package)",
    ),
}


def official_root(method: str, path: str | Path | None) -> Path:
    """The code root of a checkout of ``method``'s official repository, checked.

    Raises:
        ParityError: no path, a path that is not a folder, or a folder without the repository's
            files (naming which one is missing or which repository it looks like instead).
    """
    repo = OFFICIAL[method]
    if path is None or str(path).strip() == "":
        raise ParityError(
            f"--official is required: give the path of a local checkout of {repo.name} "
            "(the project never contains or downloads it)"
        )
    base = Path(path).expanduser()
    if not base.exists():
        raise ParityError(f"--official {path}: no such file or folder; give a local checkout of {repo.name}")
    if not base.is_dir():
        raise ParityError(f"--official {path} is not a folder; give a local checkout of {repo.name}")
    candidates = [base / repo.subdir, base] if repo.subdir else [base]
    for root in candidates:
        if _matches(root, repo):
            return root.resolve()
    others = [OFFICIAL[m].name for m in OFFICIAL if m != method and _matches_any(base, OFFICIAL[m])]
    hint = f" (it looks like {others[0]}: is --method right?)" if others else ""
    why = _mismatch(candidates[0], repo)
    raise ParityError(f"--official {path} is not a checkout of {repo.name}: {why}{hint}")


def _matches_any(base: Path, repo: OfficialRepo) -> bool:
    return any(_matches(r, repo) for r in ([base / repo.subdir, base] if repo.subdir else [base]))


def _matches(root: Path, repo: OfficialRepo) -> bool:
    return _mismatch(root, repo) is None


def _mismatch(root: Path, repo: OfficialRepo) -> str | None:
    for rel, needles in repo.markers.items():
        f = root / rel
        if not f.is_file():
            return f"{f} is missing"
        try:
            text = f.read_text(errors="replace")
        except OSError as exc:
            return f"{f} cannot be read ({exc.strerror})"
        for needle in needles:
            if needle not in text:
                return f"{f} does not contain {needle!r}"
    return None


def missing_modules(modules: Sequence[str]) -> list[str]:
    """Top-level modules that cannot be imported here."""
    out = []
    for name in modules:
        try:
            if importlib.util.find_spec(name) is None:
                out.append(name)
        except (ImportError, ValueError):
            out.append(name)
    return out


def check_modules(method: str) -> None:
    """One-line error naming every package the official modules import that is missing here."""
    repo = OFFICIAL[method]
    missing = missing_modules(repo.modules)
    if missing:
        raise ParityError(
            f"the official {repo.name} modules import {', '.join(missing)}, not installed here; "
            f"install them into this environment ({repo.install})"
        )


#: Module names the official repositories define at their top level; purged before each import
#: so a second harness in one process never sees another repository's ``clip``.
_OFFICIAL_TOP = ("clip", "continual_clip", "templates", "official_main")


def import_official(root: Path, modules: Sequence[str], main: bool = True) -> dict[str, Any]:
    """Import ``modules`` (dotted, relative to ``root``) and ``root/main.py`` as ``official_main``."""
    for name in list(sys.modules):
        if name.split(".")[0] in _OFFICIAL_TOP:
            del sys.modules[name]
    sys.path.insert(0, str(root))
    out = {name: importlib.import_module(name) for name in modules}
    if main:
        spec = importlib.util.spec_from_file_location("official_main", root / "main.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["official_main"] = mod
        spec.loader.exec_module(mod)
        out["main"] = mod
    return out


# ------------------------------------------------------------------------------- the patches

#: Why a patch is there: forced by CPU execution, forced by the tiny model, aligning data order or
#: random streams with the project's run, or only observing (no effect on the computation).
PATCH_KINDS = ("cpu", "tiny", "align", "numerics", "observe")


@dataclass
class Patch:
    kind: str
    what: str
    why: str


@dataclass
class Patches:
    """Every change made to the official code's objects, with how to undo the attribute ones."""

    items: list[Patch] = field(default_factory=list)
    _undo: list[Callable[[], None]] = field(default_factory=list)

    def note(self, kind: str, what: str, why: str) -> None:
        if kind not in PATCH_KINDS:
            raise ValueError(f"patch kind must be one of {PATCH_KINDS}, got {kind!r}")
        if not any(p.what == what for p in self.items):
            self.items.append(Patch(kind, what, why))

    def setattr(self, obj: Any, name: str, value: Any, kind: str, what: str, why: str) -> None:
        """``setattr(obj, name, value)`` until :meth:`restore`, recorded."""
        had = name in vars(obj) if hasattr(obj, "__dict__") else hasattr(obj, name)
        old = getattr(obj, name, None)
        setattr(obj, name, value)
        self._undo.append(lambda: setattr(obj, name, old) if had else delattr(obj, name))
        self.note(kind, what, why)

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()

    def lines(self) -> list[str]:
        return [f"  [{p.kind}] {p.what}: {p.why}" for p in self.items]


def cpu_patches(patches: Patches) -> None:
    """``.cuda(...)`` on tensors and modules becomes a no-op: the official loops call it with
    hard-coded device numbers, and this machine has no GPU."""
    import torch
    from torch import nn

    patches.setattr(
        torch.Tensor,
        "cuda",
        lambda self, *a, **k: self,
        "cpu",
        "torch.Tensor.cuda -> returns the tensor",
        "the official loops move batches with .cuda(device=N); no GPU here",
    )
    patches.setattr(
        nn.Module,
        "cuda",
        lambda self, *a, **k: self,
        "cpu",
        "nn.Module.cuda -> returns the module",
        "the official loops move the model with .cuda(N); no GPU here",
    )


@contextlib.contextmanager
def captured_locals(code: Any, into: list[dict]) -> Iterator[None]:
    """Append the local variables of every frame running ``code`` to ``into`` when it returns
    (observation only: the official train loops keep lambda and the optimiser in locals)."""

    def hook(frame, event, arg):  # noqa: ARG001 - the profiler's signature
        if event == "return" and frame.f_code is code:
            into.append(dict(frame.f_locals))

    old = sys.getprofile()
    sys.setprofile(hook)
    try:
        yield
    finally:
        sys.setprofile(old)


# ------------------------------------------------------------------------------- data


class TaskImages:
    """One task's images as the official loops read them: ``(transform(image), label, task id)``,
    labels = positions in the class order (what ``continuum`` gives)."""

    def __init__(self, base, indices, label_map: Mapping[int, int], transform, task: int) -> None:
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)
        self.label_map, self.transform, self.task = dict(label_map), transform, task

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img, label = self.base[int(self.indices[i])]
        return self.transform(img), self.label_map[int(label)], self.task


class TaskSeries:
    """The ``continuum`` scenario surface the official ``main.py`` files use: ``len``, iteration
    over tasks, ``[t]`` one task, ``[a:b]`` the tasks a..b-1 concatenated."""

    def __init__(self, tasks: Sequence[TaskImages]) -> None:
        self.tasks = list(tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        return iter(self.tasks)

    def __getitem__(self, key):
        from torch.utils.data import ConcatDataset

        if isinstance(key, slice):
            return ConcatDataset(self.tasks[key])
        return self.tasks[key]


def task_series(session, split: str, transform) -> TaskSeries:
    """The project's scenario (same images, same order within a task) for the official loops."""
    sc = session.scenario
    base = session.data.train if split == "train" else session.data.test
    indices = sc.train_indices if split == "train" else sc.test_indices
    return TaskSeries([TaskImages(base, idx, sc.label_map, transform, t) for t, idx in enumerate(indices)])


# ------------------------------------------------------------------------------- weights

_BLOCK = re.compile(r"^(visual\.transformer|transformer)\.resblocks\.(\d+)\.block\.")


def to_official_layout(state: Mapping[str, Any], adapter_names: Mapping[str, str]) -> dict[str, Any]:
    """The project's CLIP state dict (open_clip keys, each residual block wrapped with an adapter)
    in the official (OpenAI ``clip``) layout.

    open_clip already names the backbone as OpenAI's CLIP does; the project's wrapper adds
    ``.block.`` inside each residual block and keeps the adapter beside it as ``.adapter.<x>.``.
    ``adapter_names`` maps the adapter's sub-module path (e.g. ``down``) to the official one
    (``adaptmlp.down_proj``); an adapter key with no mapping is an error, never dropped.
    """
    out = {}
    for key, value in state.items():
        new = _BLOCK.sub(r"\1.resblocks.\2.", key)
        m = re.match(
            r"^(visual\.transformer|transformer)\.resblocks\.(\d+)\.adapter\.(.+)\.(weight|bias)$", key
        )
        if m:
            sub = m.group(3)
            if sub not in adapter_names:
                raise KeyError(f"no official name for adapter module {sub!r} (key {key})")
            new = f"{m.group(1)}.resblocks.{m.group(2)}.{adapter_names[sub]}.{m.group(4)}"
        out[new] = value
    return out


def load_checked(module, state: Mapping[str, Any], allowed_missing: Callable[[str], bool]) -> None:
    """``module.load_state_dict(state, strict=False)``, then fail unless every key of ``state`` was
    used and every key left out is one ``allowed_missing`` accepts (the official loaders load with
    ``strict=False`` and would silently keep random weights under a misspelt key)."""
    missing, unexpected = module.load_state_dict(dict(state), strict=False)
    bad_missing = [k for k in missing if not allowed_missing(k)]
    if unexpected or bad_missing:
        raise ParityError(
            f"weight mapping to the official model is incomplete: unexpected {unexpected[:4]}, "
            f"missing {bad_missing[:4]}"
        )


# ------------------------------------------------------------------------------- comparisons


def agreement(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> float:
    """Fraction of test images on which two runs predict the same class (same images, same order)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"predictions of different length: {a.shape} vs {b.shape}")
    if a.size == 0:
        raise ValueError("no predictions to compare")
    return float((a == b).mean())


def accuracy(preds, labels) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    return float((preds == labels).mean())


def max_abs_diff(a, b) -> float:
    import torch

    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


def fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


# ------------------------------------------------------------------------------- our side


def pretrained_checkpoint(path: str | None, threads: int) -> str:
    """The tiny pretrained checkpoint: ``path``, or the default one, made with ``dmnsp pretrain``
    when missing (as benchmarks/numerics.py does)."""
    import subprocess

    target = Path(path) if path else ROOT / "results/pretrain/dmnsp-tiny.pt"
    if path and not target.is_file():
        raise ParityError(f"--pretrained {path}: no such file")
    if not target.is_file():
        cmd = [sys.executable, "-m", "dmnsp", "pretrain", "--config", str(ROOT / "config/run-tiny.yaml")]
        cmd += ["--out", str(target), "--set", f"threads={threads}", "--quiet"]
        print("pretraining the tiny CLIP:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    return str(target)


def our_config(overrides: Mapping[str, Any]) -> dict:
    from dmnsp.config import load_config

    return load_config(ROOT / "config/run-tiny.yaml", dict(overrides))


@dataclass
class OurRun:
    """The project's run: per task its eval row, diagnostics, state, and test predictions."""

    session: Any
    init_state: dict
    rows: list[dict] = field(default_factory=list)
    diags: list[dict] = field(default_factory=list)
    states: list[Any] = field(default_factory=list)
    preds: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)


def run_ours(
    cfg: dict, progress: bool = False, on_task: Callable[[int, OurRun], None] | None = None
) -> OurRun:
    """Run every task of ``cfg`` with the project's own code, recording each evaluation's
    predictions (``dmnsp.evaluate.predict`` is wrapped for observation only)."""
    import dmnsp.evaluate as ev
    from dmnsp.checkpoint import TaskState
    from dmnsp.runner import Session

    session = Session(cfg, progress=progress)
    run = OurRun(session, {k: v.detach().clone() for k, v in session.model.state_dict().items()})
    original = ev.predict

    def recording_predict(*args, **kwargs):
        preds, labels = original(*args, **kwargs)
        run.preds.append(preds)
        run.labels.append(labels)
        return preds, labels

    ev.predict = recording_predict
    try:
        state = TaskState()
        for t in range(session.n_tasks):
            state, row, diag = session.run_task(t, state)
            run.rows.append(row)
            run.diags.append(diag)
            run.states.append(state)
            if on_task is not None:
                on_task(t, run)
    finally:
        ev.predict = original
    return run

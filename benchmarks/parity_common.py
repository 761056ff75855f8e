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
        ("omegaconf", "hydra", "continuum", "yaml", "tqdm", "clip", "pkg_resources"),
        install="pip install omegaconf hydra-core continuum clip-anytorch 'setuptools<80' "
        "(clip-anytorch is OpenAI's `clip` package; it imports pkg_resources)",
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


def official_blocks(clip_model) -> list[tuple[str, Any]]:
    """(tower, block) of every residual block of an official (OpenAI-layout) CLIP."""
    return [("visual", b) for b in clip_model.visual.transformer.resblocks] + [
        ("text", b) for b in clip_model.transformer.resblocks
    ]


def fit_tiny_backbone(clip_model, ours, patches: Patches) -> None:
    """Give the official CLIP the tiny model's head count and activation, where its builder assumes
    OpenAI's ViT-B sizes: ``build_model`` infers ``heads = width // 64`` (1 at width 64; the tiny
    model has 2 per tower) and every block hard-codes QuickGELU (the tiny open_clip model: GELU)."""
    from dmnsp.adapters import tower_blocks

    for tower, block in official_blocks(clip_model):
        ref = tower_blocks(ours, tower)[0].block
        heads = ref.attn.num_heads
        block.attn.num_heads = heads
        block.attn.head_dim = block.attn.embed_dim // heads
        block.mlp.gelu = type(ref.mlp.gelu)()
    patches.note(
        "tiny",
        "attn.num_heads / head_dim of every official block set to the tiny model's (2 per tower)",
        "clip/model.py build_model infers heads = width // 64, i.e. 1 at width 64",
    )
    patches.note(
        "tiny",
        "mlp.gelu of every official block replaced by nn.GELU",
        "the tiny open_clip model uses nn.GELU; the official blocks hard-code QuickGELU (OpenAI weights)",
    )


def exact_log(scale: float):
    """A float32 ``x`` whose float32 ``exp`` is ``scale`` rounded to float32 when one exists near
    ``log(scale)`` (else the closest found), so a model computing ``logit_scale.exp()`` multiplies by
    the same float32 factor as the project."""
    import torch

    target = torch.tensor(scale, dtype=torch.float32)
    x = torch.tensor(float(np.log(scale)), dtype=torch.float32)
    candidates = [x]
    for direction in (float("inf"), float("-inf")):
        y = x
        for _ in range(64):
            y = torch.nextafter(y, torch.tensor(direction))
            candidates.append(y)
    return min(candidates, key=lambda y: (abs(float(torch.exp(y)) - float(target)), abs(float(y - x))))


def align_logit_scale(clip_model, our_scale: float, patches: Patches) -> None:
    """When the project's code under test multiplies the logits by another factor than the
    checkpoint's ``exp(logit_scale)`` (the fixed 100 before issue 17's change), set the official
    model's ``logit_scale`` so that its ``exp`` is that factor, and say so."""
    import torch

    theirs = float(clip_model.logit_scale.detach().exp())
    if np.float32(theirs) == np.float32(our_scale):
        return
    with torch.no_grad():
        clip_model.logit_scale.copy_(exact_log(our_scale))
    patches.note(
        "align",
        f"official logit_scale set to log({our_scale:g}) (checkpoint: exp = {theirs:.4g})",
        "the project code under test multiplies the logits by a fixed 100, the official code by the "
        "checkpoint's exp(logit_scale) (issue 17); aligned so the rest can be compared",
    )


def check_logit_scale(clip_model, our_scale: float) -> None:
    """The official model's logit factor is still the project's (nothing reloaded it since)."""
    theirs = float(clip_model.logit_scale.detach().exp())
    if abs(theirs - our_scale) > 1e-5 * our_scale:
        raise ParityError(f"the official model's logit scale is {theirs:.6g}, the project's {our_scale:.6g}")


def our_logit_scale(cfg: Mapping[str, Any], model) -> float:
    """The factor the project's code under test puts on the logits for this config and model."""
    import dmnsp.model as dm

    if hasattr(dm, "logit_scale") and "logit_scale" in cfg:
        return float(dm.logit_scale(model, cfg["logit_scale"]))
    return float(getattr(dm, "LOGIT_SCALE", 100.0))


class LoaderFactory:
    """``DataLoader`` for the official loops with the project's samplers and seeds: one process
    (``num_workers=0``) so that random crops come from the same global stream as the project's,
    shuffling from a generator seeded as the project seeds each loader. The n-th call in a task
    takes ``purposes[n]`` (the last one repeats); with ``reseed`` the global stream is reseeded
    with that purpose first, as the project reseeds before evaluating."""

    def __init__(self, seed: int, state: dict, purposes: Sequence[str], reseed: str | None = None) -> None:
        self.seed, self.state, self.purposes, self.reseed = seed, state, list(purposes), reseed
        self.calls: dict[int, int] = {}

    def __call__(self, dataset, batch_size=1, shuffle=False, sampler=None, num_workers=0, **kwargs):
        import torch

        from dmnsp.loaders import derive_seed

        task = self.state["task"]
        n = self.calls.get(task, 0)
        self.calls[task] = n + 1
        purpose = self.purposes[min(n, len(self.purposes) - 1)]
        if self.reseed is not None:
            torch.manual_seed(derive_seed(self.seed, task, self.reseed))
        gen = torch.Generator()
        gen.manual_seed(derive_seed(self.seed, task, purpose))
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=0, generator=gen
        )


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
_ADAPTER = re.compile(r"^(visual\.transformer|transformer)\.resblocks\.(\d+)\.adapter\.(.+)$")


def to_official_layout(state: Mapping[str, Any], adapter_names: Mapping[str, str]) -> dict[str, Any]:
    """The project's CLIP state dict (open_clip keys, each residual block wrapped with an adapter)
    in the official (OpenAI ``clip``) layout.

    open_clip already names the backbone as OpenAI's CLIP does; the project's wrapper adds
    ``.block.`` inside each residual block and keeps the adapter beside it as ``.adapter.<path>``.
    ``adapter_names`` maps a path prefix inside the adapter (``down``, ``experts.1.up``,
    ``router``) to the official one (``adaptmlp.down_proj``, ``adaptmlp_list.1.up_proj``,
    ``router_list.0``); the longest matching prefix wins, and an adapter key with no mapping is an
    error, never dropped.
    """
    out = {}
    prefixes = sorted(adapter_names, key=len, reverse=True)
    for key, value in state.items():
        m = _ADAPTER.match(key)
        if m is None:
            out[_BLOCK.sub(r"\1.resblocks.\2.", key)] = value
            continue
        rest = m.group(3)
        hit = next((p for p in prefixes if rest == p or rest.startswith(p + ".")), None)
        if hit is None:
            raise KeyError(f"no official name for adapter module {rest!r} (key {key})")
        out[f"{m.group(1)}.resblocks.{m.group(2)}.{adapter_names[hit]}{rest[len(hit) :]}"] = value
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


def rounded(transform, dtype_name: str):
    """``transform`` followed by a round trip through ``dtype_name`` (e.g. float16): inputs that a
    cast to that type leaves unchanged."""
    import torch

    dtype = getattr(torch, dtype_name)

    def apply(img):
        return transform(img).to(dtype).float()

    return apply


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
    cfg: dict,
    progress: bool = False,
    on_task: Callable[[int, OurRun], None] | None = None,
    prepare: Callable[[Any], None] | None = None,
) -> OurRun:
    """Run every task of ``cfg`` with the project's own code, recording each evaluation's
    predictions (``dmnsp.evaluate.predict`` is wrapped for observation only)."""
    import dmnsp.evaluate as ev
    from dmnsp.checkpoint import TaskState
    from dmnsp.runner import Session

    session = Session(cfg, progress=progress)
    if prepare is not None:  # e.g. the same input rounding on both sides
        prepare(session)
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
            if (
                len(run.preds) != t + 1
                or abs(accuracy(run.preds[t], run.labels[t]) - row["accuracy"]) > 1e-12
            ):
                raise ParityError(
                    f"task {t}: the recorded predictions are not those of the project's evaluation "
                    f"({len(run.preds)} evaluations recorded); the harness no longer fits dmnsp.evaluate"
                )
            run.rows.append(row)
            run.diags.append(diag)
            run.states.append(state)
            if on_task is not None:
                on_task(t, run)
    finally:
        ev.predict = original
    return run

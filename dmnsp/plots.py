"""Figures of the results stage: accuracy curves, accuracy matrices, hyperparameter heatmaps, diagnostics.

Every function writes each figure as PNG and PDF and returns the files written (an empty list
when there is nothing to draw). Figures are drawn on matplotlib's Agg canvas, attached per figure
inside the functions: importing this module imports no matplotlib and touches no global backend
or pyplot state. Colours come from one mapping, :func:`method_color`, so a method keeps its
colour across every figure.
"""

from __future__ import annotations

import functools
import itertools
import re
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dmnsp import layout, methods
from dmnsp.aggregate import HYPERPARAMETERS, collect_runs, display_names, identical_problems, load_reference
from dmnsp.io import atomic_save
from dmnsp.metrics import accuracy_matrix_from_rows

__all__ = [
    "METHOD_COLORS",
    "method_color",
    "plot_accuracy_curves",
    "plot_accuracy_matrices",
    "plot_hyperparameters",
    "plot_diagnostics",
]

#: Fixed colours: each registered method's own (published methods the harness does not run would
#: join here). Other labels (ablations) get a stable hash colour from the palette's remaining hues.
METHOD_COLORS = {name: methods.get(name).color for name in methods.names()}
_EXTRA_COLORS = tuple(
    color
    for color in (
        "#d62728",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#bcbd22",
        "#17becf",
        "#aec7e8",
        "#ffbb78",
        "#98df8a",
        "#ff9896",
        "#c5b0d5",
        "#c49c94",
    )
    if color not in METHOD_COLORS.values()
)
_DPI = 150
# Variants sharing a method colour (swept settings) differ by these; dashed is kept for reported curves.
_LINESTYLES = ("-", "-.", ":", (0, (5, 1, 1, 1)))
_MARKERS = ("o", "s", "^", "D", "v")


#: Variants of a registered method (``rapf (precision=fp32)``, ``dmnsp (mode=clean)``) take a shade
#: of the method's colour: each step mixes it with white (> 0) or black (< 0) by that fraction.
_SHADES = (0.45, -0.35, 0.7, -0.55, 0.25)


def _shade(color: str, amount: float) -> str:
    rgb = np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)], dtype=float)
    target = 255.0 if amount > 0 else 0.0
    mixed = np.rint(rgb + (target - rgb) * abs(amount)).astype(int)
    return "#" + "".join(f"{v:02x}" for v in mixed)


def method_color(label: str) -> str:
    """The colour of a method label: fixed for known methods, a shade of the method's colour for its
    variants, stable (CRC32-hashed) for every other label.

    ``"dmnsp (reported)"`` and ``"dmnsp [TOP_K_RATIO=0.2]"`` (a swept setting) share ``dmnsp``'s
    colour; a run label with switches, ``"dmnsp (mode=clean)"`` or ``"rapf (precision=fp32)"``, takes
    one of a few shades of its method's colour picked by the label's hash, so variants of two methods
    never share a colour; figures tell variants of one colour apart by line style.
    """
    base = re.sub(r" \[.*\]$", "", str(label).removesuffix(" (reported)"))
    if base in METHOD_COLORS:
        return METHOD_COLORS[base]
    key = zlib.crc32(base.encode())
    method = base.split(" (", 1)[0]
    if method in METHOD_COLORS and base.endswith(")"):
        return _shade(METHOD_COLORS[method], _SHADES[key % len(_SHADES)])
    return _EXTRA_COLORS[key % len(_EXTRA_COLORS)]


# --------------------------------------------------------------------------- helpers
#: Every string drawn is plain text: labels, prompts and settings come from users, and matplotlib
#: would parse ``$...$`` in them as mathtext (``$\\frac{}$`` raises, ``cost $5 and $6`` renders
#: italics) or hand them to TeX. Set while a figure is built and saved (tick labels are made then).
PLAIN_TEXT = {"text.parse_math": False, "text.usetex": False}


def _plain_text(draw: Callable) -> Callable:
    """Run a plotting function with :data:`PLAIN_TEXT` (matplotlib's global settings restored after)."""

    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import matplotlib

        with matplotlib.rc_context(PLAIN_TEXT):
            return draw(*args, **kwargs)

    return wrapper


def _figure(width: float, height: float) -> Any:
    """A figure on its own Agg canvas (no pyplot, no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _slug(*parts: Any) -> str:
    text = "_".join(str(p) for p in parts if p is not None and str(p) != "")
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "all"


def _save(fig: Any, out_dir: Path, stem: str) -> list[Path]:
    """``stem.png`` and ``stem.pdf``, each written atomically."""
    return [
        atomic_save(out_dir / f"{stem}.{ext}", lambda fh, ext=ext: fig.savefig(fh, format=ext, dpi=_DPI))
        for ext in ("png", "pdf")
    ]


def _step_columns(df: pd.DataFrame) -> list[str]:
    steps = [c for c in df.columns if re.fullmatch(r"step_\d+", str(c))]
    return sorted(steps, key=lambda c: int(c.split("_")[1]))


def _cells(df: pd.DataFrame) -> Iterable[tuple[tuple[str, str], pd.DataFrame]]:
    placed = df[df["dataset"].notna() & df["split"].notna()]
    for key, group in placed.groupby(["dataset", "split"], sort=True):
        yield (str(key[0]), str(key[1])), group


def _run_table(run_dirs: Sequence[str | Path]) -> pd.DataFrame:
    runs = collect_runs(run_dirs)
    runs = runs[runs["status"] != "missing"].copy()
    runs["name"] = display_names(runs)
    return runs


# --------------------------------------------------------------------------- accuracy curves
def health_banner(runs: pd.DataFrame) -> str:
    """A warning line for a figure of these runs (one dataset and split), empty when healthy:
    every method gave the identical result, or runs collapsed to one class or sat at chance."""
    parts = []
    if identical_problems(runs):
        parts.append("every method gave the identical result")
    for column, what in (("collapsed", "predictions collapsed to one class"), ("at_chance", "at chance")):
        if column in runs:
            n = int(sum(value is True or value is np.True_ for value in runs[column]))
            if n:
                parts.append(f"{what} in {n}/{len(runs)} runs")
    return ("WARNING, not a result: " + "; ".join(parts) + " (see summary.md)") if parts else ""


@_plain_text
def plot_accuracy_curves(
    df_runs: pd.DataFrame, out_dir: str | Path, reference: pd.DataFrame | None = None
) -> list[Path]:
    """Accuracy on all seen classes vs step, one figure per (dataset, split), a line per method.

    The line is the mean over seeds, the band spans min to max over seeds (runs that are not
    complete contribute the steps they reached). Published per-step curves (``step_k`` rows of
    ``reference``, e.g. DMNSP 10-10 on CIFAR100) are overlaid dashed in the method's colour.

    Args:
        df_runs: :func:`dmnsp.aggregate.collect_runs` output (``step_k`` columns in percent).
        out_dir: folder for ``accuracy_curves_{dataset}_{split}.png/.pdf``.
        reference: :func:`dmnsp.aggregate.load_reference` (loaded when None).
    """
    from matplotlib.ticker import MaxNLocator

    reference = load_reference() if reference is None else reference
    out_dir = Path(out_dir)
    steps = _step_columns(df_runs)
    if df_runs.empty or not steps:
        return []
    runs = df_runs.copy()
    runs["name"] = display_names(runs)
    files: list[Path] = []
    for (dataset, split), group in _cells(runs):
        values = group[steps].astype(float)
        if values.isna().all().all():
            continue
        fig = _figure(6.4, 4.2)
        ax = fig.add_subplot()
        styles: dict[str, int] = {}
        for name, sub in group.groupby("name", sort=True):
            color = method_color(str(name))
            style = styles.setdefault(color, 0)
            styles[color] += 1
            acc = sub[steps].astype(float)
            x = np.arange(1, len(steps) + 1)
            mean = acc.mean(axis=0, skipna=True).to_numpy()
            keep = np.isfinite(mean)
            if not keep.any():
                continue
            n = int(sub["complete"].sum())
            ax.plot(
                x[keep],
                mean[keep],
                color=color,
                lw=1.8,
                ms=4,
                ls=_LINESTYLES[style % len(_LINESTYLES)],
                marker=_MARKERS[style % len(_MARKERS)],
                label=f"{name} (n={n})",
            )
            if len(sub) > 1:
                ax.fill_between(
                    x[keep],
                    acc.min(axis=0).to_numpy()[keep],
                    acc.max(axis=0).to_numpy()[keep],
                    color=color,
                    alpha=0.2,
                    lw=0,
                )
        ref = reference[
            (reference.dataset == dataset)
            & (reference.split == split)
            & reference.metric.str.fullmatch(r"step_\d+")
        ]
        for method, sub in ref.groupby("method", sort=True):
            order = sub.metric.str.slice(5).astype(int)
            ax.plot(
                order,
                sub.value,
                ls="--",
                lw=1.5,
                color=method_color(str(method)),
                label=f"{method} (reported)",
            )
        ax.set_xlabel("Step (tasks learned)")
        ax.set_ylabel("Accuracy on seen classes (%)")
        ax.set_title(
            f"{dataset} {split}: accuracy after each step\n(line: mean over seeds; band: min to max)",
            fontsize="medium",
        )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
        warning = health_banner(group)
        if warning:  # the report shows figures inline: the warning must be in the picture
            fig.suptitle(warning, color="#b00000", fontsize="small", wrap=True)
        files += _save(fig, out_dir, _slug("accuracy_curves", dataset, split))
    return files


# --------------------------------------------------------------------------- accuracy matrices
@_plain_text
def plot_accuracy_matrices(run_dirs: Sequence[str | Path], out_dir: str | Path) -> list[Path]:
    """Heatmaps of the mean accuracy matrix ``R`` (percent) per method, one figure per (dataset, split).

    Rows: the task just trained; columns: the task evaluated; the mean is over the complete seeds
    of each method (all runs when none is complete). Values are written in the cells up to 12 tasks.
    """
    out_dir = Path(out_dir)
    runs = _run_table(run_dirs)
    if runs.empty:
        return []
    files: list[Path] = []
    for (dataset, split), group in _cells(runs):
        matrices: dict[str, np.ndarray] = {}
        for name, sub in group.groupby("name", sort=True):
            chosen = sub[sub["complete"]] if sub["complete"].any() else sub
            stack = []
            for run_dir in chosen["run_dir"]:
                rows = layout.read_eval_rows(run_dir)
                if rows:
                    stack.append(accuracy_matrix_from_rows(rows)[0])
            sizes = {m.shape for m in stack}
            if stack and len(sizes) == 1:
                with warnings.catch_warnings():  # cells no run reached: "mean of empty slice"
                    warnings.simplefilter("ignore", RuntimeWarning)
                    matrices[str(name)] = 100 * np.nanmean(np.stack(stack), axis=0)
        if not matrices:
            continue
        ncols = min(3, len(matrices))
        nrows = int(np.ceil(len(matrices) / ncols))
        fig = _figure(4.2 * ncols + 0.8, 3.8 * nrows)
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        image = None
        for ax, (name, R) in zip(axes, matrices.items(), strict=False):
            T = R.shape[0]
            shown = np.ma.masked_invalid(np.where(np.tril(np.ones_like(R, dtype=bool)), R, np.nan))
            image = ax.imshow(shown, vmin=0, vmax=100, cmap="viridis", aspect="equal")
            ax.set_title(name, fontsize="medium")
            ax.set_xlabel("Evaluated task")
            ax.set_ylabel("After training task")
            ticks = np.arange(T) if T <= 20 else np.arange(0, T, max(1, T // 10))
            ax.set_xticks(ticks)
            ax.set_yticks(ticks)
            if T <= 12:
                for i, j in zip(*np.nonzero(~np.ma.getmaskarray(shown)), strict=True):
                    ax.text(
                        j,
                        i,
                        f"{R[i, j]:.0f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if R[i, j] < 60 else "black",
                    )
        for ax in axes[len(matrices) :]:
            ax.set_axis_off()
        fig.colorbar(image, ax=list(axes[: len(matrices)]), label="Accuracy (%)", shrink=0.85)
        fig.suptitle(f"{dataset} {split}: accuracy matrix (mean over seeds)")
        files += _save(fig, out_dir, _slug("accuracy_matrix", dataset, split))
    return files


# --------------------------------------------------------------------------- hyperparameters
@_plain_text
def plot_hyperparameters(summary: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Heatmaps of mean Avg (percent) over each pair of swept hyperparameters.

    For every (dataset, split, label) and every pair of :data:`dmnsp.aggregate.HYPERPARAMETERS`
    that both take two or more values, one heatmap per value of the remaining swept ones. Returns
    ``[]`` (writes nothing) when no such grid exists.
    """
    from matplotlib.patches import Rectangle

    out_dir = Path(out_dir)
    if summary.empty or "avg_mean" not in summary:
        return []
    hps = [c for c in HYPERPARAMETERS if c in summary.columns]
    files: list[Path] = []
    placed = summary[summary["dataset"].notna() & summary["split"].notna() & summary["label"].notna()]
    for (dataset, split, label), group in placed.groupby(["dataset", "split", "label"], sort=True):
        varying = [c for c in hps if group[c].nunique() > 1]
        for x, y in itertools.combinations(varying, 2):
            rest = [c for c in varying if c not in (x, y)]
            slices = group.groupby(rest, sort=True) if rest else [((), group)]
            for rest_key, sub in slices:
                grid = sub.pivot_table(index=y, columns=x, values="avg_mean", aggfunc="mean")
                if grid.shape[0] < 2 or grid.shape[1] < 2:
                    continue
                rest_vals = rest_key if isinstance(rest_key, tuple) else (rest_key,)
                fixed = ", ".join(f"{c}={v:g}" for c, v in zip(rest, rest_vals, strict=True))
                fig = _figure(1.2 * grid.shape[1] + 3.0, 0.8 * grid.shape[0] + 2.2)
                ax = fig.add_subplot()
                data = grid.to_numpy(dtype=float)
                image = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", aspect="auto", origin="lower")
                ax.set_xticks(np.arange(grid.shape[1]), [f"{v:g}" for v in grid.columns])
                ax.set_yticks(np.arange(grid.shape[0]), [f"{v:g}" for v in grid.index])
                ax.set_xlabel(x)
                ax.set_ylabel(y)
                finite = data[np.isfinite(data)]
                middle = (finite.min() + finite.max()) / 2 if finite.size else 0
                for i, j in itertools.product(range(data.shape[0]), range(data.shape[1])):
                    if np.isfinite(data[i, j]):
                        ax.text(
                            j,
                            i,
                            f"{data[i, j]:.1f}",
                            ha="center",
                            va="center",
                            fontsize=8,
                            color="white" if data[i, j] < middle else "black",
                        )
                if finite.size:
                    bi, bj = np.unravel_index(np.nanargmax(data), data.shape)
                    ax.add_patch(Rectangle((bj - 0.5, bi - 0.5), 1, 1, fill=False, ec="red", lw=2.5))
                title = f"{label}: Avg (%) on {dataset} {split}, best boxed" + (
                    f"\n({fixed})" if fixed else ""
                )
                ax.set_title(title, fontsize="medium")
                fig.colorbar(image, ax=ax, label="Avg accuracy (%)")
                stem = _slug(
                    "hyperparameters",
                    dataset,
                    split,
                    label,
                    x,
                    y,
                    *(f"{c}{v:g}" for c, v in zip(rest, rest_vals, strict=True)),
                )
                files += _save(fig, out_dir, stem)
    return files


# --------------------------------------------------------------------------- diagnostics
def _lambda_run(runs: pd.DataFrame) -> pd.Series | None:
    """A representative dmnsp run with lambda matrices: the plain ``dmnsp`` label, lowest seed, complete first."""
    candidates = []
    for _, run in runs.iterrows():
        if run.get("method") != "dmnsp":
            continue
        if any(d.get("lambda") is not None for d in layout.read_diagnostics(run["run_dir"])):
            candidates.append(run)
    if not candidates:
        return None

    def rank(run: pd.Series) -> tuple:
        seed = run["seed"] if pd.notna(run["seed"]) else 1e9
        return (run["label"] != "dmnsp", not run["complete"], seed, str(run["run_dir"]))

    return min(candidates, key=rank)


def _plot_lambdas(run: pd.Series, out_dir: Path) -> list[Path]:
    diags = [d for d in layout.read_diagnostics(run["run_dir"]) if d.get("lambda") is not None]
    mats = [(int(d["task"]), np.asarray(d["lambda"], dtype=float)) for d in diags]
    finite = np.concatenate([m[np.isfinite(m)].ravel() for _, m in mats])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    ncols = min(5, len(mats))
    nrows = int(np.ceil(len(mats) / ncols))
    fig = _figure(2.6 * ncols + 1.0, 2.5 * nrows + 0.6)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    image = None
    for ax, (task, mat) in zip(axes, mats, strict=False):
        image = ax.imshow(mat, vmin=vmin, vmax=vmax, cmap="magma", aspect="equal")
        ax.set_title(f"task {task}", fontsize="small")
        ax.set_xlabel("basis layer k", fontsize="small")
        ax.set_ylabel("gradient layer j", fontsize="small")
        ax.tick_params(labelsize=6)
    for ax in axes[len(mats) :]:
        ax.set_axis_off()
    fig.colorbar(image, ax=list(axes[: len(mats)]), label="lambda[j][k]", shrink=0.85)
    seed = "" if pd.isna(run["seed"]) else f", seed {int(run['seed'])}"
    fig.suptitle(
        f"Dynamic coefficients lambda per task: {run['label']} on {run['dataset']} {run['split']}{seed}"
    )
    return _save(
        fig,
        out_dir,
        _slug(
            "lambda",
            run["dataset"],
            run["split"],
            run["label"],
            None if pd.isna(run["seed"]) else f"seed{int(run['seed'])}",
        ),
    )


def _set_scale(ax: Any, values: np.ndarray) -> None:
    """Log scale when positive values span more than two decades (symlog when zeros occur too)."""
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    if positive.size == 0 or positive.max() / positive.min() < 100:
        return
    if (finite <= 0).any():
        ax.set_yscale("symlog", linthresh=float(positive.min()))
    else:
        ax.set_yscale("log")


def _diagnostic_series(runs: pd.DataFrame) -> pd.DataFrame:
    records = []
    for _, run in runs.iterrows():
        for d in layout.read_diagnostics(run["run_dir"]):
            inf = d.get("inf_fraction_exp_avg_sq") or {}
            norms = d.get("update_norm") or {}
            records.append(
                {
                    "dataset": run["dataset"],
                    "split": run["split"],
                    "name": run["name"],
                    "run_dir": run["run_dir"],
                    "task": int(d["task"]),
                    "inf_visual": _num(inf.get("visual")),
                    "norm_visual": _num(norms.get("visual")),
                    "norm_text": _num(norms.get("text")),
                }
            )
    return pd.DataFrame.from_records(records)


def _num(value: Any) -> float:
    return np.nan if value is None else float(value)


@_plain_text
def plot_diagnostics(run_dirs: Sequence[str | Path], out_dir: str | Path) -> list[Path]:
    """Projection diagnostics (method.md section 6).

    - ``lambda_*``: the L x L lambda matrix of every task of one representative dmnsp run, as a
      grid of heatmaps on a shared colour scale.
    - ``diagnostics_{dataset}_{split}``: per task, the fraction of inf in the visual AdamW
      ``exp_avg_sq`` and the update norm of each tower (log scale when it spans decades), one line
      per method (mean over seeds).
    """
    out_dir = Path(out_dir)
    runs = _run_table(run_dirs)
    if runs.empty:
        return []
    files: list[Path] = []
    chosen = _lambda_run(runs)
    if chosen is not None:
        files += _plot_lambdas(chosen, out_dir)
    series = _diagnostic_series(runs)
    if series.empty:
        return files
    panels = (
        ("inf_visual", "inf fraction of visual exp_avg_sq"),
        ("norm_visual", "update norm, visual adapters"),
        ("norm_text", "update norm, text adapters"),
    )
    for (dataset, split), group in _cells(series):
        fig = _figure(13.5, 4.0)
        axes = fig.subplots(1, 3)
        for ax, (column, title) in zip(axes, panels, strict=True):
            styles: dict[str, int] = {}
            for name, sub in group.groupby("name", sort=True):
                color = method_color(str(name))
                style = styles.setdefault(color, 0)
                styles[color] += 1
                mean = sub.groupby("task")[column].mean()
                if mean.notna().any():
                    ax.plot(
                        mean.index,
                        mean.to_numpy(),
                        color=color,
                        ms=4,
                        ls=_LINESTYLES[style % len(_LINESTYLES)],
                        marker=_MARKERS[style % len(_MARKERS)],
                        label=name,
                    )
            ax.set_title(title, fontsize="medium")
            ax.set_xlabel("Task")
            ax.grid(alpha=0.3)
            if column.startswith("norm"):
                ax.set_ylabel("Update norm")
                _set_scale(ax, group[column].to_numpy(dtype=float))
            else:
                ax.set_ylabel("Fraction of elements")
                ax.set_ylim(-0.02, 1.02)
        handles, labels = axes[0].get_legend_handles_labels()
        if not handles:
            handles, labels = axes[1].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="outside right center", fontsize="small")
        fig.suptitle(f"{dataset} {split}: projection diagnostics per task (mean over seeds)")
        files += _save(fig, out_dir, _slug("diagnostics", dataset, split))
    return files

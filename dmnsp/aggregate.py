"""Collect run folders into tables: one row per run, a per-setting summary over seeds, paper-style tables.

Units: the metrics files of a run hold fractions; every table written here holds **percent**
(``avg``, ``last``, ``forgetting``, ``bwt``, the continuum variants and ``step_k`` are multiplied by
100). ``wall_seconds`` and ``peak_mem_mb`` keep their units.

Nothing is dropped: a run folder that is missing or did not finish every task stays a row of
``runs.csv`` (``status``: ``missing`` / ``incomplete``), counts in ``n_seeds`` but not in
``n_complete`` of the summary, and is flagged and listed under the paper-style tables.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dmnsp import layout, methods
from dmnsp.config import ConfigError, validate
from dmnsp.io import atomic_write_text
from dmnsp.metrics import CHANCE_MARGIN, CHANCE_STDERRS, COLLAPSE_SHARE, matrix_digest

__all__ = [
    "METRICS",
    "HYPERPARAMETERS",
    "REFERENCE_MODEL",
    "load_reference",
    "run_settings",
    "collect_runs",
    "setting_columns",
    "display_names",
    "summarize",
    "paper_table",
    "latex_escape",
    "hyperparameter_table",
    "write_tables",
    "write_tables_from",
    "HEALTH_MARKS",
    "health_warnings",
]

#: Accuracy-type metrics, stored as fractions per run and shown in percent in every table.
METRICS = ("avg", "last", "forgetting", "bwt", "forgetting_continuum", "bwt_continuum")
#: Resource use per run (seconds, MiB), summed / maximised over tasks.
RESOURCES = ("wall_seconds", "peak_mem_mb")
#: The DMNSP hyperparameters whose sweeps get their own table and heatmaps.
HYPERPARAMETERS = ("TOP_SELECT", "TOP_K_RATIO", "LAMBDA_SCALE")
#: Other training settings shown in the hyperparameter table when they vary.
_OTHER_HYPERPARAMETERS = ("lr", "epochs")
#: The backbone of every published number in ``reference_results.csv`` (method.md section 9).
REFERENCE_MODEL = "ViT-B-16"

_CONFIG_KEYS = (
    "model_name",
    "pretrained",
    "method",
    "evaluate_on",
    "TOP_SELECT",
    "TOP_K_RATIO",
    "LAMBDA_SCALE",
    "lr",
    "epochs",
)
_PROJECTION_KEYS = ("mode", "towers", "layers", "lambda", "basis", "energy_threshold", "eig", "order")
#: Settings read from every run (more come from ``run.json``'s ``settings``): grouping keys of the summary.
BASE_SETTINGS = (
    "experiment",
    "label",
    "dataset",
    "split",
    *_CONFIG_KEYS,
    *(f"projection.{k}" for k in _PROJECTION_KEYS),
)
_RUN_COLUMNS = ("seed", "status", "complete", "n_tasks", "n_tasks_done", "run_dir")
#: Health facts of each run (dmnsp.metrics.run_health): share of predictions in the most frequent
#: class (a fraction, pooled over steps), collapse to one class, accuracy at chance at every step, a
#: fingerprint of the accuracy matrix (equal fingerprints: identical results) and the run's flags.
HEALTH_RUN_COLUMNS = ("top_class_share", "collapsed", "at_chance", "matrix_digest", "health")
#: Health facts of each group of the summary (see :func:`summarize`).
HEALTH_SUMMARY_COLUMNS = (
    "n_collapsed",
    "n_at_chance",
    "identical_seeds",
    "identical_methods",
    "health",
    "flagged_runs",
)
#: Table markers of the health flags (``†`` marks missing seeds): runs collapsed to one class or at
#: chance; every method of the column gave the identical result; identical results for every seed.
HEALTH_MARKS = {"runs": "‡", "methods": "§", "seeds": "¶"}
#: The settings that make two groups comparable as "methods on the same problem" (identical-result check).
_PROBLEM_KEYS = ("experiment", "dataset", "split", "evaluate_on", "model_name", "pretrained")
_KNOWN_DATASETS = ("cifar100", "tinyimagenet", "fashion-mnist", "imagefolder")
#: Rows of published methods the harness does not run (none now: each reported method is
#: registered, and its registry order places it), by table order.
_REFERENCE_ORDER: dict[str, float] = {}
_DATASET_ORDER = {"cifar100": 0, "tinyimagenet": 1}
_STEP = re.compile(r"^step_(\d+)$")


# --------------------------------------------------------------------------- reference numbers
def load_reference() -> pd.DataFrame:
    """Published numbers (method.md section 9) as tidy data, in percent.

    Columns ``method, dataset, split, metric, value, source``; ``metric`` is ``avg``, ``last`` or
    ``step_k`` (accuracy after step ``k``, 1-based). Unknown numbers are absent rows. All were
    reported for a ViT-B/16 backbone (:data:`REFERENCE_MODEL`).
    """
    path = resources.files("dmnsp").joinpath("data/reference_results.csv")
    with path.open("r") as fh:
        ref = pd.read_csv(
            fh, dtype={"method": str, "dataset": str, "split": str, "metric": str, "source": str}
        )
    ref["value"] = ref["value"].astype(float)
    return ref


def _method_order(method: Any) -> int:
    """Row order of a method in the tables (the registry's; unknown methods last)."""
    try:
        return methods.get(str(method)).order
    except methods.UnknownMethodError:
        return 99


def _reference_value(ref: pd.DataFrame, method: str, dataset: str, split: str, metric: str) -> float | None:
    hit = ref[
        (ref.method == method) & (ref.dataset == dataset) & (ref.split == split) & (ref.metric == metric)
    ]
    return float(hit.value.iloc[0]) if len(hit) else None


# --------------------------------------------------------------------------- settings of one run
def _resolved(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with every default filled in, or as it is when it no longer validates (an old run)."""
    try:
        return validate(config)
    except ConfigError:
        return dict(config)


def _label(resolved: Mapping[str, Any]) -> str:
    """:func:`dmnsp.methods.run_label` of a run without ``run.json``."""
    try:
        return methods.run_label(resolved)
    except (KeyError, methods.UnknownMethodError):
        return str(resolved.get("method") or "unknown")


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _scalar(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True)
    return value


def run_settings(config: Mapping[str, Any], run_json: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The settings that identify a run's group (everything the summary groups by), seed excluded.

    ``label`` and ``experiment`` come from ``run.json`` when given, else the label is
    :func:`dmnsp.methods.run_label`. The split is ``"{initial_increment}-{increment}"``. Keys swept in
    ``run.json``'s ``settings`` that are not already columns become extra columns (values from the
    resolved config when it has them).
    """
    run_json = run_json or {}
    flat_config = _flatten(config)
    resolved = _resolved(config)
    out: dict[str, Any] = dict.fromkeys(BASE_SETTINGS)
    out["experiment"] = run_json.get("experiment")
    out["label"] = run_json.get("label") or _label(resolved)
    out["dataset"] = config.get("dataset")
    if config.get("initial_increment") is not None and config.get("increment") is not None:
        out["split"] = f"{int(config['initial_increment'])}-{int(config['increment'])}"
    for key in _CONFIG_KEYS:
        out[key] = _scalar(config.get(key))
    for key, value in (resolved.get("projection") or {}).items():
        out[f"projection.{key}"] = _scalar(value)
    covered = set(out) | {"seed", "initial_increment", "increment", "projection"}
    for key, value in _flatten(run_json.get("settings") or {}).items():
        if key in covered:
            continue
        out[key] = _scalar(flat_config.get(key, value))
    return out


def _settings_from_path(path: Path) -> dict[str, Any]:
    """Best guess for a run folder that does not exist: dataset/method/seed from path parts."""
    out: dict[str, Any] = dict.fromkeys(BASE_SETTINGS)
    seed = None
    for raw in path.parts:
        part = raw.split("~", 1)[-1] if "~" in raw else raw  # workflow folders read key~value
        if part in _KNOWN_DATASETS:
            out["dataset"] = part
        if part in methods.names():
            out["method"] = out["label"] = part
        match = re.fullmatch(r"seed[_=~-]?(\d+)", raw)
        if match:
            seed = int(match.group(1))
    out["seed"] = seed
    return out


# --------------------------------------------------------------------------- runs table
def _isnan(value: Any) -> bool:
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def _pct(value: float | None) -> float:
    return np.nan if value is None else 100.0 * float(value)


def collect_runs(run_dirs: Iterable[str | Path]) -> pd.DataFrame:
    """One row per run folder: settings, ``seed``, status, metrics (percent) and per-step accuracy.

    Columns: the settings (:data:`BASE_SETTINGS` plus swept keys from ``run.json``), ``seed``,
    ``status`` (``complete`` / ``incomplete`` / ``missing``), ``complete``, ``n_tasks``,
    ``n_tasks_done``, ``run_dir``, the :data:`METRICS` in percent (an incomplete run's are over the
    tasks done so far), ``wall_seconds``, ``peak_mem_mb``, the :data:`HEALTH_RUN_COLUMNS` and
    ``step_1 .. step_T`` (accuracy on seen classes after each step, percent). Missing folders stay
    as rows with NaN metrics. A damaged ``run.json``, ``config.yaml`` or task record is a
    :class:`~dmnsp.config.ConfigError` naming the file (the tables are not written with a run left out).
    """
    records = []
    for run_dir in run_dirs:
        path = Path(run_dir)
        if not layout.has_results(path):
            record = _settings_from_path(path)
            record.update(status="missing", complete=False, n_tasks=np.nan, n_tasks_done=0, run_dir=str(path))
            record.update(dict.fromkeys((*METRICS, *RESOURCES), np.nan))
            record.update(dict.fromkeys(HEALTH_RUN_COLUMNS), health="")
            records.append(record)
            continue
        config = layout.read_run_config(path)
        record = run_settings(config, layout.read_run_info(path))
        record["seed"] = config.get("seed")
        metrics = layout.run_metrics(path)
        record.update(
            status="complete" if metrics["complete"] else "incomplete",
            complete=bool(metrics["complete"]),
            n_tasks=np.nan if metrics["n_tasks"] is None else metrics["n_tasks"],
            n_tasks_done=metrics["n_tasks_done"],
            run_dir=str(path),
        )
        record.update({name: _pct(metrics[name]) for name in METRICS})
        record.update({name: np.nan if metrics[name] is None else metrics[name] for name in RESOURCES})
        health = metrics["health"]
        record.update(
            top_class_share=np.nan if health["top_class_share"] is None else health["top_class_share"],
            collapsed=health["collapsed"],
            at_chance=health["at_chance"],
            matrix_digest=matrix_digest(metrics["accuracy_matrix"]),
            health="; ".join(health["flags"]),
        )
        for step, acc in enumerate(metrics["accuracy_per_step"], start=1):
            record[f"step_{step}"] = _pct(acc)
        records.append(record)
    df = pd.DataFrame.from_records(records)
    for col in df.columns:  # integer settings stay integers next to a missing run's NaN
        values = [v for v in (r.get(col) for r in records) if v is not None and not _isnan(v)]
        if values and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            df[col] = df[col].astype("Int64")
    if df.empty:
        return pd.DataFrame(
            columns=[*BASE_SETTINGS, *_RUN_COLUMNS, *METRICS, *RESOURCES, *HEALTH_RUN_COLUMNS]
        )
    fixed = {*_RUN_COLUMNS, *METRICS, *RESOURCES, *HEALTH_RUN_COLUMNS}
    settings = [c for c in df.columns if c not in fixed and not _STEP.match(c)]
    steps = sorted((c for c in df.columns if _STEP.match(c)), key=lambda c: int(_STEP.match(c).group(1)))
    df = df[[*settings, *_RUN_COLUMNS, *METRICS, *RESOURCES, *HEALTH_RUN_COLUMNS, *steps]]
    df["complete"] = df["complete"].astype(bool)
    return df


def setting_columns(df: pd.DataFrame) -> list[str]:
    """The grouping columns of a runs or summary table: everything that is not a seed, status, metric or statistic."""
    skip = (
        set(_RUN_COLUMNS)
        | set(METRICS)
        | set(RESOURCES)
        | set(HEALTH_RUN_COLUMNS)
        | set(HEALTH_SUMMARY_COLUMNS)
        | {"n_seeds", "n_complete", "seeds", "not_complete"}
    )
    out = []
    for col in df.columns:
        if col in skip or _STEP.match(col) or col.endswith(("_mean", "_std")):
            continue
        out.append(col)
    return out


def _fmt_value(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "none"
    if isinstance(value, (float, np.floating)):
        return f"{value:g}"
    return str(value)


def display_names(df: pd.DataFrame) -> pd.Series:
    """Row names for tables and plot legends: the label, plus any setting that tells apart groups sharing it.

    Within one label and one (dataset, split), settings that take several values (a swept
    hyperparameter, another experiment) are appended as ``[KEY=value, ...]``; the seed never is.
    """
    names = pd.Series("?", index=df.index, dtype=object)
    if df.empty:
        return names
    settings = [c for c in setting_columns(df) if c not in ("label", "dataset", "split")]
    labels = df["label"].astype(object).where(df["label"].notna(), "?")
    for label in pd.unique(labels):
        sub = df[labels == label]
        varying = []
        for col in settings:
            per_cell = sub.groupby(["dataset", "split"], dropna=False)[col].nunique(dropna=False)
            if (per_cell > 1).any():
                varying.append(col)
        for idx, row in sub.iterrows():
            suffix = ", ".join(f"{col}={_fmt_value(row[col])}" for col in varying)
            names[idx] = f"{label} [{suffix}]" if suffix else str(label)
    return names


# --------------------------------------------------------------------------- summary over seeds
def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Group runs by every setting except the seed; statistics over the **complete** runs.

    Columns: the settings, ``n_seeds`` (runs in the group, incomplete and missing ones included),
    ``n_complete``, ``seeds`` (e.g. ``"0,1,2"``), ``{metric}_mean`` and ``{metric}_std`` (sample
    std, ddof=1; NaN for a single complete seed) for the :data:`METRICS` (percent) and resources,
    ``not_complete`` (the run folders of the group that are incomplete or missing), and the health
    facts: ``n_collapsed`` and ``n_at_chance`` (runs whose predictions collapsed to one class, or
    at chance at every step), ``identical_seeds`` (a method that trains gave the identical accuracy
    matrix for every complete seed), ``identical_methods`` (every method on the same problem gave
    the identical result, :func:`identical_problems`), ``health`` (the flags in words, each led by
    its :data:`HEALTH_MARKS` marker) and ``flagged_runs``.
    """
    keys = setting_columns(df)
    stats = [*METRICS, *RESOURCES]
    columns = [
        *keys,
        "n_seeds",
        "n_complete",
        "seeds",
        *(f"{m}_{s}" for m in stats for s in ("mean", "std")),
        "not_complete",
        *HEALTH_SUMMARY_COLUMNS,
    ]
    if df.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for group_key, group in df.groupby(keys, dropna=False, sort=False):
        row = dict(zip(keys, group_key if isinstance(group_key, tuple) else (group_key,), strict=True))
        done = group[group["complete"]]
        seeds = sorted(int(s) for s in group["seed"] if s is not None and not pd.isna(s))
        row.update(n_seeds=len(group), n_complete=len(done), seeds=",".join(map(str, seeds)))
        for metric in stats:
            values = done[metric].astype(float).dropna()
            row[f"{metric}_mean"] = float(values.mean()) if len(values) else np.nan
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else np.nan
        row["not_complete"] = "; ".join(
            f"{r.run_dir} ({r.status}, {int(r.n_tasks_done)}/{_fmt_tasks(r.n_tasks)} tasks)"
            for r in group.itertuples()
            if not r.complete
        )
        row.update(_group_health(group, done))
        rows.append(row)
    out = pd.DataFrame(rows, columns=columns)
    for key in keys:  # groupby turns None into NaN; keep the original dtype where it can
        if out[key].isna().all():
            out[key] = out[key].astype(object)
    identical = identical_problems(df)
    out["identical_methods"] = [_problem_key(row) in identical for _, row in out.iterrows()]
    out["health"] = [_health_text(row) for _, row in out.iterrows()]
    return out


# --------------------------------------------------------------------------- health flags
def _flagged(group: pd.DataFrame, column: str) -> pd.Series:
    if column not in group:
        return pd.Series(False, index=group.index)
    return group[column].map(lambda v: v is True or v is np.True_)


def _method_trains(method: Any) -> bool:
    try:
        return bool(methods.get(str(method)).trains)
    except methods.UnknownMethodError:
        return True


def _group_health(group: pd.DataFrame, done: pd.DataFrame) -> dict[str, Any]:
    """Health columns of one summary group (its runs, and the complete ones among them)."""
    collapsed, at_chance = _flagged(group, "collapsed"), _flagged(group, "at_chance")
    digests = done["matrix_digest"].dropna() if "matrix_digest" in done else pd.Series(dtype=object)
    method = group["method"].iloc[0] if "method" in group else None
    flagged = group[collapsed | at_chance]
    return {
        "n_collapsed": int(collapsed.sum()),
        "n_at_chance": int(at_chance.sum()),
        # A method that never trains (zeroshot) may well give the same matrix for every seed.
        "identical_seeds": bool(_method_trains(method) and len(digests) >= 2 and digests.nunique() == 1),
        "flagged_runs": "; ".join(f"{r.run_dir} ({r.health})" for r in flagged.itertuples()),
    }


def _problem_key(row: Mapping[str, Any]) -> tuple[str, ...]:
    """What makes groups comparable as methods on one problem (:data:`_PROBLEM_KEYS`), as text."""
    return tuple(_fmt_value(row.get(key)) for key in _PROBLEM_KEYS)


def identical_problems(runs: pd.DataFrame) -> dict[tuple[str, ...], list[int]]:
    """Problems (same experiment, dataset, split, evaluation set and backbone) on which **every**
    method gave the identical accuracy matrix, mapped to the seeds compared.

    Complete runs are compared seed by seed (equal :func:`dmnsp.metrics.matrix_digest`). A problem
    is flagged when two or more methods ran on it, every method takes part in the comparison of
    some seed, and for every seed all its runs (every method, every grid point) are identical.
    """
    if runs.empty or "matrix_digest" not in runs or "method" not in runs:
        return {}
    done = runs[runs["complete"].astype(bool) & runs["matrix_digest"].notna()]
    problems: dict[tuple[str, ...], list[int]] = {}
    by_problem: dict[tuple[str, ...], list[Any]] = {}
    for idx, row in done.iterrows():
        by_problem.setdefault(_problem_key(row), []).append(idx)
    for key, index in by_problem.items():
        problem = done.loc[index]
        if problem["method"].nunique() < 2:
            continue
        compared, methods_compared, identical = [], set(), True
        for seed, runs_of_seed in problem.groupby(problem["seed"].map(_fmt_value), sort=True):
            if len(runs_of_seed) < 2:
                continue
            compared.append(seed)
            methods_compared |= set(runs_of_seed["method"])
            identical &= runs_of_seed["matrix_digest"].nunique() == 1
        if compared and identical and methods_compared == set(problem["method"]):
            problems[key] = [int(s) if s.isdigit() else s for s in compared]
    return problems


def _health_text(row: Mapping[str, Any]) -> str:
    """A summary row's health flags in words, each led by its marker (empty when healthy)."""
    parts = []
    n = int(row.get("n_seeds") or 0)
    runs = []
    if row.get("n_collapsed"):
        runs.append(f"predictions collapsed to one class in {int(row['n_collapsed'])}/{n} runs")
    if row.get("n_at_chance"):
        runs.append(f"at chance at every step in {int(row['n_at_chance'])}/{n} runs")
    if runs:
        parts.append(f"{HEALTH_MARKS['runs']} " + ", ".join(runs))
    if row.get("identical_methods") is True:
        parts.append(f"{HEALTH_MARKS['methods']} every method gave the identical result")
    if row.get("identical_seeds") is True:
        parts.append(f"{HEALTH_MARKS['seeds']} identical result for every seed")
    return "; ".join(parts)


def _health_marks(row: Mapping[str, Any]) -> str:
    marks = ""
    if row.get("n_collapsed") or row.get("n_at_chance"):
        marks += HEALTH_MARKS["runs"]
    if row.get("identical_methods") is True:
        marks += HEALTH_MARKS["methods"]
    if row.get("identical_seeds") is True:
        marks += HEALTH_MARKS["seeds"]
    return marks


_HEALTH_FIX = (
    "check the pretrained backbone (results/pretrained/*/model.json: zero_shot_accuracy, healthy) "
    "and the runs' metrics.json 'health'"
)


def health_warnings(summary: pd.DataFrame) -> list[str]:
    """One line per health problem of a summary: every method identical on a problem, runs
    collapsed to one class or at chance, results identical over seeds. Empty when all is well."""
    if summary.empty or "health" not in summary:
        return []
    names = display_names(summary)
    lines, seen = [], set()
    for idx, row in summary.iterrows():
        where = ", ".join(
            _fmt_value(row.get(k)) for k in ("experiment", "dataset", "split") if pd.notna(row.get(k))
        )
        key = _problem_key(row)
        if row.get("identical_methods") is True and key not in seen:
            seen.add(key)
            same = summary[[_problem_key(r) == key for _, r in summary.iterrows()]]
            lines.append(
                f"{where}: every method ({', '.join(names[same.index])}) gave the identical accuracy "
                f"matrix: the table says nothing about the methods; {_HEALTH_FIX}"
            )
        if row.get("n_collapsed") or row.get("n_at_chance"):
            text = _health_text({**row, "identical_methods": False, "identical_seeds": False})
            lines.append(f"{where}, {names[idx]}: {text[2:]}: {row['flagged_runs']}")
        if row.get("identical_seeds") is True:
            lines.append(
                f"{where}, {names[idx]}: identical accuracy matrix for seeds {row['seeds']}: "
                "the seed changed nothing"
            )
    return lines


def _fmt_tasks(n: Any) -> str:
    return "?" if n is None or pd.isna(n) else str(int(n))


# --------------------------------------------------------------------------- paper-style table
def _split_key(split: Any) -> tuple:
    try:
        initial, increment = (int(x) for x in str(split).split("-"))
        return (0, -initial, -increment, "")
    except ValueError:
        return (1, 0, 0, str(split))


def _columns(summary: pd.DataFrame) -> list[tuple[str, str]]:
    cells = {
        (d, s)
        for d, s in zip(summary["dataset"], summary["split"], strict=True)
        if pd.notna(d) and pd.notna(s)
    }
    return sorted(cells, key=lambda c: (_DATASET_ORDER.get(c[0], 9), c[0], _split_key(c[1])))


_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "Δ": r"$\Delta$",
    "−": "-",
    "±": r"$\pm$",
    "†": r"\textsuperscript{\dag}",
    "‡": r"\textsuperscript{\ddag}",
    "§": r"\textsuperscript{\S}",
    "¶": r"\textsuperscript{\P}",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX specials (``_ & % $ # { } ~ ^ \\``) and map ``Δ ± † −`` to LaTeX."""
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in str(text))


def _cell(mean: float, std: float, n: int, *, bold: bool, flag: bool, style: str) -> str:
    if n == 0 or pd.isna(mean):
        text = "—" if style == "md" else "--"
    elif n == 1 or pd.isna(std):
        text = f"{mean:.2f} (n=1)"
    else:
        text = f"{mean:.2f} ± {std:.2f}" if style == "md" else f"{mean:.2f} $\\pm$ {std:.2f}"
    if bold and text not in ("—", "--"):
        text = f"**{text}**" if style == "md" else f"\\textbf{{{text}}}"
    if flag:
        text += "†" if style == "md" else r"\textsuperscript{\dag}"
    return text


def paper_table(
    summary: pd.DataFrame,
    reference: pd.DataFrame | None = None,
    expected_seeds: int | None = None,
    style: str = "md",
) -> tuple[pd.DataFrame, list[str]]:
    """The paper-style table as strings: rows = methods (ours, then reported, then Δ), columns = dataset × split × (Avg, Last, n).

    Our cells are ``mean ± std`` over complete seeds (percent, 2 decimals; ``(n=1)`` for one seed);
    the best mean per column among our rows is bold (ties included; only when two or more
    candidates do not all tie). Cells whose group has fewer complete seeds than ``expected_seeds``
    (or than runs in the group) get ``†``; health flags get ``‡``, ``§``, ``¶``
    (:data:`HEALTH_MARKS`), each explained in a footnote. Reported rows hold the published numbers of the columns shown; Δ rows
    give ours − reported where both exist and our backbone is :data:`REFERENCE_MODEL`.

    Args:
        summary: the output of :func:`summarize` (runs evaluated on ``val`` are left out when test
            runs exist).
        reference: :func:`load_reference` (loaded when None).
        expected_seeds: number of seeds each cell should have.
        style: ``"md"`` (``**bold**``, ``±``) or ``"tex"`` (escaped, ``\\textbf``, ``$\\pm$``); the
            tex variant has a (block, method) row index.

    Returns:
        ``(table, footnotes)``.
    """
    if style not in ("md", "tex"):
        raise ValueError(f"style must be 'md' or 'tex', got {style!r}")
    reference = load_reference() if reference is None else reference
    summary = summary.copy()
    if "evaluate_on" in summary and (summary["evaluate_on"] == "test").any():
        summary = summary[summary["evaluate_on"].isna() | (summary["evaluate_on"] == "test")]
    summary["_name"] = display_names(summary)
    columns = _columns(summary)
    esc = latex_escape if style == "tex" else str

    placed = summary[summary["dataset"].notna() & summary["split"].notna()]
    method_rank = {name: _method_order(m) for name, m in zip(placed["_name"], placed["method"], strict=True)}
    names = sorted(pd.unique(placed["_name"]), key=lambda n: (method_rank.get(n, 9), n))
    by_cell = {(r["_name"], r["dataset"], r["split"]): r for _, r in placed.iterrows()}
    ref_methods = sorted(
        set(reference["method"]), key=lambda m: (_REFERENCE_ORDER.get(m) or _method_order(m), m)
    )

    ours, any_flag = _our_rows(names, columns, by_cell, expected_seeds, style)
    rows = [("ours", esc(name), cells) for name, cells in ours]
    rows += [
        ("reported", esc(f"{m} (reported)"), cells)
        for m, cells in _reported_rows(reference, ref_methods, columns)
    ]
    for name, cells in _delta_rows(names, columns, by_cell, reference, ref_methods, style):
        rows.append(("Δ ours − reported", esc(f"Δ {name}") if style == "md" else esc(name), cells))
    notes = _table_notes(rows, any_flag, expected_seeds, summary)
    if not rows:
        return pd.DataFrame(), notes
    header = [(esc(f"{d} {s}"), sub) for d, s in columns for sub in ("Avg", "Last", "n")]
    return _assemble(rows, header, style), notes


def _best_means(names: list[str], columns: list[tuple[str, str]], by_cell: dict) -> dict:
    """Per (dataset, split, metric): the best of our means (2 decimals), when two or more compete."""
    best: dict[tuple[str, str, str], float] = {}
    for d, s in columns:
        for metric in ("avg", "last"):
            values = [
                round(by_cell[(n, d, s)][f"{metric}_mean"], 2)
                for n in names
                if (n, d, s) in by_cell and pd.notna(by_cell[(n, d, s)][f"{metric}_mean"])
            ]
            if len(set(values)) >= 2:  # all equal: nothing is best (and every method identical is flagged)
                best[(d, s, metric)] = max(values)
    return best


def _our_rows(
    names: list[str], columns: list[tuple[str, str]], by_cell: dict, expected_seeds: int | None, style: str
) -> tuple[list[tuple[str, list[str]]], bool]:
    """Our rows' cells (Avg, Last, n per column) and whether any cell is flagged."""
    best = _best_means(names, columns, by_cell)
    dagger = "†" if style == "md" else r"\textsuperscript{\dag}"
    rows, any_flag = [], False
    for name in names:
        cells = []
        for d, s in columns:
            r = by_cell.get((name, d, s))
            if r is None:
                cells += ["", "", ""]
                continue
            n_complete, n_seeds = int(r["n_complete"]), int(r["n_seeds"])
            flag = n_complete < max(n_seeds, expected_seeds or 0)
            any_flag |= flag
            marks = _health_marks(r)
            marks = latex_escape(marks) if style == "tex" else marks
            for metric in ("avg", "last"):
                mean = r[f"{metric}_mean"]
                bold = pd.notna(mean) and best.get((d, s, metric)) == round(mean, 2)
                cell = _cell(mean, r[f"{metric}_std"], n_complete, bold=bold, flag=flag, style=style)
                cells.append(cell + marks)
            n_text = str(n_complete) if n_complete == n_seeds else f"{n_complete}/{n_seeds}"
            cells.append(n_text + (dagger if flag else ""))
        rows.append((name, cells))
    return rows, any_flag


def _reported_rows(
    reference: pd.DataFrame, ref_methods: list[str], columns: list[tuple[str, str]]
) -> list[tuple[str, list[str]]]:
    """Published numbers of the columns shown, one row per method that has any."""
    rows = []
    for method in ref_methods:
        cells, found = [], False
        for d, s in columns:
            for metric in ("avg", "last"):
                value = _reference_value(reference, method, d, s, metric)
                found |= value is not None
                cells.append("" if value is None else f"{value:.2f}")
            cells.append("")
        if found:
            rows.append((method, cells))
    return rows


def _delta_rows(
    names: list[str],
    columns: list[tuple[str, str]],
    by_cell: dict,
    reference: pd.DataFrame,
    ref_methods: list[str],
    style: str,
) -> list[tuple[str, list[str]]]:
    """Ours − reported, where both exist and our backbone is the reference's."""
    rows = []
    for name in names:
        cells, found = [], False
        for d, s in columns:
            r = by_cell.get((name, d, s))
            for metric in ("avg", "last"):
                text = ""
                if r is not None and str(r["label"]) in ref_methods and r["model_name"] == REFERENCE_MODEL:
                    value = _reference_value(reference, str(r["label"]), d, s, metric)
                    mean = r[f"{metric}_mean"]
                    if value is not None and pd.notna(mean):
                        text = f"{mean - value:+.2f}" if style == "md" else f"${mean - value:+.2f}$"
                        found = True
                cells.append(text)
            cells.append("")
        if found:
            rows.append((name, cells))
    return rows


def _table_notes(rows: list, any_flag: bool, expected_seeds: int | None, summary: pd.DataFrame) -> list[str]:
    notes = [
        "Accuracy in %: mean ± std over seeds (sample std, ddof=1), '(n=1)' where one seed gives no std; "
        "bold = best reproduced value per column; n = complete seeds (complete/total when runs are missing or incomplete).",
    ]
    if any(block == "reported" for block, _, _ in rows):
        notes.append(
            f"Reported: published numbers ({REFERENCE_MODEL}) from dmnsp/data/reference_results.csv; "
            f"Δ = ours − reported, only for runs with the same backbone ({REFERENCE_MODEL})."
        )
    if any_flag:
        expected = f" (expected {expected_seeds})" if expected_seeds else ""
        notes.append(
            f"† fewer complete seeds than runs or than expected{expected}; means use complete runs only."
        )
    unfinished = [text for text in summary["not_complete"] if isinstance(text, str) and text]
    if unfinished:
        notes.append("Incomplete or missing runs: " + "; ".join(unfinished) + ".")
    return notes + _health_notes(summary)


def _health_notes(summary: pd.DataFrame) -> list[str]:
    """Footnotes of the health markers used in the table (:data:`HEALTH_MARKS`)."""
    if "health" not in summary:
        return []
    notes = []
    flagged = [text for text in summary.get("flagged_runs", []) if isinstance(text, str) and text]
    if flagged:
        notes.append(
            f"{HEALTH_MARKS['runs']} WARNING, not a result: runs whose test predictions collapsed to one class "
            f"(at least {COLLAPSE_SHARE:.0%} of a step's predictions in one class) or whose accuracy was at "
            f"chance at every step (not above 1/seen classes + max({CHANCE_MARGIN:g}, {CHANCE_STDERRS:g} "
            "binomial standard errors)): " + "; ".join(flagged) + "."
        )
    if (summary["identical_methods"] == True).any():  # noqa: E712 (object column)
        notes.append(
            f"{HEALTH_MARKS['methods']} WARNING, not a result: every method gave the identical accuracy matrix "
            "on this dataset and split (same backbone, seed by seed), so these numbers say nothing about the "
            f"methods; {_HEALTH_FIX}."
        )
    if (summary["identical_seeds"] == True).any():  # noqa: E712
        notes.append(
            f"{HEALTH_MARKS['seeds']} the accuracy matrix is identical for every seed of a method that trains: "
            "the seed changed nothing (± 0.00 is not a measured spread)."
        )
    return notes


def _assemble(
    rows: list[tuple[str, str, list[str]]], header: list[tuple[str, str]], style: str
) -> pd.DataFrame:
    if style == "tex":
        blocks = {"ours": "ours", "reported": "reported", "Δ ours − reported": r"$\Delta$ ours$-$reported"}
        index = pd.MultiIndex.from_tuples([(blocks[b], n) for b, n, _ in rows])
        col_index = pd.MultiIndex.from_tuples(header)
    else:
        index = pd.Index([n for _, n, _ in rows], name="method")
        col_index = pd.Index([f"{c} {s}" for c, s in header])
    return pd.DataFrame([cells for _, _, cells in rows], index=index, columns=col_index)


def _summary_markdown(summary: pd.DataFrame, reference: pd.DataFrame, expected_seeds: int | None) -> str:
    table, notes = paper_table(summary, reference, expected_seeds, style="md")
    lines = ["# Results (accuracy, %)", ""]
    warnings = health_warnings(summary)
    if warnings:
        lines += [f"> **WARNING:** {line}  " for line in warnings] + [""]
    if table.empty:
        lines.append("No run has results yet.")
    else:
        lines.append(table.to_markdown(colalign=["left"] + ["right"] * table.shape[1]))
    lines.append("")
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _summary_html(summary: pd.DataFrame, reference: pd.DataFrame, expected_seeds: int | None) -> str:
    """The markdown summary's table, warnings and notes as one HTML page (the report shows HTML inline)."""
    table, notes = paper_table(summary, reference, expected_seeds, style="md")
    body = ["<h1>Results (accuracy, %)</h1>"]
    body += [
        f'<p style="color:#b00000;font-weight:bold">WARNING: {html.escape(line)}</p>'
        for line in health_warnings(summary)
    ]
    cells = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", table.to_html(border=1))  # markdown bold
    body.append("<p>No run has results yet.</p>" if table.empty else cells)
    body.append("<ul>" + "".join(f"<li>{html.escape(note)}</li>" for note in notes) + "</ul>")
    head = '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Results</title></head><body>'
    return head + "\n".join(body) + "</body></html>\n"


def _summary_latex(summary: pd.DataFrame, reference: pd.DataFrame, expected_seeds: int | None) -> str:
    table, notes = paper_table(summary, reference, expected_seeds, style="tex")
    if table.empty:
        return "\n".join(["% No run has results yet."] + [f"% {latex_escape(note)}" for note in notes]) + "\n"
    tex = table.style.to_latex(
        hrules=True,
        column_format="ll" + "r" * table.shape[1],
        multicol_align="c",
        multirow_align="naive",
        clines="skip-last;data",
        environment="table",
        position_float="centering",
        caption="Class-incremental accuracy (\\%), mean $\\pm$ std over seeds; reported numbers beside ours.",
        label="tab:dmnsp-summary",
    )
    # Booktabs rules between the row blocks instead of \cline, none right before \bottomrule.
    lines = [r"\midrule" if line.startswith(r"\cline") else line for line in tex.splitlines()]
    lines = [
        line
        for i, line in enumerate(lines)
        if not (line == r"\midrule" and i + 1 < len(lines) and lines[i + 1] == r"\bottomrule")
    ]
    notes_tex = [r"\par\smallskip\footnotesize"] + [latex_escape(note) + r"\\" for note in notes]
    end = lines.index(r"\end{table}")
    lines[end:end] = notes_tex
    header = ["% Requires \\usepackage{booktabs}. Generated by dmnsp.aggregate.write_tables."]
    return "\n".join(header + lines) + "\n"


# --------------------------------------------------------------------------- hyperparameter table
def hyperparameter_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Avg/Last (percent) per hyperparameter setting, for each (dataset, split, label) where one varies.

    Rows only for groups where at least one of :data:`HYPERPARAMETERS` (or ``lr``/``epochs``)
    takes several values. ``best`` marks the setting with the highest mean Avg (ties: higher Last)
    within its (dataset, split, label).
    """
    hps = [c for c in (*HYPERPARAMETERS, *_OTHER_HYPERPARAMETERS) if c in summary.columns]
    ids = ["dataset", "split", "label"] + (["evaluate_on"] if "evaluate_on" in summary.columns else [])
    stats = ["avg_mean", "avg_std", "last_mean", "last_std", "n_seeds", "n_complete"]
    stats += ["health"] if "health" in summary.columns else []
    parts = []
    if not summary.empty:
        for _, group in summary.groupby(ids, dropna=False, sort=True):
            if not any(group[c].nunique(dropna=False) > 1 for c in hps):
                continue
            part = group[ids + hps + stats].copy()
            ranked = part.sort_values(["avg_mean", "last_mean"], ascending=False, na_position="last")
            part["best"] = False
            if ranked["avg_mean"].notna().any():
                part.loc[ranked.index[0], "best"] = True
            parts.append(part.sort_values(hps))
    if not parts:
        return pd.DataFrame(columns=ids + list(HYPERPARAMETERS) + stats + ["best"])
    table = pd.concat(parts, ignore_index=True)
    keep = [c for c in _OTHER_HYPERPARAMETERS if c in table and table[c].nunique(dropna=False) > 1]
    return table[ids + list(HYPERPARAMETERS) + keep + stats + ["best"]]


def _hyperparameter_markdown(table: pd.DataFrame) -> str:
    lines = ["# Hyperparameters (accuracy, %)", ""]
    if table.empty:
        lines.append(
            "No hyperparameter sweep: every (dataset, split, method) has a single "
            "(TOP_SELECT, TOP_K_RATIO, LAMBDA_SCALE) setting."
        )
        return "\n".join(lines) + "\n"
    shown = table.copy()
    for metric in ("avg", "last"):
        shown[metric.capitalize()] = [
            _cell(m, s, int(n), bold=bool(b), flag=False, style="md")
            for m, s, n, b in zip(
                shown[f"{metric}_mean"],
                shown[f"{metric}_std"],
                shown["n_complete"],
                shown["best"],
                strict=True,
            )
        ]
    shown["n"] = [
        f"{int(c)}" if int(c) == int(s) else f"{int(c)}/{int(s)}"
        for c, s in zip(shown["n_complete"], shown["n_seeds"], strict=True)
    ]
    shown["best"] = np.where(shown["best"], "✓", "")
    drop = ["avg_mean", "avg_std", "last_mean", "last_std", "n_seeds", "n_complete"]
    shown = shown.drop(columns=drop)
    for col in shown.columns:
        shown[col] = [_fmt_value(v) if not isinstance(v, str) else v for v in shown[col]]
    lines.append(shown.to_markdown(index=False))
    lines += [
        "",
        "- Best (✓, bold): highest mean Avg within its dataset, split and method (ties: higher Last).",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- writing
def write_tables_from(
    runs: pd.DataFrame, out_dir: str | Path, expected_seeds: int | None, reference: pd.DataFrame
) -> tuple[dict[str, Path], pd.DataFrame]:
    """:func:`write_tables` from a :func:`collect_runs` table; also returns the summary."""
    out_dir = Path(out_dir)
    summary = summarize(runs)
    hyper = hyperparameter_table(summary)
    written = {
        "runs.csv": atomic_write_text(out_dir / "runs.csv", runs.to_csv(index=False)),
        "summary.csv": atomic_write_text(out_dir / "summary.csv", summary.to_csv(index=False)),
        "summary.md": atomic_write_text(
            out_dir / "summary.md", _summary_markdown(summary, reference, expected_seeds)
        ),
        "summary.tex": atomic_write_text(
            out_dir / "summary.tex", _summary_latex(summary, reference, expected_seeds)
        ),
        "summary.html": atomic_write_text(
            out_dir / "summary.html", _summary_html(summary, reference, expected_seeds)
        ),
        "hyperparameters.csv": atomic_write_text(out_dir / "hyperparameters.csv", hyper.to_csv(index=False)),
        "hyperparameters.md": atomic_write_text(
            out_dir / "hyperparameters.md", _hyperparameter_markdown(hyper)
        ),
    }
    return written, summary


def write_tables(
    run_dirs: Sequence[str | Path], out_dir: str | Path, expected_seeds: int | None = None
) -> dict[str, Path]:
    """Write ``runs.csv``, ``summary.csv``, ``summary.md``, ``summary.tex``, ``summary.html``, ``hyperparameters.csv`` and ``hyperparameters.md``.

    Args:
        run_dirs: run folders (missing ones stay visible as ``status: missing``).
        out_dir: folder for the tables (created).
        expected_seeds: seeds every cell should have; cells with fewer complete seeds get ``†``.

    Returns:
        File name -> path of every table written.
    """
    written, _ = write_tables_from(collect_runs(run_dirs), Path(out_dir), expected_seeds, load_reference())
    return written

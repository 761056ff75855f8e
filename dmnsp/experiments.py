"""Experiment planning for the Snakemake workflow.

A workflow config names *experiments*. Each experiment expands its axes (datasets, splits,
methods plus ablations, hyperparameter points from a grid and/or a sweep sheet, seeds) into runs. A run is one continual-learning
sequence: one folder ``results/<experiment>/runs/<run_id>`` whose ``run_id`` is made of readable
``key~value`` parts, e.g. ``dataset~cifar100/split~10-10/method~dmnsp/LAMBDA_SCALE~30/seed~0``.

Everything here is pure and cheap: no data is read, the number of tasks comes from the class
count and the split, and every run config is validated with :func:`dmnsp.config.validate` so a bad
value stops planning with the key named.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import itertools
import json
import math
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from . import layout, methods
from .config import (
    ConfigError,
    config_hash,
    load_yaml,
    read_class_order_file,
    read_text_file,
    set_dotted,
    validate,
)

# Experiment axes and the run key each one sets (splits set initial_increment and increment).
AXES = {"datasets": "dataset", "methods": "method", "seeds": "seed"}
SPLIT_KEYS = ("initial_increment", "increment")

# Ablations (method.md section 7): the methods' named variants, one switch each.
ABLATIONS: dict[str, dict[str, Any]] = {name: dict(v.switches) for name, v in methods.variants().items()}
reads_key = methods.reads_key


# Run keys the pretraining of a small CLIP depends on (dmnsp pretrain); everything else (method,
# seed, training and projection settings, the split) is shared by one pretrained checkpoint.
PRETRAIN_KEYS = frozenset(
    {
        "dataset",
        "dataset_root",
        "download",
        "max_test_per_class",
        "pretrain_per_class",
        "data_seed",
        "model_name",
        "cache_dir",
        "precision",
        "prompt_template",
        "device",
        "num_workers",
        "threads",
    }
)
PRETRAIN_PREFIX = "pretrain."

# Resource table: rows apply in order, a later matching row overrides earlier ones.
RESOURCE_KEYS = ("mem_mb", "runtime", "threads", "gpu")
DEFAULT_RESOURCES = {"mem_mb": 2000, "runtime": 60, "threads": 1, "gpu": 0}
SELECTOR_KEYS = ("rule", "dataset", "model_name", "method")

_SPLIT_RE = re.compile(r"([0-9]{1,6})-([0-9]{1,6})")  # fullmatch: "10-10\n" is not a split
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")

# An experiment name is a folder name under results/ and part of rule wildcards and study names.
_EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
MAX_NAME_LENGTH = 100
# Planning bounds, far above real sweeps (the paper's configs plan < 100 runs, a large grid a few
# thousand): a config past them is a mistake or an attack (10 grid keys of 10 values: 10^10 runs).
MAX_RUNS = 100_000
MAX_SHEET_ROWS = 100_000
MAX_GRID_VALUES = 1_000  # per key; the workflow schema's grid maxItems


@dataclass(frozen=True)
class RunSpec:
    """One planned run.

    Attributes:
        experiment: experiment name (first folder under ``results/``).
        run_id: ``key~value`` path below ``results/<experiment>/runs/``.
        label: method label of the tables (``dmnsp``, ``dmnsp (towers=both)``); grid values and
            the seed are separate columns there.
        settings: run-config overrides (flat, dotted keys) given to ``prepare-run``; validated.
        swept: the subset of ``settings`` that the run's path names (dataset, split, method,
            ablation, grid point, seed); the rest is shared by the experiment's runs.
        n_tasks: number of tasks (one ``train_task`` job each).
        dataset: dataset name (for the resource table).
        model_name: open_clip model name (for the resource table).
        pretrain_id: folder of the pretrained checkpoint under ``results/pretrained/``, or None.
    """

    experiment: str
    run_id: str
    label: str
    settings: dict
    swept: dict
    n_tasks: int
    dataset: str
    model_name: str
    pretrain_id: str | None = None

    @property
    def run_dir(self) -> str:
        return layout.run_dir(self.experiment, self.run_id)


@dataclass(frozen=True)
class PretrainSpec:
    """One pretraining job shared by every run whose pretraining settings match."""

    pretrain_id: str
    settings: dict
    dataset: str
    model_name: str

    @property
    def model_path(self) -> str:
        return layout.pretrained_model(self.pretrain_id)


@dataclass
class Plan:
    """Every run and pretraining job of a workflow config."""

    runs: dict[tuple[str, str], RunSpec] = field(default_factory=dict)
    experiments: dict[str, list[RunSpec]] = field(default_factory=dict)
    expected_seeds: dict[str, int] = field(default_factory=dict)
    pretrains: dict[str, PretrainSpec] = field(default_factory=dict)
    #: Consecutive tasks one training job trains, per experiment (config ``tasks_per_job``).
    tasks_per_job: dict[str, int] = field(default_factory=dict)

    def run(self, experiment: str, run_id: str) -> RunSpec:
        try:
            return self.runs[(experiment, run_id)]
        except KeyError:
            raise ConfigError(f"no run '{run_id}' in experiment '{experiment}' of this config") from None


# ---------------------------------------------------------------------------------------- helpers


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict:
    """``{"projection": {"mode": "clean"}}`` → ``{"projection.mode": "clean"}`` (lists stay values)."""
    out: dict = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value  # an empty mapping stays a value, so validation sees (and names) it
    return out


def unflatten(flat: Mapping[str, Any]) -> dict:
    """Inverse of :func:`flatten`."""
    out: dict = {}
    for key, value in flat.items():
        set_dotted(out, key, copy.deepcopy(value))
    return out


def format_value(value: Any) -> str:
    """A path-safe, readable rendering of a setting's value (``30``, ``0.001``, ``clean``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        text = _UNSAFE.sub("_", value).strip("._") or "_"
        return text[:60]
    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{type(value).__name__}-{digest}"


def same_setting(value: Any) -> Any:
    """A key under which values that are one setting compare equal: numbers by their value (``30``
    and ``30.0``, ``0.0`` and ``-0.0``, exactly, as fractions), booleans and None apart from numbers,
    lists and mappings item by item. Two grid values or sheet rows with the same key would plan two
    runs of one setting, whose table then counts one seed twice."""
    if value is None or isinstance(value, bool):
        return (type(value).__name__, value)
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            return ("float", repr(value))
        return ("number", Fraction(value))
    if isinstance(value, list | tuple):
        return ("list", tuple(same_setting(v) for v in value))
    if isinstance(value, Mapping):
        return ("mapping", frozenset((repr(k), same_setting(v)) for k, v in value.items()))
    return (type(value).__name__, repr(value))


def check_experiment_name(name: Any) -> str:
    """An experiment name is a folder name: letters, digits and ``_.+-``, starting with a letter or a
    digit (so never ``..``, a hidden folder or an option), no whitespace or control character
    anywhere (a trailing newline included), at most :data:`MAX_NAME_LENGTH` characters, and not
    ``pretrained`` (the folder of pretrained checkpoints)."""
    text = name if isinstance(name, str) else None
    if (
        text is None
        or not _EXPERIMENT_NAME.fullmatch(text)
        or text == "pretrained"
        or len(text) > MAX_NAME_LENGTH
    ):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise ConfigError(
            f"'experiments': {shown} is not a valid experiment name: use letters, digits and '_.+-', starting "
            f"with a letter or digit, at most {MAX_NAME_LENGTH} characters, not 'pretrained'"
        )
    return text


def cli_value(value: Any) -> str:
    """Render a value so that ``yaml.safe_load`` gives it back unchanged (for ``--set k=v``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...")


def cli_sets(settings: Mapping[str, Any]) -> str:
    """Shell-quoted ``--set key=value`` arguments, one per setting (sorted by key)."""
    return " ".join(f"--set {shlex.quote(f'{k}={cli_value(v)}')}" for k, v in sorted(settings.items()))


def cli_json(settings: Mapping[str, Any]) -> str:
    """Shell-quoted JSON object of the settings (flat dotted keys, sorted), for ``--settings-json``."""
    return shlex.quote(json.dumps(dict(settings), sort_keys=True, separators=(",", ":")))


def parse_split(split: Any) -> tuple[int, int]:
    """``"10-10"`` → ``(10, 10)``; raises :class:`ConfigError` naming ``splits``."""
    match = _SPLIT_RE.fullmatch(split) if isinstance(split, str) else None
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise ConfigError(
            f"'splits': {str(split)[:40]!r} is not a split; write 'INITIAL-INCREMENT' with positive numbers, e.g. '10-10'"
        )
    return int(match.group(1)), int(match.group(2))


@cache
def _class_order_file(path: str, n_classes: int | None) -> int:
    try:
        return _checked_order(read_class_order_file(path), f"class_order file {path}", n_classes)
    except ConfigError as exc:
        raise ConfigError(f"'class_order': {exc}") from None


def _checked_order(order: list, source: str, n_classes: int | None) -> int:
    """The length of a class order checked as the job will check it (integers, each once, and every
    class of a dataset with a fixed class count), so planning never counts tasks of an order the
    job refuses or expands differently."""
    from .scenario import check_class_order

    return len(check_class_order(order, source, n_classes))


def class_count(cfg: Mapping[str, Any], num_classes: int | None = None) -> int:
    """Number of classes a run sees, without touching the data.

    Args:
        cfg: a validated run config.
        num_classes: the experiment's ``num_classes`` (optional; ``imagefolder`` counts its class
            folders otherwise).

    Returns:
        Length of an explicit class order, else ``num_classes``, else the dataset's class count
        (for ``imagefolder`` the class folders under ``<dataset_root>/train``).
    """
    from .datasets import NUM_CLASSES

    order = cfg.get("class_order")
    fixed = NUM_CLASSES.get(cfg["dataset"]) if cfg["dataset"] != "imagefolder" else None
    if isinstance(order, list):
        return _checked_order(order, "'class_order'", fixed)
    if isinstance(order, str):
        return _class_order_file(order, fixed)
    if num_classes is not None:
        return int(num_classes)
    dataset = cfg["dataset"]
    if dataset == "imagefolder":
        return _imagefolder_class_count(str(cfg["dataset_root"]))
    if dataset not in NUM_CLASSES:
        raise ConfigError(
            f"'class_order': dataset {dataset!r} has no fixed class count; give class_order as a list "
            "or set the experiment's num_classes"
        )
    return int(NUM_CLASSES[dataset])


@cache
def _imagefolder_class_count(root: str) -> int:
    """Class folders under ``<root>/train``, counted as the loader counts them (no image is read)."""
    from .datasets import DataError, imagefolder_classes

    try:
        return len(imagefolder_classes(root))
    except DataError as exc:
        raise ConfigError(f"'dataset_root': {exc} (or set the experiment's num_classes)") from None


def task_count(cfg: Mapping[str, Any], num_classes: int | None = None) -> int:
    """Number of tasks of a validated run config (``dmnsp.scenario.num_tasks``), no data access."""
    from .scenario import num_tasks

    n_classes = class_count(cfg, num_classes)
    initial, increment = cfg["initial_increment"], cfg["increment"]
    if initial > n_classes:
        raise ConfigError(
            f"'splits': initial_increment {initial} exceeds the {n_classes} classes of {cfg['dataset']!r}"
        )
    try:
        return int(num_tasks(n_classes, initial, increment))
    except ValueError as exc:
        raise ConfigError(f"'splits': {initial}-{increment} does not fit {n_classes} classes: {exc}") from exc


def resources_for(
    table: Iterable[Mapping[str, Any]] | None,
    rule: str,
    dataset: str | None = None,
    model_name: str | None = None,
    method: str | None = None,
) -> dict:
    """Resources of one job from the config's resource table.

    Args:
        table: rows with optional selectors ``rule``, ``dataset``, ``model_name``, ``method`` (a
            value or a list of values) and any of ``mem_mb``, ``runtime`` (minutes), ``threads``,
            ``gpu``. Every matching row applies in order, so later rows override earlier ones.
        rule: the rule name.
        dataset: the job's dataset, if any.
        model_name: the job's model, if any.
        method: the job's method (a run's jobs; a row naming a method never matches other jobs).

    Returns:
        ``{"mem_mb", "runtime", "threads", "gpu"}`` with the defaults filled in.
    """
    out = dict(DEFAULT_RESOURCES)
    wanted = {"rule": rule, "dataset": dataset, "model_name": model_name, "method": method}
    for row in table or ():
        unknown = set(row) - set(SELECTOR_KEYS) - set(RESOURCE_KEYS)
        if unknown:
            raise ConfigError(
                f"'resources': unknown key(s) {sorted(unknown)}; use {SELECTOR_KEYS + RESOURCE_KEYS}"
            )
        if all(_selects(row.get(key), wanted[key]) for key in SELECTOR_KEYS):
            out.update({key: row[key] for key in RESOURCE_KEYS if key in row})
    return out


def _selects(selector: Any, value: Any) -> bool:
    if selector is None:
        return True
    if isinstance(selector, (list, tuple)):
        return value in selector
    return selector == value


# ------------------------------------------------------------------------------------ expansion


def _axis(spec: Mapping, base: Mapping, axis: str, default: Any) -> list:
    key = AXES[axis]
    values = spec.get(axis)
    if values is None:
        return [base.get(key, default)]
    if key in base:
        raise ConfigError(f"'{key}' is set in 'run' and swept by '{axis}'; keep one of them")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"'{axis}' must be a non-empty list")
    if len({same_setting(v) for v in values}) != len(values):
        raise ConfigError(f"'{axis}' lists a value twice: {_shown(values)}")
    return list(values)


def _splits(spec: Mapping, base: Mapping) -> list[tuple[int, int]]:
    splits = spec.get("splits")
    if splits is None:
        return [(base.get("initial_increment", 2), base.get("increment", 2))]
    for key in SPLIT_KEYS:
        if key in base:
            raise ConfigError(f"'{key}' is set in 'run' and swept by 'splits'; keep one of them")
    if not isinstance(splits, list) or not splits:
        raise ConfigError("'splits' must be a non-empty list such as ['10-10']")
    parsed = [parse_split(s) for s in splits]
    if len(set(parsed)) != len(parsed):
        raise ConfigError(f"'splits' lists a split twice: {splits}")
    return parsed


def _check_swept_key(where: str, key: str) -> None:
    if key in AXES.values() or key in SPLIT_KEYS:
        axis = "splits" if key in SPLIT_KEYS else next(a for a, k in AXES.items() if k == key)
        raise ConfigError(f"'{where}': sweep {key} with the experiment's '{axis}' list instead")
    if "~" in key or "/" in key or not key:
        raise ConfigError(f"'{where}': key names may not be empty or contain '~' or '/'")


def _shown(value: Any, limit: int = 200) -> str:
    """A value for an error message, cut short (a hostile config may hold megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _grid(spec: Mapping) -> dict[str, list]:
    grid = flatten(spec.get("grid") or {})
    for key, values in grid.items():
        _check_swept_key(f"grid.{key}", key)
        if not isinstance(values, list) or not values:
            raise ConfigError(f"'grid.{key}' must be a non-empty list of values, got {_shown(values)}")
        if len(values) > MAX_GRID_VALUES:
            raise ConfigError(
                f"'grid.{key}' lists {len(values):,} values, more than the {MAX_GRID_VALUES:,} allowed per key"
            )
        seen: dict = {}
        for value in values:
            for marker in (("path", format_value(value)), ("value", same_setting(value))):
                if marker in seen:
                    why = "equal settings" if marker[0] == "value" else "the same once written into a path"
                    raise ConfigError(
                        f"'grid.{key}': values {_shown(seen[marker], 60)} and {_shown(value, 60)} are {why}, "
                        "so they would plan one run twice; list each value once"
                    )
                seen[marker] = value
    return grid


@cache
def read_sheet(path: str) -> tuple[dict, ...]:
    """Rows of a sweep sheet (TSV, or CSV by extension): one hyperparameter point per row.

    Columns are run keys (dotted for nested ones, e.g. ``projection.mode``); cells are parsed as
    YAML scalars by the config reader (``0.001``, ``1e-4``, ``clean``, ``true``); an empty cell leaves that key unset for the row.
    Lines starting with ``#`` are comments.
    """
    file = Path(path)
    delimiter = "," if file.suffix.lower() == ".csv" else "\t"
    text = read_text_file(file, "'sheet': sweep sheet")
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    reader = _csv_rows(lines, delimiter, path)
    header = [h.strip() for h in next(reader, [])]
    if not header or len(set(header)) != len(header):
        raise ConfigError(f"'sheet': {path} needs a header row of distinct run keys, got {_shown(header)}")
    for key in header:
        _check_swept_key(f"sheet.{key}", key)
    rows = []
    for number, cells in enumerate(reader, start=2):
        if number - 1 > MAX_SHEET_ROWS:
            raise ConfigError(f"'sheet': {path} has more than {MAX_SHEET_ROWS:,} rows")
        if len(cells) != len(header):
            raise ConfigError(
                f"'sheet': {path} row {number} has {len(cells)} cells for {len(header)} columns"
            )
        row = {}
        for key, cell in zip(header, cells, strict=True):
            if cell.strip():
                try:
                    row[key] = load_yaml(cell.strip(), f"the cell of row {number}")
                except yaml.YAMLError as exc:
                    raise ConfigError(
                        f"'sheet.{key}': row {number} value {_shown(cell, 80)} cannot be read: "
                        f"{' '.join(str(exc).split())[:300]}"
                    ) from None
        rows.append(row)
    if not rows:
        raise ConfigError(f"'sheet': {path} has no rows")
    _refuse_colliding_rows(path, rows)
    return tuple(rows)


def _csv_rows(lines: list[str], delimiter: str, path: str) -> Iterable[list[str]]:
    """csv.reader's rows, its errors (a cell past csv's field size limit, a stray quote) one line."""
    reader = csv.reader(lines, delimiter=delimiter)
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise ConfigError(
                f"'sheet': {path} line {reader.line_num} is not {delimiter!r}-separated values: {exc}"
            ) from None


def _refuse_colliding_rows(path: str, rows: list[dict]) -> None:
    """Two rows that name the same run folder (values that differ only in characters the folder
    name drops, e.g. ``a photo of {}`` / ``a photo of {}!``, or a row given twice) would make one
    point overwrite the other and count twice: refuse them, naming both rows (data rows from 1)."""
    seen: dict[tuple, int] = {}
    for number, row in enumerate(rows, start=1):
        folder = tuple((key, format_value(value)) for key, value in row.items())
        setting = ("value", frozenset((key, same_setting(value)) for key, value in row.items()))
        for marker in (folder, setting):
            if marker in seen:
                first = seen[marker]
                what = (
                    f"map to the same run folder ({'/'.join(f'{k}~{v}' for k, v in folder)}); make them differ "
                    "in letters, digits or '._+-', or drop one"
                    if marker is folder
                    else "are one setting (their values are equal, e.g. 1 and 1.0); drop one"
                )
                raise ConfigError(
                    f"'sheet': {path} rows {first} ({_shown(rows[first - 1], 100)}) and {number} "
                    f"({_shown(row, 100)}) {what}"
                )
        seen[folder] = seen[setting] = number


def _points(spec: Mapping, grid: Mapping[str, list]) -> list[dict]:
    """Hyperparameter points: the grid's product, times the sheet's rows when there is a sheet."""
    rows = read_sheet(str(spec["sheet"])) if spec.get("sheet") else ({},)
    _check_run_count(
        "hyperparameter points (grid values multiplied, times sheet rows)", [*grid.values(), rows]
    )
    points = [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]
    if spec.get("sheet"):
        clash = sorted(set(grid) & {k for row in rows for k in row})
        if clash:
            raise ConfigError(f"'sheet.{clash[0]}' is also in 'grid'; sweep each key in one place")
        points = [{**point, **row} for point in points for row in rows]
    return points


def _check_run_count(what: str, axes: list) -> None:
    """Refuse a product of axes past :data:`MAX_RUNS` before it is built (it would not fit in memory)."""
    count = math.prod(len(axis) for axis in axes)
    if count > MAX_RUNS:
        raise ConfigError(
            f"{count:,} {what} is more than the {MAX_RUNS:,} runs one config may plan; split the sweep "
            "into several configs or sweep fewer values"
        )


def _project(points: list[dict], method: str, ablation: str | None = None) -> list[dict]:
    """The points restricted to the keys a run reads, duplicates removed (order kept)."""
    out, seen = [], set()
    for point in points:
        kept = {k: v for k, v in point.items() if reads_key(method, k, ablation)}
        marker = json.dumps(kept, sort_keys=True, default=str)
        if marker not in seen:
            seen.add(marker)
            out.append(kept)
    return out


def _variants(spec: Mapping, method_names: list, swept_keys: set) -> list[tuple[str, str | None]]:
    unknown = [m for m in method_names if m not in methods.names()]
    if unknown:
        raise ConfigError(f"'methods': {unknown[0]!r} is not one of {methods.names()}")
    out = [(method, None) for method in method_names]
    ablations = spec.get("ablations") or []
    if len(set(ablations)) != len(ablations):
        raise ConfigError(f"'ablations' lists an ablation twice: {ablations}")
    for name in ablations:
        if name not in ABLATIONS:
            raise ConfigError(f"'ablations': {name!r} is not one of {sorted(ABLATIONS)}")
        clash = set(ABLATIONS[name]) & swept_keys
        if clash:
            raise ConfigError(f"'{sorted(clash)[0]}' is swept and set by ablation {name!r}; drop one of them")
        out.append((methods.variant(name).method, name))
    if not out:
        raise ConfigError("'methods': the experiment has neither methods nor ablations")
    return out


def _validated(settings: Mapping[str, Any]) -> dict:
    return validate(unflatten(settings))


def pretrain_spec(cfg: Mapping[str, Any], settings: Mapping[str, Any]) -> PretrainSpec:
    """The pretraining job a run depends on: its settings are the run's pretraining keys only.

    The folder name carries the model, the dataset and a hash of the validated pretraining
    config, so one checkpoint serves every run that agrees on those keys and a changed setting
    gives a new folder (and a new job).
    """
    if cfg["pretrain_per_class"] < 1:
        raise ConfigError("'pretrain_per_class' must be at least 1 when the experiment sets pretrain_first")
    if "pretrained" in settings:
        raise ConfigError(
            "'pretrained' is set, but pretrain_first makes the workflow pretrain the model; drop one"
        )
    pre = {k: v for k, v in settings.items() if k in PRETRAIN_KEYS or k.startswith(PRETRAIN_PREFIX)}
    pre["pretrained"] = None
    resolved = _validated(pre)
    digest = config_hash(resolved)
    pretrain_id = f"{format_value(resolved['model_name'])}_{format_value(resolved['dataset'])}_{digest}"
    return PretrainSpec(pretrain_id, pre, resolved["dataset"], resolved["model_name"])


def expand_experiment(
    name: str, spec: Mapping[str, Any], shared: Mapping[str, Any] | None = None
) -> tuple[list[RunSpec], dict[str, PretrainSpec]]:
    """Expand one experiment into its runs.

    Args:
        name: experiment name (a folder name).
        spec: the experiment mapping of the workflow config (``datasets``, ``splits``, ``methods``,
            ``ablations``, ``seeds``, ``grid``, ``sheet``, ``run``, ``pretrain_first``,
            ``num_classes``).
        shared: run keys shared by every experiment (the workflow config's top-level ``run``).

    Returns:
        The runs (datasets × splits × method variants × hyperparameter points × seeds, where a
        method's points keep only the keys it reads, so it is never duplicated over the others)
        and the pretraining jobs they need, keyed by folder.

    Raises:
        ConfigError: naming the experiment, the run and the offending key.
    """
    try:
        return _expand(name, spec, shared or {})
    except ConfigError as exc:
        raise ConfigError(f"experiment '{name}': {exc}") from None


def _expand(name: str, spec: Mapping, shared: Mapping) -> tuple[list[RunSpec], dict[str, PretrainSpec]]:
    base = flatten(shared)
    base.update(flatten(spec.get("run") or {}))
    datasets = _axis(spec, base, "datasets", "fashion-mnist")
    splits = _splits(spec, base)
    method_names = _axis(spec, base, "methods", "dmnsp") if spec.get("methods") != [] else []
    seeds = _axis(spec, base, "seeds", 0)
    grid = _grid(spec)
    points = _points(spec, grid)
    variants = _variants(spec, method_names, {k for point in points for k in point})
    fixed = {k: v for k, v in base.items() if k not in AXES.values() and k not in SPLIT_KEYS}
    # Every shared key is checked, also one that only methods outside this experiment read (such a
    # key is dropped from the runs of methods that ignore it, but a malformed value is still a mistake).
    _validated(fixed)
    pretrain_first = bool(spec.get("pretrain_first", False))
    num_classes = spec.get("num_classes")
    _check_run_count(
        "runs (datasets x splits x methods x points x seeds)", [datasets, splits, variants, points, seeds]
    )

    runs: list[RunSpec] = []
    pretrains: dict[str, PretrainSpec] = {}
    for dataset, (initial, increment), (method, ablation) in itertools.product(datasets, splits, variants):
        for point in _project(points, method, ablation):
            for seed in seeds:
                settings = {k: v for k, v in fixed.items() if reads_key(method, k, ablation)}
                swept = {
                    "dataset": dataset,
                    "initial_increment": initial,
                    "increment": increment,
                    "method": method,
                }
                swept.update(ABLATIONS.get(ablation, {}))
                swept.update(point)
                swept["seed"] = seed
                settings.update(swept)
                run_id = run_path(dataset, (initial, increment), method, ablation, point, seed)
                try:
                    cfg = _validated(settings)
                    pre = None
                    if pretrain_first:
                        pre = pretrain_spec(cfg, settings)
                        pretrains[pre.pretrain_id] = pre
                        settings["pretrained"] = pre.model_path
                        cfg = _validated(settings)
                    n_tasks = task_count(cfg, num_classes)
                except ConfigError as exc:
                    raise ConfigError(f"run '{run_id}': {exc}") from None
                runs.append(
                    RunSpec(
                        experiment=name,
                        run_id=run_id,
                        label=methods.run_label(cfg),
                        settings=settings,
                        swept=swept,
                        n_tasks=n_tasks,
                        dataset=cfg["dataset"],
                        model_name=cfg["model_name"],
                        pretrain_id=pre.pretrain_id if pre else None,
                    )
                )
    return runs, pretrains


def run_path(
    dataset: str,
    split: tuple[int, int],
    method: str,
    ablation: str | None,
    point: Mapping[str, Any],
    seed: Any,
) -> str:
    """``dataset~D/split~I-I/method~M[/ablation~A][/KEY~VALUE...]/seed~S``."""
    parts = [run_prefix(dataset, split), f"method~{method}"]
    if ablation:
        parts.append(f"ablation~{ablation}")
    parts += [f"{key}~{format_value(value)}" for key, value in point.items()]
    parts.append(f"seed~{format_value(seed)}")
    return "/".join(parts)


def run_prefix(dataset: str, split: tuple[int, int]) -> str:
    """``dataset~D/split~I-I``: the start of the ``run_id`` of every run on one dataset and split."""
    return f"dataset~{format_value(dataset)}/split~{split[0]}-{split[1]}"


def expand_all(config: Mapping[str, Any]) -> Plan:
    """Expand every experiment of a (schema-validated) workflow config.

    Args:
        config: the workflow config (``experiments``, optional shared ``run``).

    Returns:
        A :class:`Plan` with every run, keyed by ``(experiment, run_id)``, and the pretraining jobs.

    Raises:
        ConfigError: on the first invalid experiment or run, naming the key.
    """
    experiments = config.get("experiments") or {}
    if not experiments:
        raise ConfigError("'experiments': the config names no experiment")
    plan = Plan()
    folded: dict[str, str] = {}
    for name, spec in experiments.items():
        check_experiment_name(name)
        # On a case-insensitive file system (macOS, Windows) "E" and "e" are one results folder.
        if name.casefold() in folded:
            raise ConfigError(
                f"'experiments': {folded[name.casefold()]!r} and {name!r} differ only in case, so they share a "
                "results folder on macOS and Windows; rename one"
            )
        folded[name.casefold()] = name
        runs, pretrains = expand_experiment(name, spec or {}, config.get("run"))
        plan.tasks_per_job[name] = _tasks_per_job(name, spec or {}, config)
        plan.experiments[name] = runs
        plan.expected_seeds[name] = len((spec or {}).get("seeds") or [None])
        for run in runs:
            plan.runs[(name, run.run_id)] = run
        plan.pretrains.update(pretrains)
        if len(plan.runs) > MAX_RUNS:
            raise ConfigError(f"the config plans more than {MAX_RUNS:,} runs; split it into several configs")
    return plan


# ---------------------------------------------------------------------------- tasks per job


def _tasks_per_job(name: str, spec: Mapping[str, Any], config: Mapping[str, Any]) -> int:
    """The experiment's ``tasks_per_job`` (its own, else the config's top-level one, else 1)."""
    own = spec.get("tasks_per_job")
    value = own if own is not None else config.get("tasks_per_job", 1)
    where = f"experiments.{name}.tasks_per_job" if own is not None else "tasks_per_job"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"'{where}' must be a whole number of tasks, at least 1; got {value!r}")
    return value


def chunk_spans(n_tasks: int, k: int) -> list[tuple[int, int]]:
    """The ``(first, last)`` tasks of each training job of a run of ``n_tasks`` tasks at ``k`` per
    job: ``(0, k-1), (k, 2k-1), ...``; the last chunk is shorter when ``k`` does not divide ``n_tasks``."""
    return [(first, min(first + k, n_tasks) - 1) for first in range(0, n_tasks, k)]


@dataclass(frozen=True)
class ChunkRule:
    """One training rule of the workflow for ``tasks_per_job > 1``: tasks ``first..last`` in one job.

    A rule's outputs name each of its tasks literally (Snakemake cannot compute ``task{t+1}`` from
    a wildcard), so the workflow defines one rule per chunk position. ``experiments`` and, where
    runs of one experiment chunk differently (splits with different task counts), ``prefixes``
    (``dataset~D/split~I-I`` starts of run ids) limit the rule to the runs whose chunk it is, so
    that exactly one rule produces each task's files.
    """

    name: str
    first: int
    last: int
    experiments: tuple[str, ...]
    prefixes: tuple[str, ...] | None = None

    @property
    def tasks(self) -> range:
        return range(self.first, self.last + 1)

    @property
    def experiment_regex(self) -> str:
        return "|".join(re.escape(e) for e in self.experiments)

    @property
    def run_regex(self) -> str | None:
        """The ``run`` wildcard's constraint (None: any run of the rule's experiments)."""
        if self.prefixes is None:
            return None
        starts = "|".join(re.escape(p) for p in self.prefixes)
        return rf"(?:{starts})(?:/[^/~]+~[^/]+)+"


def chunk_rules(plan: Plan) -> list[ChunkRule]:
    """The training rules of the experiments with ``tasks_per_job > 1`` (those with 1 keep the one
    ``train_task`` rule).

    Raises:
        ConfigError: when runs of one experiment on the same dataset and split have different task
            counts (their chunks would collide), naming the experiment.
    """
    groups: dict[tuple[tuple[int, int], tuple[str, ...] | None], list[str]] = {}
    for experiment, runs in plan.experiments.items():
        k = plan.tasks_per_job.get(experiment, 1)
        if k == 1:
            continue
        counts: dict[str, set[int]] = {}
        for run in runs:
            counts.setdefault(run_prefix_of(run.run_id), set()).add(run.n_tasks)
        for prefix, ns in counts.items():
            if len(ns) > 1:
                raise ConfigError(
                    f"experiment '{experiment}': runs on {prefix} have {sorted(ns)} tasks, so tasks_per_job "
                    f"{k} cannot chunk them alike; give them separate experiments or set its tasks_per_job to 1"
                )
        n_of = {prefix: ns.pop() for prefix, ns in counts.items()}
        spans = sorted({s for n in n_of.values() for s in chunk_spans(n, k)})
        for span in spans:
            having = tuple(p for p, n in n_of.items() if span in chunk_spans(n, k))
            asking = tuple(p for p, n in n_of.items() if n > span[0])  # runs that have a task of the span
            groups.setdefault((span, None if having == asking else having), []).append(experiment)
    rules, names = [], {}
    for (span, prefixes), experiments in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1] or ())):
        names[span] = names.get(span, 0) + 1
        suffix = "" if names[span] == 1 else f"_{names[span]}"
        rules.append(
            ChunkRule(f"train_tasks_{span[0]}_{span[1]}{suffix}", *span, tuple(experiments), prefixes)
        )
    return rules


def run_prefix_of(run_id: str) -> str:
    """The ``dataset~D/split~I-I`` start of a run id (see :func:`run_prefix`)."""
    return "/".join(run_id.split("/", 2)[:2])

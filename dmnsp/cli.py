"""Command line: ``python -m dmnsp <command>`` (also the ``dmnsp`` script). Works without Snakemake.

``main(argv)`` takes an argument list so tests can call it; nothing happens at import.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__


def _config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--config", required=required, help="run configuration YAML (see dmnsp/schemas/run.schema.yaml)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted keys allowed, values parsed as YAML); repeatable",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _load(args):
    from .config import load_config, parse_overrides

    return load_config(args.config, parse_overrides(args.overrides))


def _json_object(text: str, option: str) -> dict:
    """A command-line JSON object (the workflow writes them); malformed JSON is a user error."""
    from .bounded import BoundsError, loads_json
    from .config import ConfigError

    try:
        value = loads_json(text, option, allow_nan=False)  # bounded: nesting, size (never a RecursionError)
    except BoundsError as exc:
        raise ConfigError(str(exc)) from None
    except ValueError as exc:
        raise ConfigError(
            f"{option} is not valid JSON ({' '.join(str(exc).split())[:200]}); pass one JSON object such as "
            "'{\"lr\": 0.001}'"
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(f"{option} must be one JSON object, got {type(value).__name__}")
    return value


def cmd_run(args) -> int:
    from . import guard, layout
    from .methods import run_label

    if args.out_dir is None:
        return _run(args, _load(args), None)
    out = Path(args.out_dir)
    command = "dmnsp run --overwrite" if args.overwrite else "dmnsp run"
    with guard.locked(out, command):  # the run's one lock, released however the run ends
        cfg = _load(args)
        if not guard.claim_run_dir(out, cfg, overwrite=args.overwrite):
            return _finish_run(args, out)  # every task finished, the run stopped before its end files
        layout.write_run_info(out, cfg, experiment="cli", label=run_label(cfg), settings={})
        return _run(args, cfg, out)


def _finish_run(args, out: Path) -> int:
    from . import layout

    metrics = layout.write_run_metrics(out)
    avg, last = (f"{x:.4f}" if isinstance(x, float) else "n/a" for x in (metrics["avg"], metrics["last"]))
    print(f"Avg {avg}  Last {last}  ({metrics['n_tasks_done']} tasks)")
    print(f"wrote {out}")
    _warn_health(args.command, metrics["health"])
    return 0


def _run(args, cfg: dict, out: Path | None) -> int:
    from . import layout
    from .metrics import run_health
    from .runner import run_all

    def report(t, row, diag):
        seen = ", ".join(f"{a:.3f}" for a in row["accuracy_per_task"])
        extra = ""
        if diag.get("lambda"):
            flat = [x for r in diag["lambda"] for x in r]
            extra = f"  lambda [{min(flat):.1f}, {max(flat):.1f}]"
        inf = diag["inf_fraction_exp_avg_sq"]["visual"]
        print(
            f"task {t}: accuracy {row['accuracy']:.4f} (per task: {seen})  inf(exp_avg_sq) {inf:.2g}{extra}",
            flush=True,
        )

    rows = run_all(cfg, out, report, progress=not args.quiet)
    accs = [r["accuracy"] for r in rows]
    print(f"Avg {sum(accs) / len(accs):.4f}  Last {accs[-1]:.4f}  ({len(accs)} tasks)")
    if out is not None:
        layout.write_run_metrics(out)
        print(f"wrote {out}")
    _warn_health(args.command, run_health(rows))
    return 0


def _warn_health(command: str, health: dict) -> None:
    """A run's health flags (predictions collapsed to one class, at chance) as console warnings."""
    for flag in health["flags"]:
        print(f"dmnsp {command}: warning: {flag}; these numbers are not a result", file=sys.stderr)


def cmd_prepare_run(args) -> int:
    from . import guard, layout
    from .config import load_config, parse_overrides
    from .methods import run_label

    swept = parse_overrides(args.overrides)  # the run's own settings, recorded in run.json
    settings = _json_object(args.settings_json, "--settings-json") if args.settings_json else {}
    settings.update(swept)
    with guard.locked(args.out_dir, "dmnsp prepare-run"):  # the run's one lock
        cfg = load_config(args.config, settings)
        layout.write_run_info(args.out_dir, cfg, args.experiment, args.label or run_label(cfg), swept)
    return 0


def cmd_train_task(args) -> int:
    from . import guard
    from .layout import task_dir
    from .runner import run_one_task, run_tasks

    def report(t: int, row: dict) -> None:
        print(f"task {t}: accuracy {row['accuracy']:.4f} on {row['n_samples']} images", flush=True)

    if args.tasks is None:
        first = last = args.task
        folders = {first: args.out_dir if args.out_dir is not None else task_dir(args.run_dir, first)}
    elif args.run_dir is None:
        from .config import ConfigError

        raise ConfigError(
            "--tasks writes one folder per task: give --run-dir (the run folder), not --out-dir"
        )
    else:
        first, last = args.tasks
        folders = {t: task_dir(args.run_dir, t) for t in range(first, last + 1)}
    run = args.run_dir if args.run_dir is not None else guard.run_lock_folder(args.out_dir)
    which = f"--task {args.task}" if args.tasks is None else f"--tasks {first}-{last}"
    with guard.locked(run, f"dmnsp train-task {which}"):  # the run's one lock, as every writer of it
        cfg = _load(args)
        weights = _pretrained_file(cfg, args.pretrained_file)
        for t, folder in folders.items():
            guard.check_task_dir(folder, t, args.resume, cfg)
        if args.tasks is None:
            folder = folders[args.task]
            row = run_one_task(
                cfg, args.task, args.resume, folder, progress=not args.quiet, pretrained_file=weights
            )
            report(args.task, row)
        else:
            run_tasks(
                cfg,
                first,
                last,
                args.resume,
                args.run_dir,
                progress=not args.quiet,
                on_task_end=report,
                pretrained_file=weights,
            )
    return 0


def _pretrained_file(cfg: dict, path: str | None) -> str | None:
    """``--pretrained-file``: only for a config whose ``pretrained`` names a checkpoint file."""
    from .config import ConfigError
    from .staging import is_weights_file

    if path is not None and not is_weights_file(cfg["pretrained"]):
        raise ConfigError(
            f"--pretrained-file {path} was given, but the config's pretrained is {cfg['pretrained']!r}, "
            "not a checkpoint file; drop the option"
        )
    return path


def cmd_evaluate(args) -> int:
    from . import guard
    from .adapters import load_adapter_state_dict
    from .checkpoint import load_checkpoint
    from .io import atomic_write_json
    from .runner import Session, check_state_fits

    cfg = _load(args)
    if args.out:
        guard.check_evaluation_out(args.out)
    state = load_checkpoint(args.checkpoint, cfg)
    session = Session(cfg, progress=not args.quiet)
    check_state_fits(session.model, state, args.checkpoint, cfg)
    load_adapter_state_dict(session.model, state.adapters)
    row = session.evaluate(state.task, session.method_state(state))
    if args.out:
        atomic_write_json(args.out, row)
    print(json.dumps({k: row[k] for k in ("task", "accuracy", "accuracy_per_task")}))
    return 0


def cmd_pretrain(args) -> int:
    from .pretrain import pretrain

    cfg = _load(args)
    summary = pretrain(cfg, args.out, progress=not args.quiet)
    print(
        f"pretrained {summary['model_name']} for {summary['steps']} steps on {summary['pretrain_images']} "
        f"images: zero-shot accuracy {summary['zero_shot_accuracy']:.4f} ({summary['seconds']:.0f} s) -> {args.out}"
    )
    return 0


def cmd_metrics(args) -> int:
    from . import guard
    from .layout import check_run_dir_exists, write_run_metrics

    check_run_dir_exists(args.run_dir)
    with guard.locked(args.run_dir, "dmnsp metrics"):  # the run's one lock
        m = write_run_metrics(args.run_dir)
    print(json.dumps({k: m[k] for k in ("avg", "last", "n_tasks_done", "complete")}))
    _warn_health(args.command, m["health"])
    return 0


def cmd_report_artifacts(args) -> int:
    from .report import make_report_artifacts

    made = make_report_artifacts(
        args.runs, args.tables_dir, args.plots_dir, expected_seeds=args.expected_seeds
    )
    for line in made["warnings"]:
        print(f"dmnsp report-artifacts: warning: {line}", file=sys.stderr)
    return 0


def cmd_import_config(args) -> int:
    import yaml

    from .hydra_import import hydra_workflow_config
    from .io import atomic_write_text

    notes: list[str] = []
    spec = hydra_workflow_config(args.hydra_config, notes=notes)
    for note in notes:
        print(f"dmnsp import-config: note: {args.hydra_config}: {note}", file=sys.stderr)
    text = yaml.safe_dump(spec, sort_keys=False)
    if args.out:
        atomic_write_text(args.out, text)
    else:
        print(text, end="")
    return 0


def cmd_validate(args) -> int:
    import yaml

    cfg = _load(args)
    print(yaml.safe_dump(cfg, sort_keys=False), end="")
    return 0


def cmd_list_models(args) -> int:
    from .model import list_models, package_models

    names = package_models() if args.offline else list_models()
    print("\n".join(names))
    return 0


def cmd_list_methods(args) -> int:
    from . import methods

    width = max(len(name) for name in methods.names())
    for name in methods.names():
        print(f"{name:<{width}}  {methods.get(name).description}")
    return 0


def cmd_list_datasets(args) -> int:
    from .datasets import list_datasets

    print("\n".join(list_datasets()))
    return 0


# ----------------------------------------------------------------------------------- search (begin)
# Optuna hyperparameter search (dmnsp/search.py; workflow/rules/search.smk runs these commands).


def _search_spec(args) -> dict:
    from .search import SPEC_VERSION, SearchError, load_spec

    if args.spec_json:
        spec = _json_object(args.spec_json, "--spec-json")
        if spec.get("version") != SPEC_VERSION:
            raise SearchError(f"--spec-json is not a dmnsp search spec (version {SPEC_VERSION})")
        return spec
    return load_spec(args.spec)


def cmd_search_create(args) -> int:
    import yaml

    from .io import atomic_write_json, atomic_write_text
    from .search import create_study

    spec = _search_spec(args)
    info = create_study(spec)
    if args.out_spec:
        atomic_write_text(args.out_spec, yaml.safe_dump(spec, sort_keys=False))
    if args.out:
        atomic_write_json(args.out, info)
    how = "created" if info["created"] else f"resumed ({info['existing_trials']} trials kept)"
    print(f"study {info['study_name']} {how} in {info['storage']}")
    return 0


def cmd_search_worker(args) -> int:
    from .io import atomic_write_json
    from .search import run_worker

    summary = run_worker(
        _search_spec(args), args.worker, progress=not args.quiet, log=lambda line: print(line, flush=True)
    )
    if args.out:
        atomic_write_json(args.out, summary)
    print(
        f"worker {args.worker}: {len(summary['trials'])} trials in {summary['seconds']:.0f} s; the study holds "
        f"{summary['finished_after']} finished trials (budget {summary['n_trials']})"
    )
    return 0


def cmd_search_export(args) -> int:
    from .search import export_study

    result = export_study(_search_spec(args), args.out_dir)
    print(
        f"best trial {result['trial']}: {result['objective']} {result['value']:.4f} with {result['params']}"
    )
    for problem in result["plots_not_drawn"].values():
        print(f"note: {problem}")
    return 0


def cmd_search_prepare_run(args) -> int:
    from . import guard, layout
    from .config import load_config
    from .methods import run_label
    from .search import followup_settings, read_best

    settings = followup_settings(_json_object(args.settings_json, "--settings-json"), read_best(args.best))
    cfg = load_config(None, settings)
    label = args.label or run_label(cfg, searched=True)
    with guard.locked(args.out_dir, "dmnsp search-prepare-run"):  # the run's one lock
        layout.write_run_info(args.out_dir, cfg, args.experiment, label, settings)
    return 0


def _add_search_commands(sub) -> None:
    def spec_args(p, create: bool = False) -> None:
        group = p.add_mutually_exclusive_group(required=True)
        group.add_argument("--spec", help="search spec YAML (written by search-create)")
        group.add_argument(
            "--spec-json",
            help="search spec as one JSON object" + (" (as the workflow plans it)" if create else ""),
        )

    p = sub.add_parser("search-create", help="create the Optuna study of a search (or load it to resume)")
    spec_args(p, create=True)
    p.add_argument("--out-spec", help="write the spec here (spec.yaml, read by the workers and the export)")
    p.add_argument("--out", help="write the study's name, storage and trial count here (JSON)")
    p.set_defaults(func=cmd_search_create)

    p = sub.add_parser(
        "search-worker", help="run trials of a search's shared study until its budget is reached"
    )
    spec_args(p)
    p.add_argument("--worker", type=int, default=0, help="worker index (seeds its sampler)")
    p.add_argument("--out", help="write a summary of this worker's trials here (JSON)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_search_worker)

    p = sub.add_parser("search-export", help="best_params.yaml, trials table and plots of a search")
    spec_args(p)
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_search_export)

    p = sub.add_parser(
        "search-prepare-run", help="run folder of a follow-up run of the best searched setting"
    )
    p.add_argument("--best", required=True, help="best_params.yaml of the search")
    p.add_argument("--settings-json", required=True, help="the run's other settings as one JSON object")
    p.add_argument("--experiment", required=True)
    p.add_argument("--label", help="display name in tables (default: the method's label plus 'searched')")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_search_prepare_run)


# ----------------------------------------------------------------------------------- search (end)


# ---------------------------------------------------------------------------------- staging (begin)
# Data and weights staged before training (dmnsp/staging.py; workflow/rules/staging.smk runs these).


def _staging_settings(args, keys: tuple[str, ...]) -> dict:
    """The run keys ``keys`` from ``--config``/``--set`` (defaults filled in), explicit options winning."""
    cfg = _load(args)  # --config is optional: the run schema's defaults, with --set
    out = {key: cfg[key] for key in keys}
    for key in keys:
        value = getattr(args, key, None)
        if value is not None:
            out[key] = value
    return out


def cmd_fetch_data(args) -> int:
    from .datasets import fetch_dataset

    s = _staging_settings(args, ("dataset", "dataset_root", "download"))
    folder = fetch_dataset(s["dataset"], s["dataset_root"], download=s["download"])
    print(f"{s['dataset']}: ready in {folder}")
    return 0


def cmd_fetch_weights(args) -> int:
    from .config import ConfigError
    from .model import fetch_weights
    from .staging import weights_folder

    s = _staging_settings(args, ("model_name", "pretrained", "cache_dir"))
    if not s["pretrained"]:
        raise ConfigError("pretrained is null (random weights): there is nothing to fetch")
    out = args.out_dir or weights_folder(s["model_name"], s["pretrained"])
    fetch_weights(s["model_name"], s["pretrained"], out, cache_dir=s["cache_dir"])
    print(f"{s['model_name']}/{s['pretrained']}: ready in {out} (use it as cache_dir)")
    return 0


def _add_staging_commands(sub) -> None:
    p = sub.add_parser(
        "fetch-data",
        help="stage a dataset under its dataset_root before training: check it, or fetch it (Debian's "
        "Fashion-MNIST; CIFAR100, TinyImageNet with download); offline, name the folder to place",
    )
    _config_args(p, required=False)
    p.add_argument("--dataset", help="dataset name (default: the config's)")
    p.add_argument("--root", dest="dataset_root", help="dataset_root (default: the config's)")
    p.add_argument(
        "--download",
        action="store_const",
        const=True,
        help="download what is missing (needs the internet; default: the config's `download`)",
    )
    p.set_defaults(func=cmd_fetch_data)

    p = sub.add_parser(
        "fetch-weights",
        help="stage the open_clip weights of a pretrained tag into an open_clip cache folder of their own, "
        "from cache_dir or the internet; offline, name what to place where",
    )
    _config_args(p, required=False)
    p.add_argument("--model", dest="model_name", help="open_clip architecture (default: the config's)")
    p.add_argument("--pretrained", help="pretrained tag, e.g. openai (default: the config's)")
    p.add_argument("--cache-dir", help="open_clip cache to copy from (default: the config's cache_dir)")
    p.add_argument("--out-dir", help="the staged cache folder (default: weights/<model>/<tag>)")
    p.set_defaults(func=cmd_fetch_weights)


# ------------------------------------------------------------------------------------ staging (end)


def _task_range(text: str) -> tuple[int, int]:
    """``--tasks 3-5`` → ``(3, 5)``."""
    first, sep, last = text.partition("-")
    if not (sep and first.isdigit() and last.isdigit() and int(first) <= int(last)):
        raise argparse.ArgumentTypeError(f"{text!r} is not FIRST-LAST with 0 <= FIRST <= LAST (e.g. 3-5)")
    return int(first), int(last)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmnsp", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dmnsp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="all tasks of one run in one process, printing per-task accuracy")
    _config_args(p)
    p.add_argument("--out-dir", help="write per-task folders, metrics.json and accuracy_matrix.csv here")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="--out-dir may hold another config's (or this config's finished) results: delete them first",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "train-task",
        help="train and evaluate one task (or consecutive tasks), resuming from the previous checkpoint",
    )
    _config_args(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", type=int, help="task index t (0-based)")
    which.add_argument(
        "--tasks",
        type=_task_range,
        metavar="FIRST-LAST",
        help="train tasks FIRST..LAST in this process (writes each task's folder under --run-dir)",
    )
    p.add_argument("--resume", help="checkpoint.pt of the task before the first (required unless it is 0)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out-dir", help="with --task: folder for checkpoint.pt, eval.json, diagnostics.json")
    where.add_argument("--run-dir", help="the run folder: each task t is written to its task<t>/ folder")
    p.add_argument(
        "--pretrained-file",
        help="read the checkpoint the config's `pretrained` names from this copy of it (a staged input, "
        "e.g. under Snakemake's remote-storage prefix); the run's identity keeps the config's value",
    )
    p.set_defaults(func=cmd_train_task)

    p = sub.add_parser("evaluate", help="evaluate a task checkpoint on all classes seen so far")
    _config_args(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", help="write the evaluation row as JSON here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("pretrain", help="pretrain a small CLIP (whole model) on the pretraining slice")
    _config_args(p)
    p.add_argument("--out", required=True, help="checkpoint path (.pt); a .json summary is written beside it")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser(
        "prepare-run", help="write a run folder's resolved config.yaml and run.json (provenance)"
    )
    _config_args(p, required=False)
    p.add_argument("--settings-json", help="run settings as one JSON object (merged after --set)")
    p.add_argument("--experiment", required=True)
    p.add_argument("--label", help="display name in tables (default: the method)")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_prepare_run)

    p = sub.add_parser("metrics", help="accuracy_matrix.csv and metrics.json of a run folder")
    p.add_argument("--run-dir", required=True)
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("report-artifacts", help="tables and plots of an experiment from its run folders")
    p.add_argument("--runs", nargs="+", required=True)
    p.add_argument("--tables-dir", required=True)
    p.add_argument("--plots-dir", required=True)
    p.add_argument("--expected-seeds", type=int)
    p.set_defaults(func=cmd_report_artifacts)

    p = sub.add_parser(
        "import-config", help="turn a reference Hydra config into a workflow config (use with --configfile)"
    )
    p.add_argument("hydra_config")
    p.add_argument("--out")
    p.set_defaults(func=cmd_import_config)

    p = sub.add_parser(
        "validate-config", help="validate a run config and print it with every default filled in"
    )
    _config_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("list-models", help="open_clip architectures (and the offline tiny one)")
    p.add_argument("--offline", action="store_true", help="only the architectures shipped with dmnsp")
    p.set_defaults(func=cmd_list_models)

    p = sub.add_parser("list-methods", help="continual-learning methods, each with a one-line description")
    p.set_defaults(func=cmd_list_methods)

    p = sub.add_parser("list-datasets", help="supported datasets")
    p.set_defaults(func=cmd_list_datasets)
    _add_search_commands(sub)  # search block above
    _add_staging_commands(sub)  # staging block above
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .io import OutputError
    from .model import ModelError, WeightsError
    from .train import NonFiniteError

    errors: list[type[BaseException]] = [
        ConfigError,
        CheckpointError,
        OutputError,
        ModelError,
        WeightsError,
        NonFiniteError,
    ]
    try:
        from .datasets import DataError

        errors.append(DataError)
    except ImportError:
        pass
    return tuple(errors)


#: Options (argparse dests) that name a file or folder: none may be empty or blank.
_PATH_OPTIONS = {
    "config": "--config",
    "out_dir": "--out-dir",
    "run_dir": "--run-dir",
    "resume": "--resume",
    "checkpoint": "--checkpoint",
    "out": "--out",
    "out_spec": "--out-spec",
    "spec": "--spec",
    "best": "--best",
    "runs": "--runs",
    "tables_dir": "--tables-dir",
    "plots_dir": "--plots-dir",
    "hydra_config": "the Hydra config path",
}


def _check_paths(args) -> None:
    """An empty or blank path (``--out-dir ""``, an unset shell variable) is a user error: it would
    silently mean "no output" or the current folder."""
    from .config import ConfigError

    for dest, option in _PATH_OPTIONS.items():
        value = getattr(args, dest, None)
        for path in value if isinstance(value, list) else [value]:
            if isinstance(path, str) and not path.strip():
                raise ConfigError(f"{option} is empty ({path!r}); give a path (an unset shell variable?)")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a user error with a message, no traceback)."""
    args = build_parser().parse_args(argv)
    try:
        _check_paths(args)
        return args.func(args)
    except _user_errors() as exc:
        print(f"dmnsp {args.command}: error: {exc}", file=sys.stderr)
        return 2

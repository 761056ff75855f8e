"""Optuna search: space parsing, planning, the validation-only objective, heartbeats and retries of
killed workers (journal file and a real PostgreSQL server), the export, optuna-dashboard, and the
Snakemake rules end to end including a resumed study."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch.utils.data
import yaml
from optuna.trial import TrialState

from dmnsp import search
from dmnsp.config import ConfigError
from dmnsp.experiments import expand_all

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"
EXAMPLE = ROOT / "config" / "search-example.yaml"
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

optuna.logging.set_verbosity(optuna.logging.WARNING)


def workflow_config(**search_changes) -> dict:
    """A miniature workflow config with a search over a tiny random-weights CLIP."""
    cfg = {
        "run": {"dataset_root": "data", "threads": 1},
        "experiments": {
            "tiny": {
                "datasets": ["fashion-mnist"],
                "splits": ["6-4"],
                "methods": ["zeroshot", "dmnsp"],
                "seeds": [0],
                "grid": {"LAMBDA_SCALE": [30]},
                "run": {
                    "model_name": "dmnsp-tiny",
                    "pretrained": None,
                    "max_train_per_class": 16,
                    "max_test_per_class": 8,
                    "adapter_dim": 4,
                    "batch_size": 16,
                    "epochs": 1,
                    "max_steps": 2,
                    "warmup_steps": 1,
                    "eval_batch_size": 64,
                    "num_workers": 0,
                    "device": "cpu",
                },
            }
        },
        "keep_checkpoints": False,
        "resources": [{"mem_mb": 1000, "runtime": 5, "threads": 1}],
        "search": {
            "enabled": True,
            "objective": "avg",
            "val_fraction": 0.002,  # 12 images per class: val counts differ from the 8 test images
            "n_trials": 6,
            "workers": 2,
            "space": {
                "lr": {"type": "log", "low": 1e-4, "high": 1e-2},
                "LAMBDA_SCALE": {"type": "float", "low": 1, "high": 60},
                "adapter_dim": {"type": "int", "low": 2, "high": 8, "step": 2},
                "TOP_SELECT": {"type": "categorical", "choices": [1, 2]},
            },
            "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 3},
            "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
        },
    }
    cfg["search"].update(search_changes)
    return cfg


def schema_validate(cfg: dict) -> dict:
    from snakemake.utils import validate

    validate(cfg, str(SCHEMA))
    return cfg


# ------------------------------------------------------------------------------------ space


def test_space_parses_every_kind():
    space = search.parse_space(workflow_config()["search"]["space"])
    assert space["lr"] == {"type": "float", "low": 1e-4, "high": 1e-2, "step": None, "log": True}
    assert space["adapter_dim"] == {"type": "int", "low": 2, "high": 8, "step": 2, "log": False}
    assert space["TOP_SELECT"] == {"type": "categorical", "choices": [1, 2]}


BAD_SPACES = [
    ({"lr": {"type": "uniform", "low": 0, "high": 1}}, "type"),
    ({"lr": {"type": "float", "low": 1, "high": 1}}, "smaller"),
    ({"lr": {"type": "log", "low": 0, "high": 1}}, "low > 0"),
    ({"lr": {"type": "float", "low": 0.1, "high": 1, "log": True, "step": 0.1}}, "step"),
    ({"adapter_dim": {"type": "int", "low": 1.5, "high": 8}}, "integer"),
    ({"TOP_SELECT": {"type": "categorical", "choices": []}}, "choices"),
    ({"TOP_SELECT": {"type": "categorical", "choices": [1, 1]}}, "twice"),
    ({"lr": {"type": "float", "low": 0, "high": 1, "choices": [1]}}, "unknown field"),
    ({}, "at least one"),
]


@pytest.mark.parametrize(("space", "needle"), BAD_SPACES)
def test_bad_spaces_are_rejected_naming_the_key(space, needle):
    with pytest.raises(search.SearchError, match=needle):
        search.parse_space(space)


def test_suggestions_stay_inside_the_space():
    space = search.parse_space(workflow_config()["search"]["space"])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(60):
        trial = study.ask()
        params = search.suggest(trial, space)
        assert search.in_space(params, space), params
        study.tell(trial, 0.0)
    drawn = {t.params["adapter_dim"] for t in study.trials}
    assert drawn <= {2, 4, 6, 8} and len(drawn) > 1
    assert not search.in_space({**params, "adapter_dim": 10}, space)
    assert not search.in_space({**params, "lr": 0.5}, space)


# ------------------------------------------------------------------------------------ planning


def test_plan_builds_a_validation_base_and_test_followups():
    cfg = schema_validate(workflow_config())
    plan = expand_all(cfg)
    sp = search.plan_search(cfg, plan)
    spec = sp.spec
    assert spec["experiment"] == "tiny" and spec["storage"] == "results/tiny/search/study.journal"
    assert spec["base"]["evaluate_on"] == "val" and spec["base"]["val_fraction"] == 0.002
    assert spec["base"]["method"] == "dmnsp" and spec["base"]["seed"] == 0
    assert not set(spec["space"]) & set(spec["base"]), "searched keys must come from the trial only"
    cfg_trial = search.trial_config(
        spec["base"], {"lr": 1e-3, "LAMBDA_SCALE": 5.0, "adapter_dim": 4, "TOP_SELECT": 2}
    )
    assert cfg_trial["evaluate_on"] == "val" and cfg_trial["LAMBDA_SCALE"] == 5.0
    assert [r.run_id for r in sp.followups] == [
        "dataset~fashion-mnist/split~6-4/method~dmnsp/search~best/seed~0"
    ]
    follow = sp.followups[0]
    assert follow.label == "dmnsp (searched)"  # passed on to run.json by search.smk
    assert "evaluate_on" not in follow.settings and "val_fraction" not in follow.settings
    assert not set(spec["space"]) & set(follow.settings)
    n_before = len(plan.experiments["tiny"])
    sp.add_to(plan)
    sp.add_to(plan)  # idempotent
    assert len(plan.experiments["tiny"]) == n_before + 1
    assert plan.run("tiny", follow.run_id) is follow
    assert sp.workers == [0, 1] and sp.resources["threads"] == 1 and sp.resources["runtime"] == 5 * 2 * 3
    # The follow-up run config: base settings plus the best parameters, on the test set.
    settings = search.followup_settings(follow.settings, {"lr": 0.002, "LAMBDA_SCALE": 7.5})
    assert settings["lr"] == 0.002 and settings.get("evaluate_on", "test") == "test"
    with pytest.raises(search.SearchError, match="test set"):
        search.followup_settings({**follow.settings, "evaluate_on": "val"}, {})


BAD_SEARCHES = [
    ({"space": {"seed": {"type": "int", "low": 0, "high": 3}}}, "cannot be searched"),
    ({"space": {"dataset_root": {"type": "categorical", "choices": ["a"]}}}, "cannot be searched"),
    ({"space": {"pretrain.steps": {"type": "int", "low": 1, "high": 3}}}, "cannot be searched"),
    ({"space": {"learning_rate": {"type": "float", "low": 0.1, "high": 1}}}, "learning_rate"),
    ({"space": {"TOP_K_RATIO": {"type": "float", "low": 0.5, "high": 2}}}, "invalid trial"),
    ({"method": "finetune"}, "ignores LAMBDA_SCALE"),
    ({"experiment": "nope"}, "no experiment"),
    ({"trial_run": {"evaluate_on": "test"}}, "set by the search"),
    ({"split": "5-5"}, "no dmnsp run"),
    ({"grace_period": 30, "heartbeat_interval": 60}, "grace_period"),
    ({"objective": "best"}, "objective"),
]


@pytest.mark.parametrize(("changes", "needle"), BAD_SEARCHES)
def test_bad_search_configs_stop_planning(changes, needle):
    cfg = workflow_config()
    cfg["search"].update(changes)
    with pytest.raises(ConfigError, match=needle):
        search.plan_search(cfg)


def test_an_experiment_scored_on_validation_cannot_take_the_followups():
    cfg = workflow_config()
    cfg["experiments"]["tiny"]["run"].update(evaluate_on="val", val_fraction=0.1)
    with pytest.raises(search.SearchError, match="test set"):
        search.plan_search(cfg)


def test_schema_accepts_the_example_and_states_the_package_defaults():
    cfg = schema_validate(yaml.safe_load(EXAMPLE.read_text()))
    sp = search.plan_search(cfg)
    assert sp.spec["objective"] in ("avg", "last") and sp.spec["n_trials"] >= sp.spec["workers"] >= 2
    filled = schema_validate({"experiments": {"e": {"methods": ["dmnsp"]}}, "search": {}})["search"]
    for key, default in search.SEARCH_DEFAULTS.items():
        expected = {"sampler": search.SAMPLER_DEFAULTS, "pruner": search.PRUNER_DEFAULTS}.get(key, default)
        assert filled[key] == expected, key
    assert filled["enabled"] is False
    with pytest.raises(Exception, match="colour"):
        schema_validate({"experiments": {"e": {}}, "search": {"colour": 1}})
    with pytest.raises(Exception, match="uniform"):
        schema_validate({"experiments": {"e": {}}, "search": {"space": {"lr": {"type": "uniform"}}}})


def test_objective_values():
    assert search.objective_value([0.8, 0.6, 0.4], "avg") == pytest.approx(0.6)
    assert search.objective_value([0.8, 0.6, 0.4], "last") == pytest.approx(0.4)


# ------------------------------------------------------------------- the test set stays unread


class UnreadableSplit(torch.utils.data.Dataset):
    """Stands in for the test split: any read fails the test."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        raise AssertionError(f"the search read test image {i}")


@pytest.fixture(scope="module")
def inprocess_search(tmp_path_factory, fake_data):
    """Two trials in this process on fake data whose test split cannot be read; every evaluated
    dataset recorded."""
    import dmnsp.runner

    tmp = tmp_path_factory.mktemp("inprocess")
    data = dataclasses.replace(fake_data, test=UnreadableSplit(len(fake_data.test)))
    cfg = workflow_config(
        val_fraction=0.25, n_trials=3, storage=str(tmp / "study.journal"), pruner={"name": "none"}
    )
    cfg["experiments"]["tiny"]["splits"] = ["2-2"]
    sp = search.plan_search(schema_validate(cfg))
    evaluated = []
    real = dmnsp.runner.evaluate_seen

    def recording(model, tokenizer, task_sets, *args, **kwargs):
        evaluated.append([(ds.base, np.array(ds.indices)) for ds in task_sets])
        return real(model, tokenizer, task_sets, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(dmnsp.runner, "evaluate_seen", recording)
    try:
        search.create_study(sp.spec)
        summary = search.run_worker(sp.spec, 0, data=data, log=lambda _: None)
    finally:
        mp.undo()
    return sp, data, evaluated, summary, tmp


def test_trials_evaluate_on_validation_images_only(inprocess_search):
    from dmnsp.scenario import build_scenario

    sp, data, evaluated, summary, _ = inprocess_search
    assert summary["finished_after"] == 3 and len(summary["trials"]) == 3
    study = search.load_study(sp.spec, retry=False)
    n_tasks = 5
    assert len(evaluated) == 3 * n_tasks  # one evaluation after every task of every trial
    for trial in study.trials:
        cfg = search.trial_config(sp.spec["base"], trial.params)
        scenario = build_scenario(data, cfg)
        val = [len(v) for v in scenario.val_indices]
        test = [len(v) for v in scenario.test_indices]
        assert trial.user_attrs["evaluate_on"] == "val"
        assert trial.user_attrs["n_samples_per_task"] == val != test
    scenario = build_scenario(data, search.trial_config(sp.spec["base"], study.trials[0].params))
    trained = np.concatenate([*scenario.train_indices, scenario.pretrain_indices])
    for call in evaluated:
        for task, (base, indices) in enumerate(call):
            assert base is data.train, "evaluated a split other than the training images' validation part"
            np.testing.assert_array_equal(indices, scenario.val_indices[task])
            assert not np.intersect1d(indices, trained).size, "validation images overlap training images"


def test_export_writes_best_params_table_and_plots(inprocess_search):
    import matplotlib
    import matplotlib.pyplot as plt

    sp, _, _, _, tmp = inprocess_search
    out = tmp / "export"
    # A user's session: its backend (Agg under another name) and its open figure must survive.
    backend, users = matplotlib.get_backend(), "module://matplotlib.backends.backend_agg"
    plt.switch_backend(users)
    figure = plt.figure()
    try:
        result = search.export_study(sp.spec, out)
        assert matplotlib.get_backend() == users and plt.fignum_exists(figure.number)
    finally:
        plt.close(figure)
        plt.switch_backend(backend)
    best = yaml.safe_load((out / "best_params.yaml").read_text())
    assert search.in_space(best["params"], sp.spec["space"])
    assert best["value"] == max(t.value for t in search.load_study(sp.spec).trials)
    assert best["params"] == search.read_best(out / "best_params.yaml")
    table = pd.read_csv(out / "trials.csv")
    assert len(table) == 3 and set(sp.spec["space"]) <= set(table.columns)
    assert (table["state"] == "COMPLETE").all() and "| number |" in (out / "trials.md").read_text()
    for name in search.PLOTS:
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert result["plots_not_drawn"] == {}


def test_optuna_dashboard_opens_the_journal(inprocess_search):
    import socket

    sp, *_ = inprocess_search
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "optuna-dashboard"
    proc = subprocess.Popen(
        [str(exe), sp.spec["storage"], "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline, body = time.monotonic() + 30, None
        while time.monotonic() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as resp:
                    body = json.loads(resp.read())
            except OSError:
                time.sleep(0.3)
        assert body is not None, "optuna-dashboard did not answer"
        names = [s["study_name"] for s in body["study_summaries"]]
        assert names == [sp.spec["study_name"]]
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def test_creating_the_study_again_resumes_it(tmp_path):
    spec = sleep_spec(str(tmp_path / "study.journal"), n_trials=3)
    quick = lambda trial: search.suggest(trial, spec["space"])["x"]  # noqa: E731
    assert search.create_study(spec)["created"] is True
    assert search.run_worker(spec, 0, objective=quick, log=lambda _: None)["finished_after"] == 3
    before = [(t.number, t.params, t.value) for t in search.load_study(spec).trials]
    spec["n_trials"] = 5  # a larger budget, as after editing the config
    info = search.create_study(spec)
    assert info["created"] is False and info["existing_trials"] == 3
    summary = search.run_worker(spec, 1, objective=quick, log=lambda _: None)
    assert summary["finished_before"] == 3 and summary["finished_after"] == 5
    after = [(t.number, t.params, t.value) for t in search.load_study(spec).trials]
    assert after[:3] == before and len(after) == 5


# ------------------------------------------------------------- killed workers: heartbeat + retry

# A worker whose objective sleeps ~1 s per trial (5 reports of 0.2 s): the real worker loop,
# storage, heartbeat and retry callback, no model.
SLEEP_WORKER = """
import pathlib, sys, time
from dmnsp.search import load_spec, run_worker, suggest
spec_path = pathlib.Path(sys.argv[1])
spec = load_spec(spec_path)
spec_path.with_name(f"ready{sys.argv[2]}").touch()
while not spec_path.with_name("go").exists():  # start both workers' trials together
    time.sleep(0.05)
def objective(trial):
    params = suggest(trial, spec["space"])
    for step in range(5):
        time.sleep(0.2)
        trial.report(params["x"], step)
    return params["x"]
run_worker(spec, int(sys.argv[2]), objective=objective)
"""


def sleep_spec(storage: str, n_trials: int = 10) -> dict:
    return {
        "version": search.SPEC_VERSION,
        "experiment": "kill",
        "study_name": "kill-test",
        "storage": storage,
        "direction": "maximize",
        "objective": "avg",
        "n_trials": n_trials,
        "workers": 2,
        "space": search.parse_space(
            {"x": {"type": "float", "low": 0, "high": 1}, "k": {"type": "categorical", "choices": ["a", "b"]}}
        ),
        "base": {},
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 3},
        "pruner": {"name": "none", "n_startup_trials": 0, "n_warmup_steps": 0},
        "heartbeat_interval": 1,
        "grace_period": 3,
        "max_retry": 2,
    }


def kill_one_worker_mid_trial(tmp: Path, storage: str) -> None:
    spec = sleep_spec(storage)
    search.create_study(spec)
    spec_path = tmp / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    script = tmp / "worker.py"
    script.write_text(SLEEP_WORKER)

    def start(i: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(script), str(spec_path), str(i)],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    victim, survivor = start(0), start(1)
    study = search.load_study(spec, retry=False)
    killed, snapshot = None, {}
    try:
        deadline = time.monotonic() + 60
        while not all((tmp / f"ready{i}").exists() for i in (0, 1)) and time.monotonic() < deadline:
            time.sleep(0.05)
        (tmp / "go").touch()
        deadline = time.monotonic() + 60
        while killed is None and time.monotonic() < deadline:
            trials = study.get_trials(deepcopy=False)
            running = [  # the victim's trial, once it has drawn all its parameters (not just the first)
                t
                for t in trials
                if t.state == TrialState.RUNNING
                and t.user_attrs.get("pid") == victim.pid
                and set(t.params) == set(spec["space"])
            ]
            done = [t for t in trials if t.state == TrialState.COMPLETE]
            if running and len(done) >= 2:
                os.kill(victim.pid, signal.SIGKILL)
                killed = running[0]
                snapshot = {
                    t.number: (t.value, t.params) for t in study.get_trials(states=(TrialState.COMPLETE,))
                }
            else:
                time.sleep(0.05)
        assert killed is not None, "the victim never ran a trial"
        assert victim.wait(timeout=10) == -signal.SIGKILL
        out, _ = survivor.communicate(timeout=90)
        assert survivor.returncode == 0, out
    finally:
        for proc in (victim, survivor):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()

    trials = {t.number: t for t in study.get_trials()}
    # The killed trial was failed by the survivor's heartbeat check and retried with its parameters.
    assert trials[killed.number].state == TrialState.FAIL, trials[killed.number]
    retries = [t for t in trials.values() if search.retry_of(t) == killed.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE, retries
    assert retries[0].params == killed.params == trials[killed.number].params
    # The study reached its budget (a race may add up to workers - 1 trials) ...
    finished = [t for t in trials.values() if t.state in search.FINISHED]
    assert spec["n_trials"] <= len(finished) <= spec["n_trials"] + spec["workers"] - 1
    assert not [t for t in trials.values() if t.state == TrialState.RUNNING]
    # ... and nothing finished before the kill was lost or changed.
    for number, (value, params) in snapshot.items():
        assert trials[number].state == TrialState.COMPLETE
        assert (trials[number].value, trials[number].params) == (value, params)
    # A worker started again (a re-run) finds the budget spent and adds nothing.
    again = subprocess.run(
        [sys.executable, str(script), str(spec_path), "0"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing to do" in again.stdout
    assert len(search.load_study(spec, retry=False).trials) == len(trials)


@pytest.mark.slow
def test_killed_worker_journal_trial_is_failed_and_retried(tmp_path):
    kill_one_worker_mid_trial(tmp_path, str(tmp_path / "study.journal"))


@pytest.mark.slow
def test_killed_worker_postgresql_trial_is_failed_and_retried(tmp_path):
    from pg import PostgresServer, server_bindir

    if server_bindir() is None:
        pytest.skip("PostgreSQL server binaries are not installed (apt-get install postgresql)")
    with PostgresServer() as pg:
        kill_one_worker_mid_trial(tmp_path, pg.url)


# --------------------------------------------------------------------- Snakemake end to end


def snakemake(*args: str, cwd: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(cwd), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted(cwd.rglob("logs/*.log")))
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{logs}"
        )
    return proc


def study_of(workdir: Path) -> optuna.Study:
    spec = search.load_spec(workdir / "results" / "tiny" / "search" / "spec.yaml")
    spec = {**spec, "storage": str(workdir / spec["storage"])}
    return search.load_study(spec, retry=False)


def test_example_plans_the_search_and_its_followups(tmp_path):
    proc = snakemake("-n", "--quiet", "rules", "--configfile", str(EXAMPLE), cwd=tmp_path, timeout=180)
    counts = {}
    for line in (proc.stdout + proc.stderr).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts.setdefault(parts[0], int(parts[1]))
    # 8 trials by 2 workers; the best setting over both seeds next to the dmnsp grid runs (5 tasks each).
    assert counts["search_create_study"] == 1 and counts["search_worker"] == 2
    assert counts["search_export"] == 1 and counts["search_prepare_run"] == 2
    assert counts["prepare_run"] == 2 and counts["train_task"] == 20 and counts["compute_metrics"] == 4


def test_lint_is_clean_with_the_search_rules():
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(SNAKEFILE),
        "--lint",
        "--configfile",
        str(EXAMPLE),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "search_worker" not in proc.stdout + proc.stderr  # no lint names a search rule


@pytest.mark.slow
def test_snakemake_search_runs_follows_up_on_test_and_resumes(tmp_path_factory):
    from dmnsp.datasets import load_dataset
    from dmnsp.scenario import build_scenario

    workdir = tmp_path_factory.mktemp("search-workflow")
    data_root = tmp_path_factory.mktemp("data")
    cfg = workflow_config()
    cfg["run"]["dataset_root"] = str(data_root)
    cfg["experiments"]["tiny"]["methods"] = ["dmnsp"]
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    start = time.perf_counter()
    proc = snakemake("--cores", "2", "--configfile", str(config), cwd=workdir)
    first_seconds = time.perf_counter() - start
    assert "search_worker" in proc.stderr + proc.stdout

    out = workdir / "results" / "tiny" / "search"
    spec = search.load_spec(out / "spec.yaml")
    best = yaml.safe_load((out / "best_params.yaml").read_text())
    assert search.in_space(best["params"], spec["space"]), best
    study = study_of(workdir)
    first = {t.number: (t.state, t.value, t.params) for t in study.trials}
    finished = [t for t in study.trials if t.state in search.FINISHED]
    assert 6 <= len(finished) <= 7
    workers = {t.user_attrs.get("worker") for t in study.trials}
    assert workers == {0, 1}, "both worker jobs ran trials"
    for name in search.PLOTS:
        assert (out / "plots" / f"{name}.png").is_file()
    assert len(pd.read_csv(out / "trials.csv")) == len(study.trials)

    # Trials scored on validation images: the evaluated counts are the validation split's.
    data = load_dataset("fashion-mnist", data_root)
    for trial in finished:
        scenario = build_scenario(data, search.trial_config(spec["base"], trial.params))
        n_done = len(trial.user_attrs["accuracy_per_step"])
        val = [len(v) for v in scenario.val_indices[:n_done]]
        test = [len(v) for v in scenario.test_indices[:n_done]]
        assert trial.user_attrs["evaluate_on"] == "val"
        assert trial.user_attrs["n_samples_per_task"] == val != test

    # The follow-up run of the best setting: test set, same per-task rules, in the experiment's tables.
    run_dir = workdir / "results" / "tiny" / "runs" / "dataset~fashion-mnist" / "split~6-4" / "method~dmnsp"
    run_dir = run_dir / "search~best" / "seed~0"
    run_cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert run_cfg["evaluate_on"] == "test" and run_cfg["val_fraction"] == 0.0
    for key, value in best["params"].items():
        assert run_cfg[key] == value
    assert json.loads((run_dir / "run.json").read_text())["label"] == "dmnsp (searched)"
    evals = [json.loads((run_dir / f"task{t}" / "eval.json").read_text()) for t in range(2)]
    assert evals[-1]["n_samples_per_task"] == [6 * 8, 4 * 8]  # the test images (max_test_per_class 8)
    summary = pd.read_csv(workdir / "results" / "tiny" / "tables" / "summary.csv")
    assert set(summary["label"]) == {"dmnsp", "dmnsp (searched)"}

    # A second invocation with a larger budget resumes the same study: old trials kept, more added.
    cfg["search"]["n_trials"] = 8
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    start = time.perf_counter()
    target = "results/tiny/search/best_params.yaml"  # before --configfile, which takes several values
    snakemake(target, "--cores", "2", "--configfile", str(config), cwd=workdir)
    second_seconds = time.perf_counter() - start
    study = study_of(workdir)
    again = {t.number: (t.state, t.value, t.params) for t in study.trials}
    assert {n: again[n] for n in first} == first, "trials of the first invocation changed"
    assert 8 <= len([t for t in study.trials if t.state in search.FINISHED]) <= 9
    assert len(again) > len(first)
    print(f"search workflow: {first_seconds:.0f} s, resumed in {second_seconds:.0f} s")

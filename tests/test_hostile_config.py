"""Hostile configs, sweep sheets, class orders, Hydra imports and workflow configs (issue 17): each
is refused with one line naming the problem and the fix, within a bounded time and memory, or
read as the user meant it. Tried through the real readers, the CLI and Snakemake's own planning.

Classes of hostile input (the module's sections):
  A alias and interpolation bombs      B nesting deeper than Python's recursion limit
  C numbers and lengths past a bound   D values equal as settings (30 and 30.0)
  E import-config of a damaged Hydra file   F byte-order marks    G odd experiment names
  H non-UTF-8 and too deep workflow configs   I one-class scenarios   J ``~user`` paths
  K YAML scalars PyYAML cannot build
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_hostile import experiment, one_line_error

from dmnsp.cli import main
from dmnsp.config import (
    ConfigError,
    check_home,
    check_workflow_config,
    load_config,
    parse_overrides,
    validate,
)
from dmnsp.devices import THREADS_PER_CORE, available_cores, check_workers
from dmnsp.experiments import (
    MAX_RUNS,
    check_experiment_name,
    expand_all,
    expand_experiment,
    read_sheet,
    same_setting,
)
from dmnsp.hydra_import import convert_hydra_config
from dmnsp.scenario import MAX_TASKS, ScenarioError, num_tasks, resolve_class_order

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
NOT_UTF8 = "lr: 0.001\nprompt_template: 'une photo d\u2019un {}.'\n".encode("cp1252")


def bomb(levels: int = 9, width: int = 10, item: str = "1") -> str:
    """A flow list holding a "billion laughs" (``width ** levels`` items once aliases expand), in
    a few hundred characters: each level lists the previous one ``width`` times."""
    parts = [f"&l0 [{', '.join([item] * width)}]"]
    parts += [f"&l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


def mapping_bomb(levels: int = 9, width: int = 10) -> str:
    """The same with mappings (what Snakemake's own config merging would copy level by level)."""
    keys = [f"k{j}" for j in range(width)]
    parts = ["m0: &m0 {" + ", ".join(f"{k}: 1" for k in keys) + "}"]
    parts += [f"m{i}: &m{i} {{" + ", ".join(f"{k}: *m{i - 1}" for k in keys) + "}" for i in range(1, levels)]
    return "{" + ", ".join(parts) + "}"


def interpolation_bomb(levels: int = 11) -> str:
    """A Hydra file whose ``${...}`` references multiply a string tenfold per level (10^12 chars)."""
    lines = ["dataset: cifar100", 'a0: "xxxxxxxxxx"']
    lines += [f'a{i}: "' + f"${{a{i - 1}}}" * 10 + '"' for i in range(1, levels + 1)]
    return "\n".join([*lines, f'prompt_template: "${{a{levels}}} {{}}"']) + "\n"


def deep(depth: int = 20_000) -> str:
    """Nested lists 20 times deeper than Python's default recursion limit."""
    return "[" * depth + "]" * depth


def snakemake_dry_run(tmp_path: Path, *args: str) -> str:
    from test_workflow import snakemake

    proc = snakemake("-n", *args, cwd=tmp_path, timeout=300, check=False)
    assert proc.returncode != 0
    return proc.stdout + proc.stderr


def planning_error(output: str) -> str:
    """The one message line of a planning error (Snakemake's WorkflowError: header, message, File lines)."""
    assert "Traceback" not in output and "Building DAG" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    header = next(i for i, line in enumerate(lines) if line.startswith("WorkflowError"))
    assert all(line.lstrip().startswith("File ") for line in lines[header + 2 :]), output
    return lines[header + 1]


# ------------------------------------------------------------- A, B: bounded in a fresh process

# (name, reader, file name, file text or bytes, phrase the one-line error must hold)
BOUNDED = [
    # A: alias bombs wherever a config-like document is read, and Hydra interpolation bombs.
    ("A config class_order", "load_config", "c.yaml", f"class_order: {bomb()}\n", "1,000,000 values"),
    (
        "A config pretrain.templates",
        "load_config",
        "c.yaml",
        f"pretrain:\n  templates: {bomb(item=repr('a {}'))}\n",
        "1,000,000 values",
    ),
    ("A class-order file in the job", "class_order_job", "o.yaml", f"class_order: {bomb()}\n", "1,000,000"),
    ("A class-order file at planning", "class_order_planning", "o.yaml", f"{bomb()}\n", "1,000,000"),
    ("A sweep-sheet cell", "read_sheet", "s.tsv", f"LAMBDA_SCALE\n{bomb()}\n", "1,000,000"),
    (
        "A workflow grid value",
        "workflow_loaded",
        "w.yaml",
        f"experiments:\n  e:\n    grid: {{LAMBDA_SCALE: {bomb()}}}\n",
        "1,000,000",
    ),
    (
        "A workflow run mapping",
        "workflow_file",
        "w.yaml",
        f"experiments:\n  e:\n    run: {mapping_bomb()}\n",
        "1,000,000",
    ),
    ("A Hydra alias bomb", "import_hydra_config", "h.yaml", f"class_order: {bomb()}\n", "1,000,000"),
    (
        "A Hydra interpolation bomb",
        "import_hydra_config",
        "h.yaml",
        interpolation_bomb(),
        "65,536 characters",
    ),
    (
        "A Hydra interpolation chain",
        "import_hydra_config",
        "h.yaml",
        "".join(f"a{i}: ${{a{i + 1}}}\n" for i in range(3000)) + "a3000: x\n",
        "nest more than 16",
    ),
    ("A --set value", "set_override", "set.txt", f"class_order={bomb()}", "1,000,000"),
    # B: nesting deeper than Python's recursion limit (or than dmnsp's depth bound).
    ("B config file (JSON)", "load_config", "c.json", deep(), "nests too deep"),
    ("B config file (YAML mapping)", "load_config", "c.yaml", "{a: " * 5000 + "1" + "}" * 5000, "too deep"),
    ("B config 150 levels", "load_config", "c.yaml", "lr: " + deep(150), "deeper than 100"),
    ("B class-order file", "class_order_job", "o.yaml", deep(), "too deep"),
    ("B sweep-sheet cell", "read_sheet", "s.tsv", "lr\n" + deep(60_000) + "\n", "too deep"),
    ("B Hydra file", "import_hydra_config", "h.yaml", "lr: " + deep(), "too deep"),
    ("B --set value", "set_override", "set.txt", "lr=" + deep(), "too deep"),
    (
        "B --settings-json",
        "settings_json",
        "s.json",
        '{"a":' * 100_000 + "1" + "}" * 100_000,
        "deeper than Python",
    ),
    (
        "B --settings-json 150 levels",
        "settings_json",
        "s.json",
        '{"a":' * 150 + "1" + "}" * 150,
        "deeper than 100",
    ),
    ("B workflow config file", "workflow_file", "w.json", deep(), "too deep"),
]


@pytest.fixture(scope="module")
def bounded_results(tmp_path_factory) -> dict:
    """Every BOUNDED case run once, in one fresh process (peak memory is per process)."""
    tmp = tmp_path_factory.mktemp("bounded")
    cases = []
    for i, (name, reader, file_name, text, _) in enumerate(BOUNDED):
        path = tmp / f"{i}-{file_name}"
        path.write_text(text, encoding="utf-8")
        cases.append({"name": name, "reader": reader, "arg": str(path)})
    (tmp / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "bounded_cases.py"), str(tmp / "cases.json")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp,
    )
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert records and records[-1].get("done"), proc.stdout + proc.stderr
    return {r["name"]: r for r in records[:-1]}


@pytest.mark.parametrize(("name", "phrase"), [(c[0], c[4]) for c in BOUNDED], ids=[c[0] for c in BOUNDED])
def test_hostile_documents_end_in_one_line_within_time_and_memory(bounded_results, name, phrase):
    record = bounded_results[name]
    assert record["outcome"] == "config-error", record
    assert phrase in record["message"] and "\n" not in record["message"], record
    assert len(record["message"]) < 1000, record
    # Bounds with a wide margin for a loaded 2-core CI machine: refusing a bomb walks at most 10^6
    # nodes (about a second); expanding one took minutes and gigabytes.
    assert record["seconds"] < 60, record
    assert record["peak_over_baseline_mib"] < 400, record


def test_bombs_through_the_command_line_are_one_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"class_order: {bomb()}\n")
    start = time.perf_counter()
    assert main(["validate-config", "--config", str(config)]) == 2
    assert "1,000,000 values" in one_line_error(capsys)
    hydra = tmp_path / "h.yaml"
    hydra.write_text(interpolation_bomb())
    assert main(["import-config", str(hydra)]) == 2
    assert "65,536 characters" in one_line_error(capsys)
    out = str(tmp_path / "run")
    assert main(["prepare-run", "--settings-json", '{"a":' * 50_000 + "1" + "}" * 50_000, "--experiment", "e",
                 "--out-dir", out]) == 2  # fmt: skip
    assert "--settings-json nests deeper than Python can parse" in one_line_error(capsys)
    assert main(["validate-config", "--config", str(config), "--set", f"lr={deep()}"]) == 2
    assert "too deep" in one_line_error(capsys)
    assert time.perf_counter() - start < 120
    assert not Path(out).exists()


def test_a_class_order_file_is_checked_at_planning_as_the_job_checks_it(tmp_path):
    # Planning used to count the file's top-level items (here 5) while the job refused the file.
    order = tmp_path / "order.yaml"
    order.write_text("class_order: [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]\n")
    with pytest.raises(ConfigError, match="'class_order': class_order file .* must list integer class ids"):
        expand_experiment("e", experiment(class_order=str(order)))
    with pytest.raises(ScenarioError, match="must list integer class ids"):
        resolve_class_order(str(order), 10, list(range(10)))
    order.write_text("[3, 1, 0, 2]\n")  # 4 of Fashion-MNIST's 10 classes: planned 2 tasks, then failed
    with pytest.raises(ConfigError, match="leaves out 6 of the dataset's 10 classes"):
        expand_experiment("e", experiment(class_order=str(order)))
    with pytest.raises(ConfigError, match="'class_order'.*more than once"):
        expand_experiment("e", experiment(class_order=[0, 1, 2, 3, 4, 5, 6, 7, 8, 8]))


def test_an_alias_bomb_in_a_workflow_config_stops_snakemake_planning_in_one_line(tmp_path):
    config = tmp_path / "w.yaml"
    config.write_text(
        f"experiments:\n  e:\n    methods: [zeroshot]\n    grid: {{LAMBDA_SCALE: {bomb()}}}\n"
        "    run: {model_name: dmnsp-tiny, pretrained: null}\n"
    )
    start = time.perf_counter()
    message = planning_error(snakemake_dry_run(tmp_path, "--configfile", str(config)))
    assert "invalid workflow config" in message and "1,000,000 values" in message
    assert time.perf_counter() - start < 120  # it hung for minutes, 1.4-2.8 GB


# --------------------------------------------------------------------- C: numbers and lengths

RUN_BOUNDS = [
    ({"num_workers": 10_000}, "'num_workers': 10000 is greater than the maximum of 256"),
    ({"seed": 1e30}, "'seed'"),
    ({"seed": 2**63}, "'seed'"),
    ({"seed": -1}, "'seed'"),
    ({"batch_size": 10**6}, "'batch_size': 1000000 is greater than the maximum of 65536"),
    ({"eval_batch_size": 10**6}, "'eval_batch_size'"),
    ({"pretrain": {"batch_size": 10**6}}, "'pretrain.batch_size'"),
    ({"pretrain": {"steps": 10**8}}, "'pretrain.steps'"),
    ({"method": "moe_adapters", "moe": {"experts": 10**6}}, "'moe.experts'"),
    ({"method": "moe_adapters", "moe": {"top_k": 10**6}}, "'moe.top_k'"),
    ({"method": "rapf", "rapf": {"beta": 1e9}}, "'rapf.beta'"),  # 2e10 draws per hard pair and step
    ({"method": "rapf", "rapf": {"beta": 0.01}}, "'rapf.beta'"),  # int(10 beta) = 0: no replay at all
    ({"method": "rapf", "rapf": {"mix_bias": 5}}, "'rapf.mix_bias'"),
    ({"method": "rapf", "rapf": {"threshold": 1e300}}, "'rapf.threshold'"),
    ({"method": "rapf", "rapf": {"milestones": [10**12]}}, "'rapf.milestones.0'"),
    ({"method": "rapf", "rapf": {"milestones": [4] * 1001}}, "'rapf.milestones'"),
    ({"pretrain": {"templates": ["a {}"] * 1001}}, "'pretrain.templates': 1,001 items, more than the 1,000"),
    ({"pretrain": {"templates": ["a {}" + "x" * 1000]}}, "'pretrain.templates.0': 1,004 characters"),
    ({"prompt_template": "a photo of a {}" + "." * 1000}, "'prompt_template': 1,015 characters"),
    ({"class_order": list(range(100_001))}, "'class_order': 100,001 items, more than the 100,000"),
    ({"class_order": [0, 10**6]}, "'class_order.1'"),
    ({"initial_increment": 10**6}, "'initial_increment'"),
    ({"increment": 10**6}, "'increment'"),
    ({"max_steps": 10**10}, "'max_steps'"),
    ({"warmup_steps": 10**10}, "'warmup_steps'"),
    ({"TOP_SELECT": 10**6}, "'TOP_SELECT'"),
    ({"max_train_per_class": 10**10}, "'max_train_per_class'"),
    ({"max_test_per_class": 10**10}, "'max_test_per_class'"),
    ({"pretrain_per_class": 10**10}, "'pretrain_per_class'"),
    ({"lr": 10**400}, "'lr': 401-digit number is not finite"),
    ({"device": "cuda:99999999999999999999"}, "'device'"),
    ({"device": "cpu\n"}, "'device'"),
    ({"num_workers": "auto\n"}, "'num_workers'"),
]


@pytest.mark.parametrize(("change", "needle"), RUN_BOUNDS, ids=[str(c)[:40] for c, _ in RUN_BOUNDS])
def test_run_settings_past_their_bounds_are_one_line(change, needle):
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        validate(change)
    message = str(info.value)
    assert needle in message and "\n" not in message and len(message) < 1000, message
    assert time.perf_counter() - start < 10


def test_bounds_pass_at_their_limits():
    cfg = validate(
        {
            "num_workers": 256,
            "seed": 2**63 - 1,
            "batch_size": 65536,
            "class_order": list(range(100_000)),
            "pretrain": {"templates": ["a {}"] * 1000, "steps": 10**7},
            "device": "cuda:7",
        }
    )
    assert cfg["num_workers"] == 256 and cfg["seed"] == 2**63 - 1


def test_workers_past_a_few_per_core_are_refused_when_the_job_starts():
    cores = available_cores()
    assert check_workers(THREADS_PER_CORE * cores) == THREADS_PER_CORE * cores
    with pytest.raises(ConfigError, match=f"'num_workers': .* at most {THREADS_PER_CORE * cores} or auto"):
        check_workers(THREADS_PER_CORE * cores + 1)


def workflow(**spec) -> dict:
    return {"experiments": {"e": {"methods": ["zeroshot"], "run": {"model_name": "dmnsp-tiny"}, **spec}}}


WORKFLOW_BOUNDS = [
    (workflow(seeds=[0, 2**63]), "'experiments.e.seeds.1'"),
    (workflow(seeds=[-1]), "'experiments.e.seeds.0'"),
    (workflow(seeds=list(range(1001))), "'experiments.e.seeds': 1,001 items"),
    (workflow(grid={"lr": [0.1] * 1001}), "'experiments.e.grid.lr': 1,001 items"),
    (workflow(splits=["1000000-1"]), "'experiments.e.splits.0'"),
    (workflow(num_classes=1), "'experiments.e.num_classes'"),
    ({**workflow(), "search": {"workers": 10**6}}, "'search.workers'"),
    ({**workflow(), "search": {"n_trials": 10**9}}, "'search.n_trials'"),
    ({**workflow(), "search": {"sampler": {"seed": 2**32}}}, "'search.sampler.seed'"),
    ({**workflow(), "search": {"seed": 2**63}}, "'search.seed'"),
    ({**workflow(), "search": {"heartbeat_interval": 10**12}}, "'search.heartbeat_interval'"),
    ({**workflow(), "resources": [{"mem_mb": 1}] * 1001}, "'resources': 1,001 items"),
]


@pytest.mark.parametrize(("cfg", "needle"), WORKFLOW_BOUNDS, ids=[n for _, n in WORKFLOW_BOUNDS])
def test_workflow_settings_past_their_bounds_are_one_line(cfg, needle):
    with pytest.raises(ConfigError) as info:
        check_workflow_config(cfg, (), SCHEMA)
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_sweeps_past_the_run_bound_are_refused_before_they_are_built():
    grid = {key: [0.1 * i for i in range(1, 11)] for key in ("lr", "TOP_K_RATIO", "LAMBDA_SCALE", "ls", "weight_decay", "adapter_scale")}  # fmt: skip
    start = time.perf_counter()
    with pytest.raises(
        ConfigError, match=f"1,000,000 hyperparameter points .* more than the {MAX_RUNS:,} runs"
    ):
        expand_experiment("e", {**experiment(), "grid": grid})
    assert time.perf_counter() - start < 5  # counted, not built
    with pytest.raises(ConfigError, match=f"more than the {MAX_TASKS:,} allowed"):
        num_tasks(100_000, 2, 2)
    with pytest.raises(ConfigError, match="'splits'.*makes 50,000 tasks"):
        expand_experiment("e", {**experiment(), "datasets": ["imagefolder"], "num_classes": 100_000})


# --------------------------------------------------------------- D: values equal as settings


@pytest.mark.parametrize(
    "values",
    [[30, 30.0], [0.0, -0.0], [1e-3, 0.001], [3e1, 30]],
    ids=["int-float", "signed-zero", "spelling", "exp"],
)
def test_grid_values_equal_as_settings_are_refused_as_one_setting(values):
    with pytest.raises(ConfigError, match="'grid.LAMBDA_SCALE': values .* would plan one run twice"):
        expand_experiment("e", {**experiment(), "grid": {"LAMBDA_SCALE": values}})


def test_sheet_rows_equal_as_settings_are_refused_naming_both(tmp_path):
    sheet = tmp_path / "s.tsv"
    sheet.write_text("LAMBDA_SCALE\tlr\n1\t0.1\n2\t0.1\n1.0\t1e-1\n")
    with pytest.raises(ConfigError, match="rows 1 .* and 3 .* are one setting"):
        read_sheet(str(sheet))


def test_equal_values_through_snakemake_planning_and_the_seed_count(tmp_path):
    # Distinct values: every setting has its seeds once (the tables' seed count).
    plan = expand_all(
        {"experiments": {"e": {**experiment(), "grid": {"LAMBDA_SCALE": [30, 1.0]}, "seeds": [0, 1]}}}
    )
    groups: dict = {}
    for run in plan.experiments["e"]:
        setting = same_setting({k: v for k, v in run.swept.items() if k != "seed"})
        groups.setdefault(setting, []).append(run.swept["seed"])
    assert sorted(map(sorted, groups.values())) == [[0, 1], [0, 1]]
    assert plan.expected_seeds["e"] == 2
    config = tmp_path / "w.yaml"
    config.write_text(
        yaml.safe_dump({"experiments": {"e": {**experiment(), "grid": {"LAMBDA_SCALE": [30, 30.0]}}}})
    )
    message = planning_error(snakemake_dry_run(tmp_path, "--configfile", str(config)))
    assert "values 30 and 30.0 are equal settings" in message


def test_same_setting_keeps_types_that_are_different_settings_apart():
    assert same_setting(30) == same_setting(30.0) == same_setting(3e1)
    assert same_setting(0.0) == same_setting(-0.0)
    assert same_setting(1) != same_setting(True) and same_setting(0) != same_setting(None)
    assert same_setting("30") != same_setting(30)
    assert same_setting(2**53 + 1) != same_setting(float(2**53))  # exact, not float-rounded
    assert same_setting([1, 2.0]) == same_setting([1.0, 2]) != same_setting([2, 1])
    assert same_setting(float("inf")) != same_setting(float("-inf"))


# ------------------------------------------------------------- E: import-config, damaged files

HYDRA = [
    ("seed: 1e30\n", "'seed': 1000000000000000019884624838656 is greater than the maximum"),
    ("model_name: null\n", "'model_name': None is not a model name"),
    ("model_name: [ViT-B/16]\n", "'model_name': ['ViT-B/16'] is not a model name"),
    ("initial_increment: -1\nincrement: 10\n", "'initial_increment': -1 is less than the minimum of 1"),
    ("increment: 0\n", "0 is less than the minimum of 1"),
    ("lr: " + "1" * 400 + "\n", "'lr': 400-digit number is not finite"),
    ("batch_size: [128]\n", "'batch_size': expected a number, got [128]"),
    ("1: one\nlr: 0.1\n", "key 1 is not a name"),
    ("a: ${b}\nb: ${a}\n", "interpolation cycle"),
    ("epochs: 1e400\n", "'epochs': expected an integer"),
]


@pytest.mark.parametrize(("text", "needle"), HYDRA, ids=[t.split(":")[0] for t, _ in HYDRA])
def test_damaged_hydra_files_are_one_line_and_never_import(tmp_path, capsys, text, needle):
    path = tmp_path / "h.yaml"
    path.write_text("dataset: cifar100\nmethod: dmnsp\n" + text)
    out = tmp_path / "out.yaml"
    assert main(["import-config", str(path), "--out", str(out)]) == 2
    assert needle in one_line_error(capsys)
    assert not out.exists()


def test_an_imported_seed_and_model_name_are_real_values():
    spec = convert_hydra_config({"dataset": "cifar100", "seed": 1.0, "model_name": "ViT-B/16"})
    assert spec["seeds"] == [1] and isinstance(spec["seeds"][0], int)
    assert spec["run"]["model_name"] == "ViT-B-16"
    assert "None" not in json.dumps(spec)


# ------------------------------------------------------------------------ F: byte-order marks


def test_files_saved_with_a_byte_order_mark_read_as_without(tmp_path):
    bom = "\ufeff"
    for name, sep in (("s.csv", ","), ("s.tsv", "\t")):  # Excel's "CSV UTF-8" writes a BOM
        sheet = tmp_path / name
        sheet.write_text(f"{bom}lr{sep}epochs\n0.1{sep}2\n", encoding="utf-8")
        assert read_sheet(str(sheet)) == ({"lr": 0.1, "epochs": 2},)
    config = tmp_path / "c.yaml"
    config.write_text(f"{bom}lr: 0.01\n", encoding="utf-8")
    assert load_config(config)["lr"] == 0.01
    order = tmp_path / "o.yaml"
    order.write_text(f"{bom}[1, 0]\n", encoding="utf-8")
    assert resolve_class_order(str(order), 2, [0, 1]) == [1, 0]
    hydra = tmp_path / "h.yaml"
    hydra.write_text(f"{bom}dataset: cifar100\n", encoding="utf-8")
    assert main(["import-config", str(hydra), "--out", str(tmp_path / "w.yaml")]) == 0


# ---------------------------------------------------------------------- G: odd experiment names

ODD_NAMES = ["e\n", "e\t", "e\x00", "e ", " e", "..", ".hidden", "a/b", "../x", "-e", "x" * 101, "pretrained", "é", 7, ""]  # fmt: skip


@pytest.mark.parametrize("name", ODD_NAMES, ids=[repr(n)[:12] for n in ODD_NAMES])
def test_odd_experiment_names_are_refused_at_planning(name):
    with pytest.raises(ConfigError, match="'experiments': .* is not a valid experiment name") as info:
        expand_all({"experiments": {name: experiment()}})
    assert "\n" not in str(info.value)


def test_odd_experiment_names_are_refused_by_the_schema_and_snakemake(tmp_path):
    for name in ("e\n", "x" * 101, "pretrained"):
        with pytest.raises(ConfigError, match="'experiments'"):
            check_workflow_config({"experiments": {name: {}}}, (), SCHEMA)
    config = tmp_path / "w.yaml"
    config.write_text(yaml.safe_dump({"experiments": {"e\n": experiment()}}))
    assert "'experiments': 'e\\n' does not match" in planning_error(
        snakemake_dry_run(tmp_path, "--configfile", str(config))
    )


def test_names_that_share_a_folder_on_case_insensitive_disks_are_refused():
    assert check_experiment_name("cifar100-10-10.v2+b_1") == "cifar100-10-10.v2+b_1"
    with pytest.raises(ConfigError, match="'Exp' and 'exp' differ only in case"):
        expand_all({"experiments": {"Exp": experiment(), "exp": experiment()}})


# --------------------------------------------------------- H: workflow configs Snakemake reads


@pytest.mark.parametrize(
    ("content", "needle"),
    [(NOT_UTF8, "is not UTF-8 text"), (deep().encode(), "nests too deep to parse")],
    ids=["not-utf8", "too-deep"],
)
def test_a_damaged_default_workflow_config_is_one_line(tmp_path, content, needle):
    # The embedded default (config/config.yaml, read by the Snakefile's `configfile:`) is checked by
    # dmnsp before Snakemake's own reader, which answers both with a traceback.
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_bytes(content)
    message = planning_error(snakemake_dry_run(tmp_path))
    assert "invalid workflow config: workflow config config/config.yaml" in message and needle in message


# ------------------------------------------------------------------------ I: one-class scenarios


def test_scenarios_of_one_class_are_refused_at_validation_and_planning(tmp_path):
    with pytest.raises(ConfigError, match="'class_order'"):
        validate({"class_order": [0]})
    with pytest.raises(ScenarioError, match="1 class: with fewer than 2 every prediction is right"):
        num_tasks(1, 1, 1)
    order = tmp_path / "order.yaml"
    order.write_text("[0]\n")
    with pytest.raises(ScenarioError, match="1 class"):  # the job, on a one-class ImageFolder copy
        from dmnsp.scenario import split_tasks

        split_tasks(resolve_class_order(str(order), 1, [0]), 1, 1)
    root = tmp_path / "data"
    (root / "train" / "only").mkdir(parents=True)
    (root / "train" / "only" / "a.png").write_bytes(b"")
    spec = {**experiment(dataset_root=str(root)), "datasets": ["imagefolder"], "splits": ["1-1"]}
    with pytest.raises(ConfigError, match="'splits'.*1 class"):
        expand_experiment("e", spec)
    with pytest.raises(ConfigError, match="'experiments.e.num_classes': 1 is less than the minimum of 2"):
        check_workflow_config(workflow(num_classes=1), (), SCHEMA)


# ------------------------------------------------------------------------------ J: ~user paths


def test_a_home_folder_of_no_user_is_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="'dataset_root': '~nosuchuser/data' starts with the home folder of 'nosuchuser', but there is no such user"):  # fmt: skip
        validate({"dataset_root": "~nosuchuser/data"})
    for key in ("cache_dir", "pretrained", "class_order"):
        with pytest.raises(ConfigError, match=f"'{key}'"):
            validate({key: "~nosuchuser/x"})
    check_home("dataset_root", "~/data")  # the user's own home expands
    with pytest.raises(ConfigError, match=r"'dataset_root': '~a\\nb' starts") as info:
        validate({"dataset_root": "~a\nb"})
    assert "\n" not in str(info.value)
    config = tmp_path / "c.yaml"
    config.write_text(
        "dataset_root: ~nosuchuser/data\nmodel_name: dmnsp-tiny\npretrained: null\ndevice: cpu\n"
    )
    assert main(["run", "--config", str(config), "--quiet"]) == 2  # was RuntimeError from pathlib
    assert "of 'nosuchuser', but there is no such user" in one_line_error(capsys)
    spec = {**experiment(dataset_root="~nosuchuser/data"), "datasets": ["imagefolder"]}
    with pytest.raises(ConfigError, match="'dataset_root'"):  # planning counted the folders first
        expand_experiment("e", spec)


# ------------------------------------------------------------- K: scalars PyYAML cannot build

SCALARS = [
    ("lr: 2023-13-45\n", "month must be in 1..12"),
    ("lr: 2001-02-29\n", "day is out of range"),
    ("lr: !!int abc\n", "invalid literal for int()"),
    ("lr: !!timestamp x\n", "cannot be read"),
    ("seed: " + "1" * 5000 + "\n", "Exceeds the limit (4300 digits)"),
]


@pytest.mark.parametrize(("text", "needle"), SCALARS, ids=[t[:14] for t, _ in SCALARS])
def test_scalars_pyyaml_cannot_build_are_one_line(tmp_path, capsys, text, needle):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert main(["validate-config", "--config", str(config)]) == 2
    err = one_line_error(capsys)
    assert needle in err and "quote it" in err
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_overrides([text.strip().replace(": ", "=", 1)])

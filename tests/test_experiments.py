"""Experiment expansion (dmnsp.experiments) and the reference Hydra import (dmnsp.hydra_import)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from dmnsp.config import ConfigError, parse_overrides
from dmnsp.experiments import (
    ABLATIONS,
    cli_json,
    cli_sets,
    cli_value,
    expand_all,
    expand_experiment,
    format_value,
    parse_split,
    reads_key,
    resources_for,
    unflatten,
)
from dmnsp.hydra_import import (
    convert_hydra_config,
    hydra_workflow_config,
    import_hydra_config,
    open_clip_model_name,
)

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / "config" / "paper").glob("*.yaml"))


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def spec(**overrides) -> dict:
    """A small fashion-mnist experiment (5 tasks), methods and seeds given explicitly."""
    out = {
        "datasets": ["fashion-mnist"],
        "splits": ["2-2"],
        "methods": ["zeroshot", "finetune", "dmnsp"],
        "seeds": [0, 1],
        "run": {"model_name": "dmnsp-tiny", "pretrained": None},
    }
    out.update(overrides)
    return out


def by_method(runs) -> dict[str, list]:
    out: dict[str, list] = {}
    for run in runs:
        out.setdefault(run.settings["method"], []).append(run)
    return out


# ------------------------------------------------------------------------------------ expansion


def test_embedded_default_expands_without_duplicating_zeroshot():
    plan = expand_all(load(ROOT / "config" / "config.yaml"))
    (name,) = plan.experiments
    runs = plan.experiments[name]
    groups = by_method(runs)
    # LAMBDA_SCALE [1, 30] × 2 seeds for dmnsp; zeroshot, finetune, lwf and the clean ablation
    # (which projects AdamW's update, where the coefficients do nothing) ignore it.
    assert {m: len(r) for m, r in groups.items()} == {"zeroshot": 2, "finetune": 2, "lwf": 2, "dmnsp": 6}
    assert all(run.n_tasks == 5 for run in runs)
    assert sum(run.n_tasks for run in runs) == 60
    clean = [run for run in groups["dmnsp"] if run.settings.get("projection.mode") == "clean"]
    assert len(clean) == 2 and all("LAMBDA_SCALE" not in run.settings for run in clean)
    others = ("zeroshot", "finetune", "lwf")
    assert all("LAMBDA_SCALE" not in run.settings for m in others for run in groups[m])
    assert sorted(run.settings["LAMBDA_SCALE"] for run in groups["dmnsp"] if run not in clean) == [
        1,
        1,
        30,
        30,
    ]
    # One pretraining job, shared by every run.
    assert len(plan.pretrains) == 1
    (pre,) = plan.pretrains.values()
    assert {run.pretrain_id for run in runs} == {pre.pretrain_id}
    assert all(run.settings["pretrained"] == pre.model_path for run in runs)
    assert pre.settings["pretrain_per_class"] == 500 and pre.settings["pretrain.steps"] == 100
    assert plan.expected_seeds[name] == 2


def test_the_competitors_file_adds_both_competitors_and_keeps_every_default_run():
    """config/competitors.yaml given after the default (Snakemake merges the two): the 12 default
    runs keep their ids and settings (their finished results are reused), and MoE-Adapters and
    RAPF join with 2 seeds each, rapf.precision reaching the rapf runs only."""
    from snakemake.utils import update_config

    default = load(ROOT / "config" / "config.yaml")
    merged = load(ROOT / "config" / "config.yaml")
    update_config(merged, load(ROOT / "config" / "competitors.yaml"))
    (name,) = expand_all(default).experiments
    before = {run.run_id: run.settings for run in expand_all(default).experiments[name]}
    runs = expand_all(merged).experiments[name]
    after = {run.run_id: run.settings for run in runs}
    assert {k: after[k] for k in before} == before
    groups = by_method(runs)
    assert {m: len(groups[m]) for m in ("moe_adapters", "rapf")} == {"moe_adapters": 2, "rapf": 2}
    assert len(runs) == len(before) + 4
    assert all(("rapf.precision" in run.settings) == (m == "rapf") for m, rs in groups.items() for run in rs)
    assert all("LAMBDA_SCALE" not in run.settings for m in ("moe_adapters", "rapf") for run in groups[m])


def test_run_paths_are_readable_key_value_parts():
    runs, _ = expand_experiment("e", spec(grid={"LAMBDA_SCALE": [1, 30.0], "lr": [0.001]}))
    ids = [run.run_id for run in runs]
    assert len(set(ids)) == len(ids)
    assert "dataset~fashion-mnist/split~2-2/method~dmnsp/LAMBDA_SCALE~30.0/lr~0.001/seed~1" in ids
    assert "dataset~fashion-mnist/split~2-2/method~zeroshot/seed~0" in ids
    assert "dataset~fashion-mnist/split~2-2/method~finetune/lr~0.001/seed~0" in ids
    for run in runs:
        parts = run.run_id.split("/")
        assert all(len(p.split("~")) == 2 and p.split("~")[1] for p in parts)
        assert run.run_dir == f"results/e/runs/{run.run_id}"


def test_grid_only_multiplies_the_methods_that_read_the_key():
    grid = {
        "TOP_K_RATIO": [0.05, 0.1, 0.2],
        "lr": [0.001, 0.01],
        "projection.mode": ["faithful", "clean"],
        "projection.layers": ["multi", "single"],
    }
    runs, _ = expand_experiment("e", spec(grid=grid, seeds=[0]))
    counts = {m: len(r) for m, r in by_method(runs).items()}
    # zeroshot: only projection.mode (it sets the evaluation transform); finetune: lr × mode;
    # dmnsp: everything.
    assert counts == {"zeroshot": 2, "finetune": 4, "dmnsp": 24}
    for run in by_method(runs)["zeroshot"]:
        assert "lr" not in run.settings and "TOP_K_RATIO" not in run.settings
    assert all("projection.layers" not in run.settings for run in by_method(runs)["finetune"])


@pytest.mark.parametrize(
    ("method", "key", "reads"),
    [
        ("zeroshot", "lr", False),
        ("zeroshot", "projection.mode", True),
        ("zeroshot", "max_test_per_class", True),
        ("finetune", "lr", True),
        ("finetune", "LAMBDA_SCALE", False),
        ("finetune", "projection.target", False),
        ("dmnsp", "projection.target", True),
        ("dmnsp", "max_train_per_class", True),
    ],
)
def test_reads_key(method, key, reads):
    assert reads_key(method, key) is reads


def test_shared_keys_a_method_ignores_are_dropped_from_its_runs():
    runs, _ = expand_experiment(
        "e",
        spec(
            run={
                "model_name": "dmnsp-tiny",
                "pretrained": None,
                "lr": 0.01,
                "LAMBDA_SCALE": 10.0,
                "adapter_dim": 8,
            }
        ),
    )
    groups = by_method(runs)
    assert {"lr", "LAMBDA_SCALE", "adapter_dim"}.isdisjoint(groups["zeroshot"][0].settings)
    assert (
        groups["finetune"][0].settings["lr"] == 0.01 and "LAMBDA_SCALE" not in groups["finetune"][0].settings
    )
    assert groups["dmnsp"][0].settings["LAMBDA_SCALE"] == 10.0


def test_top_level_run_keys_are_shared_and_overridable():
    plan = expand_all(
        {
            "run": {"lr": 0.01, "epochs": 2},
            "experiments": {
                "a": spec(methods=["dmnsp"]),
                "b": spec(methods=["dmnsp"], run={"model_name": "dmnsp-tiny", "pretrained": None, "lr": 0.1}),
            },
        }
    )
    assert {r.settings["lr"] for r in plan.experiments["a"]} == {0.01}
    assert {r.settings["lr"] for r in plan.experiments["b"]} == {0.1}
    assert {r.settings["epochs"] for r in plan.runs.values()} == {2}


def test_ablations_are_dmnsp_variants_with_their_switch():
    runs, _ = expand_experiment("e", spec(methods=["dmnsp"], ablations=list(ABLATIONS), seeds=[0]))
    assert len(runs) == 1 + len(ABLATIONS)
    by_id = {run.run_id: run for run in runs}
    both = by_id["dataset~fashion-mnist/split~2-2/method~dmnsp/ablation~towers-both/seed~0"]
    assert both.settings["projection.towers"] == "both" and both.settings["method"] == "dmnsp"
    assert both.label == "dmnsp (towers=both)"
    assert by_id["dataset~fashion-mnist/split~2-2/method~dmnsp/seed~0"].label == "dmnsp"
    clean = by_id["dataset~fashion-mnist/split~2-2/method~dmnsp/ablation~mode-clean/seed~0"]
    assert clean.settings["projection.mode"] == "clean"
    cpu = by_id["dataset~fashion-mnist/split~2-2/method~dmnsp/ablation~numerics-cpu/seed~0"]
    assert cpu.settings["optimizer.numerics"] == "cpu" and cpu.label == "dmnsp (numerics=cpu)"
    eig = by_id["dataset~fashion-mnist/split~2-2/method~dmnsp/ablation~eig-eigh/seed~0"]
    assert eig.settings["projection.eig"] == "eigh" and eig.label == "dmnsp (eig=eigh)"


def test_numerics_switches_resolve_with_the_mode_and_name_themselves_in_labels():
    from dmnsp.config import validate
    from dmnsp.methods import run_label as derive_label

    faithful, clean = validate({}), validate({"projection": {"mode": "clean"}})
    assert (faithful["optimizer"]["numerics"], faithful["projection"]["eig"]) == ("cuda-foreach", "svd")
    assert (clean["optimizer"]["numerics"], clean["projection"]["eig"]) == ("torch", "eigh")
    assert derive_label(faithful) == "dmnsp" and derive_label(clean) == "dmnsp (mode=clean)"
    cpu = validate({"optimizer": {"numerics": "cpu"}, "projection": {"eig": "eigh"}})
    assert derive_label(cpu) == "dmnsp (eig=eigh, numerics=cpu)"
    assert derive_label(validate({"method": "zeroshot", "optimizer": {"numerics": "cpu"}})) == "zeroshot"


def test_axes_split_and_task_counts():
    runs, _ = expand_experiment(
        "e",
        spec(
            datasets=["cifar100", "tinyimagenet"], splits=["10-10", "100-20"], methods=["zeroshot"], seeds=[0]
        ),
    )
    tasks = {(r.settings["dataset"], r.settings["initial_increment"]): r.n_tasks for r in runs}
    assert tasks == {
        ("cifar100", 10): 10,
        ("cifar100", 100): 1,
        ("tinyimagenet", 10): 20,
        ("tinyimagenet", 100): 6,
    }


def test_axes_fall_back_to_run_keys():
    runs, _ = expand_experiment(
        "e",
        {
            "run": {
                "dataset": "cifar100",
                "initial_increment": 5,
                "increment": 5,
                "method": "finetune",
                "seed": 3,
                "pretrained": None,
            }
        },
    )
    (run,) = runs
    assert run.run_id == "dataset~cifar100/split~5-5/method~finetune/seed~3"
    assert run.n_tasks == 20


def test_imagefolder_counts_its_class_folders_at_planning(tmp_path):
    base = spec(datasets=["imagefolder"], methods=["zeroshot"], seeds=[0])
    base["run"] = {"dataset_root": str(tmp_path / "none")}
    with pytest.raises(ConfigError, match="'dataset_root'.*no folder.*num_classes"):
        expand_experiment("e", base)
    for name in ("b", "a", "c", "d"):  # the tree counts; no image is read at planning
        (tmp_path / "tree" / "train" / name).mkdir(parents=True)
    (tmp_path / "tree" / "train" / "notes.txt").write_text("a file is not a class")
    runs, _ = expand_experiment("e", {**base, "run": {"dataset_root": str(tmp_path / "tree")}})
    assert runs[0].n_tasks == 2
    runs, _ = expand_experiment("e", {**base, "num_classes": 12})
    assert runs[0].n_tasks == 6
    runs, _ = expand_experiment("e", {**base, "run": {"class_order": list(range(8)), "pretrained": None}})
    assert runs[0].n_tasks == 4


@pytest.mark.parametrize("content", [{"class_order": list(range(6))}, list(range(6))])
def test_class_order_file_sets_the_class_count(tmp_path, content):
    # Both shapes of a class-order file plan like the task job reads them (test_scenario).
    order = tmp_path / "order.yaml"
    order.write_text(yaml.safe_dump(content))
    runs, _ = expand_experiment(
        "e",
        spec(
            datasets=["imagefolder"],
            methods=["zeroshot"],
            seeds=[0],
            run={"class_order": str(order), "pretrained": None},
        ),
    )
    assert runs[0].n_tasks == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("order: [0, 1]\n")
    with pytest.raises(ConfigError, match="'class_order': class_order file .* must hold a list"):
        expand_experiment(
            "e", spec(datasets=["imagefolder"], run={"class_order": str(bad), "pretrained": None})
        )


def test_sweep_sheet_rows_are_points(tmp_path):
    sheet = tmp_path / "points.tsv"
    sheet.write_text(
        "# hand-picked points\nlr\tTOP_K_RATIO\tprojection.mode\n0.001\t0.1\t\n0.01\t0.2\tclean\n"
    )
    runs, _ = expand_experiment("e", spec(sheet=str(sheet), seeds=[0], grid={"LAMBDA_SCALE": [1, 30]}))
    groups = by_method(runs)
    # zeroshot reads only projection.mode (two distinct values: unset and clean); finetune reads
    # lr and projection.mode (two rows); dmnsp reads everything: 2 rows × 2 LAMBDA_SCALE.
    assert {m: len(r) for m, r in groups.items()} == {"zeroshot": 2, "finetune": 2, "dmnsp": 4}
    ids = {run.run_id for run in runs}
    assert (
        "dataset~fashion-mnist/split~2-2/method~dmnsp/LAMBDA_SCALE~30/lr~0.01/TOP_K_RATIO~0.2/projection.mode~clean/seed~0"
        in ids
    )
    assert "dataset~fashion-mnist/split~2-2/method~finetune/lr~0.001/seed~0" in ids
    csv_sheet = tmp_path / "points.csv"
    csv_sheet.write_text("lr,epochs\n0.001,2\n1e-4,3\n")
    runs, _ = expand_experiment("e", spec(sheet=str(csv_sheet), methods=["finetune"], seeds=[0]))
    assert runs[0].settings["lr"] == 0.001 and runs[0].settings["epochs"] == 2
    # A cell reads like the same value in a config: 1e-4 is a number, not the text "1e-4".
    assert runs[1].settings["lr"] == pytest.approx(1e-4) and isinstance(runs[1].settings["lr"], float)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("lr\n-1\n", "'lr'"),
        ("lrr\n0.1\n", "'lrr'"),
        ("seed\n1\n", "'sheet.seed'"),
        ("lr\tepochs\n0.1\n", "'sheet'"),
        ("LAMBDA_SCALE\n3\n", "'sheet.LAMBDA_SCALE'"),
        ("lr\n", "'sheet'"),
    ],
)
def test_bad_sweep_sheets_name_the_column(tmp_path, text, key):
    sheet = tmp_path / "bad.tsv"
    sheet.write_text(text)
    with pytest.raises(ConfigError) as err:
        expand_experiment("e", spec(sheet=str(sheet), grid={"LAMBDA_SCALE": [1, 30]}))
    assert key in str(err.value)
    with pytest.raises(ConfigError, match="'sheet'"):
        expand_experiment("e", spec(sheet=str(tmp_path / "missing.tsv")))


def test_pretraining_is_shared_and_keyed_by_its_settings():
    exp = spec(
        pretrain_first=True,
        grid={"LAMBDA_SCALE": [1, 30]},
        run={"model_name": "dmnsp-tiny", "pretrain_per_class": 50, "pretrain": {"steps": 10}},
    )
    runs, pre = expand_experiment("e", exp)
    assert len(pre) == 1 and all(run.pretrain_id in pre for run in runs)
    (pid,) = pre
    assert pid.startswith("dmnsp-tiny_fashion-mnist_")
    assert pre[pid].settings["pretrained"] is None
    # A different pretraining setting gives another folder; a training setting does not.
    _, pre_steps = expand_experiment("e", {**exp, "run": {**exp["run"], "pretrain": {"steps": 20}}})
    _, pre_lr = expand_experiment("e", {**exp, "run": {**exp["run"], "lr": 0.01}})
    assert set(pre_steps) != set(pre) and set(pre_lr) == set(pre)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"run": {"lr": -1}}, "'lr'"),
        ({"run": {"lrr": 0.1}}, "'lrr'"),
        ({"run": {"projection": {"mode": "sloppy"}}}, "projection.mode"),
        ({"splits": ["10x10"]}, "'splits'"),
        ({"splits": ["12-2"]}, "'splits'"),
        ({"splits": ["0-2"]}, "'splits'"),
        ({"methods": ["dmnsp", "ewc"]}, "method"),
        ({"datasets": ["mnist"]}, "dataset"),
        ({"grid": {"seed": [0, 1]}}, "'grid.seed'"),
        ({"grid": {"LAMBDA_SCALE": 30}}, "'grid.LAMBDA_SCALE'"),
        ({"grid": {"TOP_K_RATIO": [0.1, -0.5]}}, "'TOP_K_RATIO'"),
        (
            {"ablations": ["towers-both"], "grid": {"projection.towers": ["visual", "both"]}},
            "projection.towers",
        ),
        ({"ablations": ["no-such"]}, "'ablations'"),
        ({"run": {"dataset": "cifar100", "pretrained": None}}, "'dataset'"),
        ({"pretrain_first": True, "run": {"pretrain_per_class": 10, "pretrained": "x.pt"}}, "'pretrained'"),
        ({"pretrain_first": True, "run": {"pretrained": None}}, "'pretrain_per_class'"),
        ({"methods": [], "ablations": []}, "'methods'"),
    ],
)
def test_bad_experiments_name_the_key(change, key):
    with pytest.raises(ConfigError) as err:
        expand_experiment("bad", {**spec(), **change})
    assert key in str(err.value)
    assert "experiment 'bad'" in str(err.value)


def test_bad_experiment_names_and_empty_configs():
    with pytest.raises(ConfigError, match="'experiments'"):
        expand_all({"experiments": {}})
    with pytest.raises(ConfigError, match="'experiments'"):
        expand_all({"experiments": {"a/b": spec()}})


@pytest.mark.parametrize(("split", "expected"), [("10-10", (10, 10)), ("100-5", (100, 5))])
def test_parse_split(split, expected):
    assert parse_split(split) == expected


def test_format_value_is_path_safe_and_distinct():
    assert format_value(0.001) == "0.001" and format_value(30) == "30" and format_value(True) == "true"
    assert "/" not in format_value("a/b c") and "~" not in format_value("x~y")
    assert format_value([1, 2]) != format_value([2, 1])


# ------------------------------------------------------------------------------ command lines


VALUES = [
    0.001,
    1e-5,
    30,
    30.0,
    "30",
    "a bad photo of a {}.",
    "it's: odd",
    None,
    True,
    [3, 1, 2],
    "",
    "null",
    "ViT-B/16",
    ["a photo of a {}.", "x"],
]


@pytest.mark.parametrize("value", VALUES, ids=range(len(VALUES)))
def test_cli_value_round_trips_through_yaml(value):
    assert yaml.safe_load(cli_value(value)) == value
    assert type(yaml.safe_load(cli_value(value))) is type(value)


def test_cli_sets_and_json_round_trip_through_the_shell():
    settings = {v: value for v, value in zip("abcdefghijklmn", VALUES, strict=True)}
    settings["projection.mode"] = "clean"
    words = shlex.split(cli_sets(settings))
    assert words[::2] == ["--set"] * len(settings)
    assert parse_overrides(words[1::2]) == settings
    (blob,) = shlex.split(cli_json(settings))
    assert json.loads(blob) == settings
    assert unflatten(settings)["projection"] == {"mode": "clean"}


# ------------------------------------------------------------------------------------ resources


def test_resource_rows_apply_in_order():
    table = [
        {"mem_mb": 1000, "runtime": 5},
        {"rule": "train_task", "model_name": "ViT-B-16", "mem_mb": 16000, "gpu": 1, "threads": 4},
        {"rule": ["train_task", "pretrain_model"], "dataset": "tinyimagenet", "runtime": 300},
    ]
    assert resources_for(table, "train_task", "cifar100", "ViT-B-16") == {
        "mem_mb": 16000,
        "runtime": 5,
        "threads": 4,
        "gpu": 1,
    }
    assert resources_for(table, "train_task", "tinyimagenet", "ViT-B-16")["runtime"] == 300
    assert resources_for(table, "compute_metrics", "tinyimagenet", "ViT-B-16") == {
        "mem_mb": 1000,
        "runtime": 5,
        "threads": 1,
        "gpu": 0,
    }
    assert resources_for(None, "train_task")["gpu"] == 0
    with pytest.raises(ConfigError, match="resources"):
        resources_for([{"cpus": 2}], "train_task")


# ------------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_paper_configs_expand(path):
    plan = expand_all(load(path))
    (name,) = plan.experiments
    runs = plan.experiments[name]
    dataset, split = path.stem.split("-", 1)
    initial, increment = map(int, split.split("-"))
    n_classes = {"cifar100": 100, "tinyimagenet": 200}[dataset]
    assert len(runs) == 3 * (
        6 + 5
    )  # 3 seeds × (zeroshot, finetune, lwf, moe_adapters, rapf, dmnsp + 5 ablations)
    assert {run.label for run in runs} >= {
        "zeroshot",
        "finetune",
        "lwf",
        "moe_adapters",
        "rapf",
        "dmnsp",
        "dmnsp (mode=clean)",
    }
    assert {run.n_tasks for run in runs} == {1 + (n_classes - initial) // increment}
    assert all(
        run.model_name == "ViT-B-16" and run.settings.get("pretrained", "openai") == "openai" for run in runs
    )
    assert plan.expected_seeds[name] == 3 and not plan.pretrains


# ------------------------------------------------------------------------------------ hydra import

HYDRA = """\
hydra:
  run:
    dir: ./experiments/${scenario}/${dataset}_${initial_increment}-${increment}-${method}
  job:
    chdir: true
class_order: ""
dataset_root: ""
workdir: ""
log_path: "metrics.json"
model_name: "ViT-B/16"
prompt_template: "a bad photo of a {}."
batch_size: 128
initial_increment: 10
increment: ${initial_increment}
scenario: "class"
dataset: "cifar100"
weight_decay: 0.0
l2: 0
ce_method: 0
method: "DMNSP"
lr: 1e-3
ls: 0.0
"""


def test_hydra_import_maps_the_reference_config(tmp_path):
    path = tmp_path / "cifar100_10-10.yaml"
    path.write_text(HYDRA)
    exp = import_hydra_config(path)
    assert exp["datasets"] == ["cifar100"] and exp["splits"] == ["10-10"] and exp["methods"] == ["dmnsp"]
    assert exp["run"] == {
        "model_name": "ViT-B-16",
        "pretrained": "openai",
        "prompt_template": "a bad photo of a {}.",
        "batch_size": 128,
        "lr": 0.001,
        "weight_decay": 0.0,
        "ls": 0.0,
    }
    # The imported experiment plans like any other.
    runs, _ = expand_experiment("imported", exp)
    assert len(runs) == 1 and runs[0].n_tasks == 10
    workflow_cfg = hydra_workflow_config(path)
    assert list(workflow_cfg["experiments"]) == ["cifar100-10-10-dmnsp"]


def test_hydra_interpolation_keeps_types_and_substitutes_text():
    exp = convert_hydra_config(
        {
            "initial_increment": 5,
            "increment": "${initial_increment}",
            "dataset": "cifar100",
            "prompt_template": "a ${dataset} photo of a {}.",
        }
    )
    assert exp["splits"] == ["5-5"] and exp["run"]["prompt_template"] == "a cifar100 photo of a {}."


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"momentum": 0.9}, "'momentum'"),
        ({"scenario": "task"}, "'scenario'"),
        ({"l2": 1}, "'l2'"),
        ({"ce_method": 2}, "'ce_method'"),
        ({"method": "ZSCL"}, "'method'"),
        ({"dataset": "imagenet"}, "'dataset'"),
        ({"increment": "${nowhere}"}, "'increment'"),
        ({"lr": "fast"}, "'lr'"),
        ({"batch_size": 0}, "'batch_size'"),
    ],
)
def test_hydra_import_refuses_unsupported_settings(raw, key):
    with pytest.raises(ConfigError) as err:
        convert_hydra_config(raw)
    assert key in str(err.value)


def test_hydra_import_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        import_hydra_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ViT-B/16", "ViT-B-16"),
        ("ViT-L/14@336px", "ViT-L-14-336"),
        ("RN50", "RN50"),
        ("dmnsp-tiny", "dmnsp-tiny"),
    ],
)
def test_open_clip_model_names(name, expected):
    assert open_clip_model_name(name) == expected


def test_import_config_command_writes_a_plannable_experiment(tmp_path):
    from dmnsp.cli import main

    source, out = tmp_path / "ref.yaml", tmp_path / "exp.yaml"
    source.write_text(HYDRA)
    assert main(["import-config", str(source), "--out", str(out)]) == 0
    written = yaml.safe_load(out.read_text())
    exp = written["experiments"]["cifar100-10-10-dmnsp"] if "experiments" in written else written
    plan = expand_all({"experiments": {"imported": exp}})
    assert [run.n_tasks for run in plan.runs.values()] == [10]

"""The method registry and its contract: schema enums, keys a method reads, labels, and that the
planner can read it all without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dmnsp import methods
from dmnsp.cli import main
from dmnsp.config import ConfigError, validate

ROOT = Path(__file__).resolve().parents[1]


def test_schema_method_enums_match_the_registry():
    run_schema = yaml.safe_load((ROOT / "dmnsp/schemas/run.schema.yaml").read_text())
    workflow = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    registered = set(methods.names())
    assert set(run_schema["properties"]["method"]["enum"]) == registered
    assert set(workflow["$defs"]["method_name"]["enum"]) == registered
    ablations = workflow["properties"]["experiments"]["additionalProperties"]["properties"]["ablations"]
    assert set(ablations["items"]["enum"]) == set(methods.variants())


def test_registry_lookup_and_errors():
    assert methods.names() == ["zeroshot", "finetune", "lwf", "moe_adapters", "rapf", "dmnsp"]
    assert methods.get("dmnsp").name == "dmnsp"
    with pytest.raises(methods.UnknownMethodError, match="unknown method 'ewc'.*known methods: zeroshot"):
        methods.get("ewc")
    assert methods.variant("towers-both").method == "dmnsp"
    with pytest.raises(methods.UnknownMethodError, match="not one of"):
        methods.variant("towers-three")
    with pytest.raises(ValueError, match="registered twice"):
        methods.register(methods.get("finetune"))
    orders = [methods.get(n).order for n in methods.names()]
    assert orders == sorted(orders) and len(set(orders)) == len(orders)


def test_every_method_describes_itself():
    for name in methods.names():
        cls = methods.get(name)
        assert cls.description and "\n" not in cls.description
        assert cls.color.startswith("#") and len(cls.color) == 7
    colors = [methods.get(n).color for n in methods.names()]
    assert len(set(colors)) == len(colors)


@pytest.mark.parametrize(
    ("method", "key", "variant", "reads"),
    [
        ("zeroshot", "lr", None, False),
        ("zeroshot", "adapter_dim", None, False),
        ("zeroshot", "LAMBDA_SCALE", None, False),
        ("zeroshot", "projection.mode", None, True),
        ("finetune", "lr", None, True),
        ("finetune", "projection.layers", None, False),
        ("finetune", "TOP_SELECT", None, False),
        ("dmnsp", "projection.layers", None, True),
        ("dmnsp", "LAMBDA_SCALE", None, True),
        ("dmnsp", "LAMBDA_SCALE", "mode-clean", False),
        ("dmnsp", "TOP_SELECT", "mode-clean", True),
        ("dmnsp", "dataset", None, True),
        ("dmnsp", "moe.experts", None, False),
        ("dmnsp", "rapf.beta", None, False),
        ("moe_adapters", "moe.experts", None, True),
        ("moe_adapters", "adapter_dim", None, True),
        ("moe_adapters", "projection.mode", None, True),
        ("moe_adapters", "LAMBDA_SCALE", None, False),
        ("moe_adapters", "rapf.threshold", None, False),
        ("rapf", "rapf.threshold", None, True),
        ("rapf", "lr", None, True),
        ("rapf", "epochs", None, True),
        ("rapf", "adapter_dim", None, False),
        ("rapf", "warmup_steps", None, False),
        ("rapf", "ls", None, False),
        ("rapf", "moe.top_k", None, False),
        ("lwf", "moe.top_k", None, False),
    ],
)
def test_reads_key(method, key, variant, reads):
    assert methods.reads_key(method, key, variant) is reads


@pytest.mark.parametrize(
    ("config", "label"),
    [
        ({"method": "dmnsp"}, "dmnsp"),
        ({"method": "zeroshot"}, "zeroshot"),
        ({"method": "finetune", "projection": {"towers": None}}, "finetune"),
        (
            {"method": "dmnsp", "projection": {"towers": "both", "layers": "single", "lambda": "fixed"}},
            "dmnsp (towers=both, layers=single, lambda=fixed)",
        ),
        ({"method": "dmnsp", "projection": {"mode": "clean"}}, "dmnsp (mode=clean)"),
        ({"method": "finetune", "projection": {"mode": "clean"}}, "finetune (mode=clean)"),
        (
            {"method": "dmnsp", "projection": {"mode": "clean", "basis": "concat"}},
            "dmnsp (mode=clean, basis=concat)",
        ),
        ({"method": "dmnsp", "projection": {"target": "update"}}, "dmnsp (target=update)"),
        ({"method": "moe_adapters"}, "moe_adapters"),
        ({"method": "moe_adapters", "projection": {"mode": "clean"}}, "moe_adapters (mode=clean)"),
        (
            {"method": "moe_adapters", "moe": {"text_router_token": "eot"}},
            "moe_adapters (text_router_token=eot)",
        ),
        (
            {"method": "moe_adapters", "moe": {"eval_noise": False, "experts": 4}},
            "moe_adapters (experts=4, eval_noise=False)",
        ),
        ({"method": "rapf"}, "rapf"),
        ({"method": "rapf", "projection": {"mode": "clean"}}, "rapf (mode=clean)"),
        ({"method": "rapf", "rapf": {"precision": "fp32", "beta": 1}}, "rapf (beta=1, precision=fp32)"),
        (
            {"method": "dmnsp", "projection": {"basis": "orthonormal", "energy_threshold": 0.9}},
            "dmnsp (basis=orthonormal, energy=0.9)",
        ),
    ],
)
def test_run_label(config, label):
    assert methods.run_label(validate(config)) == label


def test_searched_run_label():
    assert methods.run_label(validate({"method": "dmnsp"}), searched=True) == "dmnsp (searched)"
    clean = validate({"method": "dmnsp", "projection": {"mode": "clean"}})
    assert methods.run_label(clean, searched=True) == "dmnsp (mode=clean, searched)"


def test_default_towers_come_from_the_method():
    assert validate({"method": "dmnsp"})["projection"]["towers"] == "visual"
    assert validate({"method": "finetune"})["projection"]["towers"] == "none"
    with pytest.raises(ConfigError, match="'projection.towers': 'both' needs method 'dmnsp'"):
        validate({"method": "finetune", "projection": {"towers": "both"}})


def test_list_methods_prints_every_method_with_a_description(capsys):
    assert main(["list-methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == methods.names()
    for line, name in zip(lines, methods.names(), strict=True):
        assert methods.get(name).description in line


def test_the_planner_imports_no_torch():
    code = (
        "import sys, dmnsp.methods, dmnsp.config, dmnsp.experiments, dmnsp.layout;"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_hydra_import_knows_every_registered_method():
    from dmnsp.hydra_import import convert_hydra_config

    for name in methods.names():
        assert convert_hydra_config({"method": name.upper()})["methods"] == [name]
    assert convert_hydra_config({"method": "zero_shot"})["methods"] == ["zeroshot"]


def test_method_defaults_per_dataset_and_split_fill_only_unset_keys():
    """The official settings become each method's defaults where the config resolves."""
    moe = validate(
        {"method": "moe_adapters", "dataset": "cifar100", "initial_increment": 10, "increment": 10}
    )
    assert (moe["epochs"], moe["batch_size"], moe["lr"]) == (1, 128, 1e-3)
    assert moe["moe"] == {
        "experts": 2,
        "top_k": 2,
        "eval_noise": True,
        "text_router_token": "first",
        "schedule": "reference",
    }
    assert validate({"method": "moe_adapters", "dataset": "cifar100"})["batch_size"] == 64  # 2-2
    assert (
        validate(
            {"method": "moe_adapters", "dataset": "tinyimagenet", "initial_increment": 100, "increment": 10}
        )["batch_size"]
        == 64
    )
    assert validate({"method": "moe_adapters", "batch_size": 32, "dataset": "cifar100"})["batch_size"] == 32
    rapf = validate({"method": "rapf", "dataset": "cifar100", "initial_increment": 10, "increment": 10})
    assert (rapf["epochs"], rapf["batch_size"], rapf["prompt_template"]) == (15, 100, "a good photo of a {}.")
    assert rapf["eval_transform"] == "center"
    assert rapf["rapf"] == {
        "beta": 2.0,
        "mix_bias": 0.6,
        "threshold": 0.55,
        "shrinkage": False,
        "milestones": [4, 10],
        "precision": "fp16",
        "init": "random",
    }
    clean = validate({"method": "rapf", "projection": {"mode": "clean"}, "rapf": {"beta": 1}})
    assert (clean["rapf"]["precision"], clean["rapf"]["init"], clean["rapf"]["beta"]) == (
        "fp32",
        "identity",
        1,
    )
    assert clean["rapf"]["mix_bias"] == 0.6  # a nested key the config leaves unset still takes the default
    # Other methods keep the schema's defaults (DMNSP's settings).
    dmnsp = validate({"method": "dmnsp", "dataset": "cifar100", "initial_increment": 10, "increment": 10})
    assert (dmnsp["epochs"], dmnsp["batch_size"], dmnsp["prompt_template"]) == (
        4,
        128,
        "a bad photo of a {}.",
    )
    assert validate({"method": "moe_adapters", "projection": {"mode": "clean"}})["moe"]["eval_noise"] is False


def test_every_method_default_is_a_valid_setting():
    for name in methods.names():
        for dataset, split, keys in methods.get(name).defaults:
            settings = {"method": name}
            for key, value in keys.items():
                node = settings
                *parents, last = key.split(".")
                for part in parents:
                    node = node.setdefault(part, {})
                node[last] = value
            resolved = validate(settings)
            for key, value in keys.items():
                node = resolved
                for part in key.split("."):
                    node = node[part]
                assert node == value, (name, dataset, split, key)


def test_moe_top_k_above_the_experts_is_refused():
    with pytest.raises(ConfigError, match="'moe.top_k': 3 is more than moe.experts"):
        validate({"method": "moe_adapters", "moe": {"experts": 2, "top_k": 3}})


def test_validate_config_shows_the_method_defaults(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("method: rapf\ndataset: cifar100\ninitial_increment: 10\nincrement: 10\n")
    assert main(["validate-config", "--config", str(path)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert (shown["epochs"], shown["batch_size"], shown["rapf"]["precision"]) == (15, 100, "fp16")


def test_resource_rows_can_select_a_method():
    from dmnsp.experiments import resources_for

    table = [
        {"mem_mb": 1000, "runtime": 10},
        {"rule": "train_task", "model_name": "ViT-B-16", "mem_mb": 24000},
        {"rule": "train_task", "method": "rapf", "model_name": "ViT-B-16", "mem_mb": 25000},
        {"rule": "train_task", "method": ["moe_adapters", "lwf"], "runtime": 30},
    ]
    assert resources_for(table, "train_task", "cifar100", "ViT-B-16", "rapf")["mem_mb"] == 25000
    assert resources_for(table, "train_task", "cifar100", "ViT-B-16", "dmnsp")["mem_mb"] == 24000
    assert resources_for(table, "train_task", "cifar100", "ViT-B-16", "lwf")["runtime"] == 30
    assert resources_for(table, "train_task", "cifar100", "ViT-B-16")["mem_mb"] == 24000  # no method: no row


@pytest.mark.parametrize("path", sorted((ROOT / "config" / "paper").glob("*.yaml")), ids=lambda p: p.stem)
def test_paper_configs_run_both_competitors_with_their_own_settings(path):
    from dmnsp.experiments import expand_all, resources_for, unflatten

    cfg = yaml.safe_load(path.read_text())
    plan = expand_all(cfg)
    (runs,) = plan.experiments.values()
    resolved = {
        run.swept["method"]: validate(unflatten(run.settings)) for run in runs if "ablation" not in run.run_id
    }
    assert (resolved["moe_adapters"]["epochs"], resolved["rapf"]["epochs"], resolved["dmnsp"]["epochs"]) == (
        1,
        15,
        4,
    )
    assert (
        resolved["rapf"]["prompt_template"] == "a good photo of a {}."
        and resolved["rapf"]["batch_size"] == 100
    )
    assert (
        resolved["dmnsp"]["prompt_template"]
        == resolved["moe_adapters"]["prompt_template"]
        == "a bad photo of a {}."
    )
    dmnsp_mem = resources_for(cfg["resources"], "train_task", runs[0].dataset, "ViT-B-16", "dmnsp")["mem_mb"]
    rapf_mem = resources_for(cfg["resources"], "train_task", runs[0].dataset, "ViT-B-16", "rapf")["mem_mb"]
    assert rapf_mem > dmnsp_mem


MOE_OFFICIAL = """\
hydra:
  run:
    dir: ./experiments/${scenario}/${dataset}_${initial_increment}-${increment}-${method}
class_order: ""
dataset_root: ""
workdir: ""
log_path: "metrics.json"
model_name: "ViT-B/16"
prompt_template: "a bad photo of a {}."

batch_size: 64
initial_increment: 100
increment: 10
scenario: "class"
dataset: "tinyimagenet"

weight_decay: 0.0
l2: 0
ce_method: 0

method: "MoE-Adapters"
lr: 1e-3
ls: 0.0
we:
avg_freq:
ref_dataset:
ref_sentences: random
"""


def test_an_official_moe_adapters_config_imports_with_the_methods_defaults(tmp_path):
    """JiazuoYu/MoE-Adapters4CL cil/configs/class/tinyimagenet_100-10.yaml, key for key."""
    from dmnsp.experiments import expand_all
    from dmnsp.hydra_import import hydra_workflow_config

    path = tmp_path / "tinyimagenet_100-10.yaml"
    path.write_text(MOE_OFFICIAL)
    cfg = hydra_workflow_config(path)
    ((name, spec),) = cfg["experiments"].items()
    assert name == "tinyimagenet-100-10-moe_adapters" and spec["methods"] == ["moe_adapters"]
    (run,) = expand_all(cfg).experiments[name]
    from dmnsp.experiments import unflatten

    resolved = validate(unflatten(run.settings))
    assert (resolved["batch_size"], resolved["epochs"], resolved["moe"]["experts"]) == (64, 1, 2)


@pytest.mark.parametrize("method", ["moe_adapters", "rapf"])
def test_cli_run_then_evaluate_a_checkpoint_gives_the_same_row(tmp_path, method):
    """Every path that builds a model prepares it for the method: `dmnsp evaluate` restores MoE's
    experts and applies RAPF's map from the checkpoint, and scores as the run did (the evaluation
    is seeded, the noise and crops included)."""
    import json

    from fakes import mini_run_config

    # RAPF in fp32: the tiny CLIP's features vary in at most 63 of their 64 dimensions (a LayerNorm
    # before a square projection), and fp16 covariances lose the ridge there (config/README.md).
    config = mini_run_config(
        tmp_path, method=method, initial_increment=2, increment=2, max_steps=2, rapf={"precision": "fp32"}
    )
    out = tmp_path / "run"
    assert main(["run", "--config", str(config), "--out-dir", str(out), "--quiet"]) == 0
    for task in (0, 1):
        row = json.loads((out / f"task{task}" / "eval.json").read_text())
        again = tmp_path / f"again{task}.json"
        args = [
            "evaluate",
            "--config",
            str(config),
            "--checkpoint",
            str(out / f"task{task}" / "checkpoint.pt"),
        ]
        assert main([*args, "--out", str(again), "--quiet"]) == 0
        fresh = json.loads(again.read_text())
        assert fresh["accuracy_per_task"] == row["accuracy_per_task"]
        assert fresh["predictions_per_class"] == row["predictions_per_class"]

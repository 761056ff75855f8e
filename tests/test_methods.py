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
    assert methods.names() == ["zeroshot", "finetune", "lwf", "dmnsp"]
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

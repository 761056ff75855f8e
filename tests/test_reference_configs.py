"""The reference repository's six Hydra configs (RL-VIG/DMNSP, configs/class/*.yaml) import and plan.

The files are rebuilt here key for key from the reference (commit ef6cf61): the three CIFAR100
files share one key set, the three TinyImageNet files add four keys the reference code never reads
(``we``, ``avg_freq``, ``ref_dataset`` empty; ``ref_sentences: random``).
"""

from __future__ import annotations

import pytest
import yaml
from test_workflow import job_counts, snakemake  # tests/ is on sys.path (conftest)

from dmnsp.cli import main
from dmnsp.config import ConfigError
from dmnsp.experiments import expand_all
from dmnsp.hydra_import import convert_hydra_config, hydra_workflow_config

HYDRA_BLOCK = """\
hydra:
  run:
    dir: ./experiments/${scenario}/${dataset}_${initial_increment}-${increment}-${method}
  job:
    chdir: true

  job_logging:
    version: 1
    formatters:
      simple:
        format: '%(message)s'
"""

# Lines as the reference writes them (quoting, `1e-3`, trailing blanks after empty values).
COMMON_HEAD = [
    'class_order: ""',
    'dataset_root: ""',
    'workdir: ""',
    'log_path: "metrics.json"',
    'model_name: "ViT-B/16"',
    'prompt_template: "a bad photo of a {}."',
    "",
    "batch_size: 128",
]
COMMON_TAIL = [
    "weight_decay: 0.0",
    "l2: 0",
    "ce_method: 0",
    "",
    'method: "DMNSP"',
    "lr: 1e-3",
    "ls: 0.0",
]
TINY_LEFTOVERS = ["we: ", "avg_freq:  ", "ref_dataset:", "ref_sentences: random"]


def _cifar(initial: int) -> str:
    split = ["increment: ${initial_increment}", f"initial_increment: {initial}  ", 'scenario: "class"']
    lines = COMMON_HEAD + split + ['dataset: "cifar100"', ""] + COMMON_TAIL
    return HYDRA_BLOCK + "\n" + "\n".join(lines) + "\n"


def _tiny(increment: int) -> str:
    split = ["initial_increment: 100", f"increment: {increment}", 'scenario: "class"']
    lines = COMMON_HEAD + split + ['dataset: "tinyimagenet"', ""] + COMMON_TAIL + TINY_LEFTOVERS
    return HYDRA_BLOCK + "\n" + "\n".join(lines) + "\n"


OFFICIAL = {
    "cifar100_10-10.yaml": (_cifar(10), "cifar100", "10-10", 10),
    "cifar100_5-5.yaml": (_cifar(5), "cifar100", "5-5", 20),
    "cifar100_2-2.yaml": (_cifar(2), "cifar100", "2-2", 50),
    "tinyimagenet_100-10.yaml": (_tiny(10), "tinyimagenet", "100-10", 11),
    "tinyimagenet_100-20.yaml": (_tiny(20), "tinyimagenet", "100-20", 6),
    "tinyimagenet_100-5.yaml": (_tiny(5), "tinyimagenet", "100-5", 21),
}
CIFAR_KEYS = {
    "hydra",
    "class_order",
    "dataset_root",
    "workdir",
    "log_path",
    "model_name",
    "prompt_template",
    "batch_size",
    "increment",
    "initial_increment",
    "scenario",
    "dataset",
    "weight_decay",
    "l2",
    "ce_method",
    "method",
    "lr",
    "ls",
}
TINY_KEYS = CIFAR_KEYS | {"we", "avg_freq", "ref_dataset", "ref_sentences"}


def test_rebuilt_files_carry_the_official_key_sets():
    for name, (text, dataset, _, _) in OFFICIAL.items():
        raw = yaml.safe_load(text)
        assert set(raw) == (TINY_KEYS if dataset == "tinyimagenet" else CIFAR_KEYS), name
        if dataset == "tinyimagenet":
            assert [raw[k] for k in ("we", "avg_freq", "ref_dataset", "ref_sentences")] == [None] * 3 + [
                "random"
            ]


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_reference_configs_import_and_expand(name, tmp_path, capsys):
    text, dataset, split, n_tasks = OFFICIAL[name]
    src, out = tmp_path / name, tmp_path / "exp.yaml"
    src.write_text(text)
    assert main(["import-config", str(src), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    if dataset == "tinyimagenet":
        # One note naming the four never-read keys; the CIFAR files have none.
        assert err.count("note:") == 1 and all(
            k in err for k in ("we", "avg_freq", "ref_dataset", "ref_sentences")
        )
    else:
        assert err == ""
    cfg = yaml.safe_load(out.read_text())
    (exp,) = cfg["experiments"].values()
    assert exp["datasets"] == [dataset] and exp["splits"] == [split] and exp["methods"] == ["dmnsp"]
    assert exp["run"]["model_name"] == "ViT-B-16" and exp["run"]["lr"] == 0.001
    plan = expand_all(cfg)
    assert [run.n_tasks for run in plan.runs.values()] == [n_tasks]


def test_official_reference_configs_plan_with_snakemake(tmp_path):
    """`snakemake -n` with each imported file as the workflow config: one train_task job per task."""
    for name, (text, _, _, n_tasks) in OFFICIAL.items():
        src = tmp_path / name
        src.write_text(text)
        out = tmp_path / f"{src.stem}.workflow.yaml"
        out.write_text(yaml.safe_dump(hydra_workflow_config(src), sort_keys=False))
        proc = snakemake("-n", "--quiet", "rules", "--configfile", str(out), cwd=tmp_path)
        counts = job_counts(proc.stdout + proc.stderr)
        assert counts["train_task"] == n_tasks and counts["prepare_run"] == 1, (name, counts)


@pytest.mark.parametrize(
    ("key", "value"),
    [("we", 0.5), ("avg_freq", 10), ("ref_dataset", "imagenet"), ("ref_sentences", "conceptual_captions")],
)
def test_never_read_keys_with_a_value_still_stop_naming_the_key(key, value):
    raw = yaml.safe_load(OFFICIAL["tinyimagenet_100-10.yaml"][0])
    raw[key] = value
    with pytest.raises(ConfigError) as err:
        convert_hydra_config(raw)
    assert f"'{key}'" in str(err.value) and "never reads" in str(err.value)


def test_other_unsupported_keys_with_a_value_still_stop():
    raw = yaml.safe_load(OFFICIAL["cifar100_10-10.yaml"][0])
    raw["momentum"] = 0.9
    with pytest.raises(ConfigError, match="'momentum'"):
        convert_hydra_config(raw)


def test_notes_are_returned_to_library_callers():
    notes: list[str] = []
    convert_hydra_config(yaml.safe_load(OFFICIAL["tinyimagenet_100-5.yaml"][0]), notes)
    assert len(notes) == 1 and "never reads" in notes[0]

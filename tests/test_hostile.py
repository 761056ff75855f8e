"""Hostile and odd input (issue 12's red-team list): each finding is refused with one line naming
the problem and the fix (exit code 2 on the command line), and nothing finished is lost."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from fakes import make_fake_splits

from dmnsp import devices, runner
from dmnsp.checkpoint import TaskState
from dmnsp.cli import main
from dmnsp.config import ConfigError, load_config, load_yaml, parse_overrides, read_yaml_file, validate
from dmnsp.experiments import expand_experiment, read_sheet
from dmnsp.hydra_import import import_hydra_config
from dmnsp.io import json_safe
from dmnsp.layout import write_run_metrics
from dmnsp.model import ModelError, create_clip, tokenize_prompts
from dmnsp.scenario import ScenarioError, resolve_class_order

NOT_UTF8 = "lr: 0.001\nprompt_template: 'une photo d\u2019un {}.'\n".encode("cp1252")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def experiment(**run) -> dict:
    return {
        "datasets": ["fashion-mnist"],
        "splits": ["2-2"],
        "methods": ["dmnsp"],
        "seeds": [0],
        "run": {"model_name": "dmnsp-tiny", "pretrained": None, **run},
    }


# ------------------------------------------------------------------ 1: sweep-sheet rows that collide


def test_sheet_rows_naming_one_run_folder_are_refused_naming_both(tmp_path):
    sheet = tmp_path / "sheet.tsv"
    sheet.write_text("prompt_template\tlr\na photo of {}\t1e-4\nan image of {}\t1e-4\na photo of {}!\t1e-4\n")
    with pytest.raises(ConfigError) as err:
        expand_experiment("e", {**experiment(), "sheet": str(sheet)})
    message = str(err.value)
    assert "rows 1 (" in message and "and 3 (" in message and "a photo of {}!" in message
    assert "same run folder" in message
    # A row given twice is the same collision.
    sheet.write_text("LAMBDA_SCALE\n30\n1\n30\n")
    with pytest.raises(ConfigError, match="rows 1 .* and 3 "):
        read_sheet(str(sheet))


def test_sheet_cells_read_numbers_like_configs(tmp_path):
    sheet = tmp_path / "sheet.tsv"
    sheet.write_text("lr\tLAMBDA_SCALE\n1e-4\t3e1\n")
    assert read_sheet(str(sheet)) == ({"lr": 1e-4, "LAMBDA_SCALE": 30.0},)


# ---------------------------------------------------------- 3: prompts cut by a short text context


def test_prompts_identical_after_truncation_are_refused():
    tokenizer = create_clip("dmnsp-tiny", None, adapter_dim=None).tokenizer  # 16-token context
    long = "a blurry low resolution grainy photo taken at night of a very small {}"
    with pytest.raises(ModelError) as err:
        tokenize_prompts(tokenizer, ["ankle boot", "sneaker", "bag"], long)
    assert "ankle boot" in str(err.value) and "sneaker" in str(err.value) and "16 tokens" in str(err.value)
    # Cut but still distinct: a warning; short prompts: neither.
    with pytest.warns(UserWarning, match="fill the whole 16-token"):
        tokenize_prompts(
            tokenizer,
            ["ankle boot", "sneaker"],
            "a blurry low resolution grainy photo taken at night of a {}",
        )
    tokens = tokenize_prompts(tokenizer, ["ankle boot", "sneaker"], "a photo of a {}.")
    assert tokens.shape == (2, 16) and not torch.equal(tokens[0], tokens[1])


def test_a_run_with_a_prompt_that_cuts_class_names_stops_before_training(make_config):
    data = make_fake_splits(n_classes=4, n_train_per_class=4, n_test_per_class=2, size=28)
    cfg = make_config(
        prompt_template="a blurry low resolution grainy photo taken at night of a very small {}"
    )
    cfg["dataset"] = data.name
    with pytest.raises(ModelError, match="identical after tokenization"):
        runner.Session(cfg, progress=False, data=data)


# ------------------------------------------------------------------ 4 and 7: bounds from the model


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"TOP_SELECT": 64}, "'TOP_SELECT': 64 leaves no null space in dmnsp-tiny's visual tower"),
        ({"TOP_SELECT": 512, "model_name": "ViT-B-16", "projection": {"towers": "both"}}, "text tower"),
        ({"adapter_dim": 65}, "'adapter_dim': 65 is wider than dmnsp-tiny"),
        ({"adapter_dim": 10**9}, "'adapter_dim': 1000000000 is greater than the maximum of 4096"),
        ({"threads": 10000}, "'threads': 10000 is greater than the maximum of 1024"),
        ({"epochs": 10**6}, "'epochs': 1000000 is greater than the maximum of 1000"),
        ({"seed": 2**70}, "'seed'"),
    ],
)
def test_settings_bounded_by_the_model_or_by_sense(changes, needle):
    with pytest.raises(ConfigError) as err:
        validate({"model_name": "dmnsp-tiny", "method": "dmnsp", **changes})
    assert needle in str(err.value)


def test_width_bounds_pass_where_they_fit():
    assert validate({"model_name": "dmnsp-tiny", "TOP_SELECT": 63, "adapter_dim": 64})["TOP_SELECT"] == 63
    # TOP_SELECT is dmnsp's: finetune ignores it; ViT-B-16's visual tower is 768 wide.
    validate({"model_name": "dmnsp-tiny", "method": "finetune", "TOP_SELECT": 64})
    validate({"model_name": "ViT-B-16", "TOP_SELECT": 600})


def test_top_select_past_the_width_stops_planning_and_the_search_space():
    from test_search import workflow_config

    from dmnsp import search

    with pytest.raises(ConfigError, match="TOP_SELECT"):
        expand_experiment("e", {**experiment(), "grid": {"TOP_SELECT": [1, 64]}})
    cfg = workflow_config()
    cfg["search"]["space"]["TOP_SELECT"] = {"type": "int", "low": 1, "high": 64}
    with pytest.raises(ConfigError, match="'search.space.TOP_SELECT': value 64 .*leaves no null space"):
        search.plan_search(cfg)


def test_threads_past_a_few_per_core_are_refused():
    cores = devices.available_cores()
    with pytest.raises(ConfigError, match=f"at most {devices.THREADS_PER_CORE * cores}"):
        devices.set_threads(devices.THREADS_PER_CORE * cores + 1)
    before = torch.get_num_threads()
    devices.set_threads(None)
    assert torch.get_num_threads() == before


# --------------------------------------------------------------- 5: one-line errors, not tracebacks


def test_non_utf8_files_are_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(NOT_UTF8)
    assert main(["validate-config", "--config", str(bad)]) == 2
    assert "is not UTF-8 text" in one_line_error(capsys)
    assert main(["import-config", str(bad)]) == 2
    assert "Hydra config" in one_line_error(capsys)
    assert (
        main(
            [
                "search-prepare-run",
                "--best",
                str(bad),
                "--settings-json",
                "{}",
                "--experiment",
                "e",
                "--out-dir",
                "x",
            ]
        )
        == 2
    )
    assert "best parameters file" in one_line_error(capsys)
    with pytest.raises(ScenarioError, match="not UTF-8"):  # in the job
        resolve_class_order(str(bad), 4, [0, 1, 2, 3])
    with pytest.raises(ConfigError, match="'class_order'.*not UTF-8"):  # at planning
        expand_experiment("e", experiment(class_order=str(bad)))
    sheet = tmp_path / "bad.tsv"
    sheet.write_bytes(b"lr\n0.001\n\xff\n")
    with pytest.raises(ConfigError, match="sweep sheet .*not UTF-8"):
        read_sheet(str(sheet))


def test_invalid_yaml_in_a_class_order_file_stops_planning(tmp_path):
    order = tmp_path / "order.yaml"
    order.write_text("class_order: [0, 1, 2\n")
    with pytest.raises(ConfigError, match="'class_order': class_order file .* is not valid YAML"):
        expand_experiment("e", experiment(class_order=str(order)))


def test_both_class_order_shapes_plan_and_run_alike(tmp_path):
    ids = [3, 1, 0, 2, 9, 8, 7, 6, 5, 4]  # Fashion-MNIST's 10 classes
    for text in (f"{ids}\n", f"class_order: {ids}\n"):
        order = tmp_path / "order.yaml"
        order.write_text(text)
        (run,) = expand_experiment("e", experiment(class_order=str(order)))[0]
        assert run.n_tasks == 5
        assert resolve_class_order(str(order), 10, list(range(10))) == ids


def test_unreadable_files_are_named(tmp_path, monkeypatch):
    path = tmp_path / "secret.yaml"
    path.write_text("lr: 0.1\n")
    if os.geteuid() == 0:  # root reads through chmod 000: make the open itself fail as it would
        real_open = os.open

        def deny(file, *args, **kwargs):
            if isinstance(file, str | os.PathLike) and Path(file) == path:
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(os, "open", deny)  # dmnsp.bounded opens by descriptor (O_NONBLOCK)
    else:
        path.chmod(0)
    with pytest.raises(ConfigError, match="cannot be read \\(Permission denied\\); check its permissions"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("lr=[0.1,", "not valid YAML"),
        ('prompt_template=!!python/object/apply:os.system ["touch /tmp/dmnsp-pwned"]', "python/object"),
        ("seed=1180591620717411303424", "'seed'"),
        ("threads=10000", "'threads'"),
    ],
)
def test_bad_overrides_are_one_line_errors(override, needle, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("lr: 0.001\n")
    assert main(["validate-config", "--config", str(config), "--set", override]) == 2
    assert needle in one_line_error(capsys)
    assert not Path("/tmp/dmnsp-pwned").exists()


def test_damaged_task_records_and_missing_run_folders(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "task0").mkdir(parents=True)
    (run / "task0" / "eval.json").write_text('{"task": 0, "accuracy": 0.5')  # cut short
    assert main(["metrics", "--run-dir", str(run)]) == 2
    assert "task0/eval.json is damaged" in one_line_error(capsys)
    assert (
        main(
            [
                "report-artifacts",
                "--runs",
                str(run),
                "--tables-dir",
                str(tmp_path / "t"),
                "--plots-dir",
                str(tmp_path / "p"),
            ]
        )
        == 2
    )
    assert "damaged" in one_line_error(capsys)
    (run / "task0" / "eval.json").write_bytes(b"\xff\xfe")
    assert main(["metrics", "--run-dir", str(run)]) == 2
    one_line_error(capsys)
    (run / "task0" / "eval.json").write_text("[1, 2]")
    assert main(["metrics", "--run-dir", str(run)]) == 2
    assert "not a dmnsp task record" in one_line_error(capsys)
    assert main(["metrics", "--run-dir", str(tmp_path / "nope")]) == 2
    assert "does not exist" in one_line_error(capsys)
    assert not (tmp_path / "nope").exists()
    with pytest.raises(ConfigError):
        write_run_metrics(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("bad", ['{"lr": 0.1', "[1, 2]", "nope"])
def test_malformed_json_arguments(bad, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(["prepare-run", "--settings-json", bad, "--experiment", "e", "--out-dir", out]) == 2
    assert "--settings-json" in one_line_error(capsys)
    assert main(["search-create", "--spec-json", bad]) == 2
    assert "--spec-json" in one_line_error(capsys)
    assert not Path(out).exists()


# ----------------------------------------------------------------------- 6: non-finite values written


def test_json_safe_writes_non_finite_numbers_as_strings():
    obj = {"a": [1.0, math.inf, -math.inf], "b": {"c": math.nan}, "d": (2, "x", None)}
    assert json_safe(obj) == {"a": [1.0, "inf", "-inf"], "b": {"c": "nan"}, "d": [2, "x", None]}
    back = json.loads(json.dumps(json_safe(obj), allow_nan=False))
    assert [float(v) for v in back["a"]] == [1.0, math.inf, -math.inf] and math.isnan(float(back["b"]["c"]))


def _task(tmp_path, make_config):
    cfg = make_config(model_name="dmnsp-tiny", adapter_dim=4)
    model = create_clip("dmnsp-tiny", None, adapter_dim=4).model
    from dmnsp.adapters import adapter_state_dict

    state = TaskState(0, adapter_state_dict(model), {}, [0, 1])
    row = {"task": 0, "n_tasks": 5, "accuracy": 0.5, "accuracy_per_task": [0.5], "seconds": 1.0}
    diag = {"task": 0, "lambda_factor_visual": [math.inf] * 12, "seconds": {"train": 1.0}}
    return cfg, state, row, diag


def test_task_outputs_keep_overflowed_diagnostics(tmp_path, make_config):
    cfg, state, row, diag = _task(tmp_path, make_config)
    runner.write_task_outputs(tmp_path / "task0", state, row, diag, cfg)
    written = json.loads((tmp_path / "task0" / "diagnostics.json").read_text())
    assert written["lambda_factor_visual"] == ["inf"] * 12
    assert (tmp_path / "task0" / "checkpoint.pt").is_file() and (tmp_path / "task0" / "eval.json").is_file()


def test_task_outputs_are_all_or_nothing(tmp_path, make_config, monkeypatch):
    cfg, state, row, diag = _task(tmp_path, make_config)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    from dmnsp import checkpoint

    monkeypatch.setattr(checkpoint, "save_checkpoint", disk_full)
    with pytest.raises(OSError):
        runner.write_task_outputs(tmp_path / "task0", state, row, diag, cfg)
    assert sorted(p.name for p in (tmp_path / "task0").iterdir()) == []  # no eval.json without checkpoint


def test_clean_mode_with_a_huge_lambda_scale_finishes_and_records_inf(make_config, tmp_path):
    data = make_fake_splits(n_classes=4, n_train_per_class=6, n_test_per_class=2, size=28)
    cfg = make_config(method="dmnsp", LAMBDA_SCALE=1e30, max_steps=2, projection={"mode": "clean"})
    cfg["dataset"] = data.name
    session = runner.Session(cfg, progress=False, data=data)
    rows = runner.run_all(cfg, tmp_path / "run", progress=False, session=session)
    assert len(rows) == 2
    diag = json.loads((tmp_path / "run" / "task1" / "diagnostics.json").read_text())
    assert "inf" in diag["lambda_factor_visual"]
    assert write_run_metrics(tmp_path / "run")["complete"]


# ------------------------------------------------------------------------ 9: duplicate YAML keys


def test_duplicate_keys_are_refused_naming_the_key(tmp_path, capsys):
    with pytest.raises(Exception, match="duplicate key 'lr'"):
        load_yaml("lr: 0.1\nepochs: 2\nlr: 0.2\n")
    path = tmp_path / "c.yaml"
    path.write_text("projection:\n  mode: clean\n  mode: faithful\n")
    assert main(["validate-config", "--config", str(path)]) == 2
    assert "duplicate key 'mode'" in one_line_error(capsys)
    path.write_text("class_order: [1, 0]\nclass_order: [0, 1]\n")
    with pytest.raises(ScenarioError, match="duplicate key 'class_order'"):
        resolve_class_order(str(path), 2, [0, 1])
    path.write_text("dataset: cifar100\nlr: 1e-3\nlr: 1e-2\n")
    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        import_hydra_config(path)
    # YAML merge keys are not duplicates: the explicit key overrides the merged one on purpose.
    assert load_yaml("base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n")["c"] == {"x": 3, "y": 2}
    # Repeated keys in different mappings are fine.
    path.write_text("a: {x: 1}\nb: {x: 2}\n")
    assert read_yaml_file(path, "file") == {"a": {"x": 1}, "b": {"x": 2}}
    assert parse_overrides(["lr=1e-4", "projection.mode=clean"]) == {"lr": 1e-4, "projection.mode": "clean"}


def test_duplicate_keys_in_a_workflow_config_stop_planning(tmp_path):
    from test_workflow import snakemake

    config = tmp_path / "config.yaml"
    config.write_text(
        "experiments:\n  e:\n    datasets: [fashion-mnist]\n    methods: [zeroshot]\n"
        "    run: {model_name: dmnsp-tiny, pretrained: null}\n"
        "keep_checkpoints: true\nkeep_checkpoints: false\n"
    )
    proc = snakemake("-n", "--configfile", str(config), cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "duplicate key 'keep_checkpoints'" in proc.stdout + proc.stderr

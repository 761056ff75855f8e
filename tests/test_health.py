"""Health facts: a table of noise is flagged, not printed as a result.

Every run's metrics.json says how its test predictions spread over the classes and how its
accuracy compares with chance; the results stage marks, in every table format, runs collapsed to
one class or at chance and problems on which every method gave the identical result, and warns on
the console. Hand-made evaluation records (the issue's failing case: every prediction in one class,
every method at Avg 21.55 / Last 8.69 ± 0.00) and one small end-to-end check through the CLI.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from fakes import mini_run_config

from dmnsp import aggregate as agg
from dmnsp import layout, metrics, report
from dmnsp.cli import main
from dmnsp.pretrain import health as pretrain_health

N_CLASSES, INCREMENT = 10, 2
TEST_PER_CLASS = 45  # the issue's small image folder: 45 test images per class


# ------------------------------------------------------------------------------- hand-made records
def eval_row(t: int, n_tasks: int, predicted: list[int], labels: list[int], per_task: list[float]) -> dict:
    """An eval.json record of task ``t``: counts per seen class and the accuracy they imply."""
    sizes = [INCREMENT * TEST_PER_CLASS] * (t + 1)
    return {
        "task": t,
        "n_tasks": n_tasks,
        "accuracy_per_task": per_task,
        "n_samples_per_task": sizes,
        "accuracy": float(np.dot(per_task, sizes) / sum(sizes)),
        "n_samples": sum(sizes),
        "predictions_per_class": predicted,
        "labels_per_class": labels,
        "seconds": 1.0,
    }


def collapsed_rows(n_tasks: int = 5) -> list[dict]:
    """Every test image predicted as class 0: accuracy 1/(seen classes), all on task 0's first class."""
    rows = []
    for t in range(n_tasks):
        seen = INCREMENT * (t + 1)
        predicted = [seen * TEST_PER_CLASS] + [0] * (seen - 1)
        per_task = [0.5] + [0.0] * t  # half of task 0's images are class 0
        rows.append(eval_row(t, n_tasks, predicted, [TEST_PER_CLASS] * seen, per_task))
    return rows


def healthy_rows(level: float, n_tasks: int = 5, spread: int = 0) -> list[dict]:
    """Predictions spread over the seen classes, accuracy ``level`` (minus a little per old task)."""
    rows = []
    for t in range(n_tasks):
        seen = INCREMENT * (t + 1)
        predicted = [TEST_PER_CLASS + ((c + spread) % 3) - 1 for c in range(seen)]
        predicted[0] += seen * TEST_PER_CLASS - sum(predicted)
        per_task = [max(0.0, level - 0.05 * (t - j) - 0.001 * spread) for j in range(t + 1)]
        rows.append(eval_row(t, n_tasks, predicted, [TEST_PER_CLASS] * seen, per_task))
    return rows


def write_run(root: Path, rows: list[dict], *, method: str, seed: int, mode: str = "faithful") -> Path:
    """A finished run folder as the workflow leaves it (config.yaml, run.json, task*/eval.json)."""
    root.mkdir(parents=True)
    config = {
        "dataset": "fashion-mnist",
        "initial_increment": INCREMENT,
        "increment": INCREMENT,
        "method": method,
        "seed": seed,
        "model_name": "dmnsp-tiny",
        "pretrained": "results/pretrained/abc/model.pt",
        "evaluate_on": "test",
        "projection": {"mode": mode},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    label = method if mode == "faithful" else f"{method} (mode={mode})"
    info = {"experiment": "fm", "label": label, "settings": {}}
    (root / "run.json").write_text(json.dumps(info))
    for row in rows:
        (root / f"task{row['task']}").mkdir()
        (root / f"task{row['task']}" / "eval.json").write_text(json.dumps(row))
    return root


METHODS = [("zeroshot", "faithful"), ("finetune", "faithful"), ("dmnsp", "faithful"), ("dmnsp", "clean")]


def issue_case(tmp: Path) -> list[Path]:
    """The issue's failing case: every method and seed with the same collapsed predictions."""
    return [
        write_run(tmp / f"{m}-{mode}/seed{seed}", collapsed_rows(), method=m, seed=seed, mode=mode)
        for m, mode in METHODS
        for seed in (0, 1)
    ]


def default_like(tmp: Path) -> list[Path]:
    """Healthy runs like the embedded default's: methods differ, seeds differ (zeroshot may repeat)."""
    level = {"zeroshot": 0.6, "finetune": 0.7, "dmnsp": 0.8}
    runs = []
    for m, mode in METHODS:
        for seed in (0, 1):
            spread = 0 if m == "zeroshot" else seed + 1  # zeroshot trains nothing: same matrix per seed
            rows = healthy_rows(level[m] + (0.03 if mode == "clean" else 0.0), spread=spread)
            runs.append(write_run(tmp / f"{m}-{mode}/seed{seed}", rows, method=m, seed=seed, mode=mode))
    return runs


# ------------------------------------------------------------------------------- the rule itself
def test_chance_threshold_restated():
    # 10 classes, 5000 images: 3 standard errors are 3 * sqrt(0.1 * 0.9 / 5000) = 0.0127 < 0.05.
    assert metrics.chance_threshold(10, 5000) == pytest.approx((0.1, 0.15))
    # 4 classes, 16 images: 3 * sqrt(0.25 * 0.75 / 16) = 0.3248 > 0.05.
    assert metrics.chance_threshold(4, 16)[1] == pytest.approx(0.25 + 0.324759, abs=1e-6)
    # 2 classes, 90 images (the issue's first step): 3 * sqrt(0.25 / 90) = 0.1581.
    assert metrics.chance_threshold(2, 90)[1] == pytest.approx(0.5 + 3 * math.sqrt(0.25 / 90))


@pytest.mark.parametrize(
    ("accuracy", "n_classes", "n", "at_chance"),
    [(0.15, 10, 5000, True), (0.1501, 10, 5000, False), (0.0, 10, 5000, True), (0.9, 2, 1000, False)],
)
def test_at_chance_boundary(accuracy, n_classes, n, at_chance):
    assert metrics.step_health(accuracy, n_classes, n)["at_chance"] is at_chance


def test_collapse_needs_one_class_above_its_share_of_the_labels():
    one = metrics.step_health(0.5, 2, 100, [95, 5], [50, 50])
    assert one["collapsed"] is True and one["top_class"] == 0 and one["top_class_share"] == 0.95
    assert metrics.step_health(0.5, 2, 100, [89, 11], [50, 50])["collapsed"] is False
    # A test set that is 95 % one class: predicting it 95 % of the time is no collapse.
    assert metrics.step_health(0.95, 2, 100, [95, 5], [95, 5])["collapsed"] is False
    # One class: neither rule means anything.
    single = metrics.step_health(1.0, 1, 10, [10], [10])
    assert single["collapsed"] is None and single["at_chance"] is None
    # Counts not recorded (older eval.json): the prediction facts are unknown, not "healthy".
    assert metrics.step_health(0.5, 2, 100)["collapsed"] is None
    with pytest.raises(ValueError, match="3 counts"):
        metrics.step_health(0.5, 3, 100, [1, 2])


def test_run_health_of_the_issue_case():
    health = metrics.run_health(collapsed_rows())
    assert health["collapsed"] is True and health["at_chance"] is True
    assert health["collapsed_steps"] == [0, 1, 2, 3, 4] == health["at_chance_steps"]
    assert health["top_class_share"] == 1.0
    assert [s["chance"] for s in health["steps"]] == pytest.approx([1 / 2, 1 / 4, 1 / 6, 1 / 8, 1 / 10])
    assert (
        len(health["flags"]) == 2
        and health["flags"][0] == "predictions collapsed to one class after task 0-4 (up to 100%)"
    )


def test_flagged_steps_read_as_ranges():
    assert metrics._ranges([0, 1, 2, 4, 6, 7]) == "0-2, 4, 6, 7"


def test_run_health_of_a_healthy_and_a_forgetting_run():
    good = metrics.run_health(healthy_rows(0.8))
    assert good["collapsed"] is False and good["at_chance"] is False and good["flags"] == []
    assert good["top_class_share"] < 0.2
    # Forgetting to near chance at the last step only is a result, not noise: at_chance needs every step.
    rows = healthy_rows(0.8)
    rows[-1] = eval_row(4, 5, [90] * 10, [45] * 10, [0.0, 0.0, 0.0, 0.0, 0.5])
    forgot = metrics.run_health(rows)
    assert forgot["at_chance_steps"] == [4] and forgot["at_chance"] is False and forgot["flags"] == []
    # No counts recorded: unknown.
    old = [{k: v for k, v in r.items() if not k.endswith("_per_class")} for r in healthy_rows(0.8)]
    assert metrics.run_health(old)["collapsed"] is None and metrics.run_health(old)["at_chance"] is None


def test_metrics_json_carries_the_health_facts(tmp_path):
    run = write_run(tmp_path / "run", collapsed_rows(), method="finetune", seed=0)
    written = layout.write_run_metrics(run)
    stored = json.loads((run / layout.METRICS).read_text())
    assert stored["health"] == written["health"]
    assert stored["health"]["collapsed"] is True and stored["health"]["top_class_share"] == 1.0
    assert [s["top_class_share"] for s in stored["health"]["steps"]] == [1.0] * 5


def test_pretraining_gate_uses_the_same_rule_and_catches_a_collapse():
    falling = [2.3, 2.0, 1.8, 1.6, 1.4, 1.3, 1.2, 1.1, 1.0, 0.9]
    # Above chance + margin (0.17 > 0.15) yet 92 % of the images predicted as class 3 (at most
    # 50 + 40 of 500 can then be right).
    labels = [50] * 10
    predicted = [5, 5, 5, 460, 5, 5, 5, 5, 5, 0]
    problems, facts = pretrain_health(0.17, 500, 10, falling, predicted, labels)
    assert len(problems) == 1 and "92% of the test images are predicted as one class" in problems[0]
    assert facts["collapsed"] is True and facts["top_class_share"] == pytest.approx(0.92)
    assert pretrain_health(0.17, 500, 10, falling)[0] == []  # without counts only the accuracy rule
    assert facts["needed_accuracy"] == metrics.chance_threshold(10, 500)[1]
    assert pretrain_health(0.17, 500, 10, falling, [50] * 10, labels)[0] == []


# ------------------------------------------------------------------------------- tables and warnings
def _md_row(md: str, name: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == name:
            return cells[1:]
    raise AssertionError(f"no row {name!r} in\n{md}")


def test_identical_methods_are_flagged_in_every_table_format(tmp_path):
    runs = issue_case(tmp_path / "runs")
    out = report.make_report_artifacts(runs, tmp_path / "tables", tmp_path / "plots", expected_seeds=2)
    md = (tmp_path / "tables/summary.md").read_text()
    # The issue's numbers: Avg = mean(1/2, 1/4, 1/6, 1/8, 1/10) (equal test sets per class), Last 1/10.
    avg = 100 * np.mean([0.5, 0.25, 1 / 6, 0.125, 0.1])
    for name in ("zeroshot", "finetune", "dmnsp", "dmnsp (mode=clean)"):
        cells = _md_row(md, name)
        seeds_mark = "" if name == "zeroshot" else "¶"  # zeroshot trains nothing: seeds may agree
        assert cells[:2] == [f"{avg:.2f} ± 0.00‡§{seeds_mark}", f"10.00 ± 0.00‡§{seeds_mark}"]  # no bold
    assert "> **WARNING:**" in md and "every method (zeroshot, finetune, dmnsp, dmnsp (mode=clean))" in md
    assert "- § WARNING, not a result: every method gave the identical accuracy matrix" in md
    assert "- ‡ WARNING, not a result: runs whose test predictions collapsed to one class" in md
    assert "finetune-faithful/seed1 (predictions collapsed to one class after task 0-4 (up to 100%)" in md
    tex = (tmp_path / "tables/summary.tex").read_text()
    assert r"\textsuperscript{\ddag}\textsuperscript{\S}" in tex and r"\textsuperscript{\S} WARNING" in tex
    summary = pd.read_csv(tmp_path / "tables/summary.csv")
    assert summary["identical_methods"].all() and (summary["n_collapsed"] == 2).all()
    assert summary["health"].str.contains("§ every method gave the identical result").all()
    assert summary["health"].str.startswith("‡ predictions collapsed to one class in 2/2 runs").all()
    runs_csv = pd.read_csv(tmp_path / "tables/runs.csv")
    assert runs_csv["collapsed"].all() and runs_csv["matrix_digest"].nunique() == 1
    page = (tmp_path / "tables/summary.html").read_text()
    assert page.count("WARNING: ") >= 5 and "‡§" in page
    assert any("every method" in line for line in out["warnings"])
    assert len(out["warnings"]) == 1 + 4 + 3  # one problem, four groups collapsed, three train with ¶


def test_the_console_warns_from_the_cli(tmp_path, capsys):
    runs = issue_case(tmp_path / "runs")
    argv = ["report-artifacts", "--runs", *map(str, runs), "--tables-dir", str(tmp_path / "t")]
    assert main([*argv, "--plots-dir", str(tmp_path / "p")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("dmnsp report-artifacts: warning: fm, fashion-mnist, 2-2: every method (")
    assert all(line.startswith("dmnsp report-artifacts: warning: ") for line in err)


def test_a_default_like_experiment_raises_no_false_alarm(tmp_path, capsys):
    runs = default_like(tmp_path / "runs")
    out = report.make_report_artifacts(runs, tmp_path / "tables", tmp_path / "plots", expected_seeds=2)
    assert out["warnings"] == []
    md = (tmp_path / "tables/summary.md").read_text()
    assert not any(mark in md for mark in "‡§¶") and "WARNING" not in md
    tex = (tmp_path / "tables/summary.tex").read_text()
    assert "ddag" not in tex and r"\S" not in tex and r"\P" not in tex
    summary = pd.read_csv(tmp_path / "tables/summary.csv", keep_default_na=False)
    assert (summary["health"] == "").all() and not summary["identical_methods"].any()
    # zeroshot trains nothing: the same matrix for both seeds is expected, not flagged.
    zs = summary[summary["label"] == "zeroshot"]
    assert not zs["identical_seeds"].iloc[0]
    assert main(["report-artifacts", "--runs", *map(str, runs), "--tables-dir", str(tmp_path / "t2"),
                 "--plots-dir", str(tmp_path / "p2")]) == 0  # fmt: skip
    assert capsys.readouterr().err == ""


def test_identical_only_when_every_method_and_every_seed_agree(tmp_path):
    same = collapsed_rows()
    runs = [
        write_run(tmp_path / "zs/seed0", healthy_rows(0.6), method="zeroshot", seed=0),
        write_run(tmp_path / "ft/seed0", same, method="finetune", seed=0),
        write_run(tmp_path / "dm/seed0", same, method="dmnsp", seed=0),
    ]
    # finetune == dmnsp but zeroshot differs: not "every method".
    assert agg.identical_problems(agg.collect_runs(runs)) == {}
    # Identical for seed 0, different for seed 1: not flagged either.
    two = [
        write_run(tmp_path / "b/ft0", same, method="finetune", seed=0),
        write_run(tmp_path / "b/dm0", same, method="dmnsp", seed=0),
        write_run(tmp_path / "b/ft1", same, method="finetune", seed=1),
        write_run(tmp_path / "b/dm1", healthy_rows(0.7), method="dmnsp", seed=1),
    ]
    assert agg.identical_problems(agg.collect_runs(two)) == {}
    # Both seeds identical: flagged, naming the seeds compared.
    two[-1] = write_run(tmp_path / "b/dm1b", same, method="dmnsp", seed=1)
    assert list(agg.identical_problems(agg.collect_runs(two)).values()) == [[0, 1]]
    # A method seen under one seed only is not compared: no claim about "every method".
    lone = [*two[:2], write_run(tmp_path / "b/zs5", same, method="zeroshot", seed=5)]
    assert agg.identical_problems(agg.collect_runs(lone)) == {}


# ------------------------------------------------------------------------------- end to end


def test_end_to_end_every_method_identical_is_flagged_and_a_learning_run_is_not(tmp_path, capsys):
    """Real runs through the CLI: with lr 1e-30 training changes nothing, so zeroshot, finetune
    and dmnsp give the identical matrix (the issue's symptom); with lr 0.01 they differ."""
    config = mini_run_config(tmp_path, max_test_per_class=16, max_steps=3)
    for lr in (1e-30, 0.01):
        runs = []
        for method in ("zeroshot", "finetune", "dmnsp"):
            out = tmp_path / f"lr{lr:g}" / method
            sets = ["--set", f"method={method}", "--set", f"lr={lr}"]
            assert main(["run", "--quiet", "--config", str(config), *sets, "--out-dir", str(out)]) == 0
            runs.append(out)
            assert "health" in json.loads((out / layout.METRICS).read_text())
        capsys.readouterr()
        tables = tmp_path / f"lr{lr:g}" / "tables"
        assert main(["report-artifacts", "--runs", *map(str, runs), "--tables-dir", str(tables),
                     "--plots-dir", str(tmp_path / f"lr{lr:g}" / "plots")]) == 0  # fmt: skip
        err = capsys.readouterr().err
        md = (tables / "summary.md").read_text()
        if lr == 1e-30:
            assert "every method (zeroshot, finetune, dmnsp) gave the identical accuracy matrix" in err
            assert "§" in _md_row(md, "dmnsp")[0] and "§" in _md_row(md, "zeroshot")[1]
        else:
            assert "every method" not in err and "§" not in md

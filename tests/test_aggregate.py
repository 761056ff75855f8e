"""Aggregation of synthetic run folders into runs/summary/paper-style/hyperparameter tables."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dmnsp import aggregate as agg


def make_run(
    root: Path,
    *,
    method: str = "dmnsp",
    seed: int = 0,
    first: float = 0.9,
    final: float = 0.8,
    n_tasks: int = 2,
    done: int | None = None,
    model_name: str = "ViT-B-16",
    dataset: str = "cifar100",
    split: tuple[int, int] = (10, 10),
    projection: dict | None = None,
    hp: dict | None = None,
    run_json: dict | None = None,
) -> Path:
    """A run folder whose accuracy matrix is ``first`` in every row but the last, ``final`` in the last.

    So ``A = [first, ..., first, final]``: Avg = ((T-1) * first + final) / T and Last = final.
    """
    root.mkdir(parents=True)
    config = {
        "dataset": dataset,
        "initial_increment": split[0],
        "increment": split[1],
        "method": method,
        "seed": seed,
        "TOP_SELECT": 1,
        "TOP_K_RATIO": 0.1,
        "LAMBDA_SCALE": 30.0,
        "lr": 0.001,
        "epochs": 4,
        "model_name": model_name,
        "pretrained": "openai",
        "evaluate_on": "test",
        "projection": {
            "mode": "faithful",
            "towers": None,
            "layers": "multi",
            "lambda": "dynamic",
            "basis": None,
            "energy_threshold": None,
        }
        | (projection or {}),
    } | (hp or {})
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    if run_json is not None:
        (root / "run.json").write_text(json.dumps(run_json))
    for t in range(n_tasks if done is None else done):
        value = final if t == n_tasks - 1 else first
        folder = root / f"task{t}"
        folder.mkdir()
        evaluation = {
            "task": t,
            "n_tasks": n_tasks,
            "accuracy_per_task": [value] * (t + 1),
            "n_samples_per_task": [50] * (t + 1),
            "accuracy": value,
            "n_samples": 50 * (t + 1),
            "seconds": 1.0,
            "peak_mem_mb": 10.0,
        }
        (folder / "eval.json").write_text(json.dumps(evaluation))
        diagnostics = {
            "task": t,
            "lambda": None,
            "seconds": {"train": 2.0, "basis": 0.0, "lambda": 0.0, "eval": 1.0},
            "peak_mem_mb": 20.0,
        }
        (folder / "diagnostics.json").write_text(json.dumps(diagnostics))
    return root


@pytest.fixture
def paper_runs(tmp_path: Path) -> list[Path]:
    """Four methods on CIFAR100 10-10 (2 tasks) with known means and stds.

    - dmnsp, 3 seeds: Avg 85, 87, 89 -> 87.00 ± 2.00;  Last 80, 82, 84 -> 82.00 ± 2.00 (best Last)
    - dmnsp (towers=both), 2 seeds: Avg 87, 88 -> 87.50 ± 0.71 (best Avg); Last 78, 80 -> 79.00 ± 1.41
    - finetune, 2 complete seeds + 1 incomplete: Avg 82.5, 84.5 -> 83.50 ± 1.41; Last 70, 74 -> 72.00 ± 2.83
    - zeroshot, 1 seed: 60.00 (n=1)
    plus a run folder that does not exist.
    """
    runs = []
    for seed, (first, final) in enumerate([(0.90, 0.80), (0.92, 0.82), (0.94, 0.84)]):
        runs.append(make_run(tmp_path / f"dmnsp/seed{seed}", seed=seed, first=first, final=final))
    for seed, (first, final) in enumerate([(0.96, 0.78), (0.96, 0.80)]):
        runs.append(
            make_run(
                tmp_path / f"symmetric/seed{seed}",
                seed=seed,
                first=first,
                final=final,
                projection={"towers": "both"},
            )
        )
    for seed, (first, final) in enumerate([(0.95, 0.70), (0.95, 0.74)]):
        runs.append(
            make_run(
                tmp_path / f"finetune/seed{seed}", method="finetune", seed=seed, first=first, final=final
            )
        )
    runs.append(make_run(tmp_path / "finetune/seed2", method="finetune", seed=2, done=1))
    runs.append(make_run(tmp_path / "zeroshot/seed0", method="zeroshot", first=0.6, final=0.6))
    runs.append(tmp_path / "cifar100/dmnsp/seed7")  # never ran
    return runs


def test_load_reference_matches_method_md():
    ref = agg.load_reference()
    assert list(ref.columns) == ["method", "dataset", "split", "metric", "value", "source"]
    assert set(ref.method) == {"zeroshot", "moe_adapters", "rapf", "dmnsp"}

    def value(method, dataset, split, metric):
        return agg._reference_value(ref, method, dataset, split, metric)

    assert value("dmnsp", "cifar100", "10-10", "avg") == 87.61
    assert value("dmnsp", "cifar100", "10-10", "last") == 79.94
    assert value("zeroshot", "cifar100", "2-2", "avg") == 76.49
    assert value("moe_adapters", "cifar100", "5-5", "last") == 76.20
    assert value("moe_adapters", "tinyimagenet", "100-5", "avg") == 79.96
    assert value("dmnsp", "cifar100", "5-5", "avg") is None  # unknown stays absent
    assert value("rapf", "cifar100", "10-10", "avg") == 86.19
    assert value("rapf", "cifar100", "10-10", "last") == 79.04
    assert value("rapf", "cifar100", "5-5", "avg") is None  # no published number: empty
    steps = ref[ref.metric.str.startswith("step_")].sort_values("metric", key=lambda m: m.str[5:].astype(int))
    dmnsp_steps, moe_steps = steps[steps.method == "dmnsp"], steps[steps.method == "moe_adapters"]
    assert dmnsp_steps.value.tolist() == [
        99.20,
        96.10,
        91.93,
        87.05,
        87.00,
        86.10,
        84.17,
        83.05,
        81.58,
        79.94,
    ]
    assert moe_steps.value.tolist() == [98.40, 94.70, 89.27, 85.38, 83.56, 83.25, 81.39, 79.74, 78.86, 77.52]
    assert moe_steps.value.mean() == pytest.approx(85.21, abs=0.005)  # the log's Avg of its steps
    assert ref.value.between(0, 100).all()
    assert not ref.duplicated(["method", "dataset", "split", "metric"]).any()


def test_collect_runs_keeps_every_run(paper_runs):
    runs = agg.collect_runs(paper_runs)
    assert len(runs) == len(paper_runs)
    assert runs.status.value_counts().to_dict() == {"complete": 8, "incomplete": 1, "missing": 1}
    missing = runs[runs.status == "missing"].iloc[0]
    assert missing.seed == 7 and missing.dataset == "cifar100" and missing.label == "dmnsp"
    assert math.isnan(missing.avg)
    dmnsp0 = runs[(runs.label == "dmnsp") & (runs.seed == 0) & runs.complete].iloc[0]
    assert dmnsp0.avg == pytest.approx(85.0) and dmnsp0.last == pytest.approx(80.0)  # percent
    assert dmnsp0.step_1 == pytest.approx(90.0) and dmnsp0.step_2 == pytest.approx(80.0)
    assert dmnsp0.split == "10-10" and dmnsp0["projection.towers"] == "visual"
    assert dmnsp0.wall_seconds == pytest.approx(2 * 3.0) and dmnsp0.peak_mem_mb == pytest.approx(20.0)
    assert runs.TOP_SELECT.dtype == "Int64"  # integers stay integers beside the missing run's NaN
    assert set(runs.label) == {"dmnsp", "dmnsp (towers=both)", "finetune", "zeroshot"}


def test_summarize_means_stds_and_counts(paper_runs):
    summary = agg.summarize(agg.collect_runs(paper_runs)).set_index("label", drop=False)
    placed = summary[summary.split.notna()]
    assert placed.loc["dmnsp", "avg_mean"] == pytest.approx(87.0)
    assert placed.loc["dmnsp", "avg_std"] == pytest.approx(2.0)
    assert placed.loc["dmnsp", "last_mean"] == pytest.approx(82.0)
    assert placed.loc["dmnsp (towers=both)", "avg_std"] == pytest.approx(math.sqrt(0.5))
    finetune = placed.loc["finetune"]
    assert (finetune.n_seeds, finetune.n_complete, finetune.seeds) == (3, 2, "0,1,2")
    assert finetune.last_mean == pytest.approx(72.0) and finetune.last_std == pytest.approx(math.sqrt(8))
    assert "finetune/seed2 (incomplete, 1/2 tasks)" in finetune.not_complete
    zeroshot = placed.loc["zeroshot"]
    assert zeroshot.n_seeds == 1 and zeroshot.avg_mean == pytest.approx(60.0) and math.isnan(zeroshot.avg_std)
    missing = summary[summary.split.isna()].iloc[0]
    assert (missing.n_seeds, missing.n_complete) == (1, 0) and "missing" in missing.not_complete


def _md_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|:") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_write_tables_markdown(paper_runs, tmp_path):
    out = agg.write_tables(paper_runs, tmp_path / "tables", expected_seeds=3)
    assert set(out) == {
        "runs.csv",
        "summary.csv",
        "summary.md",
        "summary.tex",
        "summary.html",
        "hyperparameters.csv",
        "hyperparameters.md",
    }
    assert all(path.is_file() for path in out.values())
    md = out["summary.md"].read_text()
    rows = _md_rows(md)
    # columns: Avg, Last, n of cifar100 10-10
    assert rows["dmnsp"] == ["87.00 ± 2.00", "**82.00 ± 2.00**", "3"]
    assert rows["dmnsp (towers=both)"] == ["**87.50 ± 0.71**†", "79.00 ± 1.41†", "2†"]
    assert rows["finetune"] == ["83.50 ± 1.41†", "72.00 ± 2.83†", "2/3†"]
    assert rows["zeroshot"] == ["60.00 (n=1)†", "60.00 (n=1)†", "1†"]
    assert rows["dmnsp (reported)"] == ["87.61", "79.94", ""]
    assert rows["zeroshot (reported)"] == ["75.17", "66.72", ""]
    assert rows["moe_adapters (reported)"] == ["85.21", "77.52", ""]
    assert rows["rapf (reported)"] == ["86.19", "79.04", ""]
    assert rows["Δ dmnsp"] == ["-0.61", "+2.06", ""]
    assert rows["Δ zeroshot"] == ["-15.17", "-6.72", ""]
    assert "Δ dmnsp (towers=both)" not in rows and "Δ finetune" not in rows  # nothing reported for them
    assert "cifar100 10-10 Avg" in md and "cifar100 10-10 n" in md
    assert "† fewer complete seeds" in md and "(expected 3)" in md and "Reported: published numbers" in md
    assert "finetune/seed2 (incomplete, 1/2 tasks)" in md and "seed7 (missing" in md

    runs = pd.read_csv(out["runs.csv"])
    assert len(runs) == len(paper_runs) and set(runs.status) == {"complete", "incomplete", "missing"}
    summary = pd.read_csv(out["summary.csv"])
    assert {"avg_mean", "avg_std", "n_seeds", "n_complete", "not_complete"} <= set(summary.columns)


def test_no_flags_without_expected_seeds_when_all_complete(tmp_path):
    runs = [make_run(tmp_path / f"r{s}", seed=s, first=0.9, final=0.8 + 0.01 * s) for s in range(2)]
    md = agg.write_tables(runs, tmp_path / "t")["summary.md"].read_text()
    assert "†" not in md
    assert _md_rows(md)["dmnsp"] == ["85.25 ± 0.35", "80.50 ± 0.71", "2"]  # one row: nothing to bold
    flagged = agg.write_tables(runs, tmp_path / "t3", expected_seeds=3)["summary.md"].read_text()
    assert _md_rows(flagged)["dmnsp"][2] == "2†"


def test_delta_only_for_the_reported_backbone(tmp_path):
    runs = [make_run(tmp_path / "tiny", model_name="dmnsp-tiny")]
    md = agg.write_tables(runs, tmp_path / "t")["summary.md"].read_text()
    rows = _md_rows(md)
    assert "dmnsp (reported)" in rows
    assert not any(name.startswith("Δ") for name in rows)


def _strip_escaped_braces(tex: str) -> str:
    return tex.replace(r"\{", "").replace(r"\}", "")


def test_latex_is_valid(paper_runs, tmp_path):
    paper_runs.append(
        make_run(
            tmp_path / "odd/seed0",
            first=0.5,
            final=0.4,
            run_json={"experiment": "abl_1", "label": "no_proj 100% & #1", "settings": {}},
        )
    )
    tex = agg.write_tables(paper_runs, tmp_path / "tables", expected_seeds=3)["summary.tex"].read_text()
    body = _strip_escaped_braces(tex)
    assert body.count("{") == body.count("}")
    depth = 0
    for ch in body:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert (
        re.search(r"(?<!\\)_", tex.split("\n", 1)[1]) is None
    )  # every underscore escaped (header comment aside)
    assert re.search(r"(?<!\\)%", "\n".join(tex.splitlines()[1:])) is None  # only the header is a comment
    assert r"no\_proj 100\% \& \#1" in tex
    assert r"moe\_adapters (reported)" in tex
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}", r"\end{tabular}"):
        assert rule in tex
    assert r"\textbf{87.50 $\pm$ 0.71}\textsuperscript{\dag}" in tex
    assert r"\textbf{82.00 $\pm$ 0.02}" not in tex and r"\textbf{82.00 $\pm$ 2.00}" in tex
    assert r"$-0.61$" in tex and r"$+2.06$" in tex
    assert "±" not in tex and "Δ" not in tex and "†" not in tex  # all mapped to LaTeX
    # every data row has the same number of cells as the column format says
    n_cols = len(re.search(r"\\begin\{tabular\}\{([lrc]+)\}", tex).group(1))

    def cells(line):
        return len(re.findall(r"(?<!\\)&", line)) + 1

    rows = [line for line in tex.splitlines() if line.endswith(r"\\") and cells(line) > 1]
    assert len(rows) >= 2 + 4 + 3 + 2  # header lines, ours, reported, delta

    def width(line):
        spans = [int(n) for n in re.findall(r"\\multicolumn\{(\d+)\}", line)]
        return cells(line) + sum(n - 1 for n in spans)

    assert all(width(line) == n_cols for line in rows)


def test_hyperparameter_table(tmp_path):
    runs = []
    grid = {(0.1, 10.0): 0.80, (0.1, 30.0): 0.86, (0.2, 10.0): 0.82, (0.2, 30.0): 0.84}
    for (ratio, scale), final in grid.items():
        for seed in (0, 1):
            runs.append(
                make_run(
                    tmp_path / f"hp_{ratio}_{scale}/seed{seed}",
                    seed=seed,
                    first=0.9,
                    final=final,
                    hp={"TOP_K_RATIO": ratio, "LAMBDA_SCALE": scale},
                    split=(5, 5),
                    run_json={
                        "experiment": "sweep",
                        "label": "dmnsp",
                        "settings": {"TOP_K_RATIO": ratio, "LAMBDA_SCALE": scale},
                    },
                )
            )
    runs.append(make_run(tmp_path / "zs", method="zeroshot", first=0.6, final=0.6, split=(5, 5)))
    out = agg.write_tables(runs, tmp_path / "tables")
    table = pd.read_csv(out["hyperparameters.csv"])
    assert len(table) == 4 and set(table.label) == {"dmnsp"}  # zeroshot has no sweep
    best = table[table.best]
    assert len(best) == 1
    assert (best.TOP_K_RATIO.iloc[0], best.LAMBDA_SCALE.iloc[0]) == (0.1, 30.0)
    assert best.avg_mean.iloc[0] == pytest.approx(88.0) and (table.n_seeds == 2).all()
    md = out["hyperparameters.md"].read_text()
    best_line = next(line for line in md.splitlines() if "✓" in line)
    assert "**88.00 ± 0.00**" in best_line and "0.1" in best_line and "30" in best_line
    # the summary keeps the four settings apart, named by the swept keys
    rows = _md_rows(out["summary.md"].read_text())
    # Both hand-made seeds hold the same matrix: ¶ flags the ± 0.00 as "the seed changed nothing".
    assert rows["dmnsp [TOP_K_RATIO=0.1, LAMBDA_SCALE=30]"][0] == "**88.00 ± 0.00**¶"


def test_hyperparameter_table_empty_without_sweep(paper_runs, tmp_path):
    out = agg.write_tables(paper_runs, tmp_path / "tables")
    assert pd.read_csv(out["hyperparameters.csv"]).empty
    assert "No hyperparameter sweep" in out["hyperparameters.md"].read_text()


def test_val_runs_stay_out_of_the_paper_table(tmp_path):
    runs = [
        make_run(tmp_path / "test", first=0.9, final=0.8),
        make_run(tmp_path / "val", first=0.5, final=0.5, hp={"evaluate_on": "val"}),
    ]
    out = agg.write_tables(runs, tmp_path / "tables")
    assert "50.00" not in out["summary.md"].read_text()
    assert set(pd.read_csv(out["summary.csv"]).evaluate_on) == {"test", "val"}


def test_empty_input(tmp_path):
    out = agg.write_tables([], tmp_path / "tables")
    assert "No run has results yet" in out["summary.md"].read_text()
    assert "Reported:" not in out["summary.md"].read_text()  # the note only comes with reported rows
    only_missing = agg.write_tables([tmp_path / "gone/seed0"], tmp_path / "t2")
    assert "gone/seed0 (missing" in only_missing["summary.md"].read_text()
    assert "gone/seed0 (missing" in only_missing["summary.tex"].read_text()
    assert agg.summarize(agg.collect_runs([])).empty

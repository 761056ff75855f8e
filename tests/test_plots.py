"""Figures render to non-trivial PNG and PDF files from synthetic run folders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("matplotlib", reason="plots need the 'plot' extra (matplotlib)")

from dmnsp import aggregate as agg  # noqa: E402
from dmnsp import plots, report  # noqa: E402

N_LAYERS = 4


def make_run(
    root: Path,
    *,
    method: str,
    seed: int,
    n_tasks: int = 3,
    hp: dict | None = None,
    towers: str | None = None,
    done: int | None = None,
) -> Path:
    """A run with a decaying accuracy matrix, lambda matrices (dmnsp) and shrinking visual update norms."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    config = {
        "dataset": "cifar100",
        "initial_increment": 10,
        "increment": 10,
        "method": method,
        "seed": seed,
        "TOP_SELECT": 1,
        "TOP_K_RATIO": 0.1,
        "LAMBDA_SCALE": 30.0,
        "lr": 0.001,
        "epochs": 4,
        "model_name": "ViT-B-16",
        "pretrained": "openai",
        "evaluate_on": "test",
        "projection": {
            "mode": "faithful",
            "towers": towers,
            "layers": "multi",
            "lambda": "dynamic",
            "basis": None,
            "energy_threshold": None,
        },
    } | (hp or {})
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    base = {"zeroshot": 0.6, "finetune": 0.8, "dmnsp": 0.9}[method] + 0.02 * seed
    for t in range(n_tasks if done is None else done):
        accs = [float(np.clip(base - 0.08 * (t - j) + rng.uniform(-0.02, 0.02), 0, 1)) for j in range(t + 1)]
        folder = root / f"task{t}"
        folder.mkdir()
        (folder / "eval.json").write_text(
            json.dumps(
                {
                    "task": t,
                    "n_tasks": n_tasks,
                    "accuracy_per_task": accs,
                    "n_samples_per_task": [20] * (t + 1),
                    "accuracy": float(np.mean(accs)),
                    "n_samples": 20 * (t + 1),
                    "seconds": 1.0,
                    "peak_mem_mb": 5.0,
                }
            )
        )
        lam = None
        if method == "dmnsp" and t > 0:
            lam = (27.0 + rng.uniform(0, 3, (N_LAYERS, N_LAYERS))).tolist()
        trained = method != "zeroshot"
        (folder / "diagnostics.json").write_text(
            json.dumps(
                {
                    "task": t,
                    "lambda": lam,
                    "basis_columns": {"visual": [63 * (t + 1)] * N_LAYERS, "text": [0] * N_LAYERS},
                    "inf_fraction_exp_avg_sq": {
                        "visual": min(1.0, 0.4 * t) if method == "dmnsp" else 0.0,
                        "text": 0.0,
                    },
                    "update_norm": {
                        "visual": (10.0 ** (-3 * t) if method == "dmnsp" else 0.5) if trained else 0.0,
                        "text": 0.3 if trained else 0.0,
                    },
                    "loss": {"first": 2.0, "last": 0.5, "mean": 1.0, "min": 0.4, "steps": 5},
                    "seconds": {"train": 1.0, "basis": 0.1, "lambda": 0.1, "eval": 0.2},
                    "peak_mem_mb": 6.0,
                }
            )
        )
    return root


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    dirs = [
        make_run(root / f"{m}/seed{s}", method=m, seed=s)
        for m in ("zeroshot", "finetune", "dmnsp")
        for s in (0, 1)
    ]
    dirs.append(make_run(root / "dmnsp-both/seed0", method="dmnsp", seed=0, towers="both"))
    dirs.append(make_run(root / "finetune/seed2", method="finetune", seed=2, done=1))  # incomplete
    return dirs


def assert_figures(files: list[Path], expected_stems: set[str] | None = None) -> None:
    assert files, "nothing was written"
    assert {f.suffix for f in files} == {".png", ".pdf"}
    for f in files:
        assert f.is_file()
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f.stat().st_size > 5_000
        else:
            assert f.read_bytes()[:5] == b"%PDF-"
            assert f.stat().st_size > 1_000
    if expected_stems is not None:
        assert {f.stem for f in files} == expected_stems


def test_matplotlib_not_imported_by_package_modules():
    code = "import sys, dmnsp.aggregate, dmnsp.plots, dmnsp.metrics; print('matplotlib' in sys.modules)"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_method_color_is_one_fixed_mapping():
    assert plots.method_color("dmnsp") == plots.METHOD_COLORS["dmnsp"]
    assert plots.method_color("dmnsp (reported)") == plots.method_color("dmnsp")
    assert plots.method_color("dmnsp [TOP_K_RATIO=0.2]") == plots.method_color("dmnsp")
    assert plots.method_color("dmnsp (towers=both)") == plots.method_color("dmnsp (towers=both)")
    assert plots.method_color("dmnsp (towers=both)") not in plots.METHOD_COLORS.values()


def test_variants_take_a_stable_shade_of_their_methods_colour():
    """The embedded default's 'rapf (precision=fp32)' and 'dmnsp (mode=clean)' used to draw the same
    hashed colour: a variant now takes a shade of its own method's colour, never another's."""
    import matplotlib.colors as mcolors

    def hue(color: str) -> float:
        return float(mcolors.rgb_to_hsv(mcolors.to_rgb(color))[0])

    labels = {
        name: [f"{name} (mode=clean)", f"{name} (precision=fp32)", f"{name} (towers=both)", f"{name} (x=1)"]
        for name in plots.METHOD_COLORS
        if name != "zeroshot"  # grey has no hue
    }
    seen: dict[str, str] = {}
    for name, variants in labels.items():
        for label in variants:
            color = plots.method_color(label)
            assert color == plots.method_color(label) and color not in plots.METHOD_COLORS.values()
            turn = abs(hue(color) - hue(plots.METHOD_COLORS[name]))
            assert min(turn, 1 - turn) < 0.02, (label, color)  # hue is circular
            assert seen.setdefault(color, name) == name, f"{label} shares {color} with {seen[color]}"
    assert plots.method_color("rapf (precision=fp32)") != plots.method_color("dmnsp (mode=clean)")
    assert plots.method_color("a label of mine") in plots._EXTRA_COLORS


def test_accuracy_curves(run_dirs, tmp_path):
    runs = agg.collect_runs(run_dirs)
    files = plots.plot_accuracy_curves(runs, tmp_path, agg.load_reference())
    assert_figures(files, {"accuracy_curves_cifar100_10-10"})
    assert plots.plot_accuracy_curves(runs.iloc[0:0], tmp_path / "none", agg.load_reference()) == []


def test_accuracy_matrices(run_dirs, tmp_path):
    assert_figures(plots.plot_accuracy_matrices(run_dirs, tmp_path), {"accuracy_matrix_cifar100_10-10"})
    assert plots.plot_accuracy_matrices([tmp_path / "missing"], tmp_path / "none") == []


def test_diagnostics(run_dirs, tmp_path):
    files = plots.plot_diagnostics(run_dirs, tmp_path)
    # the representative run is plain dmnsp, lowest seed
    assert_figures(files, {"lambda_cifar100_10-10_dmnsp_seed0", "diagnostics_cifar100_10-10"})


def test_log_scale_when_values_span_decades():
    fig = plots._figure(3, 3)
    ax = fig.add_subplot()
    plots._set_scale(ax, np.array([1.0, 1e-3, 1e-6]))
    assert ax.get_yscale() == "log"
    plots._set_scale(ax2 := fig.add_subplot(2, 1, 2), np.array([0.0, 1e-6, 1.0]))
    assert ax2.get_yscale() == "symlog"
    plots._set_scale(ax3 := fig.add_subplot(2, 2, 2), np.array([0.3, 0.5]))
    assert ax3.get_yscale() == "linear"


def test_hyperparameter_heatmap(tmp_path):
    dirs = []
    for ratio in (0.1, 0.2):
        for scale in (10.0, 30.0):
            dirs.append(
                make_run(
                    tmp_path / f"runs/hp_{ratio}_{scale}",
                    method="dmnsp",
                    seed=0,
                    hp={"TOP_K_RATIO": ratio, "LAMBDA_SCALE": scale},
                )
            )
    summary = agg.summarize(agg.collect_runs(dirs))
    files = plots.plot_hyperparameters(summary, tmp_path / "plots")
    assert_figures(files, {"hyperparameters_cifar100_10-10_dmnsp_TOP_K_RATIO_LAMBDA_SCALE"})
    # a single setting: no grid, nothing written, no error
    one = agg.summarize(agg.collect_runs(dirs[:1]))
    assert plots.plot_hyperparameters(one, tmp_path / "none") == []
    assert not (tmp_path / "none").exists()


def test_make_report_artifacts(run_dirs, tmp_path):
    out = report.make_report_artifacts(
        [*run_dirs, tmp_path / "never/seed9"], tmp_path / "tables", tmp_path / "plots", expected_seeds=2
    )
    assert set(out) == {"tables", "plots", "warnings"}
    assert out["warnings"] == []  # methods and seeds differ: nothing to flag
    assert all(path.is_file() for path in out["tables"].values())
    assert set(out["plots"]) == {"accuracy_curves", "accuracy_matrices", "hyperparameters", "diagnostics"}
    assert out["plots"]["hyperparameters"] == []
    assert_figures([f for files in out["plots"].values() for f in files])
    md = (tmp_path / "tables/summary.md").read_text()
    nothing = report.make_report_artifacts([], tmp_path / "t0", tmp_path / "p0")
    assert (tmp_path / "p0").is_dir() and all(files == [] for files in nothing["plots"].values())
    assert "dmnsp (reported)" in md and "never/seed9 (missing" in md and "finetune/seed2 (incomplete" in md

"""The results stage of an experiment: every table (:mod:`dmnsp.aggregate`) and figure
(:mod:`dmnsp.plots`) from its run folders, as ``dmnsp report-artifacts`` writes them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .aggregate import collect_runs, health_warnings, load_reference, write_tables_from
from .io import OutputError


def make_report_artifacts(
    run_dirs: Sequence[str | Path],
    tables_dir: str | Path,
    plots_dir: str | Path,
    expected_seeds: int | None = None,
) -> dict[str, Any]:
    """Every table and figure of the results stage.

    Returns:
        ``{"tables": {file name: path}, "plots": {plot kind: [paths]}, "warnings": [lines]}``; the
        warnings (:func:`dmnsp.aggregate.health_warnings`) name runs collapsed to one class or at
        chance and problems on which every method gave the identical result (the tables mark them).
    """
    from . import plots  # matplotlib is an optional extra: import only when figures are asked for

    run_dirs = list(run_dirs)
    try:  # the folder exists even when there is nothing to draw
        Path(plots_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            exc.errno, f"cannot write into {plots_dir}: {exc.strerror}; choose another --plots-dir"
        ) from None
    reference = load_reference()
    runs = collect_runs(run_dirs)
    # Tables first, and a figure that cannot be drawn costs only itself: a failed results job would
    # have Snakemake delete the tables with it.
    tables, summary = write_tables_from(runs, tables_dir, expected_seeds, reference)
    warnings = health_warnings(summary)
    drawings = {
        "accuracy_curves": lambda: plots.plot_accuracy_curves(runs, plots_dir, reference),
        "accuracy_matrices": lambda: plots.plot_accuracy_matrices(run_dirs, plots_dir),
        "hyperparameters": lambda: plots.plot_hyperparameters(summary, plots_dir),
        "diagnostics": lambda: plots.plot_diagnostics(run_dirs, plots_dir),
    }
    figures: dict[str, list] = {}
    for kind, draw in drawings.items():
        try:
            figures[kind] = draw()
        except OutputError:
            raise  # disk full or unwritable: the user's to fix, and the next figure would fail too
        except Exception as exc:  # a figure matplotlib cannot draw: the tables stand
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            figures[kind] = []
            warnings.append(
                f"the {kind} figures were not drawn ({type(exc).__name__}: {first}); the tables are complete"
            )
    return {"tables": tables, "plots": figures, "warnings": warnings}

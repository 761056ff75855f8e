"""Hostile or damaged files that are not configs (issue 17): checkpoints, result files, datasets,
model names, plot labels, search storage and pretraining output. Each is reproduced as a user or
an attacker would meet it (through the CLI where that is where it bites) and must end in one
line naming the file and the fix: never a traceback, a hang or a huge allocation."""

from __future__ import annotations

import hashlib
import json
import struct
import time
from pathlib import Path

import pytest
import torch
from fakes import mini_run_config

from dmnsp.checkpoint import CheckpointError, TaskState, load_checkpoint, save_checkpoint
from dmnsp.cli import main
from dmnsp.config import load_config


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ======================================================================== checkpoints
def parse(path: Path) -> tuple[dict, bytes]:
    """Header and tensor bytes of a format-2 file, per the safetensors layout (no dmnsp code)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def rewrite(path: Path, header: dict, body: bytes, edit=None) -> Path:
    """``header`` (its JSON text passed through ``edit``) + ``body`` with a SHA-256 that matches, as
    an attacker who read the format writes it."""
    header["__metadata__"]["sha256"] = "0" * 64
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw = edit(raw) if edit is not None else raw
    raw += b" " * (-len(raw) % 8)
    blob = struct.pack("<Q", len(raw)) + raw + body
    digest = hashlib.sha256(blob).hexdigest().encode()
    at = blob.index(b'"sha256":"' + b"0" * 64) + len(b'"sha256":"')
    path.write_bytes(blob[:at] + digest + blob[at + 64 :])
    return path


@pytest.fixture(scope="module")
def task0(tmp_path_factory) -> tuple[Path, Path]:
    """A dmnsp run config and its real task-0 checkpoint (12 visual bases of 64 rows)."""
    root = tmp_path_factory.mktemp("hostile-ckpt")
    config = mini_run_config(root, method="dmnsp")
    out = root / "run" / "task0"
    assert main(["train-task", "--quiet", "--config", str(config), "--task", "0", "--out-dir", str(out)]) == 0
    return config, out / "checkpoint.pt"


def _resume_fails(config: Path, checkpoint: Path, tmp_path: Path, capsys, needle: str) -> str:
    """``train-task --task 1 --resume checkpoint`` exits 2 within seconds with one line holding needle."""
    out = tmp_path / "task1"
    start = time.perf_counter()
    argv = ["train-task", "--quiet", "--config", str(config), "--task", "1", "--resume", str(checkpoint)]
    assert main([*argv, "--out-dir", str(out)]) == 2
    assert time.perf_counter() - start < 60
    err = one_line_error(capsys)
    assert str(checkpoint) in err and needle in err, err
    assert not out.exists()
    return err


def _with_view(header: dict, body: bytes, name: str, view: dict) -> tuple[dict, bytes]:
    """The tensor ``name`` stored as a flat storage with ``view`` over it (as dmnsp saves a strided basis)."""
    header = json.loads(json.dumps(header))
    entry = header[name]
    n = (entry["data_offsets"][1] - entry["data_offsets"][0]) // 4
    entry["shape"] = [n]
    views = json.loads(header["__metadata__"].get("views", "{}"))
    views[name] = view
    header["__metadata__"]["views"] = json.dumps(views)
    return header, body


def test_a_stride_0_basis_view_is_refused_before_the_lambda_computation(task0, tmp_path, capsys):
    """A valid digest, a basis view of shape [64, 10^9] with stride 0 over 64 x 64 floats: it used
    to pass the loader and stall the dynamic coefficients for minutes (memory rising)."""
    config, checkpoint = task0
    header, body = parse(checkpoint)
    for view, needle in [
        ({"shape": [64, 10**9], "stride": [1, 0], "offset": 0}, "addresses some elements twice"),
        ({"shape": [64, 63], "stride": [1, 1], "offset": 0}, "addresses some elements twice"),
        ({"shape": [64, 63], "stride": [63, 2], "offset": 0}, "addresses some elements twice"),
        ({"shape": [64, 64], "stride": [64, 1], "offset": 1}, "reaches past its storage"),
        ({"shape": [64, 0], "stride": [1, 64], "offset": 4097}, "starts past its storage"),
        ({"shape": [0, 2**64], "stride": [1, 1], "offset": 0}, "outside 0..2147483647"),
        ({"shape": [64] * 9, "stride": [1] * 9, "offset": 0}, "9 dimensions"),
        ({"shape": [64, 63], "stride": [1, 64], "offset": -1}, "negative or out of range"),
        ({"shape": [64, 63], "stride": [1, "64"], "offset": 0}, "not 2 integers"),
        ([64, 63], "is not an object of shape, stride and offset"),
    ]:
        crafted = rewrite(tmp_path / "crafted.pt", *_with_view(header, body, "bases/visual/0", view))
        _resume_fails(config, crafted, tmp_path, capsys, needle)


def test_huge_or_deep_headers_are_one_line_before_the_checksum(task0, tmp_path, capsys):
    config, checkpoint = task0
    header, body = parse(checkpoint)
    entries = [
        {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [len(body), len(body)]},  # torch overflow
        {"dtype": "F32", "shape": [1] * 9, "data_offsets": [len(body), len(body) + 4]},
        {"dtype": ["F32"], "shape": [1], "data_offsets": [len(body), len(body) + 4]},  # unhashable dtype
        {"dtype": "F32", "shape": [0, -1], "data_offsets": [len(body), len(body)]},
    ]
    for entry in entries:
        h = json.loads(json.dumps(header))
        h["zz"] = entry
        crafted = rewrite(tmp_path / "crafted.pt", h, body + b"\0" * 4 * (entry["shape"] == [1] * 9))
        _resume_fails(config, crafted, tmp_path, capsys, "truncated or corrupt")
    # Nested past Python's recursion limit, in the header itself and inside its JSON-in-JSON fields.
    deep = b"[" * 100_000 + b"]" * 100_000
    h = json.loads(json.dumps(header))
    h["__metadata__"]["deep"] = "DEEP"
    crafted = rewrite(tmp_path / "crafted.pt", h, body, lambda raw: raw.replace(b'"DEEP"', deep))
    _resume_fails(config, crafted, tmp_path, capsys, "nests too deep")
    for field in ("state", "views"):
        h = json.loads(json.dumps(header))
        h["__metadata__"][field] = deep.decode()
        crafted = rewrite(tmp_path / "crafted.pt", h, body)
        _resume_fails(config, crafted, tmp_path, capsys, "readable '" + field + "' metadata")
    # NaN in the header (not JSON), and a header that is not UTF-8.
    h = json.loads(json.dumps(header))
    h["__metadata__"]["x"] = "NAN"
    for literal in (b"NaN", b'"\xff"'):
        crafted = rewrite(tmp_path / "c.pt", h, body, lambda raw, x=literal: raw.replace(b'"NAN"', x))
        _resume_fails(config, crafted, tmp_path, capsys, "unreadable header")


def test_a_checkpoint_path_that_is_a_fifo_or_folder_is_refused_without_opening(task0, tmp_path, capsys):
    import os

    config, _ = task0
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path):
        _resume_fails(config, path, tmp_path, capsys, "is not a regular file")


def _altered(tmp_path: Path, config: Path, checkpoint: Path, alter) -> Path:
    """The task-0 state altered by ``alter`` and saved by dmnsp itself: a valid checksum and config hash."""
    cfg = load_config(config)
    state = load_checkpoint(checkpoint, cfg, expect_task=0)
    alter(state)
    path = tmp_path / "crafted" / "checkpoint.pt"
    save_checkpoint(path, state, cfg)
    load_checkpoint(path, cfg, expect_task=0)  # the file itself reads fine
    return path


def _columns(n):
    def alter(state):
        state.bases["visual"] = [torch.randn(64, n) for _ in state.bases["visual"]]

    return alter


def _text_tower(state):
    state.bases["text"] = [v.clone() for v in state.bases["visual"]]


def _no_bases(state):
    state.bases.clear()


def _nan_basis(state):
    state.bases["visual"][3] = state.bases["visual"][3].clone().fill_(float("nan"))


def _double_basis(state):
    state.bases["visual"] = [v.double() for v in state.bases["visual"]]


@pytest.mark.parametrize(
    ("alter", "needle"),
    [
        # TOP_SELECT 1 of width 64 leaves 63 columns per task (MINI_RUN's faithful concat bases).
        (_columns(7), "visual basis 0 has 7 columns; after task 0 concat bases of width 64 have 63"),
        (_columns(126), "has 126 columns"),
        (_columns(5000), "has 5000 columns"),
        (_text_tower, "bases of the towers ['text', 'visual'], expected ['visual']"),
        (_no_bases, "bases of the towers [], expected ['visual']"),
        (_nan_basis, "visual basis 3 is not finite float32"),
        (_double_basis, "visual basis 0 is not finite float32"),
    ],
)
def test_basis_widths_are_checked_against_the_model_and_the_method(task0, tmp_path, capsys, alter, needle):
    """Bases of the right rows but other columns used to reach training, which failed at step 0
    blaming lr; now the method's own contract names the file before anything is built on it."""
    config, checkpoint = task0
    crafted = _altered(tmp_path, config, checkpoint, alter)
    err = _resume_fails(config, crafted, tmp_path, capsys, needle)
    assert "does not fit dmnsp-tiny" in err and "delete it and rerun task 0" in err
    if alter is _nan_basis:  # `dmnsp evaluate` checks the same way (once is enough: a model build each)
        assert main(["evaluate", "--quiet", "--config", str(config), "--checkpoint", str(crafted)]) == 2
        assert needle in one_line_error(capsys)


@pytest.mark.parametrize(
    "projection",
    [
        {"basis": "concat"},
        {"basis": "orthonormal"},
        {"basis": "orthonormal", "energy_threshold": 0.5},
        {"basis": "concat", "towers": "both"},
        {"towers": "none"},
    ],
)
def test_every_basis_the_method_writes_fits_its_own_contract(make_config, projection):
    """The real update_bases over three tasks, for every basis mode: what it writes passes the check,
    and one column more or less (or a layer fewer) does not."""
    from dmnsp import methods
    from dmnsp.methods.dmnsp import update_bases

    cfg = make_config(method="dmnsp", TOP_SELECT=5, projection=projection)
    widths = {"visual": [16] * 3, "text": [16] * 3}
    gen = torch.Generator().manual_seed(0)
    towers = ["visual", "text"] if projection.get("towers") == "both" else ["visual"]
    contract = methods.get("dmnsp").state_mismatch
    bases: dict = {}
    for task in range(3):
        acts = {t: [torch.randn(4, 9, 16, generator=gen) for _ in range(3)] for t in towers}
        bases = update_bases(cfg, bases, acts)
        assert contract(cfg, task, bases, widths) is None
        if projection.get("energy_threshold") is None:
            for cut in (1, -1):
                v = bases["visual"][0]
                grown = torch.cat([v, v[:, :1]], dim=1) if cut == 1 else v[:, :-1]
                if grown.shape[1] != v.shape[1]:
                    wrong = {**bases, "visual": [grown, *bases["visual"][1:]]}
                    assert "columns" in contract(cfg, task, wrong, widths)
        assert "bases for 3 layers" in contract(cfg, task, {**bases, "visual": bases["visual"][:2]}, widths)
    assert contract(cfg, -1, {}, widths) is None


def test_methods_without_state_refuse_a_checkpoint_that_holds_some(make_config):
    from dmnsp import methods

    cfg = make_config(method="finetune")
    for name in ("finetune", "lwf", "zeroshot", "moe_adapters"):  # MoE's experts travel as adapters
        assert methods.get(name).state_mismatch(cfg, 0, {}, {}) is None
        why = methods.get(name).state_mismatch(cfg, 0, {"visual": [torch.zeros(64, 63)]}, {})
        assert f"method {name} keeps no state between tasks" in why


def test_a_round_trip_of_every_layout_dmnsp_writes_still_loads(tmp_path, make_config):
    """The new view checks accept the layouts dmnsp saves: column slices of eigenvector matrices
    (offset by the dropped columns), transposes, empty bases and zero-size tensors."""
    cfg = make_config()
    vectors = torch.linalg.eigh(torch.eye(16) + 0.1)[1]
    state = TaskState(
        0,
        {"a.adapter.w": torch.randn(4, 8)},
        {"visual": [vectors[:, 5:], torch.randn(14, 16).t(), vectors[:, 16:], torch.empty(16, 0)]},
        [0, 1],
    )
    got = load_checkpoint(save_checkpoint(tmp_path / "c.pt", state, cfg), cfg)
    for a, b in zip(got.bases["visual"], state.bases["visual"], strict=True):
        assert torch.equal(a, b) and a.stride() == b.stride() and a.storage_offset() == b.storage_offset()


def test_checkpoint_errors_stay_short_with_huge_crafted_fields(tmp_path, make_config):
    cfg = make_config()
    path = save_checkpoint(tmp_path / "c.pt", TaskState(0, {}, {}, [0]), cfg)
    header, body = parse(path)
    header["__metadata__"]["format"] = "x" * 10**6
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(rewrite(path, header, body), cfg)
    assert len(str(info.value)) < 500 and "\n" not in str(info.value)


# ======================================================================== result files
def _eval(t: int, n_tasks: int = 2) -> dict:
    """A well-formed eval.json of task t (what dmnsp.evaluate writes), 20 images per task, 5 classes each."""
    per_task = [0.5] * (t + 1)
    n = 20 * (t + 1)
    classes = 5 * (t + 1)
    return {
        "task": t,
        "n_tasks": n_tasks,
        "accuracy_per_task": per_task,
        "n_samples_per_task": [20] * (t + 1),
        "accuracy": 0.5,
        "n_samples": n,
        "predictions_per_class": [4] * classes,
        "labels_per_class": [4] * classes,
        "seconds": 0.25,
        "peak_mem_mb": 100.0,
    }


def _diagnostics(t: int) -> dict:
    return {
        "task": t,
        "steps": 2,
        "lambda": [[1.0, "inf"], ["nan", 2.0]] if t else None,
        "lambda_factor_visual": [1.0, "inf"] if t else None,
        "inf_fraction_exp_avg_sq": {"visual": 0.0, "text": 0.0},
        "update_norm": {"visual": 0.1, "text": "inf"},
        "seconds": {"train": 1.0, "lambda": 0.0, "basis": 0.5, "eval": 0.25},
        "peak_mem_mb": 100.0,
    }


def make_run(root: Path, method: str = "dmnsp", label: str | None = None, **config) -> Path:
    """A finished two-task run folder as dmnsp writes it (config.yaml, run.json, task records)."""
    import yaml

    root.mkdir(parents=True)
    cfg = {"dataset": "cifar100", "initial_increment": 10, "increment": 10, "method": method, "seed": 0}
    (root / "config.yaml").write_text(yaml.safe_dump({**cfg, **config}))
    info = {"experiment": "x", "label": label or method, "settings": {}, "config_hash": "abc"}
    (root / "run.json").write_text(json.dumps(info))
    for t in range(2):
        (root / f"task{t}").mkdir()
        (root / f"task{t}" / "eval.json").write_text(json.dumps(_eval(t)))
        (root / f"task{t}" / "diagnostics.json").write_text(json.dumps(_diagnostics(t)))
    return root


def _edit(key, value, t=1, name="eval.json"):
    """Set ``key`` (``DROP``: delete it) in task t's record."""

    def edit(run: Path) -> Path:
        path = run / f"task{t}" / name
        record = json.loads(path.read_text())
        if value is DROP:
            del record[key]
        else:
            record[key] = value
        path.write_text(json.dumps(record))
        return path

    return edit


def _raw(text: bytes | str, t=1, name="eval.json"):
    def edit(run: Path) -> Path:
        path = run / (f"task{t}" if name in ("eval.json", "diagnostics.json") else "") / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    return edit


def _literal(key, literal: str, t=1, name="eval.json"):
    """``key`` set to a raw JSON token (NaN, Infinity, 1e400, a 400-digit integer)."""

    def edit(run: Path) -> Path:
        path = run / f"task{t}" / name
        record = json.loads(path.read_text())
        record[key] = "@@"
        path.write_text(json.dumps(record).replace('"@@"', literal))
        return path

    return edit


def _fifo(run: Path) -> Path:
    import os

    path = run / "task1" / "eval.json"
    path.unlink()
    os.mkfifo(path)
    return path


DROP = object()
_DIAG = "diagnostics.json"
#: (case, edit of a finished run, words of the one-line error). The classes of issue 17: missing
#: keys, accuracies outside [0, 1], n_tasks 10^6, NaN/inf numbers or strings, lists for objects,
#: wrong types, records of another task or run, and files that are not JSON records at all.
RECORD_CASES = [
    ("eval list", _raw("[1, 2]"), "holds list [1, 2], not a JSON object"),
    ("eval no task", _edit("task", DROP), "it has no 'task'"),
    ("eval no n_tasks", _edit("n_tasks", DROP), "it has no 'n_tasks'"),
    ("eval no accuracy_per_task", _edit("accuracy_per_task", DROP), "it has no 'accuracy_per_task'"),
    ("eval no accuracy", _edit("accuracy", DROP), "it has no 'accuracy'"),
    ("eval task string", _edit("task", "1"), "'task' is '1', not an integer"),
    ("eval task bool", _edit("task", True), "'task' is True, not an integer"),
    ("eval task float", _edit("task", 1.0), "'task' is 1.0, not an integer"),
    ("eval other task", _edit("task", 0), "lies in the folder of task 1"),
    ("eval n_tasks 10^6", _edit("n_tasks", 10**6), "'n_tasks' is 1000000, outside 1..1000"),
    ("eval n_tasks 0", _edit("n_tasks", 0), "'n_tasks' is 0, outside 1..1000"),
    ("eval task past n_tasks", _edit("n_tasks", 1), "'task' is 1, but 'n_tasks' is 1"),
    ("eval runs disagree", _edit("n_tasks", 3), "says the run has 3 tasks"),
    ("eval accuracy 1.5", _edit("accuracy", 1.5), "'accuracy' is 1.5, not a fraction in [0, 1]"),
    ("eval accuracy -0.1", _edit("accuracy", -0.1), "'accuracy' is -0.1, not a fraction"),
    (
        "eval accuracy percent",
        _edit("accuracy_per_task", [50, 50]),
        "accuracy_per_task[0] is 50, not a fraction",
    ),
    ("eval accuracy NaN", _literal("accuracy", "NaN"), "non-standard JSON literal NaN"),
    ("eval accuracy Infinity", _literal("accuracy", "-Infinity"), "non-standard JSON literal -Infinity"),
    ("eval accuracy 1e400", _literal("accuracy", "1e400"), "'accuracy' is inf, not a finite number"),
    ("eval accuracy 10^400", _literal("accuracy", "1" + "0" * 400), "not a finite number"),
    ("eval accuracy 'nan'", _edit("accuracy", "nan"), "'accuracy' is 'nan', not a number"),
    ("eval accuracy '0.5'", _edit("accuracy", "0.5"), "'accuracy' is '0.5', not a number"),
    ("eval accuracy null", _edit("accuracy", None), "'accuracy' is None, not a number"),
    (
        "eval per-task object",
        _edit("accuracy_per_task", {"0": 0.5}),
        "'accuracy_per_task' is {'0': 0.5}, not a list",
    ),
    (
        "eval per-task length",
        _edit("accuracy_per_task", [0.5]),
        "'accuracy_per_task' has 1 entries, expected 2",
    ),
    (
        "eval per-task nested",
        _edit("accuracy_per_task", [0.5, [0.5]]),
        "accuracy_per_task[1] is [0.5], not a number",
    ),
    ("eval per-task null", _edit("accuracy_per_task", [0.5, None]), "accuracy_per_task[1] is None"),
    ("eval sizes string", _edit("n_samples_per_task", "40"), "'n_samples_per_task' is '40', not a list"),
    (
        "eval sizes negative",
        _edit("n_samples_per_task", [-1, 41]),
        "n_samples_per_task[0] is -1, not a count",
    ),
    ("eval sizes sum", _edit("n_samples", 41), "'n_samples' is 41, but 'n_samples_per_task' adds up to 40"),
    ("eval predictions object", _edit("predictions_per_class", {"a": 1}), "is {'a': 1}, not a list"),
    (
        "eval predictions sum",
        _edit("predictions_per_class", [4] * 9 + [5]),
        "adds up to 41, but 'n_samples' is 40",
    ),
    ("eval labels length", _edit("labels_per_class", [40]), "'labels_per_class' has 1 entries, expected 10"),
    ("eval predictions float", _edit("predictions_per_class", [4.0] * 10), "predictions_per_class[0] is 4.0"),
    ("eval seconds string", _edit("seconds", "fast"), "'seconds' is 'fast', not a number"),
    ("eval memory negative", _edit("peak_mem_mb", -1), "'peak_mem_mb' is -1, not in [0.0, inf]"),
    ("eval deep", _raw("[" * 100_000 + "]" * 100_000), "nests deeper than"),
    ("eval empty", _raw(b""), "eval.json is damaged or unreadable (Expecting value"),
    ("eval not JSON", _raw(b"{not json"), "eval.json is damaged or unreadable"),
    ("eval not UTF-8", _raw(b'{"task": "\xff"}'), "is not UTF-8 text"),
    ("eval too large", _raw(b" " * (17 << 20)), "larger than 16 MiB"),
    ("eval FIFO", _fifo, "not a regular file"),
    ("diag seconds list", _edit("seconds", [1, 2], name=_DIAG), "'seconds' is [1, 2], not an object"),
    (
        "diag seconds string",
        _edit("seconds", {"train": "x"}, name=_DIAG),
        "seconds['train'] is 'x', not a number",
    ),
    ("diag memory string", _edit("peak_mem_mb", "big", name=_DIAG), "'peak_mem_mb' is 'big', not a number"),
    ("diag lambda string", _edit("lambda", "x", name=_DIAG), "'lambda' is 'x', not a list"),
    ("diag lambda ragged", _edit("lambda", [[1.0, 2.0]], name=_DIAG), "'lambda' is not a square matrix"),
    ("diag lambda word", _edit("lambda", [["boom"]], name=_DIAG), "lambda[0][0] is 'boom', not a number"),
    ("diag norms list", _edit("update_norm", [], name=_DIAG), "'update_norm' is [], not an object"),
    ("diag other task", _edit("task", 0, name=_DIAG), "lies in the folder of task 1"),
    ("diag NaN literal", _literal("peak_mem_mb", "NaN", name=_DIAG), "non-standard JSON literal NaN"),
]
#: Files only the results stage reads (not `dmnsp metrics`).
STAGE_CASES = [
    ("run.json list", _raw("[1]", name="run.json"), "run.json is not a dmnsp run record: it holds list"),
    ("run.json label object", _raw('{"label": {"a": 1}}', name="run.json"), "'label' is {'a': 1}, not text"),
    (
        "run.json settings list",
        _raw('{"settings": [1]}', name="run.json"),
        "'settings' is [1], not an object",
    ),
    ("run.json experiment int", _raw('{"experiment": 5}', name="run.json"), "'experiment' is 5, not text"),
    ("run.json NaN", _raw('{"label": NaN}', name="run.json"), "non-standard JSON literal NaN"),
    (
        "config increment text",
        _raw("initial_increment: x\n", name="config.yaml"),
        "'initial_increment' is 'x'",
    ),
    (
        "config projection list",
        _raw("projection: [1]\n", name="config.yaml"),
        "'projection' is [1], not an object",
    ),
    (
        "config seed text",
        _raw("seed: zero\n", name="config.yaml"),
        "'seed' is 'zero', not an integer or null",
    ),
    ("config lr nan", _raw("lr: .nan\n", name="config.yaml"), "'lr' is nan, not a finite number or null"),
]


@pytest.mark.parametrize(("case", "edit", "needle"), RECORD_CASES, ids=[c[0] for c in RECORD_CASES])
def test_damaged_task_records_are_one_line_in_dmnsp_metrics(tmp_path, capsys, case, edit, needle):
    run = make_run(tmp_path / "run")
    damaged = edit(run)
    assert main(["metrics", "--run-dir", str(run)]) == 2
    err = one_line_error(capsys)
    assert str(damaged) in err and needle in err, err
    assert "delete" in err and "rerun" in err
    assert not (run / "metrics.json").exists()  # never called complete (NaN accuracy included)


@pytest.mark.parametrize(
    ("case", "edit", "needle"), RECORD_CASES + STAGE_CASES, ids=[c[0] for c in RECORD_CASES + STAGE_CASES]
)
def test_damaged_records_are_one_line_in_the_results_stage(tmp_path, capsys, case, edit, needle):
    run = make_run(tmp_path / "run")
    damaged = edit(run)
    argv = ["report-artifacts", "--runs", str(run), "--tables-dir", str(tmp_path / "t")]
    assert main([*argv, "--plots-dir", str(tmp_path / "p")]) == 2
    err = one_line_error(capsys)
    assert str(damaged) in err and needle in err, err


def test_well_formed_records_still_pass(tmp_path, capsys):
    """The table's base run (non-finite diagnostics as strings, a task without images) is accepted."""
    run = make_run(tmp_path / "run")
    assert main(["metrics", "--run-dir", str(run)]) == 0
    assert json.loads((run / "metrics.json").read_text())["complete"] is True
    # A task whose held-out split is empty has no accuracy (null), as dmnsp.evaluate writes it.
    row = {**_eval(1), "accuracy_per_task": [0.5, None], "n_samples_per_task": [20, 0], "n_samples": 20}
    row.update(predictions_per_class=[2] * 10, labels_per_class=[2] * 10)
    from dmnsp import records

    assert records.check_eval(row, 1) is row


# ======================================================================== pretraining output
class _FillsUp:
    """A file that takes ``room`` bytes, then fails with ENOSPC, as a real full disk does partway
    through a write (torch.save's zip writer then raises a RuntimeError about its position)."""

    def __init__(self, fh, room: int) -> None:
        self.fh, self.room = fh, room

    def write(self, data) -> int:
        import errno
        import os

        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()


@pytest.fixture(scope="module")
def pretrain_config(tmp_path_factory) -> Path:
    import yaml
    from fakes import make_fake_imagefolder

    root = tmp_path_factory.mktemp("pretrain")
    images = make_fake_imagefolder(
        root / "images", classes=["cat", "dog", "fox", "owl"], n_train=6, n_test=4, size=28
    )
    cfg = {
        "dataset": "imagefolder",
        "dataset_root": str(images),
        "model_name": "dmnsp-tiny",
        "pretrained": None,
        "pretrain_per_class": 4,
        "pretrain": {"steps": 2, "batch_size": 8, "warmup_steps": 0, "accept_weak": True},
        "device": "cpu",
        "num_workers": 0,
        "eval_batch_size": 64,
        "threads": 1,
    }
    (root / "pre.yaml").write_text(yaml.safe_dump(cfg))
    return root / "pre.yaml"


@pytest.mark.parametrize("victim", ["model.pt", "model.json"])
def test_disk_full_while_pretraining_saves_is_one_line_and_leaves_no_partial_file(
    pretrain_config, tmp_path, monkeypatch, capsys, victim
):
    import dmnsp.io as dio

    out = tmp_path / "m" / "model.pt"
    real = dio.os.fdopen

    def fdopen_for(fd, mode):
        import os

        target = os.readlink(f"/proc/self/fd/{fd}")
        fh = real(fd, mode)
        return _FillsUp(fh, 256) if f".{victim}." in Path(target).name else fh

    monkeypatch.setattr(dio.os, "fdopen", fdopen_for)
    argv = ["pretrain", "--config", str(pretrain_config), "--out", str(out), "--quiet"]
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert "No space left on device" in err and victim in err and "free disk space" in err
    assert sorted(p.name for p in out.parent.iterdir()) == []  # no partial file, no model without summary


# ======================================================================== datasets
def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height pixels (a decompression bomb as PIL sees it at open)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width + 1))  # one row; PIL refuses before decoding any
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _text_file(path: Path) -> None:
    path.write_text("not an image")


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _bomb(path: Path) -> None:  # 20000 x 20000: over twice PIL's limit (DecompressionBombError)
    _png_header_only(path, 20_000, 20_000)


def _bomb_warning(path: Path) -> None:  # 10000 x 10000: over the limit, under twice it (PIL only warns)
    _png_header_only(path, 10_000, 10_000)


def _fifo_image(path: Path) -> None:
    import os

    path.unlink()
    os.mkfifo(path)


@pytest.fixture
def image_run(tmp_path):
    """An image folder dataset (4 classes of 28 px PNGs) and a mini run config over it."""
    import yaml
    from fakes import MINI_RUN, make_fake_imagefolder

    root = make_fake_imagefolder(
        tmp_path / "images", classes=["cat", "dog", "fox", "owl"], n_train=4, n_test=2, size=28
    )
    config = tmp_path / "run.yaml"
    changes = {"dataset": "imagefolder", "dataset_root": str(root), "initial_increment": 2, "increment": 2}
    config.write_text(yaml.safe_dump({**MINI_RUN, **changes}))
    return root, config


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (_empty, "empty or not an image PIL can identify"),
        (_text_file, "empty or not an image PIL can identify"),
        (_truncated, "image file is truncated"),
        (_bomb, "a decompression bomb"),
        (_bomb_warning, "a decompression bomb"),
    ],
)
def test_damaged_images_are_one_line_naming_the_file(image_run, capsys, damage, needle):
    root, config = image_run
    victim = root / "train" / "dog" / "1.png"
    damage(victim)
    assert main(["run", "--quiet", "--config", str(config)]) == 2
    err = one_line_error(capsys)
    assert f"image {victim} cannot be read (" in err and needle in err and "replace the file" in err


def test_a_damaged_image_found_in_a_dataloader_worker_is_still_one_line(image_run, capsys):
    """With num_workers > 0 torch re-raises the worker's exception with its whole traceback in the
    message; the error keeps only the original line."""
    root, config = image_run
    victim = root / "test" / "owl" / "0.png"
    _truncated(victim)  # found at the last evaluation, after training
    argv = ["run", "--quiet", "--config", str(config), "--set", "num_workers=1"]
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert f"image {victim} cannot be read (image file is truncated)" in err and "Original" not in err


def test_symlink_loops_and_fifos_in_a_class_folder_never_hang(image_run):
    """Self-links (a -> ., b -> .) used to make the listing walk 2^40 paths; a FIFO named .png would
    block the reader. Linked folders are not followed, linked files are kept, FIFOs are no images."""
    import os

    from dmnsp.datasets import load_dataset

    root, _ = image_run
    cat = root / "train" / "cat"
    os.symlink(".", cat / "a")
    os.symlink(".", cat / "b")
    os.symlink(root / "train", cat / "up")  # around the tree
    os.symlink("/", cat / "out")  # out of it
    os.symlink(root / "train" / "dog" / "0.png", cat / "linked.png")  # a linked image file: kept
    os.mkfifo(cat / "fifo.png")
    start = time.perf_counter()
    data = load_dataset("imagefolder", root)
    assert time.perf_counter() - start < 10
    cats = [path for path, label in data.train.samples if label == data.class_names.index("cat")]
    assert sorted(Path(p).name for p in cats) == ["0.png", "1.png", "2.png", "3.png", "linked.png"]
    assert data.train[0][0].size == (28, 28)


def test_image_listing_keeps_torchvision_order(image_run):
    """The listing that replaced torchvision's (which follows links) gives the same samples in the
    same order on an ordinary tree, so data order and results do not change."""
    from torchvision.datasets import ImageFolder

    from dmnsp.datasets import load_dataset

    root, _ = image_run
    (root / "train" / "cat" / "sub").mkdir()
    (root / "train" / "cat" / "sub" / "9.png").write_bytes((root / "train" / "cat" / "0.png").read_bytes())
    (root / "train" / "cat" / "Z.png").write_bytes((root / "train" / "cat" / "0.png").read_bytes())
    assert load_dataset("imagefolder", root).train.samples == ImageFolder(str(root / "train")).samples


@pytest.fixture(scope="module")
def fmnist_raw(tmp_path_factory) -> Path:
    from dmnsp import datasets

    if not datasets.FASHION_MNIST_DEBIAN_DIR.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    return datasets.prepare_fashion_mnist(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture
def fmnist_copy(fmnist_raw, tmp_path, monkeypatch):
    """A copy of decompressed Fashion-MNIST idx files, with the Debian source out of reach (a
    user's own copy: nothing repairs it)."""
    import shutil

    from dmnsp import datasets

    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    shutil.copytree(fmnist_raw, raw)
    monkeypatch.setattr(datasets, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "no-debian")
    return tmp_path / "data", raw


@pytest.mark.parametrize(
    ("name", "damage", "needle"),
    [
        ("train-images-idx3-ubyte", _empty, "holds 0 bytes, fewer than an idx header"),
        ("t10k-labels-idx1-ubyte", _empty, "holds 0 bytes, fewer than an idx header"),
        ("train-images-idx3-ubyte", _truncated, "its header promises 47040016 (truncated or padded)"),
        (
            "t10k-labels-idx1-ubyte",
            lambda p: p.write_bytes(b"\0\0\x08\x03" + p.read_bytes()[4:]),
            "magic number",
        ),
        ("train-labels-idx1-ubyte", _fifo_image, "it is not a regular file"),
    ],
)
def test_a_damaged_fashion_mnist_file_is_one_line(fmnist_copy, capsys, name, damage, needle):
    import yaml
    from fakes import MINI_RUN

    root, raw = fmnist_copy
    damage(raw / name)
    config = root.parent / "run.yaml"
    config.write_text(yaml.safe_dump({**MINI_RUN, "dataset_root": str(root)}))
    assert main(["run", "--quiet", "--config", str(config)]) == 2
    err = one_line_error(capsys)
    assert f"Fashion-MNIST file {raw / name} is damaged: " in err and needle in err and "delete it" in err


def test_a_truncated_fashion_mnist_file_is_decompressed_again_from_debian(tmp_path):
    from dmnsp import datasets

    if not datasets.FASHION_MNIST_DEBIAN_DIR.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    raw = datasets.prepare_fashion_mnist(tmp_path)
    whole = (raw / "train-labels-idx1-ubyte").read_bytes()
    (raw / "train-labels-idx1-ubyte").write_bytes(whole[:100])
    assert len(datasets.load_dataset("fashion-mnist", tmp_path).train_targets) == 60_000
    assert (raw / "train-labels-idx1-ubyte").read_bytes() == whole


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (_empty, "too short to be a gzip file"),
        (_truncated, "Compressed file ended before the end-of-stream marker"),
        (lambda p: p.write_text("plain text, long enough to look like a gzip file\n"), "Not a gzipped file"),
        (lambda p: p.write_bytes(__import__("gzip").compress(b"\0\0\x08\x01" + b"\0" * 100)), "not one"),
    ],
)
def test_a_damaged_debian_source_is_one_line(tmp_path, damage, needle):
    import shutil

    from dmnsp import datasets

    if not datasets.FASHION_MNIST_DEBIAN_DIR.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    source = tmp_path / "src"
    shutil.copytree(datasets.FASHION_MNIST_DEBIAN_DIR, source)
    damage(source / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(datasets.DataError) as info:
        datasets.prepare_fashion_mnist(tmp_path / "data", source)
    message = str(info.value)
    assert "\n" not in message and "t10k-labels-idx1-ubyte.gz is damaged" in message and needle in message
    assert "reinstall" in message
    assert not (tmp_path / "data" / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").exists()


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (_truncated, "is damaged"),
        (_empty, "is damaged (EOFError"),
        (lambda p: p.write_bytes(b"\x80\x02]q\x00."), "is damaged (TypeError"),  # a list, not CIFAR's dict
        (_fifo_image, "is not a regular file"),
    ],
)
def test_a_damaged_cifar100_pickle_is_one_line(tmp_path, monkeypatch, damage, needle):
    """Behind torchvision's md5 check (bypassed here, as the fake copy's sums differ): a pickle that
    does not load to CIFAR's arrays, and a FIFO that the md5 check itself would block on."""
    import os

    import torchvision
    from fakes import make_fake_cifar100

    from dmnsp.datasets import DataError, load_dataset

    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path)
    )
    root = make_fake_cifar100(tmp_path)
    damage(root / "cifar-100-python" / "train")
    with pytest.raises(DataError) as info:
        load_dataset("cifar100", root)
    assert "\n" not in str(info.value) and needle in str(info.value)


def test_tinyimagenet_lists_that_are_not_text_are_one_line(tmp_path):
    from fakes import make_fake_tinyimagenet

    from dmnsp.datasets import DataError, load_dataset

    root = make_fake_tinyimagenet(tmp_path, n_classes=3)
    (root / "tiny-imagenet-200" / "wnids.txt").write_bytes(b"\xff\xfe n01443537\n")
    with pytest.raises(DataError, match="wnids.txt cannot be read .*not UTF-8") as info:
        load_dataset("tinyimagenet", root)
    assert "\n" not in str(info.value)


# ======================================================================== model names
@pytest.mark.parametrize(
    "name",
    [
        "../../../../../../../{tmp}/evil",  # used to read tmp/evil.json as the architecture
        "{tmp}/evil",
        "{tmp}/evil.json",
        "evil",
        "hf-hub:someone/evil",
        "ViT-B-16/../../evil",
        "..",
        "dmnsp-tiny\n",
        "",
    ],
)
def test_model_name_is_a_registered_name_never_a_path(tmp_path, capsys, name):
    import yaml

    (tmp_path / "evil.json").write_text(json.dumps({"vision_cfg": {"width": 8, "layers": 2}}))
    name = name.format(tmp=str(tmp_path).lstrip("/") if name.startswith("..") else tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"dataset": "fashion-mnist", "model_name": name}))
    assert main(["validate-config", "--config", str(config)]) == 2
    err = one_line_error(capsys)
    assert f"unknown model_name {name!r}" in err and "adapter_dim" not in err and "never a path" in err


def test_registered_model_names_pass(make_config):
    from dmnsp.architectures import architecture_names, tower_widths
    from dmnsp.model import list_models

    assert set(list_models()) >= set(architecture_names()) >= {"ViT-B-16", "dmnsp-tiny", "RN50"}
    assert tower_widths("dmnsp-tiny") == {"visual": 64, "text": 64}
    assert make_config(model_name="dmnsp-tiny")["model_name"] == "dmnsp-tiny"


# ======================================================================== plot labels
HOSTILE_LABELS = ["$\\frac{}$ \\alpha", "cost $5 and $6, a}{b %s {0} $x^ $$ _^\\"]


def test_hostile_labels_are_drawn_as_plain_text_in_every_figure(tmp_path, capsys, monkeypatch):
    """Labels and swept prompts are users' text: a TeX macro in one used to crash the results stage
    in matplotlib's mathtext (no figure, and under Snakemake no table either)."""
    from matplotlib.text import Text

    from dmnsp import plots

    runs = []
    for i, (label, ratio, scale) in enumerate(
        [
            (HOSTILE_LABELS[0], 0.1, 10),
            (HOSTILE_LABELS[0], 0.2, 20),
            (HOSTILE_LABELS[1], 0.1, 10),
        ]
    ):
        run = make_run(tmp_path / f"run{i}", label=label, TOP_K_RATIO=ratio, LAMBDA_SCALE=scale)
        info = json.loads((run / "run.json").read_text())
        info["settings"] = {"prompt_template": label + " {}", "TOP_K_RATIO": ratio, "LAMBDA_SCALE": scale}
        (run / "run.json").write_text(json.dumps(info))
        runs.append(str(run))
    drawn: list[str] = []

    def save(fig, out_dir, stem):
        for text in fig.findobj(Text):
            assert not text.get_parse_math() and not text.get_usetex(), text.get_text()
            drawn.append(text.get_text())
        fig.canvas.draw()  # lays out every text (tick labels included) as savefig would
        return [stem]  # writing PNG and PDF is tested elsewhere and costs seconds per figure

    monkeypatch.setattr(plots, "_save", save)
    argv = ["report-artifacts", "--runs", *runs, "--tables-dir", str(tmp_path / "t"), "--plots-dir"]
    assert main([*argv, str(tmp_path / "p")]) == 0
    err = capsys.readouterr().err
    assert "not drawn" not in err, err
    for label in HOSTILE_LABELS:
        assert any(label in text for text in drawn), label  # the legend shows the label as written
    assert "summary.md" in {p.name for p in (tmp_path / "t").iterdir()}
    import matplotlib

    assert matplotlib.rcParams["text.parse_math"] is True  # restored after drawing


def test_a_figure_that_cannot_be_drawn_costs_no_table(tmp_path, capsys, monkeypatch):
    from dmnsp import plots

    def broken(*args, **kwargs):
        raise ValueError("matplotlib could not lay this out\nsecond line")

    monkeypatch.setattr(plots, "plot_accuracy_matrices", broken)
    for other in ("plot_hyperparameters", "plot_diagnostics"):  # fast: drawn in other tests
        monkeypatch.setattr(plots, other, lambda *args, **kwargs: [])
    run = make_run(tmp_path / "run")
    argv = ["report-artifacts", "--runs", str(run), "--tables-dir", str(tmp_path / "t"), "--plots-dir"]
    assert main([*argv, str(tmp_path / "p")]) == 0
    err = capsys.readouterr().err
    assert "warning: the accuracy_matrices figures were not drawn (ValueError: matplotlib could not" in err
    assert "second line" not in err
    assert {"summary.md", "summary.csv", "summary.tex", "runs.csv"} <= {
        p.name for p in (tmp_path / "t").iterdir()
    }
    assert any(p.name.startswith("accuracy_curves") for p in (tmp_path / "p").iterdir())


@pytest.fixture(scope="module")
def pretrained_model(pretrain_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrained") / "model.pt"
    assert main(["pretrain", "--config", str(pretrain_config), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (_truncated, "could not load weights"),
        (_empty, "could not load weights"),
        (_text_file, "could not load weights"),
        (_fifo_image, "is not a regular file"),
    ],
)
def test_damaged_pretraining_output_is_one_line(
    pretrain_config, pretrained_model, tmp_path, capsys, damage, needle
):
    import shutil

    weights = tmp_path / "model.pt"
    shutil.copy(pretrained_model, weights)
    damage(weights)
    argv = ["run", "--quiet", "--config", str(pretrain_config), "--set", f"pretrained={weights}"]
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert str(weights) in err and needle in err


def test_an_unknown_user_in_dataset_root_is_one_line(tmp_path, capsys):
    import yaml
    from fakes import MINI_RUN

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**MINI_RUN, "dataset_root": "~nosuchuser-dmnsp/data"}))
    assert main(["run", "--quiet", "--config", str(config)]) == 2
    err = one_line_error(capsys)  # refused when the config is validated, before any data is read
    assert "'~nosuchuser-dmnsp/data'" in err and "no such user" in err

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
    for name in ("finetune", "lwf", "zeroshot"):
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

"""Task checkpoints: atomic, checksummed, tied to their configuration; format 2 is a safetensors
file whose every field is checked before use, and a hostile file is a one-line error."""

from __future__ import annotations

import hashlib
import io
import json
import struct

import pytest
import torch

from dmnsp.checkpoint import CheckpointError, TaskState, load_checkpoint, save_checkpoint


def _state():
    return TaskState(
        task=1,
        adapters={
            "visual.transformer.resblocks.0.adapter.down.weight": torch.randn(4, 8),
            "visual.transformer.resblocks.0.adapter.up.bias": torch.randn(8, dtype=torch.float64),
            "text.transformer.resblocks.0.adapter.down.weight": torch.randn(4, 8).to(torch.bfloat16),
        },
        bases={"visual": [torch.randn(8, 14), torch.randn(8, 7)], "text": [torch.empty(8, 0)]},
        seen_classes=[0, 1, 2, 3],
    )


def _one_line_error(path, cfg, match: str, **kwargs) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path, cfg, **kwargs)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    return message


# ------------------------------------------------------------------------- the file, read independently


def _parse(path):
    """Header and raw tensor bytes of a format-2 file, read per the safetensors layout (no dmnsp code)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    return data, n, header


def _rewrite(path, header: dict, body: bytes) -> None:
    """Write ``header`` + ``body`` with a checksum that matches (as a crafted file would)."""
    meta = header["__metadata__"]
    meta["sha256"] = "0" * 64
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    blob = struct.pack("<Q", len(raw)) + raw + body
    digest = hashlib.sha256(blob).hexdigest().encode()
    at = blob.index(b'"sha256":"' + b"0" * 64) + len(b'"sha256":"')
    path.write_bytes(blob[:at] + digest + blob[at + 64 :])


def test_round_trip_is_bitwise(tmp_path, make_config):
    cfg = make_config()
    state = _state()
    path = save_checkpoint(tmp_path / "c.pt", state, cfg)
    got = load_checkpoint(path, cfg, expect_task=1)
    assert got.task == 1 and got.seen_classes == [0, 1, 2, 3]
    assert got.adapters.keys() == state.adapters.keys()
    for k, v in state.adapters.items():
        assert got.adapters[k].dtype == v.dtype and got.adapters[k].shape == v.shape
        assert torch.equal(got.adapters[k].view(torch.uint8), v.view(torch.uint8)), k  # bit for bit
    for tower, vs in state.bases.items():
        assert len(got.bases[tower]) == len(vs)
        for a, b in zip(got.bases[tower], vs, strict=True):
            assert a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_file_is_safetensors_with_a_checksum_of_everything(tmp_path, make_config):
    """The layout, restated: 8-byte header length, JSON header, tensors at their offsets; the
    sha256 in the metadata is that of the whole file with its own 64 digits zeroed."""
    state = _state()
    path = save_checkpoint(tmp_path / "c.pt", state, make_config())
    data, n, header = _parse(path)
    meta = header["__metadata__"]
    assert meta["format"] == "dmnsp-checkpoint" and meta["format_version"] == "2"
    zeroed = data.replace(meta["sha256"].encode(), b"0" * 64, 1)
    assert hashlib.sha256(zeroed).hexdigest() == meta["sha256"]
    entry = header["bases/visual/0"]
    assert entry["dtype"] == "F32" and entry["shape"] == [8, 14]
    begin, end = entry["data_offsets"]
    raw = data[8 + n + begin : 8 + n + end]
    assert raw == state.bases["visual"][0].numpy().tobytes()
    assert json.loads(meta["state"])["task"] == 1
    safetensors = pytest.importorskip("safetensors.torch")  # any safetensors reader opens it
    loaded = safetensors.load_file(str(path))
    assert torch.equal(loaded["bases/visual/1"], state.bases["visual"][1])


def test_truncated_and_corrupted_files_are_detected(tmp_path, make_config):
    cfg = make_config()
    path = save_checkpoint(tmp_path / "c.pt", _state(), cfg)
    data = path.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 100, 9, 3):
        path.write_bytes(data[:cut])
        _one_line_error(path, cfg, "truncated or corrupt.*rerun")
    for at in (len(data) - 5, len(data) // 2, 40, 9, 2):  # tensor bytes, header, length
        flipped = bytearray(data)
        flipped[at] ^= 0x41
        path.write_bytes(bytes(flipped))
        _one_line_error(path, cfg, "truncated or corrupt")
    path.write_bytes(data + b"\0")
    _one_line_error(path, cfg, "truncated or corrupt")
    path.write_bytes(b"")
    _one_line_error(path, cfg, "truncated or corrupt")


def test_wrong_structure_with_a_valid_checksum_is_refused(tmp_path, make_config):
    """Crafted files whose checksum matches but whose content is not a task state."""
    cfg = make_config()
    path = save_checkpoint(tmp_path / "c.pt", _state(), cfg)
    data, n, header = _parse(path)
    body = data[8 + n :]

    def crafted(edit, match):
        h = json.loads(json.dumps(header))
        b = edit(h, body)
        _rewrite(path, h, b if isinstance(b, bytes) else body)
        return _one_line_error(path, cfg, match)

    def state_field(key, value):
        def edit(h, b):
            state = json.loads(h["__metadata__"]["state"])
            state[key] = value
            h["__metadata__"]["state"] = json.dumps(state)

        return edit

    crafted(state_field("task", "1"), "not a valid dmnsp task checkpoint.*task '1'")
    crafted(state_field("task", -7), "task -7 is not a task index")
    crafted(state_field("seen_classes", [0, "x"]), "seen_classes")
    crafted(state_field("seen_classes", {"0": 1}), "seen_classes")
    crafted(state_field("config_hash", None), "config")
    crafted(lambda h, b: h["__metadata__"].update(state="[1, 2"), "state")
    crafted(lambda h, b: h["__metadata__"].update(state="[1, 2]"), "state")
    crafted(lambda h, b: h["__metadata__"].pop("state"), "state")
    crafted(lambda h, b: h["__metadata__"].update(format="other"), "format 'other'")
    crafted(
        lambda h, b: h["__metadata__"].update(format_version="3"),
        "format version '3'.*reads versions 1 and 2",
    )

    def rename(old, new):
        def edit(h, b):
            renamed = {(new if k == old else k): v for k, v in h.items()}  # same bytes, other name
            h.clear()
            h.update(renamed)

        return edit

    crafted(rename("bases/visual/1", "bases/visual/5"), "bases of the visual tower are numbered")
    crafted(rename("bases/visual/1", "weights/x"), "unexpected tensor 'weights/x'")
    crafted(rename("bases/visual/1", "bases/../1"), "unexpected tensor")
    crafted(rename("rng/torch", "adapters/rng"), "dtype U8, expected a float type")

    def retype(name, dtype, shape=None):
        def edit(h, b):
            h[name]["dtype"] = dtype
            if shape is not None:
                h[name]["shape"] = shape

        return edit

    crafted(retype("bases/visual/0", "I32"), "dtype I32, expected a float type")
    crafted(retype("bases/visual/0", "F32", [112]), r"shape \[112\], expected a 2-D basis")
    crafted(retype("bases/visual/1", "F32", [4, 14]), "different row counts")
    crafted(retype("rng/torch", "I8"), "rng/torch")

    def drop_rng(h, b):
        begin, end = h.pop("rng/torch")["data_offsets"]
        assert end == len(b)  # written last
        return b[:begin]

    crafted(drop_rng, "no rng/torch tensor")


def test_malformed_layouts_are_refused_before_any_allocation(tmp_path, make_config):
    """Tensor tables that do not fill the data exactly (huge shapes included) never allocate."""
    cfg = make_config()
    path = save_checkpoint(tmp_path / "c.pt", _state(), cfg)
    data, n, header = _parse(path)
    body = data[8 + n :]
    for name, entry in [
        ("bases/visual/0", {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 448]}),
        ("bases/visual/0", {"dtype": "F32", "shape": [-8, 14], "data_offsets": [0, 448]}),
        ("bases/visual/0", {"dtype": "F32", "shape": [8, 14], "data_offsets": [4, 452]}),
        ("bases/visual/0", {"dtype": "C64", "shape": [8, 14], "data_offsets": [0, 448]}),
        ("bases/visual/0", {"dtype": "F32", "shape": [8, 14], "data_offsets": [0, 448], "x": 1}),
    ]:
        h = json.loads(json.dumps(header))
        h[name] = entry
        _rewrite(path, h, body)
        _one_line_error(path, cfg, "truncated or corrupt")
    _rewrite(path, json.loads(json.dumps(header)), body + b"\0" * 8)  # bytes no tensor owns
    _one_line_error(path, cfg, "truncated or corrupt.*tensors take")
    path.write_bytes(struct.pack("<Q", 2**62) + data[8:])  # a header length beyond the file
    _one_line_error(path, cfg, "header length")


def test_format_1_files_are_still_read_and_checked(tmp_path, make_config):
    """Format 1 (a SHA-256 line, then torch.save): read with weights_only after the checksum."""
    cfg = make_config()
    from dmnsp.config import config_hash, state_config

    state = _state()
    payload = {
        "format_version": 1,
        "task": 1,
        "adapters": state.adapters,
        "bases": state.bases,
        "seen_classes": [0, 1, 2, 3],
        "config": state_config(cfg),
        "config_hash": config_hash(cfg),
    }

    def write_v1(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        body = buf.getvalue()
        path = tmp_path / "v1.pt"
        path.write_bytes(hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
        return path

    path = write_v1(payload)
    got = load_checkpoint(path, cfg, expect_task=1)
    assert got.seen_classes == [0, 1, 2, 3]
    assert torch.equal(got.bases["visual"][1], state.bases["visual"][1])
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    _one_line_error(path, cfg, "truncated or corrupt")
    _one_line_error(write_v1({**payload, "bases": {"visual": [torch.zeros(3)]}}), cfg, "'bases'")
    _one_line_error(write_v1({**payload, "task": "1"}), cfg, "task '1'")
    _one_line_error(write_v1([1, 2]), cfg, "format_version None")


class _Boom:
    def __reduce__(self):
        return (print, ("PICKLE PAYLOAD RAN",))


def test_a_pickle_payload_never_runs(tmp_path, make_config, capsys):
    """A format-1 file with a valid checksum but a code-running pickle is refused unexecuted."""
    buf = io.BytesIO()
    torch.save({"format_version": 1, "x": _Boom()}, buf)
    body = buf.getvalue()
    path = tmp_path / "evil.pt"
    path.write_bytes(hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
    _one_line_error(path, make_config(), "not a valid dmnsp task checkpoint")
    assert "PICKLE PAYLOAD RAN" not in capsys.readouterr().out


def test_other_config_is_refused_naming_the_key(tmp_path, make_config):
    path = save_checkpoint(tmp_path / "c.pt", _state(), make_config(lr=0.001))
    _one_line_error(path, make_config(lr=0.01), "another configuration.*lr: 0.001 != 0.01")
    # Execution-only keys (device, data folder, workers) may differ.
    load_checkpoint(path, make_config(lr=0.001, dataset_root="/elsewhere", device="cpu", num_workers=3))


def test_wrong_task_and_missing_file(tmp_path, make_config):
    cfg = make_config()
    path = save_checkpoint(tmp_path / "c.pt", _state(), cfg)
    _one_line_error(path, cfg, "holds task 1, expected task 2", expect_task=2)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt", cfg)


def test_memory_layout_of_views_is_kept(tmp_path, make_config):
    """Bases are column-major slices of an eigenvector matrix (LAPACK's layout, offset by the
    dropped column): a resumed task must see the same strides and offset, or BLAS takes another
    path and rounds differently than a run in one process."""
    cfg = make_config()
    gram = torch.randn(16, 16, dtype=torch.float64)
    vectors = torch.linalg.eigh(gram @ gram.T)[1].float()  # column-major 16 x 16
    basis = vectors[:, 1:]  # what the faithful basis keeps: a view with offset 16, strides (1, 16)
    transposed = torch.randn(14, 16).t()
    adapter = torch.randn(4, 8, requires_grad=True)
    state = TaskState(0, {"a.adapter.w": adapter}, {"visual": [basis, transposed]}, [0, 1])
    got = load_checkpoint(save_checkpoint(tmp_path / "c.pt", state, cfg), cfg)
    for a, b in zip(got.bases["visual"], state.bases["visual"], strict=True):
        assert torch.equal(a, b)
        assert (a.shape, a.stride(), a.storage_offset()) == (b.shape, b.stride(), b.storage_offset())
    x = torch.randn(32, 16)
    assert torch.equal(x @ got.bases["visual"][0], x @ basis)  # the same arithmetic, bit for bit
    assert torch.equal(got.adapters["a.adapter.w"], adapter.detach())
    assert not got.adapters["a.adapter.w"].requires_grad


def test_views_reaching_past_their_storage_are_refused(tmp_path, make_config):
    cfg = make_config()
    state = TaskState(0, {}, {"visual": [torch.randn(14, 8).t()]}, [0, 1])
    path = save_checkpoint(tmp_path / "c.pt", state, cfg)
    data, n, header = _parse(path)
    views = json.loads(header["__metadata__"]["views"])
    assert views == {"bases/visual/0": {"shape": [8, 14], "stride": [1, 8], "offset": 0}}
    for bad, match in [
        ({"shape": [8, 14], "stride": [1, 9], "offset": 0}, "reaches past its storage"),
        ({"shape": [8, 14], "stride": [1, 8], "offset": 1}, "reaches past its storage"),
        ({"shape": [8, 14], "stride": [1, -8], "offset": 0}, "bad view"),
        ({"shape": [8, 14], "stride": [1], "offset": 0}, "bad view"),
    ]:
        h = json.loads(json.dumps(header))
        h["__metadata__"]["views"] = json.dumps({"bases/visual/0": bad})
        _rewrite(path, h, data[8 + n :])
        _one_line_error(path, cfg, match)
    h = json.loads(json.dumps(header))
    h["__metadata__"]["views"] = json.dumps({"bases/visual/7": views["bases/visual/0"]})
    _rewrite(path, h, data[8 + n :])
    _one_line_error(path, cfg, "without a 1-D storage")

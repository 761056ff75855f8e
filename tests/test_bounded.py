"""dmnsp.bounded: hostile documents (alias bombs, recursive aliases, deep nesting, FIFOs, huge or
non-UTF-8 files) end in one bounded error line, and ordinary documents pass unchanged."""

from __future__ import annotations

import os
import time

import pytest
import yaml

from dmnsp.bounded import BoundsError, check_tree, loads_json, read_regular_text
from dmnsp.config import ConfigError, load_yaml, read_yaml_file


def alias_bomb(levels: int = 9, width: int = 10) -> str:
    """The "billion laughs" shape: each level lists the previous one ``width`` times."""
    names = [f"l{i}" for i in range(levels)]
    lines = [f"{names[0]}: &{names[0]} [{', '.join(['x'] * width)}]"]
    for prev, cur in zip(names, names[1:], strict=False):
        lines.append(f"{cur}: &{cur} [{', '.join([f'*{prev}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_check_tree_counts_nodes_as_expanded():
    shared = [1, 2, 3]
    doc = {"a": shared, "b": shared}  # 1 dict + 2 lists + 6 ints = 9 nodes expanded
    assert check_tree(doc, "doc", max_nodes=9) is doc
    with pytest.raises(BoundsError, match="more than 8 values"):
        check_tree(doc, "doc", max_nodes=8)


def test_check_tree_depth_and_self_reference():
    deep: list = []
    node = deep
    for _ in range(5):
        node.append([])
        node = node[0]
    assert check_tree(deep, "doc", max_depth=5) is deep
    with pytest.raises(BoundsError, match="deeper than 4"):
        check_tree(deep, "doc", max_depth=4)
    loop: list = []
    loop.append(loop)
    with pytest.raises(BoundsError, match="refers to itself"):
        check_tree(loop, "doc")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (alias_bomb(), "more than 1,000,000 values"),
        ("a: &a [*a]\n", "deeper than 100"),
        ("[" * 20000 + "]" * 20000, "too deep"),
    ],
    ids=["alias-bomb", "recursive-alias", "deep-nesting"],
)
def test_hostile_yaml_is_one_bounded_error(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=match) as info:
        read_yaml_file(path, "config file")
    assert time.perf_counter() - t0 < 30  # bounded: a bomb is refused, never expanded
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(yaml.YAMLError, match=match):  # callers that catch YAMLError see it too
        load_yaml(text)


def test_ordinary_yaml_unchanged(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: &b {lr: 1e-3, seeds: [0, 1]}\nrun: {<<: *b, lr: 2e-3}\n")
    assert read_yaml_file(path, "config file") == {
        "base": {"lr": 1e-3, "seeds": [0, 1]},
        "run": {"lr": 2e-3, "seeds": [0, 1]},
    }


def test_fifo_folder_size_and_encoding(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(BoundsError, match="not a regular file"):
        read_regular_text(fifo, "journal")  # returns at once: no writer is waited for
    with pytest.raises(BoundsError, match="is a folder"):
        read_regular_text(tmp_path, "config file")
    big = tmp_path / "big"
    big.write_bytes(b"x" * 101)
    assert read_regular_text(big, "f", max_bytes=101) == "x" * 101
    with pytest.raises(BoundsError, match="larger than"):
        read_regular_text(big, "f", max_bytes=100)
    latin = tmp_path / "latin"
    latin.write_bytes("lr: 0.1 # caf\xe9".encode("latin-1"))
    with pytest.raises(BoundsError, match="not UTF-8"):
        read_regular_text(latin, "f")
    with pytest.raises(FileNotFoundError):
        read_regular_text(tmp_path / "missing", "f")


def test_loads_json_bounds_and_constants():
    assert loads_json('{"a": [1, 2.5, null]}', "x") == {"a": [1, 2.5, None]}
    with pytest.raises(BoundsError, match="deeper than Python can parse"):
        loads_json("[" * 100000 + "]" * 100000, "x")
    with pytest.raises(BoundsError, match="deeper than 100"):
        loads_json("[" * 150 + "]" * 150, "x")
    assert loads_json('{"a": NaN}', "x")["a"] != loads_json('{"a": NaN}', "x")["a"]  # NaN read
    with pytest.raises(ValueError, match="non-standard JSON literal Infinity"):
        loads_json('{"a": Infinity}', "x", allow_nan=False)

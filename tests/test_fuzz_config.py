"""Fuzzing the readers of user documents (issue 17): run configs (through the CLI), sweep sheets,
class-order files and reference Hydra configs. Generated documents (random YAML/JSON-ish text,
random structures written with anchors and aliases, odd scalars, byte-order marks, control
characters, bytes that are not UTF-8) must end in success or one error line (ConfigError, or the
CLI's exit 2 with one stderr line), never a traceback, within a time and a memory bound.

Reproducible: derandomized (a fixed seed per test), no example database, fixed example counts.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import string
import tracemalloc
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmnsp.cli import main
from dmnsp.config import ConfigError, read_class_order_file, run_schema
from dmnsp.experiments import expand_experiment, read_sheet
from dmnsp.hydra_import import RUN_KEYS, UNREAD_KEYS
from dmnsp.scenario import resolve_class_order

# A generated document is at most a few kilobytes: a correct reader handles one in milliseconds.
# The bounds leave a wide margin for a loaded CI machine; a reader that expanded an alias or an
# interpolation would pass them by orders of magnitude.
DEADLINE = timedelta(seconds=10)
PEAK_BYTES = 64 * 2**20
FUZZ = settings(
    max_examples=120,
    derandomize=True,
    database=None,
    deadline=DEADLINE,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
_names = itertools.count()

# --------------------------------------------------------------------------------- strategies

RUN_KEYS_ALL = sorted(run_schema()["properties"])
NESTED_KEYS = ["mode", "towers", "steps", "templates", "alpha", "numerics", "batch_size", "seed"]
HYDRA_KEYS = [
    *RUN_KEYS,
    *UNREAD_KEYS,
    "dataset",
    "method",
    "scenario",
    "l2",
    "ce_method",
    "hydra",
    "defaults",
]
# Scalars a config plausibly holds, odd ones (YAML 1.1 spellings, huge numbers, paths, templates,
# interpolations) and ones PyYAML recognises but cannot build or refuses (dates, tags).
PLAIN_SCALARS = [
    "0", "1", "2", "10", "-1", "0.1", "0.001", "1e-4", "30", "30.0", "-0.0", "2.0", "true", "false",
    "null", "a {}", "'a photo of a {}.'", "dmnsp-tiny", "ViT-B-16", "cifar100", "fashion-mnist", "dmnsp",
    "zeroshot", "finetune", "faithful", "clean", "auto", "cpu", "visual", "data", "[]", "{}", "[0, 1]",
    "[1, 0, 3, 2, 5, 4, 7, 6, 9, 8]", "class", "''",
]  # fmt: skip
ODD_SCALARS = [
    "1e30", "1e400", ".inf", "-.inf", ".nan", "0x1F", "0o17", "1_000", "+12", "9223372036854775808",
    "1" * 50, "~", "Null", "yes", "no", "on", '""', "'{}'", "'{{}}'", "'{0} {}'", "ViT-B/16",
    "../../etc/passwd", "~nosuchuser/x", "'~'", "${seed}", "${lr}", "'${increment}'", "'${now:%H}'",
    "'${a}${a}'", '"\\u0000"', '"a\\nb"', " ", "é", "cuda:0", "cuda:99999", "[0, 0]", "[-1]",
    "[1.5]", "{a: 1}", "12:30:00",
]  # fmt: skip
UNBUILDABLE = [
    "2023-13-45", "2001-02-29", "2001-12-14t21:59:43.10-05:00", "2001-12-14t21:59:43.10-99:00",
    "!!int abc", "!!float x", "!!timestamp x", "!!binary aGk=", "!!str 1", "!!set {a, b}",
    "!!python/object:os.system", "!!omap [a: 1]", "1" * 5000,
]  # fmt: skip
SCALAR = st.one_of(
    *[st.sampled_from(PLAIN_SCALARS)] * 4,
    *[st.sampled_from(ODD_SCALARS)] * 2,
    st.sampled_from(UNBUILDABLE),
    st.integers(-(10**6), 10**6).map(str),
)
SYNTAX = "[]{}:,-&*!|>'\"#%@`?~ \t\n\r.0123456789eE+${}\\"


def one_in(n: int) -> st.SearchStrategy[bool]:
    """True about once in ``n`` draws; False is the simplest value, so shrinking removes the oddity."""
    return st.sampled_from([False] * (n - 1) + [True])


def _key(keys: list[str]) -> st.SearchStrategy[str]:
    odd = st.text(string.ascii_letters + "_.~/ \t\n", min_size=1, max_size=8).map(
        lambda k: '"' + k.replace("\\", "").replace('"', "") + '"'
    )
    return st.one_of(*[st.sampled_from(keys)] * 6, odd)


@st.composite
def yaml_document(draw, keys: list[str] | None = None, top: str = "mapping") -> str:
    """YAML text built from a random structure: flow collections, odd scalars, anchors on some
    nodes and aliases to earlier anchors (small fan-out: bombs are the hostile tests' business)."""
    keys = keys or RUN_KEYS_ALL
    anchors: list[str] = []
    depth_budget = draw(st.integers(1, 4))

    def node(depth: int) -> str:
        choice = draw(st.integers(0, 9))
        if anchors and choice == 0:
            return "*" + draw(st.sampled_from(anchors))
        if depth >= depth_budget or choice <= 4:
            text = draw(SCALAR)
        elif choice <= 7:
            text = "[" + ", ".join(node(depth + 1) for _ in range(draw(st.integers(0, 4)))) + "]"
        else:
            names = draw(st.lists(_key(NESTED_KEYS), max_size=3, unique=True))
            pairs = [f"{name}: {node(depth + 1)}" for name in names]
            text = "{" + ", ".join(pairs) + "}"
        if draw(one_in(7)) and not text.startswith(("!", "*")):
            name = f"a{len(anchors)}"
            anchors.append(name)
            return f"&{name} {text}"
        return text

    if top == "list":
        return (
            node(0)
            if draw(st.booleans())
            else "[" + ", ".join(node(1) for _ in range(draw(st.integers(0, 12)))) + "]"
        )
    lines = [f"{name}: {node(1)}" for name in draw(st.lists(_key(keys), min_size=1, max_size=6, unique=True))]
    return "\n".join(lines) + "\n"


def noisy(doc: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    """A document, sometimes with a byte-order mark, inserted syntax or control characters, cut,
    or as bytes that are not UTF-8; sometimes plain random text instead."""

    @st.composite
    def build(draw) -> bytes:
        if draw(one_in(10)):
            text = draw(st.text(alphabet=SYNTAX + "abc\x00\x07\x1b\u0085\u2028\ufeff", max_size=200))
        else:
            text = draw(doc)
        for _ in range(draw(st.sampled_from([0, 0, 0, 0, 1, 2]))):
            at = draw(st.integers(0, len(text)))
            text = (
                text[:at]
                + draw(st.sampled_from(list(SYNTAX) + ["\x00", "\x1b", "\ufeff", "\\", "&a", "*a"]))
                + text[at:]
            )
        if draw(one_in(10)):
            text = text[: draw(st.integers(0, len(text)))]
        if draw(one_in(6)):
            text = "\ufeff" + text
        data = text.encode("utf-8", "surrogatepass")
        if draw(one_in(12)):
            data = data + draw(st.binary(min_size=1, max_size=4)).replace(b"\n", b"\xff") + b"\xff"
        return data

    return build()


SWEPT = ["lr", "LAMBDA_SCALE", "TOP_K_RATIO", "TOP_SELECT", "epochs", "batch_size", "prompt_template", "projection.mode", "ls"]  # fmt: skip


@st.composite
def sweep_sheet(draw) -> tuple[str, bytes]:
    """A TSV or CSV sheet: a header of sweepable run keys (sometimes odd ones), rows of cells both
    plain and odd, sometimes ragged, quoted, with a byte-order mark or bytes that are not UTF-8."""
    delimiter = draw(st.sampled_from(["\t", ","]))
    odd_key = st.sampled_from([*RUN_KEYS_ALL, "seed", "lr~x", "", "a/b", "projection.nope"])
    header = draw(
        st.lists(st.one_of(*[st.sampled_from(SWEPT)] * 4, odd_key), min_size=1, max_size=3, unique=True)
    )
    cell = st.one_of(SCALAR, st.sampled_from(["", '"', '"a,b"', "#", "0.001", "30", "30.0", "1", "1.0"]))
    rows = []
    for _ in range(draw(st.integers(1, 5))):
        width = len(header) + (draw(st.sampled_from([-1, 1])) if draw(one_in(8)) else 0)
        rows.append([draw(cell).replace("\n", " ") for _ in range(width)])
    text = "\n".join(delimiter.join(row) for row in [header, *rows]) + "\n"
    if draw(one_in(5)):
        text = "\ufeff" + text
    data = text.encode()
    if draw(one_in(12)):
        data += b"\xff\xfe"
    return (".csv" if delimiter == "," else ".tsv"), data


# ---------------------------------------------------------------------------------- the bound


def within_bounds(call):
    """Run ``call``; return its result or the ConfigError it raised (one line), measuring the peak
    Python memory it allocated. Any other exception propagates: hypothesis reports it."""
    tracemalloc.start()
    try:
        try:
            return call()
        except ConfigError as exc:
            message = str(exc)
            assert "\n" not in message and 0 < len(message) < 2000, message
            return exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < PEAK_BYTES, f"peak {peak / 2**20:.0f} MiB"


def cli_within_bounds(argv: list[str]) -> int:
    """The CLI on a generated file: exit 0, or exit 2 with exactly one stderr line; never a traceback."""
    err, out = io.StringIO(), io.StringIO()
    tracemalloc.start()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = main(argv)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"peak {peak / 2**20:.0f} MiB"
    lines = err.getvalue().strip().splitlines()
    if rc == 2:
        assert len(lines) == 1 and lines[0].startswith(f"dmnsp {argv[0]}: error: "), err.getvalue()
    else:
        assert rc == 0 and not any("error" in line for line in lines), err.getvalue()
    return rc


def write(folder: Path, suffix: str, data: bytes) -> str:
    """A fresh path per example (the planner caches sheet and class-order reads by path)."""
    path = folder / f"doc{next(_names)}{suffix}"
    path.write_bytes(data)
    return str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from dmnsp.cli import _user_errors

    _user_errors()  # the CLI's first error imports torch: before the first timed example, not in it
    return tmp_path_factory.mktemp("fuzz")


# -------------------------------------------------------------------------------------- tests


@FUZZ
@given(data=noisy(yaml_document()))
def test_run_config_reader(folder, data):
    cli_within_bounds(["validate-config", "--config", write(folder, ".yaml", data)])


@FUZZ
@given(data=noisy(yaml_document(keys=HYDRA_KEYS)))
def test_hydra_import(folder, data):
    cli_within_bounds(["import-config", write(folder, ".yaml", data)])


@FUZZ
@given(sheet=sweep_sheet())
def test_sweep_sheet_reader_and_planning(folder, sheet):
    path = write(folder, *sheet)
    rows = within_bounds(lambda: read_sheet(path))
    if not isinstance(rows, ConfigError):
        spec = {"methods": ["zeroshot", "dmnsp"], "sheet": path, "run": {"model_name": "dmnsp-tiny"}}
        within_bounds(lambda: expand_experiment("e", spec))


@FUZZ
@given(data=noisy(yaml_document(top="list")) | noisy(yaml_document(keys=["class_order", "order", "1"])))
def test_class_order_reader_in_planning_and_job(folder, data):
    path = write(folder, ".yaml", data)
    order = within_bounds(lambda: read_class_order_file(path))
    job = within_bounds(lambda: resolve_class_order(path, 10, list(range(10))))
    spec = {"methods": ["zeroshot"], "run": {"model_name": "dmnsp-tiny", "class_order": path}}
    plan = within_bounds(lambda: expand_experiment("e", spec))
    # Planning and the job agree on which files are class orders of Fashion-MNIST's 10 classes.
    assert isinstance(plan, ConfigError) == isinstance(job, ConfigError), (order, job, plan)

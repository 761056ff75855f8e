"""Bounded reading of untrusted text: files, JSON and YAML a user, a crashed job or an attacker wrote.

Every reader of a file dmnsp did not just write itself goes through here, so a hostile input
costs at most a bounded amount of time and memory and ends in one :class:`BoundsError` line:

* :func:`read_regular_text` reads only regular files (a FIFO would block, a device never end),
  at most ``max_bytes``, strictly UTF-8 (a leading byte-order mark dropped).
* :func:`check_tree` walks a parsed document counting every node *as expanded*: a YAML alias
  bomb (``a: &a [x, x]``, ``b: &b [*a, *a]``, ...) shares objects, so it parses in microseconds and
  explodes only when something walks it (schema validation, ``json.dumps``, ``deepcopy``). The walk
  stops at ``max_nodes`` or ``max_depth`` (a recursive alias ``&a [*a]`` is infinitely deep).
* :func:`loads_json` parses JSON with those bounds and no recursion overflow.

The bounds are far above any real config, class order, sweep sheet, result file or checkpoint
header (the largest real ones hold a few thousand nodes).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

#: Largest text file read (config, sheet, class order, result record): 16 MiB.
MAX_TEXT_BYTES = 16 * 2**20
#: Most nodes of a parsed document, every alias expanded (a real paper config holds < 10,000).
MAX_NODES = 1_000_000
#: Deepest nesting of a parsed document (real ones nest < 10 levels).
MAX_DEPTH = 100


class BoundsError(ValueError):
    """A file or document is not a regular file, too large, too deep, or not UTF-8; one line."""


def read_regular_text(path: str | Path, what: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of the regular file ``path``, at most ``max_bytes`` bytes.

    Raises:
        FileNotFoundError: no such file (callers word their own message).
        BoundsError: not a regular file (folder, FIFO, device, socket), larger than ``max_bytes``,
            or not UTF-8.
        OSError: unreadable (permissions): callers word their own message.
    """
    path = Path(path)
    # O_NONBLOCK: opening a FIFO with no writer would otherwise block forever before fstat.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, device or socket)"
        raise BoundsError(f"{what} {path} is {kind}; give the path of a regular file")
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise BoundsError(
            f"{what} {path} is larger than {max_bytes // 2**20} MiB; this is not a file dmnsp wrote "
            "or a config a person writes: check the path"
        )
    try:
        # utf-8-sig: a leading byte-order mark (Excel's "CSV UTF-8", Notepad) is not part of the text.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BoundsError(
            f"{what} {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8"
        ) from None


def check_tree(obj: Any, what: str, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH) -> Any:
    """Return ``obj`` unchanged when it holds at most ``max_nodes`` nodes (aliases expanded) nested
    at most ``max_depth`` deep; else raise :class:`BoundsError` naming ``what``.

    Iterative, so a recursive structure cannot overflow the stack; it stops at the first bound
    passed, so a bomb costs at most ``max_nodes`` steps.
    """
    stack = [(obj, 0)]
    nodes = 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise BoundsError(
                f"{what} holds more than {max_nodes:,} values once its aliases (&anchor/*alias) are "
                "expanded; write the values out or use fewer nested aliases"
            )
        if depth > max_depth:
            raise BoundsError(
                f"{what} nests deeper than {max_depth} levels (or an alias refers to itself); flatten it"
            )
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
            stack.extend((k, depth + 1) for k in node if isinstance(k, tuple))
        elif isinstance(node, list | tuple | set | frozenset):
            stack.extend((v, depth + 1) for v in node)
    return obj


def loads_json(text: str | bytes, what: str, allow_nan: bool = True) -> Any:
    """Parse JSON within the bounds of :func:`check_tree`.

    Args:
        text: the document.
        what: names the document in errors (``"eval record results/x/task0/eval.json"``).
        allow_nan: accept the non-standard literals ``NaN``, ``Infinity``, ``-Infinity``.

    Raises:
        BoundsError: nested too deep or too large.
        ValueError: not JSON (``json.JSONDecodeError``), or a non-finite literal when not allowed.
    """

    def _no_constant(name: str) -> float:
        raise ValueError(f"{what} holds the non-standard JSON literal {name}")

    try:
        value = json.loads(text, **({} if allow_nan else {"parse_constant": _no_constant}))
    except RecursionError:
        raise BoundsError(
            f"{what} nests deeper than Python can parse; it is not a file dmnsp wrote"
        ) from None
    return check_tree(value, what)

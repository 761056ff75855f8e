"""Run configuration: load, validate against the packaged JSON schema, fill defaults, hash.

A run config is a plain dict (YAML on disk). Validation happens once, here, so every later
step can trust the keys it reads.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import os
import re
import string
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator

from . import methods
from .architectures import check_model_name, tower_widths
from .bounded import BoundsError, check_tree, read_regular_text
from .errors import ConfigError, run_schema
from .methods.base import fill_nulls
from .methods.dmnsp import MODE_DEFAULTS

# Keys that say where things are or how fast to run, not what is computed: they may differ
# between a checkpoint and the run that resumes it.
EXECUTION_KEYS = frozenset(
    {
        "dataset_root",
        "download",
        "cache_dir",
        "device",
        "num_workers",
        "threads",
        "eval_batch_size",
        "evaluate_on",
    }
)


_FLOAT_MAX = 1.7976931348623157e308  # sys.float_info.max: larger integers overflow float()

# Keys that hold a path, checked for a ``~user`` that names no user (os.path.expanduser keeps it).
PATH_KEYS = ("dataset_root", "cache_dir", "pretrained", "class_order")


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where ``1e-4`` (no dot) is a string; read it as a float. A key
    written twice in one mapping is an error (PyYAML keeps the last value silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *anchor` merges are overridden on purpose
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:
                    continue  # unhashable keys: the base class reports them
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping",
                        node.start_mark,
                        f"duplicate key {key!r}: write each key once",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


class YAMLBoundsError(yaml.YAMLError, BoundsError):
    """A YAML document past :mod:`dmnsp.bounded`'s bounds (an alias bomb, nesting too deep): a
    ``yaml.YAMLError``, so every reader that reports malformed YAML reports it the same way."""


class YAMLValueError(yaml.YAMLError):
    """A scalar PyYAML recognises but cannot build (``2023-13-45`` read as a date, ``!!int abc``, an
    integer of more than 4300 digits): PyYAML raises a bare ValueError; this reports it as YAML."""


def load_yaml(text: str, what: str = "the YAML document"):
    """YAML as users write it: ``1e-4`` is a number; a duplicate key is an error (yaml.YAMLError),
    as is a document past the bounds of :func:`dmnsp.bounded.check_tree` (an alias bomb) or a
    scalar that cannot be built (:class:`YAMLValueError`)."""
    try:
        value = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
        return check_tree(value, what)
    except (BoundsError, RecursionError) as exc:
        message = str(exc) if isinstance(exc, BoundsError) else f"{what} nests too deep to parse; flatten it"
        raise YAMLBoundsError(message) from None
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:
        # Constructors of dates, tagged scalars and huge integers fail outside PyYAML's own errors.
        problem = " ".join(str(exc).split())[:200]
        raise YAMLValueError(f"a value cannot be read ({problem}); quote it to keep it as text") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line (PyYAML spreads context, problem and position over several)."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if problem:
        return problem + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark else "")
    return " ".join(str(exc).split())


def read_text_file(path: str | Path, what: str, error: type[ConfigError] = ConfigError) -> str:
    """The UTF-8 text of a user's file; a missing, unreadable, non-UTF-8, oversized or irregular
    (folder, FIFO) file raises ``error`` naming ``what``, the path and the fix."""
    path = Path(path)
    try:
        return read_regular_text(path, what)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except BoundsError as exc:
        raise error(str(exc)) from None
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror or exc}); check its permissions") from None


def _fill_defaults(cfg: dict, schema: Mapping) -> dict:
    out = dict(cfg)
    for key, sub in schema.get("properties", {}).items():
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        if sub.get("type") == "object" and isinstance(out.get(key), dict):
            out[key] = _fill_defaults(out[key], sub)
    return out


def _key_path(error) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def _short(text: str, limit: int = 300) -> str:
    """A message part cut to ``limit`` characters, its middle dropped (jsonschema quotes the whole
    offending value at the start and says what is wrong with it at the end)."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "\u2026" + text[len(text) - (limit - 1 - head) :]


def _describe(error) -> str:
    return " ".join(_describe_long(error).split())  # one line, whatever the values hold


def _describe_long(error) -> str:
    path = _key_path(error)
    if error.validator == "additionalProperties":
        # Name the unknown key and suggest the closest valid one (typos are the usual cause).
        parent = error.schema if isinstance(error.schema, Mapping) else {}
        allowed = sorted(parent.get("properties", {}))
        extras = sorted(set(error.instance) - set(allowed), key=str)
        hints = [] if len(extras) <= 5 else [f"and {len(extras) - 5} more"]
        for key in reversed(extras[:5]):
            close = difflib.get_close_matches(key, allowed, n=1)
            hints.append(f"'{_short(str(key), 60)}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        where = "" if path == "<top level>" else f" in '{path}'"
        return f"unknown key {', '.join(reversed(hints))}{where}; valid keys: {', '.join(allowed)}"
    if error.validator == "enum":
        return f"'{path}': {_short(repr(error.instance))} is not one of {error.validator_value}"
    if error.validator in ("maxItems", "maxLength"):
        # Name the bound and the size, without quoting a huge value back.
        unit = "items" if error.validator == "maxItems" else "characters"
        return (
            f"'{path}': {len(error.instance):,} {unit}, more than the {error.validator_value:,} allowed"
            + _bound_reason(error)
        )
    if error.validator in ("maximum", "minimum"):
        word = "greater than the maximum" if error.validator == "maximum" else "less than the minimum"
        return f"'{path}': {_short(repr(error.instance), 60)} is {word} of {error.validator_value}"
    reason = _bound_reason(error) if error.validator in ("pattern", "not", "const") else ""
    return f"'{_short(path, 200)}': {_short(error.message)}{reason}"


def _bound_reason(error) -> str:
    """The schema's description of a bounded key, so the message says why the bound is there."""
    description = (error.schema or {}).get("description") if isinstance(error.schema, Mapping) else None
    return f" ({description.rstrip('.')})" if description else ""


def validate(cfg: Mapping[str, Any] | None) -> dict:
    """Validate a run configuration, fill defaults and resolve derived settings.

    Args:
        cfg: the user's keys (missing keys take the schema defaults).

    Returns:
        A new dict with every key present.

    Raises:
        ConfigError: naming the first offending key.
    """
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, Mapping):
        raise ConfigError(
            f"a run configuration must be a mapping of keys to values, got {type(cfg).__name__}"
        )
    schema = run_schema()
    _check_keys_and_numbers(cfg, schema)
    validator = Draft202012Validator(schema)
    errors = sorted(
        validator.iter_errors(dict(cfg)), key=lambda e: (len(e.absolute_path), str(e.absolute_path))
    )
    if errors:
        raise ConfigError("invalid run configuration: " + _describe(errors[0]))
    out = _fill_defaults(_with_method_defaults(cfg, schema), schema)
    return _resolve(out)


def _with_method_defaults(cfg: Mapping[str, Any], schema: Mapping) -> dict:
    """The method's own defaults for the config's dataset and split (:func:`dmnsp.methods.defaults_for`,
    the official settings) for the keys the config leaves unset; the schema's defaults fill the rest."""
    props = schema["properties"]

    def given(key: str) -> Any:
        return cfg.get(key, props[key].get("default"))

    split = f"{given('initial_increment')}-{given('increment')}"
    out = copy.deepcopy(dict(cfg))
    for key, value in methods.defaults_for(given("method"), given("dataset"), split).items():
        node: Any = out
        for part in key.split("."):
            node = node.get(part, _UNSET) if isinstance(node, Mapping) else _UNSET
        if node is _UNSET:
            set_dotted(out, key, copy.deepcopy(value))
    return out


_UNSET = object()


def _check_keys_and_numbers(cfg: Mapping, schema: Mapping, prefix: str = "") -> None:
    """What JSON Schema lets through: non-string keys (YAML allows them), NaN/inf, and integral
    floats on integer keys (2.0 counts as an integer there, but range() and DataLoader refuse it)."""
    props = schema.get("properties", {})
    for key, value in cfg.items():
        if not isinstance(key, str):
            raise ConfigError(
                f"invalid run configuration: key {key!r} in {prefix or 'the top level'} is not a name"
            )
        name = prefix + key
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"invalid run configuration: '{name}': {value} is not a finite number")
        prop = props.get(key, {})
        types = prop.get("type", [])
        types = [types] if isinstance(types, str) else types
        if isinstance(value, float) and "integer" in types and "number" not in types:
            raise ConfigError(
                f"invalid run configuration: '{name}': {value} must be a whole number like {int(value)}"
            )
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and "number" in types
            and abs(value) > _FLOAT_MAX
        ):
            raise ConfigError(
                f"invalid run configuration: '{name}': {len(str(abs(value)))}-digit number is not finite as a float"
            )
        if isinstance(value, list) and len(value) > prop.get("maxItems", len(value)):
            # Before jsonschema, which would check every item of a list too long to use anyway.
            raise ConfigError(
                f"invalid run configuration: '{name}': {len(value):,} items, more than the "
                f"{prop['maxItems']:,} allowed"
            )
        if isinstance(value, Mapping) and "object" in types:
            _check_keys_and_numbers(value, props[key], name + ".")


def check_template(key: str, template: str) -> None:
    """A prompt template holds exactly one ``{}`` (the class name) and nothing else to fill in."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        ok = fields == [""] and template.format("x") != template.format("y")
        problem = f"{len(fields)} fields to fill" if fields != [""] else "no class name slot"
    except ValueError as exc:  # unbalanced braces
        ok, problem = False, str(exc)
    if not ok:
        raise ConfigError(
            f"'{key}': {template!r} must hold exactly one {{}} for the class name ({problem}); "
            "write other braces doubled, e.g. 'a photo of a {}.'"
        )


def _resolve(cfg: dict) -> dict:
    """Derived settings that depend on other keys (kept explicit in the resolved config)."""
    proj = cfg["projection"]
    method = methods.get(cfg["method"])
    if proj["towers"] is None:
        proj["towers"] = method.default_towers
    if method.default_towers == "none" and proj["towers"] != "none":
        projecting = [n for n in methods.names() if methods.get(n).default_towers != "none"]
        raise ConfigError(
            f"'projection.towers': {proj['towers']!r} needs method {' or '.join(map(repr, projecting))} "
            f"(method is {cfg['method']!r}); set method: {projecting[0]} or projection.towers: none"
        )
    fill_nulls(proj, MODE_DEFAULTS[proj["mode"]])
    if cfg["optimizer"]["numerics"] is None:  # the reference ran torch's foreach AdamW on a GPU
        cfg["optimizer"]["numerics"] = methods.NUMERICS_BY_MODE[proj["mode"]]
    if cfg["logit_scale"] is None:  # the reference scales by the loaded checkpoint's exp(logit_scale)
        cfg["logit_scale"] = methods.LOGIT_SCALE_BY_MODE[proj["mode"]]
    elif cfg["logit_scale"] != "checkpoint":  # 100 and 100.0: one setting, one config hash
        cfg["logit_scale"] = float(cfg["logit_scale"])
    if proj["energy_threshold"] is not None and proj["basis"] != "orthonormal":
        raise ConfigError("'projection.energy_threshold' needs projection.basis: orthonormal")
    if cfg["eval_transform"] is None:
        cfg["eval_transform"] = "train" if proj["mode"] == "faithful" else "center"
    check_template("prompt_template", cfg["prompt_template"])
    for i, template in enumerate(cfg["pretrain"]["templates"]):
        check_template(f"pretrain.templates[{i}]", template)
    for key in PATH_KEYS:
        check_home(key, cfg[key])
    check_model_name(cfg["model_name"])
    if cfg["val_fraction"] == 0 and cfg["evaluate_on"] == "val":
        raise ConfigError("'evaluate_on': val needs val_fraction > 0")
    _check_widths(cfg)
    method.resolve(cfg)
    return cfg


def check_home(key: str, value: Any) -> None:
    """A path setting that starts with ``~`` must expand: ``~nosuchuser/data`` (or ``~`` without a
    home folder) would otherwise reach the data or model loader as a literal folder name, or fail
    there with pathlib's RuntimeError."""
    if not isinstance(value, str) or not value.startswith("~"):
        return
    if os.path.expanduser(value).startswith("~"):
        user = value[1:].split("/", 1)[0]
        whose = (
            f"of {_short(repr(user), 60)}, but there is no such user on this machine"
            if user
            else "of whoever runs it, but this process has no home folder (HOME)"
        )
        raise ConfigError(
            f"'{key}': {_short(repr(value), 100)} starts with the home folder {whose}; write the full path"
        )


def _check_widths(cfg: dict) -> None:
    """Settings bounded by the model's width: the adapter bottleneck (of every expert, MoE's) fits
    inside each tower, unless the method has no adapters (RAPF ignores adapter_dim), and TOP_SELECT
    leaves null-space directions in every tower whose bases dmnsp builds."""
    widths = tower_widths(cfg["model_name"])
    if not widths:
        return
    tower, width = min(widths.items(), key=lambda item: item[1])
    if cfg["adapter_dim"] > width and "adapter_dim" not in methods.get(cfg["method"]).ignores:
        raise ConfigError(
            f"'adapter_dim': {cfg['adapter_dim']} is wider than {cfg['model_name']}'s {tower} tower "
            f"({width}); a bottleneck is at most the width: set adapter_dim to {width} or less"
        )
    if cfg["method"] != "dmnsp":
        return
    towers = ["visual", "text"] if cfg["projection"]["towers"] == "both" else ["visual"]
    for tower in towers:
        width = widths.get(tower)
        if width is not None and cfg["TOP_SELECT"] >= width:
            raise ConfigError(
                f"'TOP_SELECT': {cfg['TOP_SELECT']} leaves no null space in {cfg['model_name']}'s {tower} tower "
                f"(width {width}; the basis keeps the directions after the first TOP_SELECT): "
                f"set TOP_SELECT to at most {width - 1}"
            )


def read_yaml_file(path: str | Path, what: str, error: type[ConfigError] = ConfigError) -> Any:
    """Parse a YAML file the way users write it (``1e-4`` is a number); a missing or malformed
    file raises ``error`` naming ``what`` and the path."""
    text = read_text_file(path, what, error)
    try:
        return load_yaml(text, f"{what} {path}")
    except YAMLBoundsError as exc:
        raise error(str(exc)) from None
    except yaml.YAMLError as exc:
        raise error(f"{what} {path} is not valid YAML: {_yaml_problem(exc)}") from None


def check_workflow_config(
    config: Any, files: Iterable[str | Path] = (), schema: str | Path | None = None
) -> None:
    """Refuse a workflow config before Snakemake's schema validation walks it (the Snakefile calls
    this first): each of ``files`` is read again with dmnsp's bounded reader, which refuses what
    Snakemake's own reader lets through (a key written twice, text that is not UTF-8, nesting
    deeper than Python can parse), and the loaded ``config`` is walked within the node and depth
    bounds of :func:`dmnsp.bounded.check_tree` (a YAML alias bomb loads in microseconds and explodes
    only when something walks it). With ``schema`` (the workflow's JSON schema file), the config is
    validated against it here too, so a violation is one line naming the key (Snakemake's own
    ``validate`` prints the schema over a dozen lines).

    Raises:
        ConfigError: one line naming the file or the problem.
    """
    for path in files:
        read_yaml_file(path, "workflow config")
    try:
        check_tree(config, "the workflow config")
    except BoundsError as exc:
        raise ConfigError(str(exc)) from None
    if schema is not None:
        rules = yaml.safe_load(Path(schema).read_text())
        errors = Draft202012Validator(rules).iter_errors(config)
        first = min(errors, key=lambda e: (len(e.absolute_path), str(e.absolute_path)), default=None)
        if first is not None:
            raise ConfigError(_describe(first))


def class_order_list(content: Any, source: str, error: type[ConfigError] = ConfigError) -> list:
    """The class order a class-order file holds, in either of its two shapes: a bare YAML list of
    ids (``[3, 1, 2]``) or a mapping with a ``class_order`` list (``class_order: [3, 1, 2]``).
    The ids themselves are checked against the dataset later (:func:`dmnsp.scenario.resolve_class_order`)."""
    order = content.get("class_order") if isinstance(content, dict) else content
    if not isinstance(order, list):
        raise error(f"{source} must hold a list of class ids or a mapping with a `class_order:` list")
    return order


def read_class_order_file(path: str | Path, error: type[ConfigError] = ConfigError) -> list:
    """Read a class-order file (either shape of :func:`class_order_list`); the planner and the
    task jobs both read class orders here, so they agree on what a file holds."""
    path = os.path.expanduser(path)  # "~/orders/x.yaml"; a ~user with no user stays (and is not found)
    return class_order_list(
        read_yaml_file(path, "class_order file", error), f"class_order file {path}", error
    )


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> dict:
    """Read a YAML run config, apply ``overrides`` (dotted keys allowed) and validate it."""
    raw: dict = {}
    if path is not None:
        raw = read_yaml_file(path, "config file") or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(raw).__name__}")
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return validate(raw)


def set_dotted(cfg: dict, key: str, value: Any) -> None:
    """Set ``a.b.c`` style keys in a nested dict, creating levels as needed."""
    parts = key.split(".")
    node = cfg
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{key}': '{part}' is not a mapping")
    node[parts[-1]] = value


def parse_overrides(items: list[str] | None) -> dict:
    """``["lr=0.01", "projection.mode=clean"]`` → dict, values parsed as YAML scalars."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override '{_short(item, 120)}' must look like key=value")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = load_yaml(value)
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"override '{_short(item, 120)}': the value is not valid YAML ({_short(_yaml_problem(exc))}); quote it, "
                "e.g. --set 'prompt_template=\"a photo of a {}.\"'"
            ) from None
    return out


def state_config(cfg: Mapping) -> dict:
    """The part of a config that determines a run's task state (execution keys removed)."""
    return {k: v for k, v in cfg.items() if k not in EXECUTION_KEYS}


def config_hash(cfg: Mapping) -> str:
    """Stable short hash of the state-determining part of a resolved config."""
    blob = json.dumps(state_config(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_diff(a: Mapping, b: Mapping, prefix: str = "") -> list[str]:
    """Human-readable differences between two (nested) configs, for error messages."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} != {vb!r}")
    return out


def dump_config(cfg: Mapping, path: str | Path) -> None:
    """Write a config as YAML (atomically, so a killed job never leaves half a file)."""
    from .io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(dict(cfg), sort_keys=False))

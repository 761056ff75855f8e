"""Import a reference-code Hydra config (class-incremental CLIP) as a dmnsp experiment.

The reference configs are flat YAML files (``class_order``, ``dataset_root``, ``model_name``,
``batch_size``, ``increment``, ``initial_increment``, ``method``, ``lr`` ...) plus a ``hydra:``
block. :func:`import_hydra_config` maps them onto an experiment spec of the workflow config
(``config/README.md``), keeping the reference's key names for the run-level keys. Settings dmnsp
does not implement (task-incremental scenarios, the L2 and CE variants of other methods) are
refused with the key named, never silently dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import methods
from .bounded import BoundsError, check_tree
from .config import ConfigError, read_yaml_file, validate

# Keys that only say where the reference code writes logs or how Hydra runs: dmnsp's workflow
# decides its own paths, so they are ignored.
IGNORED_KEYS = frozenset({"hydra", "defaults", "workdir", "log_path"})

# Reference keys that map one to one onto dmnsp run keys (same name, same meaning).
RUN_KEYS = (
    "class_order",
    "dataset_root",
    "initial_increment",
    "increment",
    "model_name",
    "prompt_template",
    "batch_size",
    "lr",
    "weight_decay",
    "ls",
    "epochs",
    "TOP_SELECT",
    "TOP_K_RATIO",
    "LAMBDA_SCALE",
    "seed",
)
NUMERIC_KEYS = frozenset({"lr", "weight_decay", "ls", "TOP_K_RATIO", "LAMBDA_SCALE"})
INTEGER_KEYS = frozenset({"initial_increment", "increment", "batch_size", "epochs", "TOP_SELECT", "seed"})

# Keys the reference's TinyImageNet files carry but its code never reads (left over from the code
# base it grew from, where they configure weight ensembling and reference-data distillation). Each
# imports with a note when empty or at the official files' value; any other value asks for a
# feature neither the reference nor dmnsp has, so it stops the import.
UNREAD_KEYS: dict[str, tuple] = {"we": (), "avg_freq": (), "ref_dataset": (), "ref_sentences": ("random",)}

# Reference settings that dmnsp supports only at one value.
REQUIRED_VALUES = {"scenario": ("class",), "l2": (0, 0.0), "ce_method": (0, 0.0)}

# Every registered method by its name, plus the reference codes' other spellings (MoE-Adapters4CL's
# configs say "MoE-Adapters"; RAPF's configs name no method, so they do not import).
METHODS = {
    **{name: name for name in methods.names()},
    "zero_shot": "zeroshot",
    "moe-adapters": "moe_adapters",
    "moe_adapters4cl": "moe_adapters",
    "moe-adapters4cl": "moe_adapters",
}
DATASETS = {
    "cifar100": "cifar100",
    "tinyimagenet": "tinyimagenet",
    "tiny_imagenet": "tinyimagenet",
    "tiny-imagenet": "tinyimagenet",
    "fashion-mnist": "fashion-mnist",
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "imagefolder": "imagefolder",
}

_INTERPOLATION = re.compile(r"\$\{([^${}]+)\}")

# Interpolation bounds: a chain of references (``a: ${b}``, ``b: ${c}``, ...) at most this long, and a
# string built by substitution at most this many characters. Real reference configs chain 2 deep
# and build paths of < 200 characters; ``b: ${a}${a}...`` nested ten levels would build 10^10.
MAX_INTERPOLATION_DEPTH = 16
MAX_RESOLVED_CHARS = 65_536


def resolve_interpolations(cfg: Mapping[str, Any]) -> dict:
    """Resolve OmegaConf-style ``${key}`` references between top-level keys.

    A value that is exactly ``"${key}"`` takes the referenced value with its type; a reference
    inside a longer string is substituted as text. Nested and chained references resolve;
    unknown keys, Hydra resolvers (``${now:...}``) and cycles raise :class:`ConfigError`, as do a
    chain deeper than :data:`MAX_INTERPOLATION_DEPTH` and a string longer than
    :data:`MAX_RESOLVED_CHARS` (an interpolation bomb), before it is built.
    """
    out = dict(cfg)

    def resolve(key: str, stack: tuple[str, ...]) -> Any:
        if key in stack:
            raise ConfigError(f"'{stack[0]}': interpolation cycle {' -> '.join((*stack, key))}")
        if len(stack) >= MAX_INTERPOLATION_DEPTH:
            raise ConfigError(
                f"'{stack[0]}': interpolations nest more than {MAX_INTERPOLATION_DEPTH} deep "
                f"({' -> '.join(stack[:4])} -> ...); refer to the values directly"
            )
        value = out[key]
        if not isinstance(value, str) or "${" not in value:
            return value
        whole = _INTERPOLATION.fullmatch(value.strip())
        if whole:
            out[key] = lookup(whole.group(1), (*stack, key))
        else:
            out[key] = substitute(key, value, (*stack, key))
        return out[key]

    def substitute(key: str, value: str, stack: tuple[str, ...]) -> str:
        pieces, size, end = [], 0, 0
        for match in _INTERPOLATION.finditer(value):
            text = value[end : match.start()]
            part = lookup(match.group(1), stack)
            for piece in (text, part if isinstance(part, str) else str(part)[: MAX_RESOLVED_CHARS + 1]):
                size += len(piece)
                pieces.append(piece)
            end = match.end()
            if size > MAX_RESOLVED_CHARS:
                raise ConfigError(
                    f"'{stack[0]}': its interpolations build a string of more than {MAX_RESOLVED_CHARS:,} "
                    "characters; write the value out"
                )
        pieces.append(value[end:])
        return "".join(pieces)

    def lookup(ref: str, stack: tuple[str, ...]) -> Any:
        ref = ref.strip()
        if ":" in ref or ref not in out:
            raise ConfigError(
                f"'{stack[-1]}': cannot resolve interpolation '${{{ref}}}' (only top-level keys)"
            )
        return resolve(ref, stack)

    for key in list(out):
        if key not in IGNORED_KEYS:
            resolve(key, ())
    try:
        # Whole-value references share objects: ten keys naming one large list are ten lists.
        return check_tree(out, "the Hydra config with its interpolations resolved")
    except BoundsError as exc:
        raise ConfigError(str(exc)) from None


def open_clip_model_name(name: str) -> str:
    """OpenAI CLIP names as the reference code writes them → open_clip names (``ViT-B/16`` → ``ViT-B-16``)."""
    text = str(name).strip()
    match = re.fullmatch(r"(ViT-[A-Za-z]+)/(\d+)(?:@(\d+)px)?", text)
    if match:
        base = f"{match.group(1)}-{match.group(2)}"
        return f"{base}-{match.group(3)}" if match.group(3) else base
    return text


def _number(key: str, value: Any) -> Any:
    """Numbers the reference writes PyYAML reads as strings (``lr: 1e-3``) → floats/ints."""
    shown = repr(value)[:60]
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"'{key}': expected a number, got {shown}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"'{key}': expected a number, got {shown}")
    if key in INTEGER_KEYS:
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"'{key}': expected an integer, got {shown}")
        return int(value)
    try:
        return float(value) if key in NUMERIC_KEYS else value
    except OverflowError:
        raise ConfigError(
            f"'{key}': {len(str(value))}-digit number is not finite; write a real setting"
        ) from None


def _unread_keys(cfg: Mapping[str, Any]) -> list[str]:
    """Notes for the reference's never-read keys; raises for one set to a value that asks for more."""
    notes = []
    for key, official in UNREAD_KEYS.items():
        if key not in cfg:
            continue
        value = cfg[key]
        if value not in (None, "") and str(value).strip() not in official:
            raise ConfigError(
                f"'{key}': {repr(value)[:60]} is not supported; the reference code never reads '{key}' and dmnsp does "
                f"not implement it: leave it empty{f' or {official[0]!r}' if official else ''}, or delete it"
            )
        notes.append(key)
    if not notes:
        return []
    return [
        f"ignored {', '.join(notes)}: keys the reference code never reads (empty or at the official value)"
    ]


def convert_hydra_config(raw: Mapping[str, Any], notes: list[str] | None = None) -> dict:
    """Map a loaded reference Hydra config onto a dmnsp experiment spec.

    Args:
        raw: the reference YAML as a mapping.
        notes: when given, receives one line per ignored key group (for the user to read).

    Returns:
        ``{"datasets": [...], "splits": ["I-I"], "methods": [...], "run": {...}}``; the run keys
        keep the reference names and are validated against dmnsp's run schema.

    Raises:
        ConfigError: naming the unsupported key or value.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a Hydra config must be a mapping of keys, got {type(raw).__name__}")
    odd = [key for key in raw if not isinstance(key, str)]
    if odd:
        raise ConfigError(f"key {odd[0]!r} is not a name; Hydra configs map names to values")
    cfg = resolve_interpolations(raw)
    known = IGNORED_KEYS | set(RUN_KEYS) | set(REQUIRED_VALUES) | set(UNREAD_KEYS) | {"dataset", "method"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(
            f"'{unknown[0]}': the reference key is not supported by dmnsp"
            + (f" (nor {', '.join(repr(k) for k in unknown[1:])})" if len(unknown) > 1 else "")
            + f"; supported keys: {', '.join(sorted(known - IGNORED_KEYS - set(UNREAD_KEYS)))}"
        )
    found = _unread_keys(cfg)
    if notes is not None:
        notes.extend(found)
    for key, allowed in REQUIRED_VALUES.items():
        if key in cfg and cfg[key] not in allowed and str(cfg[key]).strip() not in map(str, allowed):
            raise ConfigError(
                f"'{key}': {repr(cfg[key])[:60]} is not supported; dmnsp implements only {key}: {allowed[0]!r}"
            )

    run: dict[str, Any] = {}
    for key in RUN_KEYS:
        if key not in cfg:
            continue
        value = cfg[key]
        if key in ("class_order", "dataset_root") and value in ("", None):
            continue  # "" means the dataset's standard order / the default folder
        if key in NUMERIC_KEYS or key in INTEGER_KEYS:
            value = _number(key, value)
        if key == "model_name":
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(
                    f"'model_name': {repr(value)[:60]} is not a model name; write one, e.g. ViT-B/16, or delete the "
                    "key for dmnsp's default (ViT-B-16)"
                )
            value = open_clip_model_name(value)
        run[key] = value
    if "model_name" in run and run["model_name"].startswith(("ViT-", "RN")):
        run["pretrained"] = "openai"

    spec: dict[str, Any] = {}
    check = dict(run)  # every imported setting validated before the spec is built from it
    if "initial_increment" in run or "increment" in run:
        check["initial_increment"] = run.get("initial_increment", run.get("increment"))
        check["increment"] = run.get("increment", check["initial_increment"])
    if "dataset" in cfg:
        name = str(cfg["dataset"]).strip().lower()
        if name not in DATASETS:
            raise ConfigError(
                f"'dataset': {repr(cfg['dataset'])[:60]} is not supported; use one of {sorted(set(DATASETS.values()))}"
            )
        spec["datasets"] = [DATASETS[name]]
        check["dataset"] = DATASETS[name]
    if "method" in cfg:
        name = str(cfg["method"]).strip().lower()
        if name not in METHODS:
            raise ConfigError(
                f"'method': {repr(cfg['method'])[:60]} is not supported; use one of {sorted(set(METHODS.values()))}"
            )
        check["method"] = METHODS[name]
    validate(check)
    if "initial_increment" in run or "increment" in run:
        initial = run.pop("initial_increment", run.get("increment"))
        increment = run.pop("increment", initial)
        spec["splits"] = [f"{initial}-{increment}"]
    if "method" in check:
        spec["methods"] = [check["method"]]
    if "seed" in run:
        spec["seeds"] = [run.pop("seed")]
    spec["run"] = run
    return spec


def import_hydra_config(path: str | Path, notes: list[str] | None = None) -> dict:
    """Read a reference Hydra YAML file and return the dmnsp experiment spec (see :func:`convert_hydra_config`)."""
    path = Path(path)
    raw = read_yaml_file(path, "Hydra config")
    try:
        return convert_hydra_config(raw or {}, notes)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def experiment_name(spec: Mapping[str, Any], fallback: str = "imported") -> str:
    """A readable experiment name from an imported spec: ``cifar100-10-10-dmnsp``."""
    parts = [*spec.get("datasets", []), *spec.get("splits", []), *spec.get("methods", [])]
    return "-".join(str(p) for p in parts) or fallback


def hydra_workflow_config(path: str | Path, name: str | None = None, notes: list[str] | None = None) -> dict:
    """A complete workflow config (``{"experiments": {name: spec}}``) from a reference Hydra file."""
    spec = import_hydra_config(path, notes)
    return {"experiments": {name or experiment_name(spec): spec}}

"""open_clip architectures by name, read from their JSON configs without importing open_clip or
building a model: the names, their tower widths and embedding width (dmnsp.config checks
model_name and the widths with them)."""

from __future__ import annotations

import difflib
import importlib.util
import re
from functools import cache
from importlib import resources
from pathlib import Path

from .bounded import loads_json, read_regular_text
from .errors import ConfigError

#: An architecture name: open_clip's (ViT-B-16, convnext_base_w, RN50x4, ...) and the package's
#: own (dmnsp-tiny). Not a path: ``model_name`` never names a file to read.
ARCHITECTURE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def architecture_folders() -> list[Path]:
    """Where architecture JSON configs live: the package's own, then open_clip's (no import)."""
    folders = [Path(str(resources.files("dmnsp").joinpath("model_configs")))]
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        folders += [Path(p) / "model_configs" for p in spec.submodule_search_locations]
    return folders


@cache
def architecture_names() -> tuple[str, ...]:
    """Every architecture name with a JSON config in :func:`architecture_folders` (what open_clip's
    ``list_models`` gives, with the package's own), sorted."""
    return tuple(
        sorted(
            {p.stem for folder in architecture_folders() if folder.is_dir() for p in folder.glob("*.json")}
        )
    )


def check_model_name(model_name: str) -> None:
    """``model_name`` is a known architecture name: never a path (``../x`` would read any ``x.json``
    on the machine as the architecture), never a name without a config."""
    known = architecture_names()
    if isinstance(model_name, str) and ARCHITECTURE_NAME.match(model_name) and model_name in known:
        return
    close = difflib.get_close_matches(str(model_name), known, n=3)
    raise ConfigError(
        f"unknown model_name {model_name!r}"
        + (f"; did you mean {', '.join(close)}?" if close else "")
        + " (`python -m dmnsp list-models` lists all: give a name, never a path; note open_clip writes "
        "ViT-B-16, not ViT-B/16)"
    )


@cache
def architecture(model_name: str) -> dict:
    """An open_clip architecture's JSON config (the package's own or open_clip's), read without
    importing or building anything; empty when the architecture is not found that way."""
    check_model_name(model_name)
    for folder in architecture_folders():
        path = folder / f"{model_name}.json"
        if path.is_file():
            try:
                arch = loads_json(read_regular_text(path, "architecture config", 2**20), str(path))
            except (OSError, ValueError) as exc:  # BoundsError and JSONDecodeError are ValueErrors
                raise ConfigError(
                    f"architecture config {path} of {model_name} is damaged ({exc}); reinstall the package "
                    "that holds it"
                ) from None
            return arch if isinstance(arch, dict) else {}
    return {}


@cache
def tower_widths(model_name: str) -> dict[str, int]:
    """Residual-stream widths of an open_clip architecture's towers (``{"visual": 768, "text": 512}``),
    from :func:`architecture`; empty when the architecture is not found that way or gives no width."""
    arch = architecture(model_name)
    cfgs = {"visual": arch.get("vision_cfg"), "text": arch.get("text_cfg")}
    # Only transformer towers (an int layer count; ResNets list stages) carry adapters.
    return {
        tower: int(c["width"])
        for tower, c in cfgs.items()
        if isinstance(c, dict) and type(c.get("width")) is int and type(c.get("layers")) is int
    }


def embed_dim(model_name: str) -> int | None:
    """The width of an architecture's joint image-text embedding (``encode_image``'s output), from
    :func:`architecture`; None when it does not say."""
    value = architecture(model_name).get("embed_dim")
    return value if type(value) is int else None

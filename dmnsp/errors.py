"""Errors every module may raise, and the run config's schema, importable without dmnsp.config
(which imports the methods) or dmnsp.train (which the methods' hooks serve): no import cycle."""

from __future__ import annotations

from functools import cache
from importlib import resources

import yaml


class ConfigError(ValueError):
    """A run configuration is malformed; the message names the key and the fix."""


class NonFiniteError(FloatingPointError):
    """Loss or parameters became NaN/inf; names task, step and tensor."""


@cache
def run_schema() -> dict:
    """The JSON schema (draft 2020-12) of a run configuration."""
    text = resources.files("dmnsp").joinpath("schemas/run.schema.yaml").read_text()
    return yaml.safe_load(text)

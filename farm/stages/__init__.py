"""Stages a worker runs: quantize, evaluate. Plain functions with typed inputs and results; no Ray here."""

from __future__ import annotations

import importlib
from typing import Any


def call(path: str, *args: Any) -> Any:
    """Call the stage function named "module:function" (how methods and backends name their stages)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)(*args)

"""Stages a worker runs: quantize, evaluate. Plain functions with typed inputs and results; no Ray here."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any


def call(path: str, *args: Any) -> Any:
    """Call the function named "module:function": how a backend names the quantize step that runs in its own
    Python environment (a Ray task there imports it by that path; in-process engines are registered by config
    type instead, stages/engines/registry.py)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)(*args)


def timed_call(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """`fn(*args)` and the seconds it took (for work handed to a thread beside the main one)."""
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0

"""Which engine quantizes a method config, looked up by the config's type.

Each engine module registers the config type it serves (torchao's `register_quantize_module_handler`), with a
condition on the config where one type has several engines (GPTQ through GPTQModel, FP8 from the shards).
A config no engine takes goes through llm-compressor's oneshot with its `modifiers()` (stages/quantize.py).
Adding an engine is a new module in this package: neither the quantize stage, the worker nor the driver
changes. The engine modules are imported on the first lookup, in the worker (they may import torch).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from farm.stages.quantize import QuantizeRequest, QuantizeResult

Engine = Callable[["QuantizeRequest"], "QuantizeResult"]
C = TypeVar("C")

_ENGINES: dict[type, list[tuple[Callable[[Any], bool], Engine]]] = {}


def register_engine(config_type: type[C], when: Callable[[C], bool] | None = None) -> Callable[[Engine], Engine]:
    """Decorator: the engine quantizes configs of `config_type` (those for which `when` holds)."""

    def add(engine: Engine) -> Engine:
        entries = _ENGINES.setdefault(config_type, [])
        if all(e is not engine for _, e in entries):  # a module imported twice registers once
            entries.append((when or (lambda _config: True), engine))
        return engine

    return add


def engine_for(config: Any) -> Engine | None:
    """The engine registered for this config, or None for llm-compressor's oneshot."""
    _import_engines()
    for when, engine in _ENGINES.get(type(config), []):
        if when(config):
            return engine
    return None


def registered() -> dict[str, list[str]]:
    """Config type name -> its engines' names (for docs and error messages)."""
    _import_engines()
    return {t.__name__: [e.__name__ for _, e in entries] for t, entries in _ENGINES.items()}


def _import_engines() -> None:
    import farm.stages.engines as package

    for module in pkgutil.iter_modules(package.__path__):
        if module.name != "registry":
            importlib.import_module(f"{package.__name__}.{module.name}")

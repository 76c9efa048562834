"""A scoped replacement of one llm-compressor function: how farm's GPU speed-ups (stages/hessian.py,
stages/factor.py) hook into oneshot without forking it.

The replacement is set for one block and restored on exit, also on error. When upstream no longer has the
function, nothing is replaced and a warning says which speed-up is off: the run takes llm-compressor's own path
rather than failing, and the run's notes (which report what each speed-up covered) show it did not apply.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Used(Protocol):
    """What a speed-up did during one oneshot, as a line for the run's notes (None: it did nothing)."""

    def note(self) -> str | None: ...


@contextlib.contextmanager
def swapped(module: Any, name: str, make: Callable[[Any], Any], what: str) -> Iterator[bool]:
    """Within the block `module.name` is `make(original)`; yields whether the swap happened."""
    original = getattr(module, name, None)
    if original is None:
        log.warning("llm-compressor no longer has %s.%s; %s is off", module.__name__, name, what)
        yield False
        return
    setattr(module, name, make(original))
    try:
        yield True
    finally:
        setattr(module, name, original)

"""A scoped replacement of one llm-compressor function: how farm's GPU speed-ups (stages/llmc/hessian_tensor_cores.py,
stages/llmc/gptq_one_cholesky.py, stages/llmc/gptq_left_looking.py) hook into oneshot without forking it. `taken_over`
is the common form: the
calls a speed-up covers go to it and are counted for the run's notes (`Tally`), the others to upstream.

The replacement is set for one block and restored on exit, also on error. When upstream no longer has the
function, nothing is replaced and a warning says which speed-up is off: the run takes llm-compressor's own path
rather than failing, and the run's notes (which report what each speed-up covered) show it did not apply.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from farm.stages.llmc import registry

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
    if not registry.guard(module, name, original):  # an unchecked upstream version or signature: upstream runs
        yield False
        return
    setattr(module, name, make(original))
    try:
        yield True
    finally:
        setattr(module, name, original)


@dataclass
class Stopwatch:
    """Seconds spent inside one swapped function during a block (a phase of a stage that upstream runs inside
    a larger call, such as compressed-tensors' compression inside `save_pretrained`)."""

    seconds: float = 0.0


@contextlib.contextmanager
def timed(module: Any, name: str) -> Iterator[Stopwatch]:
    """Within the block, time every call of `module.name` (unchanged otherwise)."""
    import time

    watch = Stopwatch()

    def make(original: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                watch.seconds += time.perf_counter() - t0

        return call

    with swapped(module, name, make, f"timing {name}"):
        yield watch


@dataclass
class Tally:
    """How much a speed-up took over during one oneshot; `line` formats it (`{n}`) for the run's notes."""

    line: str
    n: int = 0

    def note(self) -> str | None:
        return self.line.format(n=self.n) if self.n else None


@contextlib.contextmanager
def taken_over(
    module: Any,
    name: str,
    covers: Callable[..., bool],
    replacement: Callable[..., Any],
    what: str,
    line: str,
    count: Callable[..., int] = lambda *args, **kwargs: 1,
) -> Iterator[Tally]:
    """Within the block, calls of `module.name` that `covers` go to `replacement` (counted by `count`, for
    the note); all others to the original. `covers` and `count` take the call's arguments under upstream's
    parameter names (llm-compressor passes some by keyword)."""
    tally = Tally(line)

    def make(original: Any) -> Any:
        def dispatch(*args: Any, **kwargs: Any) -> Any:
            if covers(*args, **kwargs):
                tally.n += count(*args, **kwargs)
                return replacement(*args, **kwargs)
            return original(*args, **kwargs)

        return dispatch

    with swapped(module, name, make, what):
        yield tally

"""Fixes for llm-compressor behaviour that breaks on machines without an accelerator.

AWQ pins its cached activations (`IntermediatesCache.pin_memory`) before every grid search so that later
host-to-device copies can be asynchronous. Pinning needs an accelerator; on a CPU-only machine torch raises
"Cannot access accelerator device when none is available". With no accelerator there is no transfer to speed
up, so skipping the pin is exactly right. The guard is scoped (a context manager, undone on exit), applies only
when no accelerator is present, and tests/engine/test_compat.py checks both that upstream still needs it and that
AWQ runs on CPU with it, so an upstream fix or rename shows up as a test result rather than a silent no-op.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from farm.stages.llmc import registry

log = logging.getLogger(__name__)


def accelerator_available() -> bool:
    import torch

    return bool(torch.accelerator.is_available())


class PinningGuard:
    """What the guard did: whether it is active, and how many pin requests it skipped."""

    def __init__(self, active: bool):
        self.active = active
        self.skipped = 0

    def __bool__(self) -> bool:
        return self.active


@contextlib.contextmanager
def cpu_safe_pinning() -> Iterator[PinningGuard]:
    """Within the block, `IntermediatesCache.pin_memory` is a no-op when no accelerator exists."""
    if accelerator_available():
        yield PinningGuard(False)
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = getattr(IntermediatesCache, "pin_memory", None)
    if original is None:
        log.warning("llm-compressor no longer has IntermediatesCache.pin_memory; CPU pinning guard not needed")
        yield PinningGuard(False)
        return
    if not registry.guard(IntermediatesCache, "pin_memory", original):
        yield PinningGuard(False)
        return
    guard = PinningGuard(True)

    def pin_memory(self: object, batch_index: int, input_names: list[str] | None = None) -> None:
        guard.skipped += 1  # nothing to pin for: no accelerator to copy to

    IntermediatesCache.pin_memory = pin_memory  # type: ignore[method-assign]
    try:
        yield guard
    finally:
        IntermediatesCache.pin_memory = original  # type: ignore[method-assign]

"""Fixes for llm-compressor behaviour that breaks on machines without an accelerator.

AWQ pins its cached activations (`IntermediatesCache.pin_memory`) before every grid search so that later
host-to-device copies can be asynchronous. Pinning needs an accelerator; on a CPU-only machine torch raises
"Cannot access accelerator device when none is available". With no accelerator there is no transfer to speed
up, so skipping the pin is exactly right. The guard is scoped (a context manager, undone on exit), applies only
when no accelerator is present, and tests/unit/test_compat.py checks both that upstream still needs it and that
AWQ runs on CPU with it, so an upstream fix or rename shows up as a test result rather than a silent no-op.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

log = logging.getLogger(__name__)


def accelerator_available() -> bool:
    import torch

    return bool(torch.accelerator.is_available())


@contextlib.contextmanager
def cpu_safe_pinning() -> Iterator[bool]:
    """Within the block, `IntermediatesCache.pin_memory` is a no-op when no accelerator exists.

    Yields whether the guard is active."""
    if accelerator_available():
        yield False
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = getattr(IntermediatesCache, "pin_memory", None)
    if original is None:
        log.warning("llm-compressor no longer has IntermediatesCache.pin_memory; CPU pinning guard not needed")
        yield False
        return

    def pin_memory(self: object, batch_index: int, input_names: list[str] | None = None) -> None:
        return None  # nothing to pin for: no accelerator to copy to

    IntermediatesCache.pin_memory = pin_memory  # type: ignore[method-assign]
    try:
        yield True
    finally:
        IntermediatesCache.pin_memory = original  # type: ignore[method-assign]

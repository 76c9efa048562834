"""The CPU fix for llm-compressor's AWQ: upstream still needs it, and AWQ runs on CPU with it.

If upstream stops pinning on CPU, `test_upstream_still_pins_on_cpu` fails (strict xfail turns into a pass),
telling us to delete farm/stages/llmc/cpu_pinning.py rather than keep a patch that does nothing."""

from __future__ import annotations

import pytest
import torch

from farm.stages.llmc.cpu_pinning import accelerator_available, cpu_safe_pinning

cpu_only = pytest.mark.skipif(accelerator_available(), reason="the fix only applies without an accelerator")


def _cache_with_tensor():
    from llmcompressor.pipelines.cache import IntermediatesCache

    cache = IntermediatesCache.empty(1, torch.device("cpu"))
    cache.update(0, {"hidden_states": torch.ones(2, 2)})
    return cache


@cpu_only
@pytest.mark.xfail(raises=RuntimeError, strict=True, reason="llm-compressor 0.14 pins memory without an accelerator")
def test_upstream_still_pins_on_cpu() -> None:
    _cache_with_tensor().pin_memory(0)


@cpu_only
def test_guard_skips_pinning_and_restores() -> None:
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.pin_memory
    with cpu_safe_pinning() as guard:
        assert guard
        cache = _cache_with_tensor()
        cache.pin_memory(0)  # no error
    assert guard.skipped == 1
    assert IntermediatesCache.pin_memory is original

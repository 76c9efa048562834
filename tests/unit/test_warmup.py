"""The first-layer kernel warm-up (stages/warmup.py): it finds the weight arguments farm's GPTQ methods quantize
with, and runs the small solve and fake quantization with them (on CPU here; the GPU run is in the GPU stage
tests and the benchmarks)."""

from __future__ import annotations

import pytest

from farm.methods.registry import build_method
from farm.stages.warmup import warm_kernels, weight_args


@pytest.mark.parametrize(("spec", "expected"), [
    ({"method": "gptq", "group_size": 128}, [(4, "group", 128)]),
    ({"method": "gptq", "group_size": 64, "scheme": "W8A16"}, [(8, "group", 64)]),
    ({"method": "fp8"}, []),  # no GPTQ modifier: GEMM and attention only
])
def test_weight_args_follow_the_method(spec: dict, expected: list) -> None:
    modifiers = build_method(spec).modifiers()
    assert [(a.num_bits, str(a.strategy), a.group_size) for a in weight_args(modifiers)] == expected
    assert warm_kernels(modifiers, "cpu") >= 0

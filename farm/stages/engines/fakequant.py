"""Weights rounded onto an integer grid exactly as llm-compressor's round-to-nearest would (compressed-tensors'
own min-max qparams and fake_quantize), for sensitivity probes and the forward pass of QAT."""

from __future__ import annotations

from typing import Any

from farm.methods.precision import Grid


def round_to_grid(weight: Any, grid: Grid) -> Any:
    """Quantize-dequantize a 2-D weight, per group along the input dimension or per output row."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    rows, cols = weight.shape
    w = weight.detach()
    if grid.group_size and cols % grid.group_size == 0:
        args = QuantizationArgs(
            num_bits=grid.bits, type="int", symmetric=grid.symmetric, strategy="group", group_size=grid.group_size
        )
        g = w.reshape(rows, cols // grid.group_size, grid.group_size)
        lo, hi = g.amin(-1), g.amax(-1)
    else:
        args = QuantizationArgs(num_bits=grid.bits, type="int", symmetric=grid.symmetric, strategy="channel")
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale, zero = calculate_qparams(lo, hi, args)
    return fake_quantize(w, scale, zero, args)

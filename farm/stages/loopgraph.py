"""GPTQ's column loop replayed from CUDA graphs: one capture per module shape, replayed for every layer.

The left-looking loop (stages/leftgptq.py `column_loop`) runs 128 columns at a time through ~20 small kernels
(a triangular solve, two GEMMs, llm-compressor's Triton block update, copies); Llama-8B's down_proj has 112 such
dependent blocks. On an H100 the loop's time hardly depends on the rows (bench/gptq_loop_bench.py): the CPU
launching kernels is the bound, not the GPU. Every decoder layer has the same module shapes, so farm captures
the loop once per shape and replays it: inputs are copied into the graph's own buffers, the recorded kernels run
back to back, the outputs are copied out. Same kernels, same order, so the same numbers as the eager loop.

A graph holds its buffers (weights, factor, outputs of one shape: ~1.3 GB for down_proj's 4096 x 14336) until
the oneshot ends; `LoopGraphs.close` frees them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class _Captured:
    graph: Any
    inputs: tuple[Any, ...]  # W, V, scale, zero_point, global_scale, g_idx: the buffers the graph reads
    outputs: tuple[Any, Any]  # Q, loss


def _key(W: Any, V: Any, scale: Any, zero_point: Any, global_scale: Any, g_idx: Any, quant_args: Any,
         blocksize: int) -> tuple[Any, ...]:
    def sig(t: Any) -> Any:
        return None if t is None else (tuple(t.shape), tuple(t.stride()), t.dtype, t.device)

    return (sig(W), sig(V), sig(scale), sig(zero_point), sig(global_scale), sig(g_idx), blocksize,
            quant_args.model_dump_json())


class LoopGraphs:
    """`run` has `column_loop`'s contract; CUDA inputs go through a graph captured for their shape."""

    def __init__(self) -> None:
        self._graphs: dict[tuple[Any, ...], _Captured] = {}
        self.captures = 0
        self.replays = 0

    def run(self, W: Any, V: Any, scale: Any, zero_point: Any, global_scale: Any, g_idx: Any, quant_args: Any,
            blocksize: int = 128) -> tuple[Any, Any]:
        from farm.stages.leftgptq import column_loop

        if not W.is_cuda:
            return column_loop(W, V, scale, zero_point, global_scale, g_idx, quant_args, blocksize)
        args = (W, V, scale, zero_point, global_scale, g_idx)
        key = _key(W, V, scale, zero_point, global_scale, g_idx, quant_args, blocksize)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._graphs[key] = self._capture(args, quant_args, blocksize)
        for buffer, value in zip(captured.inputs, args, strict=True):
            if buffer is not None:
                buffer.copy_(value)
        captured.graph.replay()
        self.replays += 1
        q, loss = captured.outputs
        return q.clone(), loss.clone()

    def _capture(self, args: tuple[Any, ...], quant_args: Any, blocksize: int) -> _Captured:
        import torch

        from farm.stages.leftgptq import column_loop

        inputs: tuple[Any, ...] = tuple(None if t is None else t.clone() for t in args)
        W, V, scale, zero_point, global_scale, g_idx = inputs
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: cuBLAS handles, Triton builds, allocator
            column_loop(W.clone(), V, scale, zero_point, global_scale, g_idx, quant_args, blocksize)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # NCCL's watchdog thread may poll
            outputs = column_loop(W, V, scale, zero_point, global_scale, g_idx, quant_args, blocksize)
        self.captures += 1
        return _Captured(graph, inputs, outputs)

    def close(self) -> None:
        self._graphs.clear()

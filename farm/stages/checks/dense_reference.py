"""Benchmark stage: latency, throughput and memory of a loaded model, measured (never estimated).

- latency: cold time to first token (the first request after load), warm time to first token (median of
  repeats), tokens/s at batch 1 and at a batch size, with transformers' generate (the engine available here).
- memory: weights resident in memory, peak during a generation, and the largest batch (at a context) and
  largest context (at batch 1) whose prefill fits a memory budget beyond the weights - found by a doubling
  then bisecting search of real forward passes, each measured (CUDA allocator peak on GPUs, sampled RSS on CPU).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from farm.spec import LatencySpec, MemorySpec


def _prompt_ids(tokenizer: Any, n: int, device: str, batch: int = 1) -> Any:
    import torch

    base = tokenizer("The quick brown fox jumps over the lazy dog. ", add_special_tokens=False)["input_ids"]
    ids = (base * (n // len(base) + 1))[:n]
    return torch.tensor([ids] * batch, device=device)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _generate(model: Any, ids: Any, new_tokens: int, device: str) -> float:
    import torch

    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.config.eos_token_id,
        )
    _sync(device)
    return time.perf_counter() - t0


def latency(model: Any, tokenizer: Any, spec: LatencySpec, device: str) -> dict[str, float]:
    """Call first after loading: the first measurement is the cold one."""
    one = _prompt_ids(tokenizer, spec.prompt_tokens, device)
    cold = _generate(model, one, 1, device)
    warm = statistics.median(_generate(model, one, 1, device) for _ in range(spec.repeats))
    b1 = statistics.median(_generate(model, one, spec.new_tokens, device) for _ in range(spec.repeats))
    many = _prompt_ids(tokenizer, spec.prompt_tokens, device, spec.batch_size)
    bn = _generate(model, many, spec.new_tokens, device)
    return {
        "ttft_cold_s": cold,
        "ttft_warm_s": warm,
        "tokens_per_s_batch1": spec.new_tokens / b1,
        f"tokens_per_s_batch{spec.batch_size}": spec.batch_size * spec.new_tokens / bn,
    }


@contextlib.contextmanager
def _peak_bytes(device: str) -> Iterator[Callable[[], int]]:
    """Peak memory above the level at entry while the block runs: the CUDA allocator's own peak on GPUs; on
    CPUs the process RSS sampled every 2 ms (freed heap is first returned to the OS so the baseline is low)."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield lambda: int(torch.cuda.max_memory_allocated() - start)
        return
    import psutil

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    proc = psutil.Process()
    start = proc.memory_info().rss
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield lambda: int(peak[0] - start)
    finally:
        done.set()
        t.join()
        peak[0] = max(peak[0], proc.memory_info().rss)


def _prefill_bytes(model: Any, tokenizer: Any, batch: int, context: int, device: str) -> int | None:
    """Memory a prefill of (batch, context) needs beyond the weights; None when it does not run at all."""
    import torch

    ids = _prompt_ids(tokenizer, context, device, batch)
    try:
        with _peak_bytes(device) as peak, torch.inference_mode():
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return peak()
    except (torch.OutOfMemoryError, MemoryError, RuntimeError):
        if device == "cuda":
            torch.cuda.empty_cache()
        return None
    finally:
        del ids
        gc.collect()


def largest(fits: Callable[[int], bool], start: int, ceiling: int, step: int = 1) -> int:
    """The largest n in [start, ceiling] (multiples of `step`) with fits(n), assuming fits is monotone: double
    until it fails, then bisect. 0 when even `start` does not fit."""
    if not fits(start):
        return 0
    good, n = start, start
    while n < ceiling:
        n = min(ceiling, n * 2)
        if not fits(n):
            bad = n
            break
        good = n
    else:
        return good
    while bad - good > step:
        mid = (good + bad) // 2 // step * step
        if mid <= good:
            break
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def memory(model: Any, tokenizer: Any, spec: MemorySpec, device: str, new_tokens: int = 16) -> dict[str, float]:
    budget = int(spec.budget_gb * 2**30)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    with _peak_bytes(device) as peak:
        _generate(model, _prompt_ids(tokenizer, min(spec.context, 128), device), new_tokens, device)
    generation_peak = peak()
    ceiling = spec.max_context or min(2048, int(getattr(model.config, "max_position_embeddings", 2048)))
    probes: dict[tuple[int, int], int | None] = {}

    def fits(batch: int, context: int) -> bool:
        if (batch, context) not in probes:
            probes[(batch, context)] = _prefill_bytes(model, tokenizer, batch, context, device)
        used = probes[(batch, context)]
        return used is not None and used <= budget

    max_batch = largest(lambda b: fits(b, spec.context), 1, spec.max_batch)
    max_context = largest(lambda c: fits(1, c), min(64, ceiling), ceiling, step=64)
    return {
        "weights_in_memory_bytes": weights,
        "peak_generation_bytes": generation_peak,
        f"max_batch_at_{spec.context}": max_batch,
        "max_context_batch1": max_context,
        "memory_probes": len(probes),
    }

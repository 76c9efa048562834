"""Expert coverage of a mixture-of-experts model's calibration: how many calibration tokens each expert's router
sent it. llm-compressor 0.14 calibrates every expert on every token (`moe_calibrate_all_experts`), so no expert
is left without statistics; this records what the router itself chose, so an expert the calibration text never
reaches under normal routing (and whose quantization is then judged on text unlike its own) is visible.

A router is a module with a `top_k` attribute whose forward returns the chosen experts' indices last (transformers
5's `*TopKRouter`: Mixtral, Qwen3-MoE, ...). llm-compressor's sequential pipeline runs every layer twice (calibrate,
then propagate with the quantized weights), so counts are averaged over the passes a router saw: per expert,
tokens x top_k x (its share of all routings).
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


def routers(model: Any) -> list[tuple[str, Any]]:
    """The model's MoE routers, by module name."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(getattr(m, "top_k", None), int) and type(m).__name__.endswith("Router")
    ]


@dataclass
class Coverage:
    counts: dict[str, Any] = field(default_factory=dict)  # router name -> int64 tensor of routings per expert
    top_k: dict[str, int] = field(default_factory=dict)

    def result(self, tokens: int) -> tuple[dict[str, float], dict[str, Any] | None]:
        """(metrics, document) for `tokens` calibration tokens; ({}, None) for a model without routers."""
        if not self.counts:
            return {}, None
        per_router: dict[str, list[float]] = {}
        for name, counts in self.counts.items():
            total = float(counts.sum())
            scale = tokens * self.top_k[name] / total if total else 0.0
            per_router[name] = [round(float(c) * scale, 2) for c in counts]
        every = [c for counts in per_router.values() for c in counts]
        metrics = {
            "moe_routers": float(len(per_router)),
            "moe_experts": float(len(every)),
            "moe_expert_tokens_min": min(every),
            "moe_expert_tokens_median": statistics.median(every),
            "moe_expert_tokens_max": max(every),
            "moe_experts_without_tokens": float(sum(c == 0 for c in every)),
        }
        document = {"tokens": tokens, "top_k": self.top_k, "tokens_per_expert": per_router}
        return metrics, document


@contextlib.contextmanager
def expert_coverage(model: Any) -> Iterator[Coverage]:
    """Count, for every router, the experts it picks for each token while the block runs (forward hooks)."""
    import torch

    found = Coverage()
    handles = []
    for name, router in routers(model):
        experts = int(getattr(router, "num_experts", 0) or router.weight.shape[0])
        found.counts[name] = torch.zeros(experts, dtype=torch.int64)
        found.top_k[name] = router.top_k

        def hook(_module: Any, _inputs: Any, output: Any, name: str = name, experts: int = experts) -> None:
            indices = output[-1] if isinstance(output, tuple) else None
            if indices is None or indices.dtype not in (torch.int64, torch.int32):
                return
            found.counts[name] += torch.bincount(indices.reshape(-1).to("cpu", torch.int64), minlength=experts)

        handles.append(router.register_forward_hook(hook))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()

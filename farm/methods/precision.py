"""Automatic mixed precision, the pure part: rank decoder layers by a sensitivity profile, build the
llm-compressor config groups that keep chosen layers at the high scheme, estimate sizes, and search for the
fewest upgraded layers that meet a quality budget. No torch here; the stage supplies measurements."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from farm.methods.base import int_weight_bits, int_weight_group


@dataclass(frozen=True)
class Grid:
    """An integer weight grid: bits, group size (None = one scale per output channel) and symmetry."""

    bits: int
    group_size: int | None
    symmetric: bool = True

    def bits_per_weight(self) -> float:
        return int_weight_bits(self.bits, self.group_size, self.symmetric)

    def bytes_per_weight(self) -> float:
        """Packed weight bits plus a 16-bit scale (and an asymmetric grid's zero point) per group."""
        return self.bits_per_weight() / 8

    def weights(self) -> dict[str, Any]:
        return int_weight_group(self.bits, self.group_size, self.symmetric)["group_0"]["weights"]


@dataclass(frozen=True)
class Layer:
    """One decoder layer: its index, its Linear modules (suffixes under the layer) and their weight count."""

    index: int
    linears: tuple[str, ...]
    params: int


def layer_targets(layers: Iterable[int], linears: Iterable[str]) -> list[str]:
    """A compressed-tensors target matching exactly these Linear modules in these decoder layers."""
    idx = "|".join(str(i) for i in sorted(set(layers)))
    mods = "|".join(re.escape(s) for s in sorted(set(linears)))
    return [rf"re:.*layers\.({idx})\.({mods})$"] if idx and mods else []


def config_groups(layers: list[Layer], high: set[int], low_grid: Grid, high_grid: Grid) -> dict[str, Any]:
    """Two groups: every layer not in `high` at the low grid, the rest at the high grid."""
    linears = sorted({s for layer in layers for s in layer.linears})
    groups = {}
    low = [layer.index for layer in layers if layer.index not in high]
    if low:
        groups["low"] = {"targets": layer_targets(low, linears), "weights": low_grid.weights()}
    if high:
        groups["high"] = {"targets": layer_targets(high, linears), "weights": high_grid.weights()}
    return groups


def quantized_bytes(layers: list[Layer], high: set[int], low_grid: Grid, high_grid: Grid) -> float:
    """Bytes of the decoder's quantized Linear weights under this assignment (embeddings and norms excluded)."""
    return sum(layer.params * (high_grid if layer.index in high else low_grid).bytes_per_weight() for layer in layers)


def rank_layers(profile: dict[int, float], layers: list[Layer], low_grid: Grid, high_grid: Grid) -> list[int]:
    """Most fragile first: perplexity lost per byte saved by keeping the layer at the low grid."""
    cost = {
        layer.index: layer.params * (high_grid.bytes_per_weight() - low_grid.bytes_per_weight()) for layer in layers
    }
    return sorted(profile, key=lambda i: (-profile[i] / max(cost.get(i, 1.0), 1.0), i))


@dataclass
class Search:
    """The outcome of a budget search: how many of the ranked layers were upgraded and every probe made."""

    upgraded: int
    met: bool
    probes: dict[int, float] = field(default_factory=dict)


def predicted_upgrades(profile: dict[int, float], order: list[int], uniform_delta: float, budget: float) -> int:
    """The fewest upgrades the profile predicts for the budget, scaled to the measured uniform-low delta:
    delta(k) ~ uniform_delta * (fragility left at low after k upgrades) / (all fragility). Per-layer deltas are
    measured with round-to-nearest and the variant may round with GPTQ; the scaling absorbs that, the search
    checks it."""
    left = [max(profile[i], 0.0) for i in order]
    total = sum(left)
    if total <= 0:
        return 0
    remaining = total
    for k in range(len(order) + 1):
        if uniform_delta * remaining / total <= budget:
            return k
        if k < len(order):
            remaining -= left[k]
    return len(order)


def smallest_meeting(
    probe: Callable[[int], float], n: int, budget: float, guess: Callable[[float], int] | None = None
) -> Search:
    """Fewest upgrades k in [0, n] whose measured perplexity delta is within budget.

    It assumes more upgrades never hurt (true of the measured profile up to noise). After k = 0, `guess` (from
    that delta) names a first candidate; its neighbour settles it when the guess is right (3 quantizations),
    else bisection continues from the bracket it found (about log2(n) + 2 at worst). If even k = n misses the
    budget, k = n is returned, not met."""
    probes: dict[int, float] = {}

    def ok(k: int) -> bool:
        if k not in probes:
            probes[k] = probe(k)
        return probes[k] <= budget

    if ok(0):
        return Search(0, True, probes)
    lo, hi = 0, None  # ok(lo) is False; ok(hi) is True once known
    if guess is not None:
        g = min(max(guess(probes[0]), 1), n)
        if ok(g):
            hi = g
            if g - 1 > lo and not ok(g - 1):
                lo = g - 1
            elif g - 1 > lo:
                hi = g - 1
        else:
            lo = g
            if g + 1 <= n and ok(g + 1):
                hi = g + 1
            elif g + 1 <= n:
                lo = g + 1
    if hi is None:
        if lo == n or not ok(n):
            return Search(n, False, probes)
        hi = n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return Search(hi, True, probes)

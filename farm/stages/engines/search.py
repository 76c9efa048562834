"""The search quantize stage: build each candidate recipe for real (through the same quantize stage a variant of
that method would use), reload its checkpoint the way the evaluation does, score it on the validation text and
keep the smallest one within the budget. Candidates come smallest first, so with early stopping the search ends
at a passing candidate that no untried one can undercut. Only the kept checkpoint stays on disk; every candidate
comes back as a row of `QuantizeResult.candidates`, which the records write as one MLflow run each under the
variant's run."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from farm.errors import FarmError
from farm.methods.search import SearchConfig, estimated_bits
from farm.stages.engines.registry import register_engine
from farm.stages.engines.validation import allowed_delta, judging, perplexity_of
from farm.stages.modelio import decoder_linear_bytes, pick_device, weights_bytes
from farm.stages.quantize import QuantizeRequest, QuantizeResult, quantize

REALIZED_BITS = "mixed.avg_weight_bits"  # what a mixed candidate took, once its assignment is chosen


@dataclass
class Tried:
    index: int
    label: str
    identity: dict[str, Any]
    out_dir: str
    seconds: float
    delta: float = float("nan")
    perplexity: float = float("nan")
    linear_bytes: int = 0
    checkpoint_bytes: int = 0
    passed: bool = False
    bits: float = float("inf")  # stored bits per weight, in the estimate's units (the size order of candidates)
    error: str | None = None
    result: QuantizeResult | None = None

    def row(self, chosen: bool) -> dict[str, Any]:
        metrics = {"seconds_candidate": self.seconds}
        if self.error is None:
            metrics |= {
                "validation_perplexity": self.perplexity,
                "validation_perplexity_delta": self.delta,
                "decoder_linear_bytes": float(self.linear_bytes),
                "weights_bytes": float(self.checkpoint_bytes),
            }
        status = "failed" if self.error else "chosen" if chosen else "passed" if self.passed else "missed"
        return {
            "index": self.index,
            "label": self.label,
            "method": self.identity,
            "status": status,
            "error": self.error,
            "metrics": metrics,
        }


def _better(new: Tried, old: Tried | None) -> bool:
    """Within budget beats outside it; among passing ones the smaller wins, among missing ones the closer."""
    if old is None:
        return True
    if new.passed != old.passed:
        return new.passed
    if new.passed:
        return (new.linear_bytes, new.delta) < (old.linear_bytes, old.delta)
    return new.delta < old.delta


def _undercut_by_none(best: Tried | None, untried: list[Any]) -> bool:
    """Whether the best candidate is within budget and no untried one (smallest first) can be smaller."""
    return best is not None and best.passed and (not untried or estimated_bits(untried[0]) >= best.bits)


@register_engine(SearchConfig)
def quantize_search(req: QuantizeRequest) -> QuantizeResult:
    method = req.method
    if not isinstance(method, SearchConfig):
        raise TypeError(f"quantize_search needs a SearchConfig, got {type(method).__name__}")
    device = pick_device()
    t0 = time.perf_counter()
    _, windows = judging(req, "a search")
    base = perplexity_of(req.model_dir, windows, req.load_device or device, req.trust_remote_code)
    allowed = allowed_delta(method.budget, method.budget_unit, base)
    candidates = method.candidate_methods()
    draws = req.candidate_calibrations or (req.calibration,) * len(candidates)
    if len(draws) != len(candidates):
        raise ValueError(f"the search has {len(candidates)} candidates but {len(draws)} calibration draws")
    work = Path(req.out_dir).parent / "candidates"
    t1 = time.perf_counter()

    tried: list[Tried] = []
    best: Tried | None = None
    for i, (cand, draw) in enumerate(zip(candidates, draws, strict=True)):
        sub = replace(
            req, method=cand, calibration=draw, out_dir=str(work / f"{i:02d}"), candidate_calibrations=(), report={}
        )
        t = Tried(i, cand.label(), cand.identity(), sub.out_dir, 0.0)
        start = time.perf_counter()
        try:
            t.result = quantize(sub)
            t.perplexity = perplexity_of(sub.out_dir, windows, req.load_device or device, req.trust_remote_code)
        except FarmError:
            raise  # changed inputs fail the variant, as they would any other
        except Exception as err:  # a recipe this model cannot take is one failed candidate, not a failed search
            t.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:500]
        t.seconds = time.perf_counter() - start
        if t.error is None and t.result is not None:
            t.bits = t.result.metrics.get(REALIZED_BITS, estimated_bits(cand))
            t.delta = t.perplexity - base
            t.passed = t.delta <= allowed
            t.linear_bytes = decoder_linear_bytes(sub.out_dir)
            t.checkpoint_bytes = weights_bytes(sub.out_dir)
        tried.append(t)
        if t.error is None and _better(t, best):
            if best is not None:
                shutil.rmtree(best.out_dir, ignore_errors=True)
            best = t
        else:
            shutil.rmtree(sub.out_dir, ignore_errors=True)
        if method.early_stop and _undercut_by_none(best, candidates[i + 1 :]):
            break
    t2 = time.perf_counter()
    if best is None or best.result is None:
        errors = "; ".join(f"{t.label}: {t.error}" for t in tried)
        raise RuntimeError(f"every search candidate failed: {errors}")
    shutil.rmtree(req.out_dir, ignore_errors=True)
    shutil.move(best.out_dir, req.out_dir)
    shutil.rmtree(work, ignore_errors=True)
    t3 = time.perf_counter()

    chosen = best.result
    notes = list(chosen.notes)
    verdict = "within" if best.passed else "outside"
    notes.append(
        f"search: {best.label} chosen, validation perplexity {best.perplexity:.3f} ({best.delta:+.3f}, {verdict} the "
        f"budget {allowed:+.3f}); {len(tried)} of {len(candidates)} candidates built"
    )
    rows = [t.row(t is best) for t in tried]
    return QuantizeResult(
        out_dir=req.out_dir,
        device=chosen.device,
        seconds_load=t1 - t0,
        seconds_oneshot=t2 - t1,
        seconds_save=t3 - t2,
        recipe=chosen.recipe,
        notes=notes,
        calibration_report=chosen.calibration_report,
        metrics={
            **chosen.metrics,
            "search.candidates": float(len(candidates)),
            "search.built": float(len(tried)),
            "search.failed": float(sum(t.error is not None for t in tried)),
            "search.met": float(best.passed),
            "search.allowed_delta": allowed,
            "search.validation_base_perplexity": base,
            "search.validation_perplexity_delta": best.delta,
            "search.decoder_linear_bytes": float(best.linear_bytes),
        },
        documents={
            **chosen.documents,
            "search.json": {
                "budget": method.budget,
                "budget_unit": method.budget_unit,
                "allowed_delta": allowed,
                "validation": {
                    "source": req.validation.source if req.validation else None,
                    "tokens": sum(len(w) - 1 for w in windows),
                },
                "base_perplexity": base,
                "chosen": best.label,
                "met": best.passed,
                "candidates": rows,
            },
        },
        candidates=rows,
    )

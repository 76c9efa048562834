"""What a job did, variant by variant: the driver's return value and the lines `farm run` prints."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from farm.plan import Plan, Variant


@dataclass
class VariantOutcome:
    variant: Variant
    status: str  # "built" | "cached" | "failed" | "skipped" (a ladder stopped below it)
    run_id: str | None = None
    perplexity: float | None = None
    base_perplexity: float | None = None
    weights_bytes: int | None = None
    seconds: float | None = None
    artifact_uri: str | None = None
    model_version: str | None = None
    reason: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # what the gate reads
    gate: str | None = None  # promoted | rejected

    @property
    def delta(self) -> float | None:
        if self.perplexity is None or self.base_perplexity is None:
            return None
        return self.perplexity - self.base_perplexity

    def line(self, n: int, total: int) -> str:
        """The progress line `farm run` prints when this variant is settled."""
        head = f"[{n}/{total}] {self.variant.label}"
        if self.status == "failed":
            return f"{head}: FAILED {self.reason} (run {self.run_id})"
        if self.status == "skipped":
            return f"{head}: skipped ({self.reason})"
        delta = f"{self.delta:+.2f}" if self.delta is not None else "n/a"
        size = f"{self.weights_bytes / 1e6:.1f} MB" if self.weights_bytes else "?"
        secs = f"{self.seconds:.0f} s" if self.seconds is not None else "?"
        ppl = f"{self.perplexity:.2f}" if self.perplexity is not None else "?"
        return f"{head}: {self.status}, {size}, ppl {ppl} ({delta}), {secs}, run {self.run_id}, {self.artifact_uri}"


@dataclass
class JobOutcome:
    plan: Plan
    parent_run_id: str | None
    tracking_uri: str
    variants: list[VariantOutcome] = field(default_factory=list)
    seconds: float = 0.0
    # where the job's time went: preflight (resolve + hash inputs), tracking (MLflow lookups; alongside cluster when
    # a new local store is created), cluster (Ray start or connect), build (base evaluations and variants), finish
    phases: dict[str, float] = field(default_factory=dict)
    failed_bases: dict[str, str] = field(default_factory=dict)  # base eval id -> why its evaluation failed
    finished: bool = False  # the driver got to the end of the job (failures are the variants' own)

    def mark(self, phase: str, since: float) -> float:
        """Book the time since `since` to `phase`; returns now."""
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - since
        return now

    def add(self, o: VariantOutcome) -> str:
        """Settle a variant; returns its progress line."""
        self.variants.append(o)
        return o.line(len(self.variants), len(self.plan.variants))

    @property
    def ok(self) -> bool:
        return not self.failed_bases and all(v.status != "failed" for v in self.variants)

    def reason(self) -> str | None:
        """Why the job's run did not succeed, in a line (None when it did)."""
        if not self.finished:
            return "job did not finish (error or interrupt in the driver)"
        failed = [v.variant.label for v in self.variants if v.status == "failed"]
        parts = [f"base evaluation failed: {why}" for why in self.failed_bases.values()]
        if failed:
            parts.append(f"{len(failed)} variant(s) failed: {', '.join(failed[:8])}")
        return "; ".join(parts) or None

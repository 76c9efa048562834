"""What a worker hands back to the driver: one typed result per task, pickled across Ray.

The driver reads fields, not string keys, and a change to what a stage reports is a change to one dataclass
that mypy checks on both sides. The parts are the stages' own results (torch-free modules: the driver imports
them without loading torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from farm.stages.checks.runner import ChecksResult
from farm.stages.evaluate import EvaluateResult
from farm.stages.quantize import QuantizeResult


@dataclass(frozen=True)
class BaseResult:
    """A base model's evaluation: held-out perplexity and generation, and its checks (serving included)."""

    evaluation: EvaluateResult
    checks: ChecksResult | None = None


@dataclass(frozen=True)
class RankReport:
    """Where one rank of a data-parallel variant ran."""

    rank: int
    worker: str
    cuda_visible_devices: str


@dataclass(frozen=True)
class DataParallel:
    world: int
    ranks: tuple[RankReport, ...]  # rank 0 first; the driver adds the others' reports as they return


@dataclass(frozen=True)
class VariantResult:
    """A built variant: how it was quantized, what its evaluation and checks measured, where it was published,
    and where its seconds went after the stage (hashing and uploading overlap the evaluation)."""

    quantize: QuantizeResult
    evaluation: EvaluateResult
    checks: ChecksResult | None
    manifest: dict[str, Any]
    artifact_uri: str
    model_uri: str | None
    seconds_manifest: float  # file table and hashes, in the background during evaluation
    seconds_mlflow_upload: float  # likewise
    seconds_artifact_wait: float  # what hashing and uploading added after evaluation
    seconds_publish: float
    seconds_total: float
    ddp: DataParallel | None = None

    def timings(self) -> dict[str, float]:
        return {
            "seconds_total": self.seconds_total,
            "seconds_manifest": self.seconds_manifest,
            "seconds_publish": self.seconds_publish,
            "seconds_mlflow_upload": self.seconds_mlflow_upload,
            "seconds_artifact_wait": self.seconds_artifact_wait,
        }

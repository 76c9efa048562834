"""The watch spec: which bases to follow and which job template to run for each new release."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from farm.calibration import TextIdentity
from farm.errors import SpecError
from farm.spec import NAME, JobSpec, ModelSpec, Strict, load_spec, one_line, read_yaml


class WatchSpec(Strict):
    name: str = Field(pattern=NAME, description="watch name (recorded on every claim)")
    job: str = Field(description="job template YAML; its `models` are replaced by the released base")
    bases: list[ModelSpec] = Field(
        min_length=1,
        max_length=256,
        description="bases to follow: hf://org/name@branch, s3://bucket/prefix, a directory",
    )
    tracking_uri: str | None = Field(None, description="MLflow holding the watermarks (default: the job's)")
    submit_address: str | None = Field(None, description="Ray Jobs API address; the job runs in-process if unset")
    interval_s: float = Field(3600, gt=0, le=7 * 86400, description="seconds between cycles when not --once")
    stale_after_s: float = Field(24 * 3600, gt=0, description="an unfinished claim older than this may be retried")
    heartbeat_s: float = Field(
        60,
        gt=0,
        le=3600,
        description="how often a watcher running a job marks its claim alive; a claim silent for 5 heartbeats, or "
        "whose watcher process on this host is gone, is taken over by the next cycle",
    )
    max_attempts: int = Field(3, ge=1, le=20, description="attempts per release before the watcher gives up")

    @model_validator(mode="after")
    def _unique(self) -> WatchSpec:
        names = [b.display_name() for b in self.bases]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"bases: duplicate name(s) {', '.join(dup)}; give each a distinct `name`")
        return self


def load_watch(path: str | Path) -> tuple[WatchSpec, JobSpec]:
    """The watch spec and its validated job template; both fail with one line before anything runs."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping at the top level")
    try:
        watch = WatchSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"{path}: {one_line(err)}") from None
    base = path.resolve().parent
    job_path = Path(watch.job) if Path(watch.job).is_absolute() else base / watch.job
    template = load_spec(job_path)
    bases = [
        b if "://" in b.source else b.model_copy(update={"source": str((base / b.source).resolve())})
        for b in watch.bases
    ]
    return watch.model_copy(update={"bases": bases, "job": str(job_path.resolve())}), template


def recipe_hash(template: JobSpec) -> str:
    """What a release is quantized with (methods, calibration by content, evaluation, gate) and where it is
    recorded (experiment, registry prefix, artifact root). The same release with the same recipe is never built
    twice; changing any of these is a new recipe."""
    body: dict[str, Any] = template.model_dump(mode="json", include={"methods", "calibration", "evaluation", "gate"})
    body["where"] = [template.tracking.experiment, template.tracking.registered_model_prefix, template.output.root]
    body["calibration"]["source"] = TextIdentity.of(template.calibration.source).sha256
    body["evaluation"]["perplexity"]["source"] = TextIdentity.of(template.evaluation.perplexity.source).sha256
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def job_for(template: JobSpec, base: ModelSpec, revision: str | None, tags: dict[str, str]) -> JobSpec:
    """The template with `models` replaced by one base (a hub branch pinned to the detected commit) and the
    release recorded as run tags."""
    model = base.model_copy(update={"name": base.display_name()})
    if revision:
        model = model.model_copy(update={"source": base.source.split("@")[0], "revision": revision})
    tracking = template.tracking.model_copy(update={"tags": {**template.tracking.tags, **tags}})
    return JobSpec.model_validate(
        {**template.model_dump(), "models": [model.model_dump()], "tracking": tracking.model_dump()}
    )

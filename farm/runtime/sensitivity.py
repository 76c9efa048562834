"""`farm sensitivity`: profile each model of a job layer by layer on its validation text (its calibration text when
the job declares none) and record the profile
in MLflow (one run per model: a metric per layer, `sensitivity.json`), so a team can see which layers a mixed
recipe will keep high before paying for the search. Runs in this process: one model, no quantization."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from farm import sources
from farm.calibration import TextIdentity
from farm.errors import SpecError
from farm.methods.precision import Grid
from farm.runtime.driver import tracking_target
from farm.secrets import redact
from farm.spec import JobSpec
from farm.tracking.mlflow_store import MlflowStore
from farm.tracking.names import Tag


@dataclass
class Recorded:
    model: str
    run_id: str
    profile: Any  # stages.engines.sensitivity.Profile (typed loosely: this module imports no torch)


def profile_job(
    spec: JobSpec, grid: Grid, tokens: int, seq_len: int, model: str | None = None, tracking_uri: str | None = None
) -> list[Recorded]:
    names = [m.display_name() for m in spec.models]
    if model and model not in names:
        raise SpecError(f"sensitivity: no model {model!r} in job {spec.name}; it has {', '.join(names)}")
    uri, artifacts = tracking_target(spec, tracking_uri)
    store = MlflowStore(uri, spec.tracking.experiment, artifacts)
    store.check_reachable()
    role = "validation" if spec.validation else "calibration"
    calibration = spec.validation.source if spec.validation else spec.calibration.source
    cal_sha = TextIdentity.of(calibration).sha256
    out = []
    for m in spec.models:
        name = m.display_name()
        if model and name != model:
            continue
        resolved = sources.resolve(m.source, m.revision, allow_pickle=m.allow_pickle)
        from farm.stages.engines.sensitivity import measure

        tags = {
            **spec.tracking.tags,
            Tag.ROLE: "sensitivity",
            Tag.MODEL: name,
            Tag.MODEL_IDENTITY: resolved.identity,
        }
        run_id = store.start_run(f"sensitivity/{name}", tags, None)
        try:
            t0 = time.perf_counter()
            prof = measure(resolved.local_dir, calibration, grid, tokens, seq_len, m.trust_remote_code)
            store.log(
                run_id,
                params={
                    "model.source": redact(m.source),
                    "grid.bits": grid.bits,
                    "grid.group_size": grid.group_size,
                    "probe_tokens": prof.tokens,
                    "text.role": role,
                    "text.source": redact(calibration),
                    "text.sha256": cal_sha,
                },
                metrics={
                    **prof.metrics(),
                    "base_perplexity": prof.base_perplexity,
                    "seconds_total": time.perf_counter() - t0,
                },
            )
            store.log_json(run_id, prof.to_json(), "sensitivity.json")
        except BaseException as err:
            store.end_run(run_id, ok=False, reason=f"{type(err).__name__}: {err}")
            raise
        store.end_run(run_id, ok=True)
        out.append(Recorded(name, run_id, prof))
    return out

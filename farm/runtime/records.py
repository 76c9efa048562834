"""A job's records in MLflow: its parent run, each base and variant run, registry versions, and the claims that
keep one record per variant however many jobs race. The driver decides what happens; this says how it is
written down (through `tracking/`, the only module that imports MLflow)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from farm.artifacts import ArtifactStore
from farm.errors import TrackingError
from farm.plan import BaseEval, Plan, Variant
from farm.promote import Decision
from farm.runtime.claims import VariantClaims
from farm.runtime.liveness import alive_here, process_id
from farm.runtime.outcome import JobOutcome, VariantOutcome
from farm.runtime.results import BaseResult, VariantResult
from farm.runtime.workers import library_versions
from farm.secrets import redact
from farm.serving import measure as serving
from farm.spec import JobSpec
from farm.stages.checks.runner import ChecksResult
from farm.stages.evaluate import EvaluateResult
from farm.tracking.mlflow_store import TAG, MlflowStore, is_tracking_failure
from farm.tracking.names import Tag

Printer = Callable[[str], None]
DRIVER_ID = process_id()


def registered_name(spec: JobSpec, model_name: str) -> str:
    return f"{spec.tracking.registered_model_prefix}{model_name}"


class JobRecords:
    """What one job writes to its tracking store, and what it reads back of earlier jobs."""

    def __init__(self, store: MlflowStore, spec: JobSpec, say: Printer):
        self.store = store
        self.spec = spec
        self.say = say
        self.open_runs: set[str] = set()
        self.stale: set[str] = set()  # FINISHED variant runs whose published artifact is gone
        self.base_metrics: dict[str, dict[str, float]] = {}
        self.base_runs: dict[str, str] = {}  # base_eval_id -> its recorded run
        self.base_greedy: dict[str, list[list[int]] | None] = {}  # base_eval_id -> serving greedy token ids
        self.claims = VariantClaims(store)

    # -- runs ------------------------------------------------------------------------------------------------
    def _job_run(self, plan: Plan) -> tuple[str, int]:
        """The job's one parent run and this attempt's number: a re-run of the same job reopens the run it
        recorded (its variant runs, this attempt's among them, stay nested in it) rather than adding another."""
        rows = self.store.find_runs(
            [f"tags.`{Tag.ROLE}` = 'job'", f"tags.`{Tag.JOB_ID}` = '{plan.job_id}'"], max_results=1
        )
        if not rows:
            tags = {Tag.ROLE: "job", Tag.JOB_ID: plan.job_id, Tag.JOB_NAME: plan.job_name, Tag.ATTEMPT: "1"}
            return self._start(f"job:{plan.job_name}", tags, None), 1
        row = rows[0]
        attempt = int(row.tags.get(Tag.ATTEMPT, "1")) + 1
        self.store.reopen_run(row.run_id, {Tag.ATTEMPT: str(attempt), Tag.DRIVER: DRIVER_ID})
        self.open_runs.add(row.run_id)
        return row.run_id, attempt

    def _start(self, name: str, tags: dict[str, str], parent: str | None) -> str:
        run_id = self.store.start_run(name, {**self.spec.tracking.tags, **tags, Tag.DRIVER: DRIVER_ID}, parent)
        self.open_runs.add(run_id)
        return run_id

    def _end(self, run_id: str, ok: bool, reason: str | None = None, status: str | None = None) -> None:
        self.store.end_run(run_id, ok, reason, status)
        self.open_runs.discard(run_id)

    def open_job(self, plan: Plan) -> tuple[str, int]:
        """The job's parent run (reopened on a re-run) with the spec and library versions on it."""
        parent, attempt = self._job_run(plan)
        if attempt == 1:
            recorded_spec = redact(self.spec.model_dump_json(indent=2))
            self.store.log(
                parent,
                params={"job_name": plan.job_name, "variants": len(plan.variants), "spec": recorded_spec},
                tags={Tag.VERSIONS: library_versions()},
            )
            self.store.log_text(parent, recorded_spec, "spec.json")
        else:
            self.store.log(parent, tags={Tag.VERSIONS: library_versions()})
        return parent, attempt

    def close_job(self, parent: str, ok: bool, outcome: JobOutcome) -> None:
        """End every run this job left open: the parent with the job's reason, the rest as unfinished."""
        for run_id in list(self.open_runs):
            try:
                self._end(
                    run_id,
                    ok=run_id == parent and ok,
                    reason=None if ok else outcome.reason() if run_id == parent else "job did not finish",
                )
            except Exception as err:  # the tracking server may be the thing that failed: stop trying
                if not is_tracking_failure(err):
                    raise
                break

    def start_base(self, plan: Plan, b: BaseEval, attempt: int, parent: str) -> str:
        tags = {
            Tag.ROLE: "base",
            Tag.JOB_ID: plan.job_id,
            Tag.BASE_EVAL_ID: b.id,
            Tag.MODEL: b.model_name,
            Tag.MODEL_IDENTITY: b.identity,
            Tag.ATTEMPT: str(attempt),
        }
        return self._start(f"base:{b.model_name}", tags, parent)

    def start_variant(self, plan: Plan, v: Variant, attempt: int, parent: str) -> str:
        run_id = self._start(v.label, {**self._variant_tags(plan, v), Tag.ATTEMPT: str(attempt)}, parent)
        self.store.log(run_id, params=self._variant_params(v))
        return run_id

    def fail(self, run_id: str, reason: str | None) -> None:
        self._end(run_id, ok=False, reason=reason)

    # -- what is recorded ------------------------------------------------------------------------------------
    def recorded(self, v: Variant) -> Any:
        """The newest FINISHED run of this variant (judged the same way) in the experiment whose artifact is not
        known to be gone, if any job recorded it."""
        rows = self.store.find_runs(
            [
                f"tags.`{Tag.ROLE}` = 'variant'",
                f"tags.`{Tag.VARIANT_ID}` = '{v.id}'",
                f"tags.`{Tag.BASE_EVAL_ID}` = '{v.base_eval_id}'",
            ],
            status="FINISHED",
            max_results=20,
        )
        return next((r for r in rows if Tag.STALE not in r.tags and r.run_id not in self.stale), None)

    def reusable(self, v: Variant) -> Any:
        """The recorded run of this variant if its published artifact is still there and matches its manifest;
        otherwise the run is tagged `farm.stale` with the reason and the variant is built again."""
        row = self.recorded(v)
        uri = row.tags.get(Tag.ARTIFACT_URI) if row is not None else None
        if row is None or not uri:
            return row
        problem = ArtifactStore(uri).problem(uri, v.id)
        if problem is None:
            return row
        self.stale.add(row.run_id)
        self.store.log(row.run_id, tags={Tag.STALE: problem})
        self.say(f"  stale    {v.label}: {redact(problem)}; building it again")
        return None

    # -- what earlier jobs left ------------------------------------------------------------------------------
    def reap_orphans(self, plan: Plan) -> None:
        """Runs of this job left RUNNING by a driver that died (kill -9, power loss) on this host are marked
        FAILED, so the record never shows work in progress that nobody is doing."""
        for row in self.store.find_runs([f"tags.`{Tag.JOB_ID}` = '{plan.job_id}'"], status="RUNNING"):
            driver = row.tags.get(Tag.DRIVER, "")
            if alive_here(driver) is False:
                self.store.end_run(row.run_id, ok=False, reason=f"driver {driver} died before finishing this run")
                self.say(f"  marked FAILED: run {row.run_id} left RUNNING by dead driver {driver}")

    def registered_as(self, v: Variant, row: Any) -> Any:
        """A reused variant registered under this job's name for its model. The variant id hashes what the model
        computes, not what it is called: the same checkpoint under another name (or registry prefix) is reused,
        and gets that name's registry version and tags, once."""
        if not row.tags.get(Tag.MODEL_VERSION):  # never registered (log_model off): nothing to add
            return row
        name = registered_name(self.spec, v.model_name)
        version = self.store.version_of_run(name, row.run_id)
        if version is None:
            manifest = self.store.load_json(row.run_id, "manifest.json")
            if manifest is None:
                return row
            version = self.store.register(
                name,
                row.run_id,
                "model",
                self._version_tags(v, manifest) | {"registered_from_reuse": "true"},
                description=f"{v.method.label()} of {redact(v.model.source)} (the checkpoint of an equal model)",
            )
        return dataclasses.replace(row, tags={**row.tags, Tag.MODEL_VERSION: version})

    def reused(self, v: Variant, row: Any, base: float | None) -> VariantOutcome:
        return VariantOutcome(
            v,
            "cached",
            row.run_id,
            row.metrics.get("perplexity"),
            base,
            int(row.metrics.get("weights_bytes", 0)),
            row.metrics.get("seconds_total"),
            row.tags.get(Tag.ARTIFACT_URI),
            row.tags.get(Tag.MODEL_VERSION),
            metrics=dict(row.metrics),
        )

    def _log_checks(self, run_id: str, label: str, checks: ChecksResult | None) -> dict[str, float]:
        if checks is None:
            return {}
        tags = {TAG + k: v for k, v in checks.tags.items()}
        self.store.log(run_id, metrics=checks.metrics, tags=tags)
        for name, content in checks.artifacts.items():
            self.store.log_json(run_id, content, f"checks/{name}")
        if TAG + serving.TAG_ERROR in tags:
            self.say(f"  serving  {label}: not measured: {tags[TAG + serving.TAG_ERROR]}")
        return dict(checks.metrics)

    def _greedy_of_base(self, base_eval_id: str) -> list[list[int]] | None:
        """The base's greedy token ids from its serving check (this job's, or its recorded run's)."""
        if base_eval_id not in self.base_greedy and base_eval_id in self.base_runs:
            doc = self.store.load_json(self.base_runs[base_eval_id], f"checks/{serving.DOCUMENT}") or {}
            self.base_greedy[base_eval_id] = doc.get("greedy") or None
        return self.base_greedy.get(base_eval_id)

    def _diff_promoted(self, v: Variant, run_id: str, outputs: dict[str, Any], alias: str) -> dict[str, float]:
        """Greedy outputs of the fixed prompts against those of the variant the registry last promoted for this
        base (`@<alias>`): the nightly question "does the new build still answer like the one we ship?"."""
        try:
            _, promoted_run = self.store.version_run(registered_name(self.spec, v.model_name), "@" + alias)
        except TrackingError:
            return {}  # nothing promoted yet
        before = self.store.load_json(promoted_run, "checks/reference_outputs.json")
        if not before or before.get("prompts") != outputs["prompts"]:
            return {}
        pairs = list(zip(before["greedy"], outputs["greedy"], strict=True))
        rate = sum(a == b for a, b in pairs) / len(pairs)
        self.store.log(run_id, metrics={"promoted_exact_match": rate}, tags={Tag.PROMOTED_RUN: promoted_run})
        self.store.log_json(
            run_id,
            [
                {"prompt": p, "promoted": a, "this": b, "same": a == b}
                for p, (a, b) in zip(outputs["prompts"], pairs, strict=True)
            ],
            "checks/diff_vs_promoted.json",
        )
        return {"promoted_exact_match": rate}

    def record_decision(self, run_id: str, o: VariantOutcome, d: Decision) -> None:
        """The gate's decision on a variant's run and its registry version."""
        self.store.log(
            run_id,
            tags={
                Tag.GATE: d.outcome,
                Tag.GATE_REASONS: "; ".join(d.reasons),
                Tag.GATE_WARNINGS: "; ".join(d.warnings),
            },
        )
        self.store.log_json(
            run_id, {"decision": d.outcome, "reasons": d.reasons, "warnings": d.warnings, "matrix": d.rows}, "gate.json"
        )
        if o.model_version:
            name = registered_name(self.spec, o.variant.model_name)
            self.store.tag_version(name, o.model_version, {"gate": d.outcome, "gate_reasons": "; ".join(d.reasons)})

    def finish_base(
        self, b: BaseEval, run_id: str, result: BaseResult | None, error: str | None, base_ppl: dict[str, float]
    ) -> None:
        if error or not isinstance(result, BaseResult):
            self._end(run_id, ok=False, reason=error)
            self.say(f"  base     {b.model_name}: FAILED {error}")
            return
        e = result.evaluation
        self.store.log(
            run_id,
            metrics=_eval_metrics(e),
            params={"model_source": redact(b.model.source)},
            tags={Tag.GENERATION: e.generation},
        )
        checks = result.checks
        self.base_metrics[b.id] = {**_eval_metrics(e), **self._log_checks(run_id, f"base {b.model_name}", checks)}
        self.base_greedy[b.id] = _greedy(checks)
        self._end(run_id, ok=True)
        base_ppl[b.id] = e.perplexity
        self.say(f"  base     {b.model_name}: ppl {e.perplexity:.2f}, {e.weights_bytes / 1e6:.1f} MB")

    def finish_variant(
        self, v: Variant, run_id: str, result: VariantResult, base: float | None, outcome: JobOutcome
    ) -> None:
        """Record a built variant, unless a concurrent job recorded it first (possible only when this job stepped
        over a build claim it judged dead): then this build's run ends KILLED with the reason and the variant is
        reported as reused from that job's run (one FINISHED run and one registry version per variant)."""
        row, claim = self.claims.claim_record(v, run_id, outcome.plan.job_id, self.recorded)
        if row is not None:
            self._end(
                run_id,
                ok=False,
                reason=f"a concurrent job recorded this variant first (run {row.run_id})",
                status="KILLED",
            )
            self.say(outcome.add(self.reused(v, self.registered_as(v, row), base)))
            self.claims.release_build(v)
            return
        try:
            self._record_variant(v, run_id, result, base, outcome)
        except BaseException:
            if claim:
                self.claims.fail_record(claim)
            raise
        if claim:
            self.claims.release_record(claim)
        self.claims.release_build(v)

    def _record_variant(
        self, v: Variant, run_id: str, result: VariantResult, base: float | None, outcome: JobOutcome
    ) -> None:
        e, q, manifest = result.evaluation, result.quantize, result.manifest
        metrics = {
            **_eval_metrics(e),
            **result.timings(),
            "seconds_quantize_load": q.seconds_load,
            "seconds_oneshot": q.seconds_oneshot,
            "seconds_save": q.seconds_save,
        }
        if base is not None:
            metrics |= {"base_perplexity": base, "perplexity_delta": e.perplexity - base}
        limit = self.spec.evaluation.thresholds.max_perplexity_delta
        tags = {
            Tag.ARTIFACT_URI: result.artifact_uri,
            Tag.GENERATION: e.generation,
            Tag.RECIPE_SHA256: manifest["recipe_sha256"],
            Tag.DEVICE: q.device,
        }
        if result.ddp is not None:
            tags[Tag.DDP_WORLD_SIZE] = str(result.ddp.world)
            ranks = sorted(result.ddp.ranks, key=lambda r: r.rank)
            tags[Tag.DDP_RANKS] = json.dumps([dataclasses.asdict(r) for r in ranks])
        if q.notes:
            tags[Tag.NOTES] = "; ".join(q.notes)
        if limit is not None and base is not None:
            tags[Tag.WITHIN_THRESHOLD] = str(e.perplexity - base <= limit).lower()
        report = q.calibration_report
        if report:
            metrics |= {
                "calibration_tokens": report["tokens"],
                "calibration_unique_token_ratio": report["unique_token_ratio"],
            }
            self.store.log_json(run_id, report, "calibration_report.json")
        metrics |= q.metrics
        for name, doc in q.documents.items():
            self.store.log_json(run_id, doc, name)
        self._record_candidates(v, run_id, q.candidates)
        self.store.log(run_id, metrics=metrics, tags=tags)
        metrics |= self._log_checks(run_id, v.label, result.checks)
        greedy = _greedy(result.checks)
        base_greedy = self._greedy_of_base(v.base_eval_id) if greedy else None
        if greedy and base_greedy:  # the same seeded prompts, greedy: does the served variant answer like its base?
            agreement = serving.greedy_agreement(greedy, base_greedy)
            self.store.log(run_id, metrics=agreement)
            metrics |= agreement
        outputs = result.checks.artifacts.get("reference_outputs.json") if result.checks else None
        if outputs and self.spec.gate is not None:
            metrics |= self._diff_promoted(v, run_id, outputs, self.spec.gate.alias)
        self.store.log_json(run_id, manifest, "manifest.json")
        self.store.log_text(run_id, manifest["recipe"], "recipe.yaml")
        version = None
        if result.model_uri:
            version = self.store.register(
                registered_name(self.spec, v.model_name),
                run_id,
                "model",
                self._version_tags(v, manifest),
                description=f"{v.method.label()} of {redact(v.model.source)}",
            )
            self.store.log(run_id, tags={Tag.MODEL_VERSION: version})
        self._end(run_id, ok=True)
        self.say(
            outcome.add(
                VariantOutcome(
                    v,
                    "built",
                    run_id,
                    e.perplexity,
                    base,
                    e.weights_bytes,
                    result.seconds_total,
                    result.artifact_uri,
                    version,
                    metrics=metrics,
                )
            )
        )

    def _record_candidates(self, v: Variant, run_id: str, rows: list[dict[str, Any]]) -> None:
        """One finished run per candidate a search (or mixed) built, under the variant's run: its settings as
        params, its validation figures and size as metrics, whether it was chosen as a tag."""
        for row in rows:
            child = self.store.start_run(
                f"{v.label}/{row['label']}",
                {
                    **self.spec.tracking.tags,
                    Tag.ROLE: "candidate",
                    Tag.VARIANT_ID: v.id,
                    Tag.MODEL: v.model_name,
                    Tag.LABEL: row["label"],
                    Tag.CANDIDATE_STATUS: row["status"],
                },
                run_id,
            )
            params = {
                f"method.{k}": json.dumps(x) if isinstance(x, (dict, list)) else x for k, x in row["method"].items()
            }
            self.store.log(child, params={**params, "candidate.index": row["index"]}, metrics=row["metrics"])
            self.store.end_run(child, ok=row["error"] is None, reason=row["error"])

    # -- records ---------------------------------------------------------------------------------------------
    def _variant_tags(self, plan: Plan, v: Variant) -> dict[str, str]:
        return {
            Tag.ROLE: "variant",
            Tag.JOB_ID: plan.job_id,
            Tag.VARIANT_ID: v.id,
            Tag.MODEL: v.model_name,
            Tag.MODEL_IDENTITY: v.identity,
            Tag.METHOD: v.method.method,
            Tag.LABEL: v.method.label(),
            Tag.CALIBRATION_HASH: v.calibration.hash,
            Tag.BASE_EVAL_ID: v.base_eval_id,
        }

    def _variant_params(self, v: Variant) -> dict[str, Any]:
        params: dict[str, Any] = {f"method.{k}": val for k, val in v.method.identity().items()}
        c = v.calibration
        params |= {
            "model.source": redact(v.model.source),
            "model.identity": v.identity,
            "calibration.source": redact(c.source),
            "calibration.num_samples": c.num_samples,
            "calibration.max_seq_length": c.max_seq_length,
            "calibration.seed": c.seed,
            "resources.num_gpus": v.resources.num_gpus,
            "resources.num_cpus": v.resources.num_cpus,
            "resources.gptq_hessian": v.resources.gptq_hessian,
            "resources.calibration_attention": v.resources.calibration_attention,
            "resources.gptq_inverse": v.resources.gptq_inverse,
            "resources.gptq_broadcast": v.resources.gptq_broadcast,
            "resources.gpu_memory_bytes": v.resources.gpu_memory_bytes,
        }
        if v.validation is not None:
            val = v.validation
            params |= {
                "validation.source": redact(val.source),
                "validation.sha256": val.sha256,
                "validation.max_tokens": val.max_tokens,
                "validation.seq_len": val.seq_len,
            }
        return params

    def _version_tags(self, v: Variant, manifest: dict[str, Any]) -> dict[str, str]:
        versions = manifest["versions"]
        return {
            "base_model_hash": v.identity,
            "method": v.method.method,
            "label": v.method.label(),
            "recipe_hash": manifest["recipe_sha256"],
            "method_config_hash": v.method.config_hash(),
            "calibration_hash": manifest["calibration"]["hash"],
            "variant_id": v.id,
            "date": manifest["created"],
            **{f"version.{k}": val for k, val in versions.items()},
        }


def _greedy(checks: ChecksResult | None) -> list[list[int]] | None:
    """The greedy token ids the serving check recorded, if it ran and generated."""
    document = checks.artifacts.get(serving.DOCUMENT) if checks is not None else None
    return (document or {}).get("greedy") or None


def _eval_metrics(e: EvaluateResult) -> dict[str, float]:
    return {
        "perplexity": e.perplexity,
        "ppl_tokens": e.ppl_tokens,
        "weights_bytes": e.weights_bytes,
        "dir_bytes": e.dir_bytes,
        "decoder_linear_bytes": e.decoder_linear_bytes,
        "seconds_eval_load": e.seconds_load,
        "seconds_perplexity": e.seconds_perplexity,
        "seconds_generate": e.seconds_generate,
    }

"""The driver: spec -> preflight -> plan -> Ray workers -> MLflow.

It alone creates and ends MLflow runs. Every check that can fail on bad input (sources, text files, method vs
model shapes, tracking reachability) runs before the first run is created or a worker starts. Finished
variants (same variant id, FINISHED run in the experiment) are reused, so re-running a job - or resuming one
whose driver died - only builds what is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from farm import resources, sources
from farm.artifacts import ArtifactStore
from farm.calibration import TextIdentity
from farm.errors import SpecError, TrackingError
from farm.methods.backends import BACKENDS
from farm.plan import BaseEval, ModelInfo, Plan, Variant, make_plan, merged_identity
from farm.runtime import cluster
from farm.runtime.ddp import Rank
from farm.runtime.results import BaseResult, RankReport, VariantResult
from farm.runtime.workers import BaseTask, Tracking, VariantTask, Worker, library_versions, pid_alive
from farm.secrets import redact
from farm.serving import measure as serving
from farm.spec import GateSpec, JobSpec
from farm.stages.checks.runner import ChecksResult
from farm.stages.evaluate import EvaluateResult
from farm.tracking.mlflow_store import (
    TAG,
    MlflowStore,
    default_local_uri,
    environ_uri,
    is_tracking_failure,
    new_local_store,
)
from farm.tracking.names import Tag

Printer = Callable[[str], None]
DRIVER_ID = f"{socket.gethostname()}:{os.getpid()}"


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


RECORD_WAIT_S = 120.0  # how long a recording claim blocks others: recording a variant takes seconds


def preflight(spec: JobSpec) -> Plan:
    """Resolve every input and plan; raises SpecError/SourceError before anything is created."""
    check_output_root(spec.output.root)
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(spec.models)))) as pool:  # hashing is I/O and hashlib
        futures = {
            m.display_name(): pool.submit(sources.resolve, m.source, m.revision, allow_pickle=m.allow_pickle)
            for m in spec.models
        }
        resolved = {name: f.result() for name, f in futures.items()}
    merged = {m.display_name(): sources.adapter_identity(m.merge_adapter) for m in spec.models if m.merge_adapter}
    infos = {
        n: ModelInfo(merged_identity(r.identity, merged[n]) if n in merged else r.identity, r.config, r.weights_bytes)
        for n, r in resolved.items()
    }
    texts = {"calibration text": TextIdentity.of(spec.calibration.source)}
    texts |= {f"calibration set {name!r}": TextIdentity.of(s.source) for name, s in spec.calibration_sets.items()}
    heldout = texts["held-out text"] = TextIdentity.of(spec.evaluation.perplexity.source)
    shas = {"": texts["calibration text"].sha256}
    shas |= {name: texts[f"calibration set {name!r}"].sha256 for name in spec.calibration_sets}
    for name, r in resolved.items():  # text the model's tokenizer cannot read is found now, naming the tokenizer
        problem = sources.tokenizer_problem(
            r.local_dir, {f"{what} ({t.source})": t.sample for what, t in texts.items()}
        )
        if problem:
            raise SpecError(f"model {name}: {problem}")
    adapters = {a.name: sources.adapter_identity(a.source) for a in spec.evaluation.adapters}
    for a in spec.evaluation.adapters:
        if a.eval_source:
            TextIdentity.of(a.eval_source)  # a missing adapter text is bad input: say so before anything runs
    return make_plan(spec, infos, shas, heldout.sha256, adapters)


def check_output_root(root: str) -> None:
    """A local output root must be a directory, or a path one can be made at (nothing is created here)."""
    if "://" in root:
        return
    path = Path(root).expanduser()
    for p in [path, *path.parents]:
        if p.exists():
            if not p.is_dir():
                what = "is" if p == path else f"is under {p}, which is"
                raise SpecError(f"output.root {root}: {what} a file, not a directory")
            if not os.access(p, os.W_OK | os.X_OK):
                raise SpecError(f"output.root {root}: {p} is not writable")
            return


def tracking_target(spec: JobSpec, override: str | None) -> tuple[str, str | None]:
    uri = override or spec.tracking.uri or environ_uri()
    if uri:
        return uri, None
    return default_local_uri(spec.output.root)


def registered_name(spec: JobSpec, model_name: str) -> str:
    return f"{spec.tracking.registered_model_prefix}{model_name}"


class Lookup(NamedTuple):
    """What the tracking store already holds for a plan, and what is left to do."""

    cached: dict[str, Any]  # variant id -> its finished run, or None
    todo: list[Variant]
    bases_todo: list[BaseEval]
    base_ppl: dict[str, float]
    seconds: float

    @property
    def work(self) -> bool:
        return bool(self.todo or self.bases_todo)


class Driver:
    def __init__(
        self,
        spec: JobSpec,
        tracking_uri: str | None = None,
        ray_address: str | None = None,
        verbose: bool = False,
        printer: Printer = print,
    ):
        self.spec = spec
        self.ray_address = ray_address
        self.verbose = verbose
        self.say = printer
        self.tracking_override = tracking_uri
        self.open_runs: set[str] = set()
        self.stale: set[str] = set()  # FINISHED variant runs whose published artifact is gone
        self.base_metrics: dict[str, dict[str, float]] = {}
        self.base_runs: dict[str, str] = {}  # base_eval_id -> its recorded run
        self.base_greedy: dict[str, list[list[int]] | None] = {}  # base_eval_id -> serving greedy token ids

    # -- MLflow helpers --------------------------------------------------------------------------------------
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

    # -- one record per variant, however many jobs race -------------------------------------------------------
    def _recorded(self, v: Variant) -> Any:
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

    def _reusable(self, v: Variant) -> Any:
        """The recorded run of this variant if its published artifact is still there and matches its manifest;
        otherwise the run is tagged `farm.stale` with the reason and the variant is built again."""
        row = self._recorded(v)
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

    def _claim_record(self, v: Variant, run_id: str, job_id: str) -> tuple[Any, str | None]:
        """(the run another job recorded this variant in, None) when this build is a duplicate, else (None, the
        claim this job now holds). Claims are MLflow experiments (unique names, as `farm watch` claims a
        release), one per recording attempt: a recorder that died leaves a claim the next attempt steps over
        once it is RECORD_WAIT_S old."""
        prefix = f"farm-record/{self.store.experiment_id}/{v.id}/"
        while True:
            row = self._recorded(v)
            if row is not None and row.run_id != run_id:
                return row, None
            claims = self.store.claims(prefix)
            age = time.time() - claims[-1].created_ms / 1000 if claims else None
            last = claims[-1].tags if claims else {}
            busy = last.get(Tag.RECORDING_RUN) != run_id and last.get(Tag.RECORD_STATE) != "failed"
            if age is not None and age < RECORD_WAIT_S and busy:
                time.sleep(0.5)  # another job is recording it now: its record, when it lands, is the one
                continue
            name = f"{prefix}{len(claims)}"
            if self.store.claim(name, {Tag.RECORDING_RUN: run_id, Tag.JOB_ID: job_id}):
                return None, name

    # -- the job ---------------------------------------------------------------------------------------------
    def run(self) -> JobOutcome:
        t0 = time.perf_counter()
        plan = preflight(self.spec)  # bad input stops here, before anything is created
        outcome = JobOutcome(plan, None, "")
        t = outcome.mark("preflight", t0)
        # A new local tracking store costs seconds of MLflow migrations and means every variant is to be built:
        # it is created while Ray starts (7-9 s each on the GPU machine). An existing store answers quickly which
        # variants it holds, and a rerun of a recorded job then starts no cluster at all.
        self.uri, self.artifact_location = tracking_target(self.spec, self.tracking_override)
        overlap = bool(plan.variants) and new_local_store(self.uri)
        with ThreadPoolExecutor(max_workers=1) as pool:
            lookup = pool.submit(self._lookup, plan)
            found = None if overlap else lookup.result()
            t = t if found is None else time.perf_counter()
            needed = overlap or (found is not None and found.work)
            with cluster.connect(self.ray_address, self.verbose) if needed else contextlib.nullcontext():
                outcome.mark("cluster", t)
                found = found or lookup.result()
                outcome.phases["tracking"] = found.seconds  # alongside "cluster" when a new store is created
                outcome.tracking_uri = redact(self.uri)
                self.say(
                    f"job {plan.job_name} ({plan.job_id}): {len(plan.variants)} variants, {len(found.todo)} to build, "
                    f"{len(plan.variants) - len(found.todo)} reused; tracking {redact(self.uri)}"
                )
                if found.work:  # a variant no node can hold is bad input: say so before any run is created
                    self._refuse_unfit(found.todo)
                    self._refuse_unservable()
                return self._record(plan, outcome, found.cached, found.todo, found.bases_todo, found.base_ppl, t0)

    def _refuse_unfit(self, todo: list[Variant]) -> None:
        """SpecError when no node (or no node's share for a data-parallel gang) can hold what is to be built."""
        memory = max(v.resources.memory_bytes for v in todo) if todo else 0
        nodes = cluster.nodes()
        problem = resources.unfit(nodes, self.spec.resources.num_cpus, self.spec.resources.num_gpus, memory)
        gangs = [v.resources for v in todo if v.resources.ranks > 1]
        if not problem and gangs:
            r = max(gangs, key=lambda r: r.memory_bytes)
            problem = cluster.gang_unfit(
                nodes, {"CPU": r.num_cpus, "GPU": r.num_gpus, "memory": r.memory_bytes}, r.ranks
            )
        if problem:
            raise SpecError(problem)

    def _refuse_unservable(self) -> None:
        """SpecError when the serving check cannot run where the variants will: no GPU in the cluster, or the
        engine not importable on a GPU worker (asked of a task placed like a variant, before any run)."""
        ev = self.spec.evaluation.serving
        if ev is None:
            return
        gpus = cluster.totals().get("GPU", 0)
        if gpus <= 0:
            raise SpecError(
                "evaluation.serving: the Ray cluster has no GPU; the serving engine runs on the variant's GPU"
            )
        from farm.serving.runner import probe

        problem, _version = cluster.run_task(
            probe, {"num_gpus": min(self.spec.resources.num_gpus, 1.0), "num_cpus": 0}, ev
        )
        if problem:
            raise SpecError(problem)

    def _lookup(self, plan: Plan) -> Lookup:
        """The tracking store, and what it already holds: variants and base evaluations to reuse, the rest to do."""
        t = time.perf_counter()
        self.store = MlflowStore(self.uri, self.spec.tracking.experiment, self.artifact_location)
        self.store.check_reachable()
        self._reap_orphans(plan)
        # a variant is reused only if it was judged the same way (base_eval_id hashes the evaluation settings)
        cached = {v.id: self._reusable(v) for v in plan.variants}
        todo = [v for v in plan.variants if cached[v.id] is None]
        base_cached = {b.id: self.store.finished("base", "base_eval_id", b.id) for b in plan.base_evals}
        base_ppl = {b: float(r.metrics["perplexity"]) for b, r in base_cached.items() if r is not None}
        self.base_runs = {b: r.run_id for b, r in base_cached.items() if r is not None}
        self.base_metrics = {b: dict(r.metrics) for b, r in base_cached.items() if r is not None}
        bases_todo = [b for b in plan.base_evals if b.id not in base_ppl and any(v.base_eval_id == b.id for v in todo)]
        return Lookup(cached, todo, bases_todo, base_ppl, time.perf_counter() - t)

    def _record(
        self,
        plan: Plan,
        outcome: JobOutcome,
        cached: dict[str, Any],
        todo: list[Variant],
        bases_todo: list[BaseEval],
        base_ppl: dict[str, float],
        t0: float,
    ) -> JobOutcome:
        parent, attempt = self._job_run(plan)
        outcome.parent_run_id = parent
        ok = False
        try:
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
            for v in plan.variants:
                row = cached[v.id]
                if row is not None:
                    row = self._registered_as(v, row)
                    outcome.variants.append(self._reused(v, row, base_ppl.get(v.base_eval_id)))
                    self._print_variant(outcome.variants[-1], len(outcome.variants), len(plan.variants))
            t = time.perf_counter()
            if todo or bases_todo:
                self._run_rungs(plan, todo, bases_todo, base_ppl, parent, outcome)
            t = outcome.mark("build", t)
            if self.spec.gate is not None:
                self._gate(outcome, self.spec.gate)
            outcome.mark("finish", t)
            outcome.seconds = time.perf_counter() - t0
            built = [v for v in outcome.variants if v.status == "built"]
            self.store.log(
                parent,
                metrics={
                    "variants_built": len(built),
                    "variants_failed": sum(v.status == "failed" for v in outcome.variants),
                    "seconds": outcome.seconds,
                    **{f"seconds_{k}": v for k, v in outcome.phases.items()},
                },
            )
            ok, outcome.finished = outcome.ok, True
            return outcome
        except Exception as err:
            if is_tracking_failure(err):
                done = [v.variant.label for v in outcome.variants if v.status == "built"]
                raise TrackingError(
                    f"MLflow at {redact(self.uri)} failed mid-job ({type(err).__name__}); {len(done)} variant(s) "
                    f"were recorded; finished artifacts stay under {redact(self.spec.output.root)}; re-run to resume"
                ) from None
            raise
        finally:
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

    def _reap_orphans(self, plan: Plan) -> None:
        """Runs of this job left RUNNING by a driver that died (kill -9, power loss) on this host are marked
        FAILED, so the record never shows work in progress that nobody is doing."""
        for row in self.store.find_runs([f"tags.`{Tag.JOB_ID}` = '{plan.job_id}'"], status="RUNNING"):
            driver = row.tags.get(Tag.DRIVER, "")
            host, _, pid = driver.rpartition(":")
            if host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
                self.store.end_run(row.run_id, ok=False, reason=f"driver {driver} died before finishing this run")
                self.say(f"  marked FAILED: run {row.run_id} left RUNNING by dead driver {driver}")

    def _registered_as(self, v: Variant, row: Any) -> Any:
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

    def _reused(self, v: Variant, row: Any, base: float | None) -> VariantOutcome:
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

    def _run_rungs(
        self,
        plan: Plan,
        todo: list[Variant],
        bases: list[BaseEval],
        base_ppl: dict[str, float],
        parent: str,
        outcome: JobOutcome,
    ) -> None:
        """Run the variants rung by rung (one rung without a ladder): a base climbs to the next rung only if
        every variant of the rung below passed the gate; the rest of its ladder is skipped, and says why."""
        from farm.promote import decide, default_rules, rungs

        gate = self.spec.gate
        order = rungs([m.label() for m in self.spec.methods], gate.ladder if gate else None)
        rules = gate.rules if gate and gate.rules is not None else default_rules(self.spec.evaluation)
        stopped: dict[str, str] = {}  # model -> why its ladder stopped
        for i, labels in enumerate(order):
            rung = [v for v in todo if v.method.label() in labels]
            for v in [v for v in rung if v.model_name in stopped]:
                outcome.variants.append(VariantOutcome(v, "skipped", reason=stopped[v.model_name]))
                self._print_variant(outcome.variants[-1], len(outcome.variants), len(plan.variants))
            self._execute(
                plan,
                [v for v in rung if v.model_name not in stopped],
                bases if i == 0 else [],
                base_ppl,
                parent,
                outcome,
            )
            if not gate or not gate.ladder:
                continue
            for o in [o for o in outcome.variants if o.variant.method.label() in labels and o.status != "skipped"]:
                verdict = (
                    "failed"
                    if o.status == "failed"
                    else decide(rules, o.metrics, self.base_metrics.get(o.variant.base_eval_id, {})).outcome
                )
                if verdict != "promoted" and o.variant.model_name not in stopped:
                    stopped[o.variant.model_name] = f"ladder stopped: {o.variant.method.label()} was {verdict}"

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

    def _gate(self, outcome: JobOutcome, gate: GateSpec) -> None:
        """Apply the evaluation matrix to every variant of the job (built now or reused), record each decision
        on its run and model version, and point the registry aliases at the promoted ones."""
        from farm.promote import aliases, decide, default_rules

        rules = gate.rules if gate.rules is not None else default_rules(self.spec.evaluation)
        promoted: dict[str, list[tuple[str, str, float]]] = {}
        for o in outcome.variants:
            if o.status in {"failed", "skipped"} or o.run_id is None:
                continue
            d = decide(rules, o.metrics, self.base_metrics.get(o.variant.base_eval_id, {}))
            o.gate = d.outcome
            self.store.log(
                o.run_id,
                tags={
                    Tag.GATE: d.outcome,
                    Tag.GATE_REASONS: "; ".join(d.reasons),
                    Tag.GATE_WARNINGS: "; ".join(d.warnings),
                },
            )
            self.store.log_json(
                o.run_id,
                {"decision": d.outcome, "reasons": d.reasons, "warnings": d.warnings, "matrix": d.rows},
                "gate.json",
            )
            name = registered_name(self.spec, o.variant.model_name)
            if o.model_version:
                self.store.tag_version(name, o.model_version, {"gate": d.outcome, "gate_reasons": "; ".join(d.reasons)})
                if d.outcome == "promoted":
                    promoted.setdefault(name, []).append(
                        (o.variant.method.label(), o.model_version, float(o.weights_bytes or 0))
                    )
            why = f": {'; '.join(d.reasons)}" if d.reasons else ""
            self.say(f"  gate     {o.variant.label}: {d.outcome}{why}")
        for name, versions in promoted.items():
            self.store.set_aliases(name, aliases(versions, gate.alias, gate.tiers))

    def _execute(
        self,
        plan: Plan,
        todo: list[Variant],
        bases: list[BaseEval],
        base_ppl: dict[str, float],
        parent: str,
        outcome: JobOutcome,
    ) -> None:
        """Run base evaluations, then variants (slowest methods first), on a pool of reusable workers sized to
        the cluster: a worker process imports torch and llm-compressor once and quantizes many small variants.
        Likewise a data-parallel gang stays up for the next variant of its shape (a fresh one spends 8-12 s
        importing, measured on H100 hosts)."""
        res = self.spec.resources
        memory = max([v.resources.memory_bytes for v in todo] or [0]) or None
        # farm retries a variant whose worker died itself (not Ray's task retries), so that every attempt has
        # its own MLflow run: the killed one FAILED with the reason, the retry FINISHED.
        worker_opts = {
            "num_cpus": res.num_cpus,
            "num_gpus": res.num_gpus,
            "max_restarts": 0,
            "max_task_retries": 0,
            **({"memory": memory} if memory else {}),
        }
        size = resources.pool_size(cluster.totals(), res.num_cpus, res.num_gpus, memory or 0, len(todo) + len(bases))
        tracking = Tracking(
            self.store.uri, self.spec.tracking.experiment, self.artifact_location, self.spec.tracking.log_model
        )
        slowest_first = sorted(todo, key=lambda v: v.method.cost_rank)
        queue: deque[BaseEval | Variant] = deque([*bases, *slowest_first])
        idle: dict[str, list[Any]] = {}  # reusable workers by runtime environment ("" = the worker's own)
        idle_gangs: dict[tuple[Any, ...], list[cluster.Gang]] = {}  # finished gangs by shape, kept for the next
        pending: dict[Any, tuple[BaseEval | Variant, Any, str]] = {}  # ref -> (item, worker or gang, run_id)
        followers: dict[Any, Any] = {}  # ref of a rank > 0 -> ref of its rank 0
        rank_errors: dict[Any, str] = {}  # rank-0 ref -> why another rank of its gang failed
        rank_info: dict[Any, list[RankReport]] = {}  # rank-0 ref -> where the other ranks ran
        waiting: list[tuple[Variant, str, VariantResult]] = []  # variants done before their base
        bases_left = {b.id for b in bases}
        attempts: dict[str, int] = {}
        self.say(f"  {size} worker(s) of {res.num_cpus:g} CPU / {res.num_gpus:g} GPU each")

        def slots(item: BaseEval | Variant) -> int:
            return min(item.resources.ranks, size) if isinstance(item, Variant) else 1

        def close_idle_gangs() -> None:
            for gang in [g for gangs in idle_gangs.values() for g in gangs]:
                gang.close()
            idle_gangs.clear()

        def take(item: BaseEval | Variant) -> Any:
            """An idle worker of the item's runtime environment, or a new one (a backend's own virtualenv)."""
            env = backend_env(item)
            pool = idle.setdefault(env_key(env), [])
            if pool:
                return pool.pop()
            close_idle_gangs()  # they hold the GPUs a new worker needs
            other = next((p for p in idle.values() if p), None)
            if other:  # an idle worker of another environment holds the slot this one needs
                cluster.kill(other.pop())
            return cluster.remote_actor(Worker, {**worker_opts, **({"runtime_env": env} if env else {})}).remote(
                res.num_cpus, secrets=cluster.forwarded_env()[1], cpu_only=not res.num_gpus
            )

        try:
            while queue or pending:
                while queue and sum(slots(p[0]) for p in pending.values()) + slots(queue[0]) <= size:
                    item = queue.popleft()
                    attempt = attempts[item.id] = attempts.get(item.id, 0) + 1
                    if isinstance(item, BaseEval):
                        worker = take(item)
                        run_id = self._start(
                            f"base:{item.model_name}",
                            {
                                Tag.ROLE: "base",
                                Tag.JOB_ID: plan.job_id,
                                Tag.BASE_EVAL_ID: item.id,
                                Tag.MODEL: item.model_name,
                                Tag.MODEL_IDENTITY: item.identity,
                                Tag.ATTEMPT: str(attempt),
                            },
                            parent,
                        )
                        ref = worker.evaluate_base.remote(
                            BaseTask(plan.job_name, item, self.spec.evaluation, res.num_gpus)
                        )
                        pending[ref] = (item, worker, run_id)
                        continue
                    row = self._recorded(item) if attempt == 1 else None
                    if row is not None:  # another job recorded it after this one looked: nothing to build
                        outcome.variants.append(
                            self._reused(item, self._registered_as(item, row), base_ppl.get(item.base_eval_id))
                        )
                        self._print_variant(outcome.variants[-1], len(outcome.variants), len(plan.variants))
                        continue
                    run_id = self._start(
                        item.label, {**self._variant_tags(plan, item), Tag.ATTEMPT: str(attempt)}, parent
                    )
                    self.store.log(run_id, params=self._variant_params(item))
                    task = VariantTask(
                        plan.job_name, item, run_id, self.spec.evaluation, self.spec.output.root, tracking
                    )
                    if item.resources.ranks > 1 or item.resources.num_gpus != res.num_gpus:
                        same = idle_gangs.get(gang_shape(item))
                        gang = same.pop() if same else None  # its ranks imported torch & co. already
                        if gang is None:
                            for w in [w for pool in idle.values() for w in pool]:  # they hold what it needs
                                cluster.kill(w)
                            idle.clear()
                            close_idle_gangs()
                        gang, refs = self._start_gang(item, task, gang)
                        ref = refs[0]
                        followers.update({r: ref for r in refs[1:]})
                        pending[ref] = (item, gang, run_id)
                    else:
                        worker = take(item)
                        ref = worker.build.remote(task)
                        pending[ref] = (item, worker, run_id)
                    self.say(f"  started  {item.label}  (variant {item.id}, run {run_id[:12]})")
                ref = cluster.wait_one(list(pending) + list(followers))
                if ref in followers:
                    lead = followers.pop(ref)
                    value, error, _ = cluster.result(ref)
                    rank_info.setdefault(lead, []).append(value)
                    if error is not None and lead in pending:  # one rank failed: the collective cannot finish
                        rank_errors[lead] = f"a data-parallel rank failed: {error}"
                        pending[lead][1].close()
                    continue
                item, worker, run_id = pending.pop(ref)
                result, error, worker_lost = cluster.result(ref)
                if isinstance(worker, cluster.Gang):
                    rest = [r for r, lead in followers.items() if lead == ref]
                    for r in rest:
                        followers.pop(r)
                    error = rank_errors.pop(ref, error) if error is not None else None
                    others = rank_info.pop(ref, [])
                    late = cluster.finished(rest) if error is None else None  # ranks still returning
                    if late is not None and isinstance(item, Variant):  # gangs only ever run variants
                        others += late
                        idle_gangs.setdefault(gang_shape(item), []).append(worker)  # for the next of its shape
                    else:
                        worker.close()
                    if isinstance(result, VariantResult) and result.ddp is not None:
                        ranks = (*result.ddp.ranks, *(r for r in others if isinstance(r, RankReport)))
                        result = dataclasses.replace(result, ddp=dataclasses.replace(result.ddp, ranks=ranks))
                elif worker_lost:
                    cluster.kill(worker)
                else:
                    idle.setdefault(env_key(backend_env(item)), []).append(worker)
                if error is not None and worker_lost and attempts[item.id] <= res.max_retries:
                    self._end(run_id, ok=False, reason=f"{error} (attempt {attempts[item.id]}; retried)")
                    self.say(f"  retry    {getattr(item, 'label', getattr(item, 'model_name', ''))}: {error}")
                    queue.appendleft(item)
                    continue
                if isinstance(item, BaseEval):
                    bases_left.discard(item.id)
                    self._finish_base(item, run_id, result, error, base_ppl)
                    if item.id not in base_ppl:  # a variant is judged against its base: without one, not built
                        outcome.failed_bases[item.id] = f"{item.model_name}: {error}"
                        for v in [q for q in queue if isinstance(q, Variant) and q.base_eval_id == item.id]:
                            queue.remove(v)
                            outcome.variants.append(
                                VariantOutcome(v, "skipped", None, reason=f"base evaluation failed: {error}")
                            )
                            self._print_variant(outcome.variants[-1], len(outcome.variants), len(plan.variants))
                    for w in [w for w in waiting if w[0].base_eval_id == item.id]:
                        waiting.remove(w)
                        self._finish_variant(w[0], w[1], w[2], base_ppl.get(item.id), outcome)
                elif error is not None or result is None:
                    self._end(run_id, ok=False, reason=error)
                    outcome.variants.append(VariantOutcome(item, "failed", run_id, reason=error))
                    self._print_variant(outcome.variants[-1], len(outcome.variants), len(plan.variants))
                elif item.base_eval_id not in bases_left:
                    self._finish_variant(item, run_id, result, base_ppl.get(item.base_eval_id), outcome)
                else:
                    waiting.append((item, run_id, result))
        finally:
            close_idle_gangs()
            for worker in [w for pool in idle.values() for w in pool] + [p[1] for p in pending.values()]:
                if isinstance(worker, cluster.Gang):
                    worker.close()
                else:
                    cluster.kill(worker)

    def _start_gang(self, v: Variant, task: VariantTask, gang: cluster.Gang | None = None) -> tuple[Any, list[Any]]:
        """A placement group of `ranks` workers (or `gang`, an idle one of this shape); rank 0 names the
        rendezvous, every rank joins it. A variant of another shape than the pool's (one worker, several GPUs)
        is a gang of one."""
        r = v.resources
        fresh = gang is None
        gang = gang or cluster.Gang(
            Worker,
            r.ranks,
            {"CPU": r.num_cpus, "GPU": r.num_gpus, "memory": r.memory_bytes},
            (r.num_cpus, r.ranks == 1, cluster.forwarded_env()[1], not r.num_gpus),
        )
        if r.ranks == 1:
            return gang, [gang.actors[0].build.remote(task)]
        addr, port = gang.call("rendezvous")
        visible = ",".join(gang.call_each("visible_devices"))
        ranks = [Rank(i, r.ranks, addr, port, visible) for i in range(r.ranks)]
        if fresh:  # imports first: an actor runs its calls in order, and `build` starts its stage only after
            for actor, rank in zip(gang.actors, ranks, strict=True):  # the group's barrier, so no rank's
                actor.join.remote(rank)  # imports land in the stage
        refs = [actor.build.remote(task, rank) for actor, rank in zip(gang.actors, ranks, strict=True)]
        return gang, refs

    def _finish_base(
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

    def _finish_variant(
        self, v: Variant, run_id: str, result: VariantResult, base: float | None, outcome: JobOutcome
    ) -> None:
        """Record a built variant, unless a concurrent job recorded it first: then this build's run ends KILLED
        with the reason and the variant is reported as reused from that job's run (one FINISHED run and one
        registry version per variant)."""
        row, claim = self._claim_record(v, run_id, outcome.plan.job_id)
        if row is not None:
            self._end(
                run_id,
                ok=False,
                reason=f"a concurrent job recorded this variant first (run {row.run_id})",
                status="KILLED",
            )
            outcome.variants.append(self._reused(v, self._registered_as(v, row), base))
            self._print_variant(outcome.variants[-1], len(outcome.variants), len(outcome.plan.variants))
            return
        try:
            self._record_variant(v, run_id, result, base, outcome)
        except BaseException:
            if claim:
                self.store.tag_claim(claim, {Tag.RECORD_STATE: "failed"})
            raise
        if claim:
            self.store.hide_claim(claim)

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
        outcome.variants.append(
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
        self._print_variant(outcome.variants[-1], len(outcome.variants), len(outcome.plan.variants))

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

    def _print_variant(self, o: VariantOutcome, n: int, total: int) -> None:
        if o.status == "failed":
            self.say(f"[{n}/{total}] {o.variant.label}: FAILED {o.reason} (run {o.run_id})")
            return
        if o.status == "skipped":
            self.say(f"[{n}/{total}] {o.variant.label}: skipped ({o.reason})")
            return
        delta = f"{o.delta:+.2f}" if o.delta is not None else "n/a"
        size = f"{o.weights_bytes / 1e6:.1f} MB" if o.weights_bytes else "?"
        secs = f"{o.seconds:.0f} s" if o.seconds is not None else "?"
        ppl = f"{o.perplexity:.2f}" if o.perplexity is not None else "?"
        self.say(
            f"[{n}/{total}] {o.variant.label}: {o.status}, {size}, ppl {ppl} ({delta}), {secs}, "
            f"run {o.run_id}, {o.artifact_uri}"
        )


def gang_shape(v: Variant) -> tuple[Any, ...]:
    """Variants of one shape can run on the same gang, one after another (its workers stay warm)."""
    r = v.resources
    return r.ranks, r.num_gpus, r.num_cpus, r.memory_bytes, env_key(backend_env(v))


def backend_env(item: BaseEval | Variant) -> dict[str, Any] | None:
    """The Ray runtime_env a variant's backend needs (None: the worker's own packages)."""
    if not isinstance(item, Variant):
        return None
    return BACKENDS[item.method.backend_name].runtime_env()


def env_key(env: dict[str, Any] | None) -> str:
    return json.dumps(env, sort_keys=True) if env else ""


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
        "seconds_eval_load": e.seconds_load,
        "seconds_perplexity": e.seconds_perplexity,
        "seconds_generate": e.seconds_generate,
    }


def run_job(
    spec: JobSpec,
    tracking_uri: str | None = None,
    ray_address: str | None = None,
    verbose: bool = False,
    printer: Printer = print,
) -> JobOutcome:
    return Driver(spec, tracking_uri, ray_address, verbose, printer).run()

"""The driver: spec -> preflight -> plan -> Ray workers -> MLflow.

Every check that can fail on bad input (sources, text files, method vs model shapes, tracking reachability)
runs before the first run is created or a worker starts. Finished variants (same variant id, FINISHED run in the
experiment) are reused, so re-running a job - or resuming one whose driver died - only builds what is missing.
The driver decides; `records` writes the job down in MLflow, `execute` runs a rung on Ray (its scheduler is a
plain state machine), `outcome` is what the job did.
"""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from farm import packing, resources, sources
from farm.calibration import MIX, TextIdentity, parts
from farm.errors import SpecError, TrackingError
from farm.plan import BaseEval, ModelInfo, Plan, Variant, make_plan, merged_identity
from farm.runtime import cluster
from farm.runtime.execute import Execution
from farm.runtime.outcome import JobOutcome, VariantOutcome
from farm.runtime.records import JobRecords, Printer, registered_name
from farm.runtime.workers import Tracking, gpu_card_bytes
from farm.secrets import redact
from farm.spec import GateSpec, JobSpec
from farm.tracking.mlflow_store import MlflowStore, default_local_uri, environ_uri, is_tracking_failure, new_local_store

__all__ = ["JobOutcome", "VariantOutcome", "preflight", "registered_name", "run_job", "tracking_target"]


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
    validation = None
    if spec.validation is not None:
        validation = texts["validation text"] = TextIdentity.of(spec.validation.source)
        for what, t in texts.items():
            pieces = [t] if not t.source.startswith(MIX) else [TextIdentity.of(src) for src, _ in parts(t.source)]
            if what != "validation text" and validation.sha256 in {p.sha256 for p in pieces}:
                raise SpecError(
                    f"validation.source: the validation text is the {what} ({t.source}); it must be apart from "
                    "both, or the figures it chooses by are not held out"
                )
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
    return make_plan(spec, infos, shas, heldout.sha256, adapters, validation.sha256 if validation else None)


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


def job_directory_problem(spec: JobSpec, override: str | None, cwd: Path, in_job: bool) -> str | None:
    """Inside a job started with `ray job submit`, the working directory is Ray's copy of the job's working_dir,
    deleted with the job: an output root or a sqlite store there (a relative path, or the defaults) would be lost
    without a word. `farm submit` sends absolute paths, which are kept."""
    if not in_job:
        return None
    root = spec.output.root
    places = [] if "://" in root else [("output.root", root)]
    uri = override or spec.tracking.uri or environ_uri()
    if uri is None:
        places.append(("the default tracking store", str(Path(root if "://" not in root else ".farm") / "mlflow.db")))
    elif uri.startswith("sqlite:///"):
        places.append(("tracking.uri", uri[len("sqlite:///") :]))
    for what, place in places:
        full = (cwd / Path(place).expanduser()).resolve()
        if full == cwd or cwd in full.parents:
            return (
                f"{what} {place} lies in the Ray job's working directory ({cwd}), which Ray deletes with the job: "
                "use an s3:// output root and an MLflow server (tracking.uri), or absolute paths on shared storage"
            )
    return None


def tracking_target(spec: JobSpec, override: str | None) -> tuple[str, str | None]:
    uri = override or spec.tracking.uri or environ_uri()
    if uri:
        return uri, None
    return default_local_uri(spec.output.root)


class Lookup(NamedTuple):
    """What the tracking store already holds for a plan, and what is left to do."""

    records: JobRecords  # the job's records, holding what earlier jobs recorded for its bases
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
        self.pool_gpus: float | None = None  # set by GPU packing; None: the spec's num_gpus

    def run(self) -> JobOutcome:
        t0 = time.perf_counter()
        plan = preflight(self.spec)  # bad input stops here, before anything is created
        problem = job_directory_problem(self.spec, self.tracking_override, Path.cwd().resolve(), cluster.in_ray_job())
        if problem:
            raise SpecError(problem)
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
                self.records = found.records  # made on the lookup's thread, used only from here on
                outcome.phases["tracking"] = found.seconds  # alongside "cluster" when a new store is created
                outcome.tracking_uri = redact(self.uri)
                self.say(
                    f"job {plan.job_name} ({plan.job_id}): {len(plan.variants)} variants, {len(found.todo)} to build, "
                    f"{len(plan.variants) - len(found.todo)} reused; tracking {redact(self.uri)}"
                )
                if found.work and self.spec.resources.gpu_packing == "memory":
                    found = found._replace(todo=self._packed(plan, found.todo, found.bases_todo, found.records))
                if found.work:  # a variant no node can hold is bad input: say so before any run is created
                    self._refuse_unfit(found.todo)
                    self._refuse_unservable()
                return self._record(plan, outcome, found.cached, found.todo, found.bases_todo, found.base_ppl, t0)

    def _packed(self, plan: Plan, todo: list[Variant], bases: list[BaseEval], records: JobRecords) -> list[Variant]:
        """`resources.gpu_packing: memory`: each variant's GPU share from its measured or estimated need
        (farm/packing.py); SpecError naming a variant no share holds, before any run."""
        most = self.spec.resources.num_gpus
        if cluster.totals().get("GPU", 0) <= 0:
            raise SpecError("resources.gpu_packing: the Ray cluster has no GPU to pack variants on")
        given = self.spec.resources.gpu_card_gb
        card = (
            int(given * resources.GIB)
            if given
            else cluster.run_task(gpu_card_bytes, {"num_gpus": packing.PROBE_GPUS, "num_cpus": 0})
        )
        packed, problems = packing.pack(todo, plan.shapes, card, records.store.measured_peaks())
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise SpecError(f"resources.gpu_packing: {problems[0]}{more}")
        pool = (
            packing.base_share({b.model_name: plan.shapes[b.identity] for b in bases}, card, most)
            if bases
            else min([most, *(v.resources.num_gpus for v in packed)])
        )
        if isinstance(pool, str):
            raise SpecError(f"resources.gpu_packing: {pool}")
        self.pool_gpus = pool
        shares = ", ".join(f"{v.label} {v.resources.num_gpus:g}" for v in packed)
        self.say(f"  GPU packing on {packing.gib(card)} GiB cards: bases {self.pool_gpus:g} GPU; {shares}")
        return packed

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
        """The tracking store, and what it already holds: variants and base evaluations to reuse, the rest to do.
        Runs on a thread beside the cluster's start: it returns everything it finds and sets nothing on `self`."""
        t = time.perf_counter()
        store = MlflowStore(self.uri, self.spec.tracking.experiment, self.artifact_location)
        store.check_reachable()
        records = JobRecords(store, self.spec, self.say)
        records.reap_orphans(plan)
        # a variant is reused only if it was judged the same way (base_eval_id hashes the evaluation settings)
        cached = {v.id: records.reusable(v) for v in plan.variants}
        todo = [v for v in plan.variants if cached[v.id] is None]
        base_cached = {b.id: store.finished("base", "base_eval_id", b.id) for b in plan.base_evals}
        base_ppl = {b: float(r.metrics["perplexity"]) for b, r in base_cached.items() if r is not None}
        records.base_runs = {b: r.run_id for b, r in base_cached.items() if r is not None}
        records.base_metrics = {b: dict(r.metrics) for b, r in base_cached.items() if r is not None}
        bases_todo = [b for b in plan.base_evals if b.id not in base_ppl and any(v.base_eval_id == b.id for v in todo)]
        return Lookup(records, cached, todo, bases_todo, base_ppl, time.perf_counter() - t)

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
        records = self.records
        parent, _attempt = records.open_job(plan)
        outcome.parent_run_id = parent
        ok = False
        try:
            for v in plan.variants:
                row = cached[v.id]
                if row is not None:
                    row = records.registered_as(v, row)
                    self.say(outcome.add(records.reused(v, row, base_ppl.get(v.base_eval_id))))
            t = time.perf_counter()
            if todo or bases_todo:
                self._run_rungs(plan, todo, bases_todo, base_ppl, parent, outcome)
            t = outcome.mark("build", t)
            if self.spec.gate is not None:
                self._gate(outcome, self.spec.gate)
            outcome.mark("finish", t)
            outcome.seconds = time.perf_counter() - t0
            built = [v for v in outcome.variants if v.status == "built"]
            records.store.log(
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
            records.close_job(parent, ok, outcome)

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
        tracking = Tracking(
            self.uri, self.spec.tracking.experiment, self.artifact_location, self.spec.tracking.log_model
        )
        stopped: dict[str, str] = {}  # model -> why its ladder stopped
        for i, labels in enumerate(order):
            rung = [v for v in todo if v.method.label() in labels]
            for v in [v for v in rung if v.model_name in stopped]:
                self.say(outcome.add(VariantOutcome(v, "skipped", reason=stopped[v.model_name])))
            Execution(self.spec, plan, self.records, parent, outcome, self.pool_gpus).run(
                [v for v in rung if v.model_name not in stopped], bases if i == 0 else [], base_ppl, tracking
            )
            if not gate or not gate.ladder:
                continue
            for o in [o for o in outcome.variants if o.variant.method.label() in labels and o.status != "skipped"]:
                verdict = (
                    "failed"
                    if o.status == "failed"
                    else decide(rules, o.metrics, self.records.base_metrics.get(o.variant.base_eval_id, {})).outcome
                )
                if verdict != "promoted" and o.variant.model_name not in stopped:
                    stopped[o.variant.model_name] = f"ladder stopped: {o.variant.method.label()} was {verdict}"

    def _gate(self, outcome: JobOutcome, gate: GateSpec) -> None:
        """Apply the evaluation matrix to every variant of the job (built now or reused), record each decision
        on its run and model version, and point the registry aliases at the promoted ones."""
        from farm.promote import aliases, decide, default_rules

        rules = gate.rules if gate.rules is not None else default_rules(self.spec.evaluation)
        promoted: dict[str, list[tuple[str, str, float]]] = {}
        for o in outcome.variants:
            if o.status in {"failed", "skipped"} or o.run_id is None:
                continue
            d = decide(rules, o.metrics, self.records.base_metrics.get(o.variant.base_eval_id, {}))
            o.gate = d.outcome
            self.records.record_decision(o.run_id, o, d)
            if o.model_version and d.outcome == "promoted":
                name = registered_name(self.spec, o.variant.model_name)
                promoted.setdefault(name, []).append(
                    (o.variant.method.label(), o.model_version, float(o.weights_bytes or 0))
                )
            why = f": {'; '.join(d.reasons)}" if d.reasons else ""
            self.say(f"  gate     {o.variant.label}: {d.outcome}{why}")
        for name, versions in promoted.items():
            self.records.store.set_aliases(name, aliases(versions, gate.alias, gate.tiers))


def run_job(
    spec: JobSpec,
    tracking_uri: str | None = None,
    ray_address: str | None = None,
    verbose: bool = False,
    printer: Printer = print,
) -> JobOutcome:
    return Driver(spec, tracking_uri, ray_address, verbose, printer).run()

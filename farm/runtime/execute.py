"""Run a rung of a job on Ray: the scheduler's actions carried out with actors and placement groups, and each
finished task handed to the job's records.

Base evaluations go first, then variants (slowest methods first), on a pool of reusable workers sized to the
cluster: a worker process imports torch and llm-compressor once and quantizes many small variants. A
data-parallel gang likewise stays up for the next variant of its shape (a fresh one spends 8-12 s importing,
measured on H100 hosts). farm retries a variant whose worker died itself (not Ray's task retries), so that every
attempt has its own MLflow run: the killed one FAILED with the reason, the retry FINISHED.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from farm import resources
from farm.methods.backends import BACKENDS
from farm.plan import BaseEval, Plan, Variant
from farm.runtime import cluster
from farm.runtime.claims import BUILD_BEAT_S
from farm.runtime.ddp import Rank
from farm.runtime.outcome import JobOutcome, VariantOutcome
from farm.runtime.records import JobRecords
from farm.runtime.results import RankReport, VariantResult
from farm.runtime.scheduler import Run, Scheduler, Start, Stop, Unit
from farm.runtime.workers import BaseTask, Tracking, VariantTask, Worker
from farm.spec import JobSpec
from farm.tracking.heartbeat import beating
from farm.tracking.names import Tag

Item = BaseEval | Variant
PARK_POLL_S = 5.0  # how often a variant another job is building is looked up again


def backend_env(item: Item) -> dict[str, Any] | None:
    """The Ray runtime_env a variant's backend needs (None: the worker's own packages)."""
    if not isinstance(item, Variant):
        return None
    return BACKENDS[item.method.backend_name].runtime_env()


def env_key(env: dict[str, Any] | None) -> str:
    return json.dumps(env, sort_keys=True) if env else ""


def kind_of(item: Item, pool_gpus: float) -> Hashable:
    """What an item runs on: a pool worker of its runtime environment, or a gang of its shape (several ranks,
    or another GPU share than the pool's; a gang of one then)."""
    key = env_key(backend_env(item))
    if isinstance(item, Variant) and (item.resources.ranks > 1 or item.resources.num_gpus != pool_gpus):
        r = item.resources
        return ("gang", r.ranks, r.num_gpus, r.num_cpus, r.memory_bytes, key)
    return ("worker", key)


@dataclass
class Task:
    """A remote call in flight: the unit it runs on, its item and run; for a gang, its other ranks' calls."""

    unit: Unit[Item]
    item: Item
    run_id: str
    followers: list[Any] = field(default_factory=list)
    rank_error: str | None = None
    ranks: list[RankReport] = field(default_factory=list)


class Execution:
    """One rung: its scheduler, the calls in flight, and what came back."""

    def __init__(
        self,
        spec: JobSpec,
        plan: Plan,
        records: JobRecords,
        parent: str,
        outcome: JobOutcome,
        pool_gpus: float | None = None,
    ):
        self.spec, self.plan, self.records, self.parent, self.outcome = spec, plan, records, parent, outcome
        # the pool workers' GPU share (base evaluations, and variants of that share): the spec's, or packing's
        self.pool_gpus = spec.resources.num_gpus if pool_gpus is None else pool_gpus
        self.say = records.say
        self.tasks: dict[Any, Task] = {}  # rank-0 (or only) ref -> task
        self.followers: dict[Any, Any] = {}  # ref of a rank > 0 -> its rank 0's ref
        self.starting: dict[Any, Unit[Item]] = {}  # a new worker's `ready` ref -> its unit
        self.waiting: list[tuple[Variant, str, VariantResult]] = []  # variants done before their base
        self.bases_left: set[str] = set()
        self.told: set[str] = set()  # variants this job said it waits for

    def run(self, todo: list[Variant], bases: list[BaseEval], base_ppl: dict[str, float], tracking: Tracking) -> None:
        res, pool = self.spec.resources, self.pool_gpus
        memory = max([v.resources.memory_bytes for v in todo] or [0]) or None
        self.worker_opts = {
            "num_cpus": res.num_cpus,
            "num_gpus": pool,
            "max_restarts": 0,
            "max_task_retries": 0,
            **({"memory": memory} if memory else {}),
        }
        smallest = min([pool, *(v.resources.num_gpus for v in todo if v.resources.ranks == 1)])
        size = resources.pool_size(cluster.totals(), res.num_cpus, smallest, memory or 0, len(todo) + len(bases))
        self.tracking, self.base_ppl = tracking, base_ppl
        self.bases_left = {b.id for b in bases}

        def profile(item: Item) -> tuple[Hashable, int]:
            slots = min(item.resources.ranks, size) if isinstance(item, Variant) else 1
            return kind_of(item, pool), slots

        self.sched: Scheduler[Item] = Scheduler(size, res.max_retries, profile)
        self.sched.add([*bases, *sorted(todo, key=lambda v: v.method.cost_rank)])
        self.say(f"  {size} worker(s) of {res.num_cpus:g} CPU / {pool:g} GPU each")
        records = self.records
        try:
            with beating(
                lambda: list(records.claims.building.values()), records.store.tag_claim, BUILD_BEAT_S, time.time
            ):
                look_again = time.monotonic() + PARK_POLL_S
                while self.sched.active:
                    self._act()
                    if not self.sched.active:
                        break
                    refs = [*self.starting, *self.tasks, *self.followers]
                    wait = max(0.0, look_again - time.monotonic()) if self.sched.parked else None
                    ref = cluster.wait_one(refs, wait)
                    if ref is not None:
                        self._settle(ref)
                    if self.sched.parked and time.monotonic() >= look_again:  # variants another job is building
                        self.sched.unpark()
                        look_again = time.monotonic() + PARK_POLL_S
        finally:
            for unit in self.sched.units:
                self._close(unit)
            records.claims.release_builds()

    # -- the scheduler's actions -------------------------------------------------------------------------------
    def _act(self) -> None:
        while actions := self.sched.step():
            for action in actions:
                if isinstance(action, Stop):
                    self._close(action.unit)
                elif isinstance(action, Start):
                    self._start(action.unit)
                elif isinstance(action, Run):
                    self._run(action.item, action.unit)

    def _start(self, unit: Unit[Item]) -> None:
        kind = unit.kind
        if not isinstance(kind, tuple):
            raise TypeError(f"unknown unit kind {kind!r}")
        if kind[0] == "gang":  # a placement group: placed before it returns
            _, ranks, num_gpus, num_cpus, memory, _key = kind
            unit.handle = cluster.Gang(
                Worker,
                ranks,
                {"CPU": num_cpus, "GPU": num_gpus, "memory": memory},
                (num_cpus, ranks == 1, cluster.forwarded_env()[1], not num_gpus),
            )
            self.starting[unit.handle.ready] = unit  # placed when its resources are free; the driver goes on
            return
        env = json.loads(kind[1]) if kind[1] else None
        unit.handle = cluster.remote_actor(
            Worker, {**self.worker_opts, **({"runtime_env": env} if env else {})}
        ).remote(self.spec.resources.num_cpus, secrets=cluster.forwarded_env()[1], cpu_only=not self.pool_gpus)
        self.starting[unit.handle.visible_devices.remote()] = unit  # answers once the worker is up

    def _close(self, unit: Unit[Item]) -> None:
        if isinstance(unit.handle, cluster.Gang):
            unit.handle.close()
        elif unit.handle is not None:
            cluster.kill(unit.handle)
        self.starting = {ref: u for ref, u in self.starting.items() if u is not unit}

    def _run(self, item: Item, unit: Unit[Item]) -> None:
        attempt = self.sched.attempt(item)
        if isinstance(item, BaseEval):
            run_id = self.records.start_base(self.plan, item, attempt, self.parent)
            task = BaseTask(self.plan.job_name, item, self.spec.evaluation, self.pool_gpus)
            self.tasks[unit.handle.evaluate_base.remote(task)] = Task(unit, item, run_id)
            return
        row = self.records.recorded(item) if attempt == 1 else None
        if row is not None:  # another job recorded it after this one looked: nothing to build
            base = self.base_ppl.get(item.base_eval_id)
            self.say(self.outcome.add(self.records.reused(item, self.records.registered_as(item, row), base)))
            self.sched.skipped(unit)
            return
        holder = self.records.claims.claim_build(item, self.plan.job_id)
        if holder is not None:  # another job is building it: wait for its record, then reuse it
            if item.id not in self.told:
                self.told.add(item.id)
                self.say(f"  waiting  {item.label}: {holder.tags.get(Tag.BUILDER, '?')} is building it")
            self.sched.park(unit)
            return
        run_id = self.records.start_variant(self.plan, item, attempt, self.parent)
        vt = VariantTask(self.plan.job_name, item, run_id, self.spec.evaluation, self.spec.output.root, self.tracking)
        if isinstance(unit.handle, cluster.Gang):
            refs = start_gang(unit.handle, item, vt)
            self.tasks[refs[0]] = Task(unit, item, run_id, followers=refs[1:])
            self.followers.update({r: refs[0] for r in refs[1:]})
        else:
            self.tasks[unit.handle.build.remote(vt)] = Task(unit, item, run_id)
        self.say(f"  started  {item.label}  (variant {item.id}, run {run_id[:12]})")

    # -- what came back ----------------------------------------------------------------------------------------
    def _settle(self, ref: Any) -> None:
        if ref in self.starting:
            unit = self.starting.pop(ref)
            _, error, _ = cluster.result(ref)
            if error is None:
                if isinstance(unit.handle, cluster.Gang):
                    unit.handle.place()
                self.sched.ready(unit)
                return
            self._close(unit)
            for item in self.sched.start_failed(unit):
                self._failed(item, None, f"no worker could start: {error}")
            return
        if ref in self.followers:
            lead = self.followers.pop(ref)
            value, error, _ = cluster.result(ref)
            task = self.tasks.get(lead)
            if task is not None:
                task.followers.remove(ref)
                task.ranks.append(value)
                if error is not None:  # one rank failed: the collective cannot finish
                    task.rank_error = f"a data-parallel rank failed: {error}"
                    task.unit.handle.close()
            return
        task = self.tasks.pop(ref)
        result, error, lost = cluster.result(ref)
        reusable = not lost
        if isinstance(task.unit.handle, cluster.Gang):
            for r in task.followers:
                self.followers.pop(r, None)
            error = task.rank_error or error if error is not None else None
            late = cluster.finished(task.followers) if error is None else None  # ranks still returning
            reusable = late is not None and isinstance(task.item, Variant)  # kept for the next of its shape
            if isinstance(result, VariantResult) and result.ddp is not None:
                others = [*task.ranks, *(late or [])]
                ranks = (*result.ddp.ranks, *(r for r in others if isinstance(r, RankReport)))
                result = dataclasses.replace(result, ddp=dataclasses.replace(result.ddp, ranks=ranks))
        if not reusable:
            self._close(task.unit)
        if self.sched.finished(task.unit, failed=error is not None, unit_lost=lost, reusable=reusable):
            attempt = self.sched.attempt(task.item)
            self.records.fail(task.run_id, f"{error} (attempt {attempt}; retried)")
            self.say(f"  retry    {getattr(task.item, 'label', getattr(task.item, 'model_name', ''))}: {error}")
            return
        item = task.item
        if isinstance(item, BaseEval):
            self._base_done(item, task.run_id, result, error)
        elif error is not None or result is None:
            self._failed(item, task.run_id, error)
        elif item.base_eval_id not in self.bases_left:
            self.records.finish_variant(item, task.run_id, result, self.base_ppl.get(item.base_eval_id), self.outcome)
        else:
            self.waiting.append((item, task.run_id, result))

    def _failed(self, item: Item, run_id: str | None, error: str | None) -> None:
        if run_id is not None:
            self.records.fail(run_id, error)
        if isinstance(item, Variant):
            self.records.claims.release_build(item)
            self.say(self.outcome.add(VariantOutcome(item, "failed", run_id, reason=error)))
        elif run_id is None:  # a base whose worker never started
            self._base_done(item, None, None, error)

    def _base_done(self, b: BaseEval, run_id: str | None, result: Any, error: str | None) -> None:
        self.bases_left.discard(b.id)
        if run_id is not None:
            self.records.finish_base(b, run_id, result, error, self.base_ppl)
        if b.id not in self.base_ppl:  # a variant is judged against its base: without one, it is not built
            self.outcome.failed_bases[b.id] = f"{b.model_name}: {error}"
            for v in self.sched.drop(lambda q: isinstance(q, Variant) and q.base_eval_id == b.id):
                if isinstance(v, Variant):
                    reason = f"base evaluation failed: {error}"
                    self.say(self.outcome.add(VariantOutcome(v, "skipped", None, reason=reason)))
        for w in [w for w in self.waiting if w[0].base_eval_id == b.id]:
            self.waiting.remove(w)
            self.records.finish_variant(w[0], w[1], w[2], self.base_ppl.get(b.id), self.outcome)


def start_gang(gang: cluster.Gang, v: Variant, task: VariantTask) -> list[Any]:
    """Run `v` on a gang's ranks (rank 0 names the rendezvous, every rank joins it); the refs, rank 0's first.
    A fresh gang's ranks import first: an actor runs its calls in order, and `build` starts its stage only after
    the group's barrier, so no rank's imports land in the stage."""
    r = v.resources
    if r.ranks == 1:
        return [gang.actors[0].build.remote(task)]
    addr, port = gang.call("rendezvous")
    visible = ",".join(gang.call_each("visible_devices"))
    ranks = [Rank(i, r.ranks, addr, port, visible) for i in range(r.ranks)]
    if gang.fresh:
        for actor, rank in zip(gang.actors, ranks, strict=True):
            actor.join.remote(rank)
        gang.fresh = False
    return [actor.build.remote(task, rank) for actor, rank in zip(gang.actors, ranks, strict=True)]

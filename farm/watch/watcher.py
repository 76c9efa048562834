"""The release watcher: for each base, detect its current release; if this release has not been built with
this recipe, claim it in MLflow and run (or submit) the job template for it.

The watermark lives in MLflow, not on a disk: each attempt at a (release, recipe) is a claim - an experiment
named `farm-watch/<key>/<attempt>` whose tags hold the base, release, recipe, state and job. Experiment names
are unique in the tracking database, so when two watchers race for a release exactly one creates the claim and
runs the job. A failed attempt may be retried up to `max_attempts`, and so may an unfinished one whose watcher is
gone: its process no longer exists on this host, or its heartbeat (a tag it renews every `heartbeat_s` while the
job runs) stopped for 5 beats, or it is older than `stale_after_s`. The job's own dedup by variant id then
rebuilds only what is missing, and its driver marks the dead one's runs FAILED.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from farm.errors import FarmError, TrackingError
from farm.runtime.liveness import alive_here, process_id
from farm.secrets import redact
from farm.spec import JobSpec, ModelSpec
from farm.tracking.heartbeat import beating, silent
from farm.tracking.mlflow_store import TAG, Claim, MlflowStore
from farm.tracking.names import Tag
from farm.watch.releases import HubClient, Release, detect
from farm.watch.spec import WatchSpec, job_for, recipe_hash

PREFIX = "farm-watch/"
W = TAG + "watch."
Clock = Callable[[], float]


@dataclass(frozen=True)
class CycleResult:
    base: str
    action: str  # built | submitted | unchanged | in progress | claimed elsewhere | failed | gave up
    release: str | None
    detail: str = ""


class Runner(Protocol):
    def start(self, spec: JobSpec) -> tuple[str, str, str]:
        """Run or submit a job: (state finished|failed|submitted, job reference, detail)."""
        ...

    def poll(self, ref: str) -> str | None:
        """finished | failed for a submitted job that ended; None while it runs."""
        ...


class LocalRunner:
    """Runs the job in this process (on a local or given Ray cluster), as `farm run` would."""

    def __init__(self, tracking_uri: str, ray_address: str | None = None, say: Callable[[str], None] = print):
        self.tracking_uri, self.ray_address, self.say = tracking_uri, ray_address, say

    def start(self, spec: JobSpec) -> tuple[str, str, str]:
        from farm.runtime.driver import run_job

        outcome = run_job(spec, self.tracking_uri, self.ray_address, printer=self.say)
        failed = [o.variant.label for o in outcome.variants if o.status == "failed"]
        detail = f"{len(failed)} of {len(outcome.variants)} variants failed" if failed else ""
        return ("failed" if failed else "finished"), outcome.plan.job_id, detail

    def poll(self, ref: str) -> str | None:
        return None  # local jobs end inside start()


class RayJobRunner:
    """Submits the job through the Ray Jobs API; a later cycle reads how it ended."""

    def __init__(self, address: str, tracking_uri: str):
        self.address, self.tracking_uri = address, tracking_uri

    def start(self, spec: JobSpec) -> tuple[str, str, str]:
        from farm.runtime import submit

        return "submitted", submit.submit(spec, self.address, self.tracking_uri), ""

    def poll(self, ref: str) -> str | None:
        from farm.runtime import submit

        state = submit.status(self.address, ref)
        return {"SUCCEEDED": "finished", "FAILED": "failed", "STOPPED": "failed"}.get(state)


def release_key(identity: str, recipe: str) -> str:
    return hashlib.sha256(f"{identity}\0{recipe}".encode()).hexdigest()[:32]


def _attempt(claim: Claim) -> int:
    return int(claim.name.rsplit("/", 1)[1])


class Watcher:
    def __init__(
        self,
        watch: WatchSpec,
        template: JobSpec,
        store: MlflowStore,
        runner: Runner,
        hub: HubClient,
        clock: Clock = time.time,
        say: Callable[[str], None] = print,
    ):
        self.watch, self.template, self.store, self.runner, self.hub = watch, template, store, runner, hub
        self.clock, self.say = clock, say
        self.owner = process_id()

    def cycle(self) -> list[CycleResult]:
        """One pass over every base. A base that fails (missing, no weights, credentials) is reported and the
        others are still watched; losing MLflow stops the cycle (no claim can be trusted without it)."""
        recipe = recipe_hash(self.template)
        results = []
        for base in self.watch.bases:
            try:
                release = detect(base, self.hub)
            except TrackingError:
                raise
            except FarmError as err:
                results.append(CycleResult(base.display_name(), "failed", None, redact(str(err))))
                continue
            results.append(self._release(base, release, recipe))
        return results

    def run(
        self,
        cycles: int | None = None,
        sleep: Callable[[float], None] = time.sleep,
        report: Callable[[list[CycleResult]], None] | None = None,
    ) -> None:
        """Cycle every `interval_s` (forever unless `cycles` is given)."""
        done = 0
        while True:
            results = self.cycle()
            if report:
                report(results)
            done += 1
            if cycles is not None and done >= cycles:
                return
            sleep(self.watch.interval_s)

    # -- one base --------------------------------------------------------------------------------------------
    def _release(self, base: ModelSpec, release: Release, recipe: str) -> CycleResult:
        prefix = f"{PREFIX}{release_key(release.identity, recipe)}/"
        claims = self.store.claims(prefix)
        attempt = 1
        if claims:
            last = max(claims, key=_attempt)
            state = self._state(last)
            if state == "finished":
                return CycleResult(release.base, "unchanged", release.identity, f"built by {last.tags.get(W + 'job')}")
            if state in {"running", "submitted"} and not self._stale(last):
                return CycleResult(release.base, "in progress", release.identity, last.name)
            if _attempt(last) >= self.watch.max_attempts:
                return CycleResult(
                    release.base,
                    "gave up",
                    release.identity,
                    f"{_attempt(last)} attempts; last: {last.tags.get(W + 'reason', state)}",
                )
            attempt = _attempt(last) + 1
        name = f"{prefix}{attempt}"
        now = str(int(self.clock()))
        tags = {
            W + "name": self.watch.name,
            W + "base": release.base,
            W + "source": redact(release.source),
            W + "release": release.identity,
            W + "recipe": recipe,
            W + "state": "running",
            W + "owner": self.owner,
            W + "claimed_at": now,
        }
        if not self.store.claim(name, tags):
            return CycleResult(release.base, "claimed elsewhere", release.identity, name)
        self.say(f"watch {self.watch.name}: new release of {release.base} ({release.identity}); attempt {attempt}")
        spec = job_for(
            self.template,
            base,
            release.revision,
            {Tag.RELEASE: release.identity, Tag.WATCH: self.watch.name, W + "claim": name},
        )
        try:
            with beating(lambda: [name], self.store.tag_claim, self.watch.heartbeat_s, self.clock, W + "heartbeat"):
                state, ref, detail = self.runner.start(spec)
        except TrackingError:
            raise
        except FarmError as err:
            state, ref, detail = "failed", "", redact(str(err))
        except BaseException:
            self.store.tag_claim(name, {W + "state": "failed", W + "reason": "interrupted"})
            raise
        self.store.tag_claim(
            name, {W + "state": state, W + "job": ref, W + "reason": detail, W + "ended_at": str(int(self.clock()))}
        )
        action = {"finished": "built", "submitted": "submitted"}.get(state, "failed")
        return CycleResult(release.base, action, release.identity, detail or ref)

    def _state(self, claim: Claim) -> str:
        state = claim.tags.get(W + "state", "running")
        if state == "submitted":
            ended = self.runner.poll(claim.tags.get(W + "job", ""))
            if ended:
                self.store.tag_claim(claim.name, {W + "state": ended, W + "ended_at": str(int(self.clock()))})
                return ended
        return state

    def _stale(self, claim: Claim) -> bool:
        """An unfinished claim nobody is working on: its watcher died on this host, its heartbeat stopped, or it
        is older than `stale_after_s` (a submitted job is polled instead: its watcher is not needed)."""
        now = self.clock()
        if claim.tags.get(W + "state", "running") == "running":
            if alive_here(claim.tags.get(W + "owner", "")) is False:
                return True
            if silent(claim.tags.get(W + "heartbeat") or claim.tags.get(W + "claimed_at"), self.watch.heartbeat_s, now):
                return True
        return now - float(claim.tags.get(W + "claimed_at", "0")) > self.watch.stale_after_s

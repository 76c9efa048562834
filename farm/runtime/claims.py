"""One build and one record per variant, however many jobs race for it.

Claims are MLflow experiments with unique names (deleted ones included), as `farm watch` claims a release: of
several drivers creating one name, exactly one succeeds. A driver claims a variant before building it
(`farm-build/<experiment>/<variant id>/<n>`); another driver that finds a live claim waits for that variant's
record and reuses it. A claim whose builder is gone (its process on this host, or its heartbeat from another
host) is stepped over. Recording takes a second claim (`farm-record/...`): if a build claim was stepped over
wrongly (a builder alive but silent), the later record still finds the earlier one and ends its run KILLED.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from farm.errors import TrackingError
from farm.plan import Variant
from farm.runtime.liveness import alive_here, process_id
from farm.tracking.heartbeat import silent
from farm.tracking.mlflow_store import Claim, MlflowStore, is_tracking_failure
from farm.tracking.names import Tag

RECORD_WAIT_S = 120.0  # how long a recording claim blocks others: recording a variant takes seconds
BUILD_BEAT_S = 30.0  # how often a driver renews the heartbeat of the build claims it holds


class VariantClaims:
    def __init__(self, store: MlflowStore):
        self.store = store
        self.building: dict[str, str] = {}  # variant id -> the build claim this job holds for it

    def claim_build(self, v: Variant, job_id: str) -> Claim | None:
        """None when this job builds `v` (it now holds the variant's build claim); else the claim of the live job
        that is building it, whose record this job then waits for and reuses. Claims are MLflow experiments
        `farm-build/<experiment>/<variant id>/<n>` (unique names, as `farm watch` claims a release); a claim whose
        builder is gone (its process on this host, or its heartbeat elsewhere) is stepped over."""
        if v.id in self.building:  # a retry of this job's own build
            return None
        prefix = f"farm-build/{self.store.experiment_id}/{v.id}/"
        for _ in range(20):
            claims = self.store.claims(prefix)
            if claims and self._building(claims[-1]):
                return claims[-1]
            name = f"{prefix}{len(claims)}"
            tags = {Tag.BUILDER: process_id(), Tag.JOB_ID: job_id, Tag.HEARTBEAT: str(int(time.time()))}
            if self.store.claim(name, tags):
                self.building[v.id] = name
                return None
        raise TrackingError(f"could not claim variant {v.id} in {self.store.uri}: too many concurrent claimers")

    def _building(self, claim: Claim) -> bool:
        if claim.tags.get(Tag.BUILD_STATE) == "done":
            return False
        here = alive_here(claim.tags.get(Tag.BUILDER, ""))
        if here is not None:
            return here
        return not silent(claim.tags.get(Tag.HEARTBEAT), BUILD_BEAT_S, time.time())

    def release_build(self, v: Variant) -> None:
        """This job is done with `v` (recorded, reused or failed): its build claim ends and leaves the UI."""
        name = self.building.pop(v.id, None)
        if name is not None:
            self.store.tag_claim(name, {Tag.BUILD_STATE: "done"})
            self.store.hide_claim(name)

    def release_builds(self) -> None:
        """Every build claim still held (a job that stops early): others may build those variants now."""
        for name in list(self.building.values()):
            try:
                self.store.tag_claim(name, {Tag.BUILD_STATE: "done"})
                self.store.hide_claim(name)
            except Exception as err:  # the tracking server may be what failed: the claims then go stale
                if not is_tracking_failure(err):
                    raise
                break
        self.building.clear()

    def claim_record(
        self, v: Variant, run_id: str, job_id: str, recorded: Callable[[Variant], Any]
    ) -> tuple[Any, str | None]:
        """(the run another job recorded this variant in, None) when this build is a duplicate, else (None, the
        claim this job now holds). Claims are MLflow experiments (unique names, as `farm watch` claims a
        release), one per recording attempt: a recorder that died leaves a claim the next attempt steps over
        once it is RECORD_WAIT_S old."""
        prefix = f"farm-record/{self.store.experiment_id}/{v.id}/"
        while True:
            row = recorded(v)
            if row is not None and row.run_id != run_id:
                return row, None
            claims = self.store.claims(prefix)
            age = time.time() - claims[-1].created_ms / 1000 if claims else None
            last = claims[-1].tags if claims else {}
            busy = last.get(Tag.RECORDING_RUN) != run_id and last.get(Tag.RECORD_STATE) not in ("failed", "done")
            if age is not None and age < RECORD_WAIT_S and busy:
                time.sleep(0.5)  # another job is recording it now: its record, when it lands, is the one
                continue
            name = f"{prefix}{len(claims)}"
            if self.store.claim(name, {Tag.RECORDING_RUN: run_id, Tag.JOB_ID: job_id}):
                return None, name

    def release_record(self, claim: str) -> None:
        """The variant is recorded: its recording claim says so (a later recording, the rebuild of a variant
        whose artifact went stale, goes ahead at once) and leaves the UI."""
        self.store.tag_claim(claim, {Tag.RECORD_STATE: "done"})
        self.store.hide_claim(claim)

    def fail_record(self, claim: str) -> None:
        """Recording gave up: the next recorder goes ahead at once."""
        self.store.tag_claim(claim, {Tag.RECORD_STATE: "failed"})

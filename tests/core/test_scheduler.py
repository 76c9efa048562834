"""The scheduler is a plain state machine: which item runs where, which workers start and stop. No Ray here;
`Cluster` below is a ledger of slots that places a started unit when a slot is free, as Ray would."""

from __future__ import annotations

from dataclasses import dataclass

from farm.runtime.scheduler import Run, Scheduler, Start, Stop, Unit


@dataclass(frozen=True)
class It:
    id: str
    kind: str = "w"
    slots: int = 1


def sched(capacity: int = 2, retries: int = 1) -> Scheduler[It]:
    return Scheduler(capacity, retries, lambda i: (i.kind, i.slots))


def kinds(actions: list) -> list[str]:
    return [type(a).__name__ for a in actions]


def test_items_wait_for_a_started_worker_and_reuse_it() -> None:
    s = sched(capacity=2)
    s.add([It("a"), It("b"), It("c")])
    first = s.step()
    assert kinds(first) == ["Start", "Start"]  # two slots, nothing runs before a worker is up
    u1, u2 = (a.unit for a in first)
    s.ready(u1)
    assert [(type(a).__name__, a.item.id) for a in s.step()] == [("Run", "a")]
    assert s.finished(u1, failed=False, unit_lost=False) is False
    ran = s.step()
    assert [(type(a).__name__, a.item.id) for a in ran] == [("Run", "b")]  # the ready one takes the next
    s.ready(u2)
    assert [a.item.id for a in s.step() if isinstance(a, Run)] == ["c"]
    s.finished(u1, failed=False, unit_lost=False)
    assert s.step() == [Stop(u1)]  # the queue is empty: an idle worker is given back at once
    s.finished(u2, failed=False, unit_lost=False)
    assert s.step() == [Stop(u2)] and not s.active


def test_a_starting_worker_is_stopped_when_a_ready_one_took_the_last_item() -> None:
    """The deadlock two jobs on a small cluster fell into: each job's second worker waits for a slot the other
    job's idle first worker holds. A worker that is not up holds no item, so it is dropped instead."""
    s = sched(capacity=2)
    s.add([It("a"), It("b")])
    u1, u2 = (a.unit for a in s.step())
    s.ready(u1)
    s.step()  # a on u1
    s.finished(u1, failed=False, unit_lost=False)
    assert [a.item.id for a in s.step() if isinstance(a, Run)] == ["b"]
    # b went to the ready worker; u2 (never placed) is stopped in the same step
    assert u2 not in s.units
    s.finished(u1, failed=False, unit_lost=False)
    s.step()
    assert not s.active and not s.units


class Cluster:
    """Slots on a shared cluster: a started unit is placed when one is free, in order of asking."""

    def __init__(self, slots: int):
        self.free, self.waiting = slots, []

    def ask(self, unit: Unit, owner: Scheduler) -> None:
        self.waiting.append((unit, owner))

    def release(self, unit: Unit) -> None:
        if any(u is unit for u, _ in self.waiting):
            self.waiting = [(u, o) for u, o in self.waiting if u is not unit]
        else:
            self.free += unit.slots

    def place(self) -> bool:
        if self.waiting and self.waiting[0][0].slots <= self.free:
            unit, owner = self.waiting.pop(0)
            self.free -= unit.slots
            owner.ready(unit)
            return True
        return False


def test_two_jobs_on_a_cluster_smaller_than_both_finish() -> None:
    """Two jobs each sized to the whole 2-slot cluster, interleaved: both finish, every item runs once."""
    cluster = Cluster(2)
    jobs = [sched(capacity=2), sched(capacity=2)]
    for n, s in enumerate(jobs):
        s.add([It(f"{n}-base"), It(f"{n}-fp8"), It(f"{n}-rtn")])
    running: list[tuple[Scheduler, Unit]] = []
    ran: list[str] = []
    for _ in range(200):
        for s in jobs:
            for a in s.step():
                if isinstance(a, Start):
                    cluster.ask(a.unit, s)
                elif isinstance(a, Stop):
                    cluster.release(a.unit)
                else:
                    ran.append(a.item.id)
                    running.append((s, a.unit))
        while cluster.place():
            pass
        if running:  # one task ends per tick
            s, unit = running.pop(0)
            s.finished(unit, failed=False, unit_lost=False)
        if not any(s.active for s in jobs) and not running:
            break
    assert not any(s.active for s in jobs), ran
    assert sorted(ran) == sorted(f"{n}-{k}" for n in range(2) for k in ("base", "fp8", "rtn"))


def test_a_lost_worker_retries_its_item_then_gives_up() -> None:
    s = sched(capacity=1, retries=1)
    s.add([It("a")])
    (start,) = s.step()
    s.ready(start.unit)
    s.step()
    assert s.finished(start.unit, failed=True, unit_lost=True) is True  # attempt 1 of 2: queued again
    assert start.unit not in s.units
    (again,) = s.step()
    assert isinstance(again, Start)
    s.ready(again.unit)
    (run,) = s.step()
    assert s.attempt(run.item) == 2
    assert s.finished(again.unit, failed=True, unit_lost=True) is False  # no attempts left: it fails
    assert not s.active


def test_an_items_own_error_is_not_retried() -> None:
    s = sched(capacity=1, retries=3)
    s.add([It("a")])
    (start,) = s.step()
    s.ready(start.unit)
    s.step()
    assert s.finished(start.unit, failed=True, unit_lost=False) is False
    assert start.unit.state == "idle"


def test_workers_that_never_start_give_up_their_items() -> None:
    s = sched(capacity=1, retries=1)
    s.add([It("a"), It("b"), It("g", kind="gang")])
    (start,) = s.step()
    assert s.start_failed(start.unit) == []  # one failure: try again
    (start,) = s.step()
    assert [i.id for i in s.start_failed(start.unit)] == ["a", "b"]  # the gang's item stays
    assert [i.id for i in s.queue] == ["g"]


def test_idle_units_of_another_kind_make_room_and_gangs_take_their_slots() -> None:
    s = sched(capacity=2)
    s.add([It("a"), It("g", kind="gang", slots=2)])
    (start,) = s.step()
    s.ready(start.unit)
    actions = s.step()
    assert kinds(actions) == ["Run"]  # the gang waits: its 2 slots are not free while a runs
    s.finished(start.unit, failed=False, unit_lost=False)
    actions = s.step()
    assert kinds(actions) == ["Stop", "Start"] and actions[0].unit is start.unit
    gang = actions[1].unit
    s.ready(gang)
    assert [a.item.id for a in s.step() if isinstance(a, Run)] == ["g"]


def test_a_skipped_item_leaves_its_unit_idle_and_drop_takes_items_out() -> None:
    s = sched(capacity=1)
    s.add([It("a"), It("b"), It("c")])
    (start,) = s.step()
    s.ready(start.unit)
    s.step()
    s.skipped(start.unit)
    assert start.unit.state == "idle"
    assert [i.id for i in s.drop(lambda i: i.id == "c")] == ["c"]
    assert [a.item.id for a in s.step() if isinstance(a, Run)] == ["b"]


def test_a_parked_item_waits_outside_the_queue_and_keeps_its_attempts() -> None:
    """Another job is building the item: it is parked (its worker idle, nothing counted), the job stays active,
    idle workers go back meanwhile, and after `unpark` it runs as a first attempt."""
    s = sched(capacity=1)
    s.add([It("a")])
    (start,) = s.step()
    s.ready(start.unit)
    s.step()
    s.park(start.unit)
    assert s.active and not s.queue and s.attempt(It("a")) == 0
    assert s.step() == [Stop(start.unit)]  # nothing queued: the worker is given back while it waits
    s.unpark()
    (again,) = s.step()
    s.ready(again.unit)
    (run,) = s.step()
    assert run.item.id == "a" and s.attempt(run.item) == 1
    assert s.drop(lambda i: True) == [] and s.finished(again.unit, failed=False, unit_lost=False) is False

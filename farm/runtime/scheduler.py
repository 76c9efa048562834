"""Which work item runs on which worker next: a plain state machine, no Ray.

The driver's Ray adapter (`runtime/execute.py`) feeds it events (a worker came up, a task ended) and carries out
the actions it returns (start a worker, run an item on a ready one, stop a worker). Keeping the decisions here
makes them testable in milliseconds and keeps one rule in one place:

- A job holds only the workers it uses. An item is handed only to a worker that is up; a worker that is still
  starting (waiting for Ray to place it, importing its libraries) holds no item, so when a ready worker takes the
  last item, the starting ones are stopped. Two jobs sharing a cluster that holds fewer workers than both ask for
  therefore never wait on each other: whatever one job is not using, the other can get.
- Workers are reused: an idle worker of the item's kind (a runtime environment, or a data-parallel gang's shape)
  takes the next item; idle workers of another kind are stopped when a new one must start.
- `capacity` counts slots (a gang of N ranks takes N): the driver never starts more than the cluster holds.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar


class Item(Protocol):
    @property
    def id(self) -> str: ...


T = TypeVar("T", bound=Item)
State = Literal["starting", "idle", "busy"]


@dataclass(eq=False)
class Unit(Generic[T]):
    """A worker, or a gang of workers that runs one item together."""

    kind: Hashable  # items of one kind can run on it
    slots: int
    state: State = "starting"
    item: T | None = None
    handle: Any = None  # the adapter's (an actor, a gang)


@dataclass(frozen=True)
class Start(Generic[T]):
    unit: Unit[T]


@dataclass(frozen=True)
class Run(Generic[T]):
    item: T
    unit: Unit[T]


@dataclass(frozen=True)
class Stop(Generic[T]):
    unit: Unit[T]


Action = Start[T] | Run[T] | Stop[T]


@dataclass
class Scheduler(Generic[T]):
    capacity: int
    max_retries: int
    profile: Callable[[T], tuple[Hashable, int]]  # item -> (kind of unit it runs on, slots that unit takes)
    queue: deque[T] = field(default_factory=deque)
    units: list[Unit[T]] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)
    parked: list[T] = field(default_factory=list)  # items waiting on something outside the job (`park`)
    start_failures: dict[Hashable, int] = field(default_factory=dict)  # consecutive, by kind

    def add(self, items: Iterable[T]) -> None:
        self.queue.extend(items)

    @property
    def active(self) -> bool:
        """Work is queued, parked or running (a job ends when this turns False)."""
        return bool(self.queue or self.parked) or any(u.state == "busy" for u in self.units)

    def attempt(self, item: T) -> int:
        return self.attempts.get(item.id, 0)

    def step(self) -> list[Action[T]]:
        """The actions to take now, in order. Items go out in queue order; the first that can neither run on an
        idle unit, nor wait for a starting one, nor get a new one, waits (and so do the items behind it)."""
        actions: list[Action[T]] = []
        promised: set[int] = set()  # starting units already expected by an item ahead in the queue
        for item in list(self.queue):
            kind, slots = self.profile(item)
            idle = next((u for u in self.units if u.state == "idle" and u.kind == kind), None)
            if idle is not None:
                self.queue.remove(item)
                idle.state, idle.item = "busy", item
                self.attempts[item.id] = self.attempt(item) + 1
                actions.append(Run(item, idle))
                continue
            starting = next(
                (u for u in self.units if u.state == "starting" and u.kind == kind and id(u) not in promised), None
            )
            if starting is not None:
                promised.add(id(starting))
                continue
            # idle units of another kind make room: their resources (a gang's GPUs, another environment's
            # worker) are what a new unit needs, and the slot count alone does not see every shape
            actions += [self._stop(u) for u in self.units if u.state == "idle" and u.kind != kind]
            if self._used() + slots > self.capacity:
                break
            unit: Unit[T] = Unit(kind, slots)
            self.units.append(unit)
            promised.add(id(unit))
            actions.append(Start(unit))
        if not self.queue:  # nothing left to hand out: keep nothing this job does not use
            actions += [self._stop(u) for u in self.units if u.state != "busy"]
        return actions

    def ready(self, unit: Unit[T]) -> None:
        """A started unit is up and can take an item."""
        if unit in self.units and unit.state == "starting":
            unit.state = "idle"
            self.start_failures.pop(unit.kind, None)

    def start_failed(self, unit: Unit[T]) -> list[T]:
        """A unit died before it was up. After more than `max_retries` such failures in a row for one kind,
        the queued items of that kind are given up (returned) rather than starting workers forever."""
        if unit in self.units:
            self.units.remove(unit)
        n = self.start_failures[unit.kind] = self.start_failures.get(unit.kind, 0) + 1
        if n <= self.max_retries:
            return []
        lost = [i for i in self.queue if self.profile(i)[0] == unit.kind]
        for i in lost:
            self.queue.remove(i)
        return lost

    def finished(self, unit: Unit[T], *, failed: bool, unit_lost: bool, reusable: bool = True) -> bool:
        """The unit's item ended. Returns True when the item goes back to the head of the queue: its unit died
        under it (not its own error) and it has attempts left. A unit that died, or is not reusable, is dropped
        (the adapter has already closed it)."""
        item = unit.item
        unit.item = None
        if unit_lost or not reusable:
            self.units.remove(unit)
        else:
            unit.state = "idle"
        if item is not None and failed and unit_lost and self.attempt(item) <= self.max_retries:
            self.queue.appendleft(item)
            return True
        return False

    def skipped(self, unit: Unit[T]) -> None:
        """The item handed to `unit` needed no work after all (another job recorded it): the unit is idle again."""
        unit.item, unit.state = None, "idle"

    def park(self, unit: Unit[T]) -> None:
        """The item handed to `unit` cannot start yet (another job is building it): the unit is idle again, and
        the item waits outside the queue, its attempt not counted, until `unpark`."""
        item = unit.item
        unit.item, unit.state = None, "idle"
        if item is not None:
            self.attempts[item.id] = self.attempt(item) - 1
            self.parked.append(item)

    def unpark(self) -> None:
        """Parked items go back to the end of the queue, to be looked at again."""
        self.queue.extend(self.parked)
        self.parked.clear()

    def drop(self, which: Callable[[T], bool]) -> list[T]:
        """Take the queued items `which` selects out of the queue (e.g. the variants of a base that failed)."""
        gone = [i for i in [*self.queue, *self.parked] if which(i)]
        self.queue = deque(i for i in self.queue if not which(i))
        self.parked = [i for i in self.parked if not which(i)]
        return gone

    def _used(self) -> int:
        return sum(u.slots for u in self.units)

    def _stop(self, unit: Unit[T]) -> Stop[T]:
        self.units.remove(unit)
        return Stop(unit)

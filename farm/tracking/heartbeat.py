"""A claim's holder says it is alive by renewing a tag on it (`Tag.HEARTBEAT`, epoch seconds): a holder on
another host cannot be asked whether its process lives, but a heartbeat that stopped shows it died. Used by the
driver for the variants it builds and by the watcher for the release it runs."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from farm.tracking.names import Tag

SILENT_BEATS = 5  # a claim whose heartbeat is older than this many periods belongs to a dead holder


@contextlib.contextmanager
def beating(
    names: Callable[[], list[str]],
    tag_claim: Callable[[str, dict[str, str]], None],
    every_s: float,
    clock: Callable[[], float],
    tag: str = Tag.HEARTBEAT,
) -> Iterator[None]:
    """Renew `tag` on every claim `names()` returns, every `every_s` seconds, until the block ends (a thread:
    the block is the holder's work). A missed beat is tried again at the next period."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            for name in names():
                with contextlib.suppress(Exception):
                    tag_claim(name, {tag: str(int(clock()))})

    thread = threading.Thread(target=beat, name="farm-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def silent(last_beat: str | None, every_s: float, now: float) -> bool:
    """Whether a holder that beats every `every_s` has been silent too long (no beat at all: not silent)."""
    return bool(last_beat) and now - float(last_beat or 0) > SILENT_BEATS * every_s

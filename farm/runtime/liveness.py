"""Whether a process is alive: how the driver, the workers and the watcher tell a dead owner's leftovers (runs
left RUNNING, scratch checkpoints, claims) from live work. Same host only: a pid means nothing elsewhere."""

from __future__ import annotations

import os
import socket


def pid_alive(pid: int) -> bool:
    """Whether a process of this host has that pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_id() -> str:
    """This process as `host:pid`, the form the liveness checks read back."""
    return f"{socket.gethostname()}:{os.getpid()}"

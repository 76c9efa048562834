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


def alive_here(owner: str) -> bool | None:
    """For an owner written as `host:pid`: whether its process is alive, if it ran on this host; None when it ran
    elsewhere (or the owner is not in that form), where only a heartbeat can tell."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    return pid_alive(int(pid))


def process_id() -> str:
    """This process as `host:pid`, the form the liveness checks read back."""
    return f"{socket.gethostname()}:{os.getpid()}"

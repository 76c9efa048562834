"""Connecting to Ray: an embedded local cluster, or an existing one by address. The only module importing ray.

Defaults keep a laptop or CI box private and quiet: no usage stats, no token auth written to ~/.ray (a later
`ray start` would then demand it), listeners on 127.0.0.1 for the embedded cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from farm.secrets import redact

# Forwarded to workers so they reach the same S3 endpoint and caches (a value carrying a credential goes through
# the worker's constructor, see forwarded_env); keys and tokens are not forwarded:
# on a real cluster nodes carry their own (instance roles, mounted secrets).
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "MLFLOW_S3_ENDPOINT_URL",
    "HF_HUB_OFFLINE",
    "HF_HOME",
    "FARM_CACHE",
    "FARM_FIXTURES",
    # workers talk to MLflow too (artifact upload): same retry/timeout policy as the driver
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
)


def quiet_env() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def detected_gpus() -> int:
    """GPUs on this machine without importing torch (the CLI stays light)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return len([d for d in os.listdir("/dev") if d.startswith("nvidia") and d[6:].isdigit()])
    except OSError:
        return 0


@contextlib.contextmanager
def connect(address: str | None, verbose: bool = False) -> Iterator[Any]:
    quiet_env()
    import ray

    env_vars, _secret = forwarded_env()
    # Inside a submitted Ray job the job's runtime env already reaches every worker (and Ray refuses a second
    # one that sets the same variables).
    in_job = in_ray_job()
    runtime_env = {"env_vars": env_vars} if env_vars and not in_job else None
    main = threading.current_thread() is threading.main_thread()
    on_term = signal.getsignal(signal.SIGTERM) if main else None
    address = address or os.environ.get("RAY_ADDRESS") or None  # a submitted job's, or the user's explicit one
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=verbose, logging_level=logging.WARNING)
    else:
        ray.init(
            address="local",  # an embedded cluster of its own, even where `ray start` runs one on this host
            num_gpus=detected_gpus(),
            include_dashboard=False,
            log_to_driver=verbose,
            logging_level=logging.WARNING,
            runtime_env=runtime_env,
            _node_ip_address="127.0.0.1",
        )
    if callable(on_term):  # ray.init installs a C handler that kills the process on SIGTERM: give it back
        signal.signal(signal.SIGTERM, on_term)  # to the CLI, which unwinds and marks its open runs FAILED
    try:
        yield ray
    finally:
        ray.shutdown()


def in_ray_job() -> bool:
    """This process is the entrypoint of a job submitted to Ray's Jobs API."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def holds_secret(value: str) -> bool:
    """A value that carries a credential (a URL's user:password, a secret query parameter): Ray writes a
    runtime_env's variables verbatim into its runtime_env_agent.log, so these never travel in one."""
    return redact(value) != value


def forwarded_env() -> tuple[dict[str, str], dict[str, str]]:
    """(variables for the workers' runtime_env, variables that carry a credential): the second reach workers
    through their constructor (`Worker(secrets=...)`), which Ray does not log."""
    public: dict[str, str] = {}
    secret: dict[str, str] = {}
    for key in FORWARDED_ENV:
        if key in os.environ:
            (secret if holds_secret(os.environ[key]) else public)[key] = os.environ[key]
    return public, secret


def remote_actor(cls: type, options: dict[str, Any]) -> Any:
    """`cls` as a Ray actor class with these options (resources, restarts)."""
    import ray

    return ray.remote(cls).options(**options)


def call_in_env(path: str, runtime_env: dict[str, Any] | None, *args: Any) -> Any:
    """Run the function at `path` ("module:function") in another runtime environment on this node, from inside a
    worker, and return its result. It takes no resources of its own: the calling worker holds them and waits."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    from farm.stages import call

    task = ray.remote(call).options(num_cpus=0, runtime_env=runtime_env, scheduling_strategy=here, max_retries=0)
    return ray.get(task.remote(path, *args))


def run_task(fn: Any, options: dict[str, Any], *args: Any, timeout_s: float = 180) -> Any:
    """`fn(*args)` as a Ray task placed with `options` (e.g. on a GPU, as a variant would be), its value back;
    raises SpecError naming the resources when no node runs it within `timeout_s`."""
    import ray

    from farm.errors import SpecError

    ref = ray.remote(fn).options(max_retries=0, **options).remote(*args)
    done, _ = ray.wait([ref], timeout=timeout_s)
    if not done:
        ray.cancel(ref, force=True)
        raise SpecError(f"no node ran a task needing {options} within {timeout_s:g} s")
    return ray.get(ref)


def totals() -> dict[str, float]:
    """The cluster's total resources (CPU, GPU, memory in bytes)."""
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items()}


def nodes() -> list[dict[str, float]]:
    """Resources of each live node (CPU, GPU, memory in bytes, ...)."""
    import ray

    return [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]


def wait_one(refs: list[Any], timeout_s: float | None = None) -> Any:
    """The first of `refs` to finish; None when none did within `timeout_s`."""
    import ray

    if not refs:
        time.sleep(timeout_s or 0)
        return None
    done, _ = ray.wait(refs, num_returns=1, timeout=timeout_s)
    return done[0] if done else None


def result(ref: Any) -> tuple[Any, str | None, bool]:
    """(value, None, False) on success; (None, one-line reason, worker_lost) on failure. A worker is lost
    when its process died (restarts used up) rather than the task raising."""
    import ray
    import ray.exceptions as rex

    try:
        return ray.get(ref), None, False
    except Exception as err:  # a failed variant fails alone; the job goes on
        lost = isinstance(err, rex.ActorDiedError | rex.ActorUnavailableError | rex.OutOfMemoryError)
        return None, failure_reason(err), lost


def finished(refs: list[Any], timeout_s: float = 60) -> list[Any] | None:
    """The values of `refs` if every one succeeds within `timeout_s`, else None."""
    import ray

    if not refs:
        return []
    done, waiting = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if waiting:
        return None
    results = [result(r) for r in done]
    return None if any(error is not None for _, error, _ in results) else [value for value, _, _ in results]


def kill(actor: Any) -> None:
    import ray

    ray.kill(actor)


def failure_reason(err: BaseException) -> str:
    """One line saying why a remote call failed, without Ray's multi-line traceback wrapper."""
    import ray.exceptions as rex

    if isinstance(err, rex.RayTaskError):
        cause = err.cause if getattr(err, "cause", None) is not None else err
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"[:500]
    if isinstance(err, rex.ActorDiedError | rex.ActorUnavailableError):
        return f"worker died: {str(err).strip().splitlines()[0]}"[:500]
    if isinstance(err, rex.OutOfMemoryError):
        return "out of host memory (killed by Ray's memory monitor)"
    return f"{type(err).__name__}: {err}"[:500]


class Gang:
    """`count` actors of `cls`, one per bundle of a placement group on one node (STRICT_PACK: compressed-tensors
    maps process rank to device index, a one-node layout): the ranks of one data-parallel variant, or one worker
    of a GPU share unlike the pool's. The group is asked for at once and placed by Ray when its resources are
    free: `ready` answers then, and `place` starts the actors. `close` kills them and frees the bundles."""

    def __init__(self, cls: type, count: int, bundle: dict[str, float], init_args: tuple[Any, ...]):
        from ray.util.placement_group import placement_group

        self.cls, self.count, self.init_args = cls, count, init_args
        self.bundle = {k: v for k, v in bundle.items() if v}
        self.fresh = True  # its ranks have not imported the stages' libraries yet (`join` does, once)
        self.pg = placement_group([self.bundle] * count, strategy="STRICT_PACK")
        self.ready = self.pg.ready()  # a ref that resolves once Ray has placed every bundle
        self.actors: list[Any] = []

    def place(self) -> None:
        """Start one actor in each bundle (after `ready`)."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options = {
            "num_cpus": self.bundle.get("CPU", 1),
            "num_gpus": self.bundle.get("GPU", 0),
            "max_restarts": 0,
            "max_task_retries": 0,
            **({"memory": self.bundle["memory"]} if "memory" in self.bundle else {}),
        }
        self.actors = [
            ray.remote(self.cls)
            .options(
                **options, scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)
            )
            .remote(*self.init_args)
            for i in range(self.count)
        ]

    def call(self, method: str, *args: Any) -> Any:
        """Call `method` on rank 0 and wait for its value (the rendezvous address, say)."""
        import ray

        return ray.get(getattr(self.actors[0], method).remote(*args))

    def call_each(self, method: str) -> list[Any]:
        import ray

        return list(ray.get([getattr(a, method).remote() for a in self.actors]))

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.pg)


def gang_unfit(nodes: list[dict[str, float]], bundle: dict[str, float], count: int) -> str | None:
    """Why no node can hold `count` bundles of this shape at once (a gang lives on one node), or None."""
    need = {k: v for k, v in bundle.items() if v}
    fits = max((int(min(n.get(k, 0) / v for k, v in need.items()) + 1e-9) if need else count for n in nodes), default=0)
    if fits >= count:
        return None
    shape = ", ".join(f"{v:g} {k}" if k != "memory" else f"{v / 2**30:.1f} GiB" for k, v in need.items())
    return f"resources: {count} ranks of ({shape}) must share one node, and the largest holds {fits}"

"""Which tracking stores are new: a job creates a new local sqlite store while Ray starts (its migrations take
seconds), and asks an existing store first whether it needs a cluster at all."""

from pathlib import Path

from farm.tracking.mlflow_store import default_local_uri, new_local_store


def test_new_local_store(tmp_path: Path) -> None:
    uri, _ = default_local_uri(str(tmp_path / "out"))
    assert new_local_store(uri)
    (tmp_path / "out" / "mlflow.db").write_bytes(b"")
    assert not new_local_store(uri)
    assert not new_local_store("http://127.0.0.1:5000")  # a server: quick lookups, no migrations here
    assert not new_local_store("postgresql://u@db/mlflow")


OPEN = (
    "import sys\n"
    "from farm.tracking.mlflow_store import MlflowStore\n"
    "from farm.errors import TrackingError\n"
    "try:\n"
    "    MlflowStore(sys.argv[1], 'race').check_reachable()\n"
    "except TrackingError as err:\n"
    "    print(err); sys.exit(3)\n"
)


def test_concurrent_creators_of_a_new_sqlite_store_both_succeed(tmp_path: Path) -> None:
    """Three first-time drivers sharing a new sqlite store: MLflow's migrations run once, under a lock; every
    creator gets a working store (unlocked, they crashed and left temporary tables that broke later runs)."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    procs = [
        subprocess.Popen([sys.executable, "-c", OPEN, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    import sqlite3

    tables = {r[0] for r in sqlite3.connect(tmp_path / "store" / "mlflow.db").execute("select name from sqlite_master")}
    assert "experiments" in tables and not [t for t in tables if t.startswith("_alembic_tmp")]


def test_a_store_that_cannot_be_opened_is_one_line_and_a_new_one_is_not_left(tmp_path: Path) -> None:
    import subprocess
    import sys

    broken = tmp_path / "broken.db"
    broken.write_bytes(b"this is not a sqlite database" * 100)
    run = subprocess.run([sys.executable, "-c", OPEN, f"sqlite:///{broken}"], capture_output=True, text=True)
    assert run.returncode == 3 and len(run.stdout.strip().splitlines()) == 1, run.stdout + run.stderr
    assert "cannot be opened" in run.stdout and broken.exists()  # not ours to remove
    blocked = tmp_path / "file"
    blocked.write_text("x")
    run = subprocess.run([sys.executable, "-c", OPEN, f"sqlite:///{blocked}/mlflow.db"], capture_output=True, text=True)
    assert run.returncode == 3 and "cannot create" in run.stdout, run.stdout + run.stderr


def test_a_recorded_variant_is_recorded_again_without_waiting(tmp_path: Path) -> None:
    """A finished recording releases its claim as done: rebuilding the variant (its artifact went stale) records at
    once, where a claim that was only hidden made the next recorder wait out RECORD_WAIT_S as for a live one.
    A claim whose recorder is still at it keeps others waiting."""
    import time
    from types import SimpleNamespace

    from farm.runtime.claims import RECORD_WAIT_S, VariantClaims
    from farm.tracking.mlflow_store import MlflowStore

    claims = VariantClaims(MlflowStore(f"sqlite:///{tmp_path / 'mlflow.db'}", "claims"))
    v = SimpleNamespace(id="0123456789abcdef")
    row, first = claims.claim_record(v, "run-1", "job-1", lambda _: None)  # type: ignore[arg-type]
    assert row is None and first
    claims.release_record(first)
    t = time.monotonic()
    row, second = claims.claim_record(v, "run-2", "job-2", lambda _: None)  # type: ignore[arg-type]
    assert row is None and second and second != first
    assert time.monotonic() - t < RECORD_WAIT_S / 4
    assert not claims.store.claims(f"farm-record/{claims.store.experiment_id}/{v.id}/")[-1].tags.get(
        "farm.record_state"
    )  # the second recording is live

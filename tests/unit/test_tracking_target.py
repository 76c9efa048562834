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

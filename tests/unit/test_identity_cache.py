"""Content identity: remembered per (path, size, mtime), and a changed file is a new identity."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from farm import sources


def test_identity_is_cached_and_tracks_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FARM_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    shard = model / "model.safetensors"
    shard.write_bytes(b"a" * 1000)
    first = sources.content_identity(model)
    assert len(list((tmp_path / "cache" / "sha256").iterdir())) == 2
    assert sources.content_identity(model) == first
    shard.write_bytes(b"b" * 1000)
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1_000_000))
    assert sources.content_identity(model) != first

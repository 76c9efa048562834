"""Artifact publishing is atomic and keys stay under the root."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from farm.artifacts import MANIFEST, ArtifactStore, file_table


def test_publish_local_is_complete_and_replaces(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"x" * 10)
    store = ArtifactStore(str(tmp_path / "root"))
    key = store.key("m", "gptq", "abc")
    store.publish(src, key, {"files": file_table(src)})
    assert json.loads((Path(key) / MANIFEST).read_text())["files"]["model.safetensors"]["bytes"] == 10
    (src / "model.safetensors").write_bytes(b"y")
    store.publish(src, key, {"v": 2})
    assert store.read_manifest(key) == {"v": 2}
    assert sorted(p.name for p in Path(key).parent.iterdir()) == ["abc"]  # no staging left behind


def test_failed_copy_leaves_nothing(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "root"))
    with pytest.raises(FileNotFoundError):
        store.publish(tmp_path / "missing", store.key("m", "x", "1"), {})
    assert not (tmp_path / "root" / "m" / "x" / "1").exists()
    assert list((tmp_path / "root" / "m" / "x").iterdir()) == []


@pytest.mark.parametrize("parts", [("..", "etc"), ("/abs",), ("a", "../../b")])
def test_keys_cannot_escape(parts: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="escapes"):
        ArtifactStore("s3://b/p").key(*parts)

"""hf:// sources through huggingface_hub's own cache layout with HF_HUB_OFFLINE=1 (no hub is reachable):
the identity is the commit sha the revision resolves to."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from farm import sources
from farm.errors import SourceError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(fixture_paths: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    repo = tmp_path / "hub" / "models--farm-test--tiny-llama"
    shutil.copytree(fixture_paths["tiny-llama"], repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return repo


def test_hf_revision_resolves_to_commit(hf_cache: Path) -> None:
    model = sources.resolve("hf://farm-test/tiny-llama@main")
    assert model.identity == f"hf:farm-test/tiny-llama@{COMMIT}" and model.revision == COMMIT
    assert model.config["model_type"] == "llama"


def test_hf_missing_repo_is_one_line(hf_cache: Path) -> None:
    with pytest.raises(SourceError, match="not available") as e:
        sources.resolve("hf://farm-test/absent@main")
    assert "\n" not in str(e.value)

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


PROMPTING = [
    ("tokenizer.json", '{"model": {"vocab": {"a": 0}}}'),
    ("tokenizer_config.json", '{"bos_token": "<s>"}'),
    ("special_tokens_map.json", '{"eos_token": "</s>"}'),
    ("chat_template.jinja", "{{ messages }}"),
    ("generation_config.json", '{"temperature": 0.7}'),
    ("tokenizer.model", "sentencepiece bytes"),
    ("merges.txt", "a b"),
    ("modeling_custom.py", "class Model: ..."),
]


@pytest.mark.parametrize(("name", "content"), PROMPTING, ids=[n for n, _ in PROMPTING])
def test_identity_covers_every_file_that_changes_what_the_model_computes_or_how_it_is_prompted(
    name: str, content: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same weights and config, another tokenizer / template / generation config: another model (added, or
    changed); a README or licence is not part of it."""
    monkeypatch.setenv("FARM_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"a" * 1000)
    bare = sources.content_identity(model)
    (model / name).write_text(content)
    added = sources.content_identity(model)
    assert added != bare
    (model / name).write_text(content + " ")
    assert sources.content_identity(model) not in (bare, added)
    (model / name).write_text(content)
    for doc in ("README.md", "LICENSE.txt", "USE_POLICY.md"):
        (model / doc).write_text("words")
    assert sources.content_identity(model) == added

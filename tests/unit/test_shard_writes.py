"""farm's save writes checkpoint shards on threads (stages/modelio.parallel_shard_writes): the same files, index
and tensors as transformers' one-after-another loop; every shard is on disk when the block ends; a failed write
raises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, modeling_utils

from farm.stages.modelio import parallel_shard_writes


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        out |= load_file(shard)
    return out


def test_threaded_shards_match_the_serial_save(fixture_paths: dict, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(fixture_paths["tiny-llama"]))
    model.save_pretrained(tmp_path / "serial", max_shard_size="200KB")
    original = modeling_utils.safe_save_file
    with parallel_shard_writes(workers=4):
        model.save_pretrained(tmp_path / "threads", max_shard_size="200KB")
    assert modeling_utils.safe_save_file is original
    serial, threads = (sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("serial", "threads"))
    assert serial == threads and sum(n.endswith(".safetensors") for n in serial) > 3
    index = [json.loads((tmp_path / d / "model.safetensors.index.json").read_text()) for d in ("serial", "threads")]
    assert index[0] == index[1]
    a, b = _tensors(tmp_path / "serial"), _tensors(tmp_path / "threads")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_failed_shard_write_raises(fixture_paths: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(modeling_utils, "safe_save_file", full_disk)
    model = AutoModelForCausalLM.from_pretrained(str(fixture_paths["tiny-llama"]))
    with pytest.raises(OSError, match="No space left"), parallel_shard_writes():
        model.save_pretrained(tmp_path / "out", max_shard_size="200KB")
    assert modeling_utils.safe_save_file is full_disk

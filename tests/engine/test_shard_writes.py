"""farm's save writes checkpoint shards itself, on threads (stages/llmc/parallel_shard_writes.py): files safetensors
reads back with
every tensor, dtype, shape and the metadata; the same files, index and tensors as transformers' own loop;
every shard is on disk when the block ends; a failed write raises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, modeling_utils

from farm.stages.llmc import parallel_shard_writes as shardio
from farm.stages.llmc.parallel_shard_writes import parallel_shard_writes, write_shard


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        out |= load_file(shard)
    return out


def test_write_shard_reads_back_as_safetensors_own(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tensors = {
        "layer.weight_packed": torch.randint(-(2**31), 2**31 - 1, (64, 8), dtype=torch.int32),
        "layer.weight_scale": torch.randn(64, 2).to(torch.bfloat16),
        "zp": torch.randint(-8, 7, (3,), dtype=torch.int8),
        "fp8": torch.randn(4, 4).to(torch.float8_e4m3fn),
        "f32": torch.randn(5),
        "half": torch.randn(2, 3).half(),
        "i64": torch.arange(7),
        "mask": torch.rand(9) > 0.5,
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "strided": torch.randn(6, 4).t(),
    }
    write_shard(tensors, str(tmp_path / "farm.safetensors"), metadata={"format": "pt"})
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"}
    )
    ours, ref = load_file(tmp_path / "farm.safetensors"), load_file(tmp_path / "ref.safetensors")
    assert ours.keys() == tensors.keys()
    for k, t in tensors.items():
        assert ours[k].dtype == t.dtype and ours[k].shape == t.shape
        assert torch.equal(ours[k].reshape(-1).view(torch.uint8), ref[k].reshape(-1).view(torch.uint8))
    with safe_open(tmp_path / "farm.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert (tmp_path / "farm.safetensors").stat().st_size == (tmp_path / "ref.safetensors").stat().st_size


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

    monkeypatch.setattr(shardio, "write_shard", full_disk)
    model = AutoModelForCausalLM.from_pretrained(str(fixture_paths["tiny-llama"]))
    with pytest.raises(OSError, match="No space left"), parallel_shard_writes():
        model.save_pretrained(tmp_path / "out", max_shard_size="200KB")


def test_the_caller_may_reuse_its_host_tensors_once_a_shard_is_handed_over(tmp_path: Path) -> None:
    """transformers onloads offloaded modules into temporaries for a save and may reuse that memory as soon as
    `safe_save_file` returns; the shard on disk must hold what was handed over, not what the memory holds later."""
    torch.manual_seed(0)
    handed = {"w": torch.randn(256, 256), "b": torch.randn(256)}
    expected = {k: t.clone() for k, t in handed.items()}
    with parallel_shard_writes(workers=2):
        for i in range(4):
            modeling_utils.safe_save_file(handed, str(tmp_path / f"s{i}.safetensors"), metadata={"format": "pt"})
            for t in handed.values():  # reused at once, before any thread has written
                t.zero_()
            handed = {k: v.clone() for k, v in expected.items()}
    for i in range(4):
        got = load_file(tmp_path / f"s{i}.safetensors")
        assert all(torch.equal(got[k], expected[k]) for k in expected)

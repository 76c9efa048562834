"""Ranks that each read a share of the checkpoint (stages/distributed/split_load.py): the shares cover every tensor
once and
balance bytes; on three gloo processes (no Ray) every rank ends with exactly the model a whole read gives, having
read only its own tensors, and compressed-tensors' dispatch of those replicas sends nothing yet leaves the
distributed caches in place; a checkpoint transformers would not load name for name, or a quantized one, is
loaded whole."""

from __future__ import annotations

import multiprocessing as mp
import shutil
import socket
from pathlib import Path

import pytest

from farm.stages.distributed.split_load import owners, plain_checkpoint, tensor_bytes

WORLD = 3
FIXTURE = Path(__file__).resolve().parents[2] / ".fixtures" / "models" / "tiny-llama"


@pytest.fixture(scope="module")
def fixture_model() -> Path:
    if not FIXTURE.exists():
        pytest.skip("fixtures not built (make fixtures)")
    return FIXTURE


def test_shares_cover_every_tensor_once_and_balance_bytes(fixture_model: Path) -> None:
    files = plain_checkpoint(fixture_model)
    sizes = tensor_bytes(files[0])
    for world in (1, 2, 3, 4):
        plan = owners(files, world)
        assert plan.keys() == sizes.keys() and set(plan.values()) <= set(range(world))
        load = [sum(sizes[k] for k, r in plan.items() if r == rank) for rank in range(world)]
        assert max(load) - min(load) <= max(sizes.values())  # greedy: within one tensor of even
    assert owners(files, 3) == owners(list(files), 3)  # every rank computes the same plan


def test_quantized_or_bin_checkpoints_are_not_shared(tmp_path: Path, fixture_model: Path) -> None:
    q = tmp_path / "q"
    shutil.copytree(fixture_model, q)
    cfg = (q / "config.json").read_text()
    (q / "config.json").write_text(
        cfg.replace("{", '{"quantization_config": {"quant_method": "compressed-tensors"},', 1)
    )
    assert plain_checkpoint(q) == []
    assert plain_checkpoint(tmp_path) == []


def _rank(rank: int, port: int, path: str, out: str) -> None:
    import os

    import torch
    import torch.distributed as dist

    from farm.stages.distributed import split_load as splitload
    from farm.stages.modelio import load_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    read: list[str] = []  # the tensors this rank's loader took from the file
    original = splitload._Handle.get_slice

    def counted(self: splitload._Handle, name: str) -> object:
        if name not in self.elsewhere:
            read.append(name)
        return original(self, name)

    splitload._Handle.get_slice = counted  # type: ignore[method-assign]
    model = splitload.load_split(path, "cpu", rank, WORLD, lambda: load_model(path, "cpu"))
    collectives: list[str] = []  # what the dispatch sent between ranks
    caches = []
    if model is not None:  # then handed to compressed-tensors without another broadcast: still the same model
        sent = {name: getattr(dist, name) for name in ("broadcast", "broadcast_object_list")}
        for name, fn in sent.items():
            setattr(dist, name, lambda *a, _n=name, _f=fn, **k: (collectives.append(_n), _f(*a, **k))[1])
        try:
            splitload.dispatch_replica(model, "cpu")
        finally:
            for name, fn in sent.items():
                setattr(dist, name, fn)
        caches = sorted({type(m._parameters).__name__ for m in model.modules() if m._parameters})
    state = None if model is None else {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"state": state, "read": read, "collectives": collectives, "caches": caches}, out)
    dist.destroy_process_group()


def _run(tmp: Path, path: Path) -> list[dict]:
    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, port, str(path), str(tmp / f"{r}.pt"))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0] * WORLD
    return [torch.load(tmp / f"{r}.pt") for r in range(WORLD)]


def test_every_rank_gets_the_whole_model_reading_its_share(tmp_path: Path, fixture_model: Path) -> None:
    import torch

    from farm.stages.modelio import load_model

    whole = load_model(fixture_model, "cpu").state_dict()
    ranks = _run(tmp_path, fixture_model)
    plan = owners(plain_checkpoint(fixture_model), WORLD)
    for rank, got in enumerate(ranks):
        assert sorted(got["read"]) == sorted(k for k, r in plan.items() if r == rank)
        assert got["collectives"] == []  # the dispatch sent nothing: the replicas were equal already
        assert got["caches"] == ["DistributedCPUCache"]  # later offloads (qparams, compressed weights) still share
        assert got["state"].keys() == whole.keys()
        for name, tensor in whole.items():
            assert torch.equal(got["state"][name], tensor), (rank, name)


def test_a_tensor_the_model_does_not_have_means_a_whole_read(tmp_path: Path, fixture_model: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    odd = tmp_path / "odd"
    shutil.copytree(fixture_model, odd)
    tensors = load_file(odd / "model.safetensors")
    save_file({**tensors, "extra.weight": torch.ones(4)}, odd / "model.safetensors", metadata={"format": "pt"})
    assert all(r["state"] is None for r in _run(tmp_path, odd))

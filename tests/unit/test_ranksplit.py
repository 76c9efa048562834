"""Data-parallel GPTQ with the layer's largest solve shared by rows (stages/ranksplit.py): which modules a plan
splits, and, on three gloo processes (no Ray), that one rank's factor plus every rank's rows give each rank the
single-process left-looking result (group scales with and without activation order, channel and per-tensor
scales, dead columns, a Hessian that is not positive definite, fewer rows than ranks)."""

from __future__ import annotations

import multiprocessing as mp
import socket
from typing import Any

import pytest

from farm.spec import ResourceSpec
from farm.stages.ranksplit import factor_cost, loop_cost, plan_ranks, share

WORLD = 3
LLAMA_8B = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]


def test_plan_splits_only_the_dominant_solve() -> None:
    whole = [factor_cost(c) + loop_cost(r, c) for r, c in LLAMA_8B]
    for world in (2, 4, 8):
        plan = plan_ranks(LLAMA_8B, world)
        assert list(plan.split) == [6]  # down_proj: 14336 columns
        assert sorted(plan.owner) == [0, 1, 2, 3, 4, 5]
        assert max(plan.loads) < max(whole)  # shorter than its owner solving it whole
    four = plan_ranks(LLAMA_8B, 4)
    assert four.split[6] not in four.owner.values()  # the factoring rank has its hands full already
    assert plan_ranks(LLAMA_8B, 1).split == {} and set(plan_ranks(LLAMA_8B, 1).owner.values()) == {0}
    even = [(4096, 4096)] * 4  # nothing outweighs a rank's share: llm-compressor's owners
    assert plan_ranks(even, 4).split == {} and sorted(plan_ranks(even, 4).owner.values()) == [0, 1, 2, 3]


def test_shares_cover_every_row_once() -> None:
    for rows, world in [(14336, 4), (1024, 4), (10, 4), (3, 4), (7, 1)]:
        spans = [share(rows, r, world) for r in range(world)]
        assert [i for start, stop, _ in spans for i in range(start, stop)] == list(range(rows))
        assert all(stop - start <= chunk for start, stop, chunk in spans)


def test_spec_choice() -> None:
    assert ResourceSpec().gptq_ranks == "split" and ResourceSpec(gptq_ranks="owner").gptq_ranks == "owner"


def cases() -> dict[str, tuple[Any, ...]]:
    """name -> (weights [1, rows, n], normalised Hessian [1, n, n], scale, zero point, quant args)."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs

    from tests.gptq_losses import gptq_problem

    w, h, scale, zero = gptq_problem(1, 16, 320)  # 2.5 blocks of 128
    group = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
    dead = h.clone()
    dead[0, 7, :] = 0
    dead[0, :, 7] = 0
    tiny_w, tiny_h, tiny_s, tiny_z = gptq_problem(1, 2, 64)
    ch_scale = w.abs().amax(-1, keepdim=True) / 127.5
    t_scale = w.abs().amax().reshape(1, 1) / 448
    return {
        "group": (w, h, scale, zero, QuantizationArgs(**group)),
        "group, static order": (w, h, scale, zero, QuantizationArgs(**group, actorder="static")),
        "group, weight order": (w, h, scale, zero, QuantizationArgs(**group, actorder="weight")),
        "int8 channel": (w, h, ch_scale, torch.zeros_like(ch_scale, dtype=torch.int8),
                         QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")),
        "fp8 tensor": (w, h, t_scale, torch.zeros_like(t_scale),
                       QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="tensor")),
        "a dead column": (w, dead, scale, zero, QuantizationArgs(**group, actorder="static")),
        "not positive definite": (w, -torch.eye(320).unsqueeze(0), scale, zero, QuantizationArgs(**group)),
        "2 rows, 3 ranks": (tiny_w, tiny_h, tiny_s, tiny_z, QuantizationArgs(**group)),
    }


def _rank(rank: int, port: int, out: str) -> None:
    import os

    import torch
    import torch.distributed as dist

    from farm.stages.ranksplit import factorize, share_factor, solve_rows

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {}
    for i, (name, (w, h, scale, zero, qargs)) in enumerate(cases().items()):
        src = i % WORLD  # every rank factors some case
        columns = w.shape[-1]
        mine = factorize(h.clone(), columns, qargs, 0.01) if rank == src else None
        factor = share_factor(mine, src, columns, bool(qargs.actorder), w.device)
        q, loss = solve_rows(w[0].clone(), factor, scale, zero, None, qargs, 128)
        results[name] = (q, loss, factor.fallback.clone())
    torch.save(results, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    torch = pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("ranksplit")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, port, str(tmp / f"{r}.pt"))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0] * WORLD
    return [torch.load(tmp / f"{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", list(cases()))
def test_every_rank_gets_the_single_process_solve(ranks: list[dict], name: str) -> None:
    import torch

    from farm.stages.leftgptq import left_looking_quantize_weight

    w, h, scale, zero, qargs = cases()[name]
    ref_q, ref_loss, ref_flag = left_looking_quantize_weight(w.clone(), h.clone(), scale, zero, None, qargs)
    q, loss, flag = ranks[0][name]
    assert all(torch.equal(q, r[name][0]) for r in ranks[1:])  # one all-gathered result
    assert q.shape == ref_q.shape and (q != ref_q).float().mean() < 1e-3  # a rounding tie at most
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
    assert flag.tolist() == ref_flag.tolist()
    if name == "a dead column":
        assert (q[0, :, 7] == 0).all()

"""Data-parallel GPTQ with each module's rows split over the ranks (stages/rowsplit.py), on three gloo processes
(no Ray): `split_rows` gives every rank the whole single-process `quantize_weight` result (llm-compressor's
solve and the left-looking one; group, channel and per-tensor scales; a row count the ranks do not divide);
a oneshot whose weights live in compressed-tensors' shared host cache keeps llm-compressor's owner-rank path."""

from __future__ import annotations

import multiprocessing as mp
import socket
from pathlib import Path
from typing import Any

import pytest

from farm.stages.rowsplit import share

WORLD = 3


def test_shares_cover_every_row_once() -> None:
    for rows, world in [(14336, 4), (1024, 4), (10, 4), (3, 4), (7, 1)]:
        spans = [share(rows, r, world) for r in range(world)]
        covered = [i for start, stop, _ in spans for i in range(start, stop)]
        assert covered == list(range(rows))
        assert all(stop - start <= chunk for start, stop, chunk in spans)


def cases() -> dict[str, tuple[Any, ...]]:
    """name -> (solve, weights, hessians, scale, zero_point, quant args); 16 rows over 3 ranks: 6, 6, 4."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    from farm.stages.leftgptq import left_looking_quantize_weight
    from tests.gptq_losses import gptq_problem

    w, h, scale, zero = gptq_problem(2, 16, 256)
    group = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    static = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32,
                              actorder="static")
    channel = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    fp8 = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="tensor")
    ch_scale = w.abs().amax(-1, keepdim=True) / 127.5
    t_scale = w.abs().amax(dim=(1, 2)).reshape(2, 1, 1) / 448
    return {
        "llm-compressor group": (quantize_weight, w, h, scale, zero, group),
        "left-looking group, static order": (left_looking_quantize_weight, w, h, scale, zero, static),
        "left-looking int8 channel": (left_looking_quantize_weight, w, h, ch_scale,
                                      torch.zeros_like(ch_scale, dtype=torch.int8), channel),
        "llm-compressor fp8 tensor": (quantize_weight, w, h, t_scale, torch.zeros_like(t_scale), fp8),
    }


def _rank(rank: int, port: int, out: str) -> None:
    import os

    import torch
    import torch.distributed as dist
    from datasets import Dataset
    from llmcompressor import oneshot

    from farm.calibration import read_text, sample_windows
    from farm.methods import build_method
    from farm.stages.modelio import load_model, load_tokenizer
    from farm.stages.rowsplit import rows_split_solve, split_rows

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {name: split_rows(solve, w.clone(), h.clone(), s, z, None, qargs)
               for name, (solve, w, h, s, z, qargs) in cases().items()}
    root = Path(__file__).resolve().parents[2] / ".fixtures"
    model_dir, text = root / "models" / "tiny-llama", root / "shakespeare" / "calibration.txt"
    windows = sample_windows(read_text(str(text)), load_tokenizer(model_dir), 6, 64, 0)[rank::WORLD]
    ds = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    with rows_split_solve() as tally:
        oneshot(model=load_model(model_dir, "cpu"), dataset=ds, num_calibration_samples=len(ds), max_seq_length=64,
                recipe=build_method({"method": "gptq", "group_size": 32}).modifiers(),
                shuffle_calibration_samples=False)
    torch.save({"results": results, "split": tally.n}, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(fixture_paths: dict, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    import torch

    tmp = tmp_path_factory.mktemp("rowsplit")
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

    solve, w, h, scale, zero, qargs = cases()[name]
    ref_q, ref_loss, ref_flag = solve(w.clone(), h.clone(), scale, zero, None, qargs)
    q, loss, flag = ranks[0]["results"][name]
    assert all(torch.equal(q, r["results"][name][0]) for r in ranks[1:])  # one all-gathered result
    assert q.shape == ref_q.shape and (q != ref_q).float().mean() < 1e-3  # a rounding tie at most
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
    assert flag.tolist() == ref_flag.tolist()


def test_shared_host_weights_keep_the_owner_path(ranks: list[dict]) -> None:
    """CPU ranks share one host copy (compressed-tensors' distributed CPU cache), which one rank must write."""
    assert [r["split"] for r in ranks] == [0] * WORLD

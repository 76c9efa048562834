"""Every data-parallel rank writes its share of the shards (stages/distributed/split_save.py): on three gloo processes
(no Ray)
farm's save of a GPTQ-calibrated tiny Llama writes, into rank 0's directory, byte for byte the checkpoint that
llm-compressor's own save (rank 0 writing every shard) gives for the same model, each rank having written the
shards round robin assigns it; ranks that share no directory leave the save to rank 0."""

from __future__ import annotations

import multiprocessing as mp
import socket
from pathlib import Path

import pytest

from farm.stages.distributed.split_save import shard_owner

WORLD = 3


def test_shards_go_round_robin_and_a_single_file_to_rank_0() -> None:
    names = [f"/x/model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    assert [shard_owner(n, 3) for n in names] == [0, 1, 2, 0, 1]
    assert shard_owner("/x/model.safetensors", 3) == 0 and shard_owner(names[4], 1) == 0


def _rank(rank: int, port: int, model_dir: str, text: str, tmp: str, shared: bool) -> None:
    import json
    import os

    import torch.distributed as dist

    from farm.methods.registry import build_method
    from farm.stages import quantize as q
    from farm.stages.distributed import split_save as ranksave
    from farm.stages.llmc import parallel_shard_writes as shardio
    from farm.stages.modelio import load_tokenizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    method = build_method({"method": "gptq", "group_size": 64, "ignore": ["lm_head"]})
    req = q.QuantizeRequest(
        model_dir, method, q.CalibrationDraw(text, 6, 64, 0), f"{tmp}/split{rank}", rank=rank, world=WORLD
    )
    model, _ = q.load_weights(req, q.placement(req, "cpu"), "cpu")
    tokenizer = load_tokenizer(model_dir)
    q.calibrate(req, model, tokenizer, method.modifiers())
    q.SHARD = "40KB"  # several shards for the tiny model
    with shardio.parallel_shard_writes():  # llm-compressor's own save: rank 0 writes every shard
        model.save_pretrained(f"{tmp}/default{rank}", save_compressed=True, max_shard_size=q.SHARD)
    written: list[str] = []
    original = shardio.write_shard
    shardio.write_shard = lambda tensors, filename, metadata=None: (
        written.append(os.path.basename(filename)),
        original(tensors, filename, metadata),
    )[1]
    if not shared and rank:  # as on another host: rank 0's directory is not here
        ranksave.sees = lambda directory: False
    q.save(model, tokenizer, req.out_dir)
    if rank == 0:  # the moment the save returns, every rank's shards are complete
        got = {
            name: (Path(tmp) / "split0" / name).read_bytes()
            for name in os.listdir(f"{tmp}/default0")
            if name.endswith(".safetensors")
        }
        want = {name: (Path(tmp) / "default0" / name).read_bytes() for name in got}
        bad = {n: (len(got[n]), len(want[n])) for n in got if got[n] != want[n]}
        assert not bad, (bad, sorted(os.listdir(f"{tmp}/split0")))
    with open(f"{tmp}/written{rank}.json", "w") as f:
        json.dump(written, f)
    dist.destroy_process_group()


def _run(tmp: Path, paths: dict, shared: bool) -> list[list[str]]:
    import json

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    text = str(paths["shakespeare"] / "calibration.txt")
    procs = [
        ctx.Process(target=_rank, args=(r, port, str(paths["tiny-llama"]), text, str(tmp), shared))
        for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0] * WORLD
    return [json.loads((tmp / f"written{r}.json").read_text()) for r in range(WORLD)]


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name.startswith("model")}


@pytest.mark.parametrize("shared", [True, False], ids=["shared-directory", "no-shared-directory"])
def test_ranks_write_the_checkpoint_rank_0_alone_would(tmp_path: Path, fixture_paths: dict, shared: bool) -> None:
    written = _run(tmp_path, fixture_paths, shared)
    default, split = _files(tmp_path / "default0"), _files(tmp_path / "split0")
    shards = sorted(n for n in default if n.endswith(".safetensors"))
    assert len(shards) >= WORLD and "model.safetensors.index.json" in default
    assert split == default  # every shard and the index, byte for byte
    if shared:
        assert [sorted(w) for w in written] == [[n for n in shards if shard_owner(n, WORLD) == r] for r in range(WORLD)]
    else:
        assert written == [shards, [], []]
    for r in (1, 2):  # what a rank's own save wrote beside: no shard
        assert not list((tmp_path / f"split{r}").glob("*.safetensors"))

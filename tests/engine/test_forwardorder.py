"""The order in which DDP ranks solve and send each layer's GPTQ results (stages/llmc/ddp_forward_order.py)."""

from __future__ import annotations

from farm.stages.llmc.ddp_forward_order import Pending, schedule

LAYER = ["q", "k", "v", "o", "gate", "up", "down"]
# llm-compressor's greedy packing of an 8B layer over 4 ranks (by Hessian size): down alone on rank 0
OWNER4 = {"down": 0, "q": 1, "k": 2, "v": 3, "o": 1, "gate": 2, "up": 3}


def test_every_rank_sends_in_forward_order_and_solves_just_before_its_own() -> None:
    batches = {0: [["down"]], 1: [["q", "o"]], 2: [["k"], ["gate"]], 3: [["v"], ["up"]]}
    for rank, own in batches.items():
        steps = schedule(LAYER, OWNER4, rank, own)
        assert [m for kind, m in steps if kind == "send"] == LAYER  # the same collectives, in order, everywhere
        solved = [m for kind, batch in steps if kind == "solve" for m in batch]
        assert sorted(solved) == sorted(m for b in own for m in b)  # each own module solved once
        for i, (kind, item) in enumerate(steps):
            if kind == "send" and OWNER4[item] == rank:
                assert any(k == "solve" and item in b for k, b in steps[:i])  # solved before it is sent


def test_the_owner_of_the_largest_module_posts_the_others_before_its_solve() -> None:
    steps = schedule(LAYER, OWNER4, 0, [["down"]])
    assert steps[:6] == [("send", m) for m in LAYER[:6]]  # received while down_proj is being solved
    assert steps[6:] == [("solve", ["down"]), ("send", "down")]


def test_a_batch_is_solved_at_its_first_module_in_forward_order() -> None:
    steps = schedule(LAYER, OWNER4, 1, [["o", "q"]])
    assert steps[0] == ("solve", ["o", "q"]) and steps[1] == ("send", "q")


class Work:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def wait(self) -> None:
        self.log.append(self.name)


class Hook:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def remove(self) -> None:
        self.log.append(f"unhook {self.name}")


def test_pending_waits_once_per_module_and_drops_without_waiting_after_an_error() -> None:
    log: list[str] = []
    p = Pending(
        works={"q": [Work(log, "q")], "down": [Work(log, "down")]},
        hooks={"q": Hook(log, "q"), "down": Hook(log, "down")},
    )
    p.wait("q")
    p.wait("q")  # a second call of the module: nothing left to wait for
    assert log == ["q", "unhook q"]
    p.flush()
    assert log[2:] == ["down", "unhook down"] and not p.works and not p.hooks
    p2 = Pending(works={"up": [Work(log, "up")]}, hooks={"up": Hook(log, "up")})
    p2.drop()
    assert log[-1] == "unhook up" and "up" not in log


def _rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank of a real gloo group: seven linear modules with this layer's owners; each rank 'solves' its
    own (writes values only it knows) and rank 0's solve is slow, as down_proj's is."""
    import time

    import torch
    import torch.distributed as dist

    from farm.stages.llmc.ddp_forward_order import Pending, exchange

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        layer = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in LAYER])
        modules = dict(zip(LAYER, layer, strict=True))
        owner = {modules[n]: OWNER4[n] for n in LAYER}
        own = {0: [["down"]], 1: [["q", "o"]], 2: [["k"], ["gate"]], 3: [["v"], ["up"]]}[rank]

        def solve(batch: list) -> None:
            if rank == 0:
                time.sleep(0.5)
            with torch.no_grad():
                for m in batch:
                    m.weight.fill_(float(10 * rank + LAYER.index(next(n for n in LAYER if modules[n] is m))))
                    m.bias.zero_()

        pending = Pending()
        exchange(
            list(modules.values()),
            owner,
            rank,
            [[modules[n] for n in b] for b in own],
            solve,
            lambda m: [m.weight.data, m.bias.data],
            pending,
        )
        with torch.no_grad():
            y = layer(torch.ones(2, 8))
        pending.flush()
        torch.save({"y": y, "w": [m.weight.clone() for m in layer], "left": len(pending.works)}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_of_a_gloo_group_get_every_owners_result_before_each_module_runs(tmp_path) -> None:
    import socket

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(4, port, str(tmp_path)), nprocs=4, join=True)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(4)]
    for i, name in enumerate(LAYER):
        expected = float(10 * OWNER4[name] + i)
        assert all(bool((r["w"][i] == expected).all()) for r in results), name
    assert all(torch.equal(r["y"], results[0]["y"]) and r["left"] == 0 for r in results)
    # the forward used the owners' weights: ones through seven all-constant layers (bias 0)
    y = torch.ones(2, 8)
    for i, name in enumerate(LAYER):
        y = y.sum(dim=1, keepdim=True).expand(2, 8) * float(10 * OWNER4[name] + i)
    assert torch.allclose(results[0]["y"], y)

"""Runs in the serving environment, not farm's: standard library and vLLM only, started as a script
(`python vllm_engine.py REQUEST.json RESULT.json`) by `farm.serving.runner`.

It loads the model with vLLM's async engine (`AsyncLLM`, the engine behind `vllm serve`; the offline `LLM`
class runs a batch to completion and reports no per-token times), then for each level sends requests closed-loop
with that many in flight, streaming every token, and records when each request was sent and when each of its
tokens arrived. It computes nothing it could get wrong: farm's `measure` turns the raw times into figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any


def _weights(worker: Any) -> tuple[int | None, int]:
    """In vLLM's worker process: the GPU memory its loader measured for the weights, and the bytes of the
    model's parameters and buffers (packed 4-bit weights count as the int32 words they are stored in)."""
    inner = getattr(worker, "worker", None) or worker  # vLLM's wrapper holds the GPU worker
    model = inner.get_model()
    tensors = [*model.parameters(), *model.buffers()]
    loaded = getattr(getattr(inner, "model_runner", None), "model_memory_usage", None)
    return (int(loaded) if loaded is not None else None), int(sum(t.numel() * t.element_size() for t in tensors))


async def _run(req: dict[str, Any], t_start: float) -> dict[str, Any]:
    import vllm
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    out: dict[str, Any] = {
        "engine": "vllm",
        "version": vllm.__version__,
        "seconds_import": time.perf_counter() - t_start,
    }
    t0 = time.perf_counter()
    from vllm.usage.usage_lib import UsageContext

    args = {
        "model": req["model"],
        "tokenizer": req["model"],
        "trust_remote_code": req["trust_remote_code"],
        "seed": req["seed"],
        "gpu_memory_utilization": req["gpu_memory_utilization"],
        "max_model_len": req["max_model_len"],
        "disable_log_stats": True,
    } | req["engine_args"]
    # the defaults `vllm serve` runs with (batch sizes differ from the offline LLM class's)
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args), usage_context=UsageContext.OPENAI_API_SERVER)
    try:
        out["seconds_engine_start"] = time.perf_counter() - t0
        cache = engine.vllm_config.cache_config
        out["kv_blocks"], out["block_size"] = cache.num_gpu_blocks, cache.block_size
        out["max_model_len"] = engine.vllm_config.model_config.max_model_len
        out["quantization"] = str(engine.vllm_config.model_config.quantization or "")
        out["max_num_seqs"] = engine.vllm_config.scheduler_config.max_num_seqs
        out["max_num_batched_tokens"] = engine.vllm_config.scheduler_config.max_num_batched_tokens
        try:
            per_worker = await engine.collective_rpc(_weights)
            out["weights_bytes"], out["param_bytes"] = per_worker[0]
        except Exception as err:  # recorded, and the log's own line is read instead
            out["weights_note"] = f"{type(err).__name__}: {err}"[:300]
        corpus: list[int] = req["corpus"]
        counter = iter(range(1 << 62))

        async def request(ids: list[int], tokens: int, start: float, greedy: bool = False) -> dict[str, Any]:
            params = SamplingParams(
                max_tokens=tokens, temperature=0.0, ignore_eos=not greedy, output_kind=RequestOutputKind.DELTA
            )
            sent = time.perf_counter() - start
            times: list[float] = []
            counts: list[int] = []
            got: list[int] = []
            async for o in engine.generate(TokensPrompt(prompt_token_ids=ids), params, f"farm-{next(counter)}"):
                new = list(o.outputs[0].token_ids)
                if new:
                    times.append(round(time.perf_counter() - start, 6))
                    counts.append(len(new))
                    got += new
            return {"sent": round(sent, 6), "times": times, "counts": counts, "ids": got if greedy else None}

        async def level(offsets: list[int], inp: int, tokens: int, concurrency: int) -> dict[str, Any]:
            todo = list(offsets)
            records: list[dict[str, Any]] = []
            start = time.perf_counter()

            async def slot() -> None:
                while todo:
                    o = todo.pop(0)
                    records.append(await request(corpus[o : o + inp], tokens, start))

            await asyncio.gather(*(slot() for _ in range(min(concurrency, len(offsets)))))
            return {"seconds": time.perf_counter() - start, "requests": records}

        async def fresh_cache() -> None:
            try:  # no level may find the previous level's prompts cached
                await engine.reset_prefix_cache()
            except Exception as err:
                out.setdefault("notes", []).append(f"prefix cache not reset: {type(err).__name__}")

        w = req["warmup"]
        if w["offsets"]:
            await level(w["offsets"], w["input_tokens"], w["output_tokens"], len(w["offsets"]))
        out["levels"] = []
        for lv in req["levels"]:
            await fresh_cache()
            r = await level(lv["offsets"], lv["input_tokens"], lv["output_tokens"], lv["concurrency"])
            out["levels"].append(
                {
                    "shape": lv["shape"],
                    "concurrency": lv["concurrency"],
                    "input_tokens": lv["input_tokens"],
                    "output_tokens": lv["output_tokens"],
                    **r,
                }
            )
        g = req["greedy"]
        if g["offsets"]:
            await fresh_cache()
            start = time.perf_counter()
            done = await asyncio.gather(
                *(
                    request(corpus[o : o + g["input_tokens"]], g["output_tokens"], start, greedy=True)
                    for o in g["offsets"]
                )
            )
            out["greedy"] = [d["ids"] for d in done]
        return out
    finally:
        engine.shutdown()


def _write(path: str, doc: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)  # the reader sees a whole result or none


def _die_with_parent() -> None:
    """A worker killed mid-check (kill -9) takes its engine with it: the kernel signals this process when its
    parent goes (Linux), and a parent already gone before that was set is noticed here."""
    parent = os.environ.get("FARM_PARENT_PID")
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent and os.getppid() != int(parent):
        sys.exit("farm's worker ended before its serving engine started")


def main(argv: list[str]) -> int:
    t_start = time.perf_counter()
    _die_with_parent()
    request_path, result_path = argv[1], argv[2]
    with open(request_path) as f:
        req = json.load(f)
    try:
        doc = asyncio.run(_run(req, t_start))
    except BaseException as err:  # one line for the run's record; the full trace is in the engine's log
        import traceback

        traceback.print_exc()
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        first = " ".join(lines[:3])  # e.g. pydantic's "1 validation error for ModelConfig" and its cause
        _write(result_path, {"error": f"{type(err).__name__}: {first}"[:500]})
        return 1
    doc["seconds_process"] = time.perf_counter() - t_start
    _write(result_path, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

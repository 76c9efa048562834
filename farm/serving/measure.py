"""From the engine's raw times to the figures farm records: pure functions, and every serving name defined once.

A level's figures follow `vllm bench serve`'s definitions: output tokens/s is every output token of the level
over the level's wall time; time to first token (TTFT) is from a request's send to its first token; inter-token
latency (ITL) is the gap between consecutive token arrivals of one request (a chunk of k tokens counts k gaps
of gap/k); time per output token (TPOT) is a request's (last - first) / (tokens - 1).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

PREFIX = "serve_"
# run-level metric names
COLD_START = "serve_cold_start_s"  # engine constructed to ready (load, compile, CUDA graphs, KV cache)
PROCESS_START = "serve_process_start_s"  # engine process start to ready, imports included
WEIGHTS = "serve_weights_bytes"  # GPU memory vLLM's loader measured for the weights
PARAMS = "serve_param_bytes"  # bytes of the loaded model's parameters and buffers on the GPU
KV_BLOCKS = "serve_kv_cache_blocks"
KV_BLOCK_SIZE = "serve_kv_block_size"
KV_TOKENS = "serve_kv_cache_tokens"
GREEDY_EXACT = "serve_greedy_exact_match"  # share of prompts whose greedy output equals the base's
GREEDY_AGREE = "serve_greedy_token_agreement"  # mean share of the base's greedy tokens matched before a difference
GPU_UTILIZATION = "serve_gpu_memory_utilization"
WORKER_HELD_BYTES = "serve_worker_held_bytes"  # GPU memory the quantizing worker still held as the engine started
# tags (under farm.)
TAG_ENGINE = "serving_engine"
TAG_VERSION = "serving_engine_version"
TAG_ERROR = "serving_error"
TAG_QUANTIZATION = "serving_quantization"
DOCUMENT = "serving.json"  # checks/serving.json: per-level figures, greedy ids, engine facts

LEVEL_FIGURES = (
    "output_tokens_per_s",
    "requests_per_s",
    "ttft_p50_s",
    "ttft_p90_s",
    "itl_p50_s",
    "itl_p90_s",
    "tpot_p50_s",
    "e2e_p50_s",
)
_LEVEL = re.compile(r"^serve_([a-z0-9_]+?)_c(\d+)_(" + "|".join(LEVEL_FIGURES) + r")$")


def max_concurrency_name(context: int) -> str:
    return f"serve_max_concurrency_at_{context}"


def level_name(shape: str, concurrency: int, figure: str) -> str:
    if figure not in LEVEL_FIGURES:
        raise ValueError(f"unknown serving figure {figure!r}; known: {', '.join(LEVEL_FIGURES)}")
    return f"{PREFIX}{shape}_c{concurrency}_{figure}"


def parse_level_name(name: str) -> tuple[str, int, str] | None:
    """(shape, concurrency, figure) of a level metric's name, None for any other name."""
    m = _LEVEL.match(name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def curves(metrics: Mapping[str, float], figure: str) -> dict[str, list[tuple[int, float]]]:
    """shape -> [(concurrency, value of `figure`)] sorted by concurrency: what the report plots."""
    out: dict[str, list[tuple[int, float]]] = {}
    for name, value in metrics.items():
        parsed = parse_level_name(name)
        if parsed and parsed[2] == figure:
            out.setdefault(parsed[0], []).append((parsed[1], float(value)))
    return {shape: sorted(points) for shape, points in out.items()}


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def level_figures(level: Mapping[str, Any]) -> dict[str, float]:
    """The figures of one level from its requests' send and token-arrival times (seconds from level start)."""
    reqs = level["requests"]
    wall = float(level["seconds"])
    ttft, itl, tpot, e2e = [], [], [], []
    tokens = 0
    for r in reqs:
        times, counts = r["times"], r["counts"]
        n = sum(counts)
        tokens += n
        if not times:
            continue
        ttft.append(times[0] - r["sent"])
        e2e.append(times[-1] - r["sent"])
        for prev, now, k in zip(times, times[1:], counts[1:], strict=False):
            itl += [(now - prev) / k] * k
        if n > 1:
            tpot.append((times[-1] - times[0]) / (n - 1))
    return {
        "output_tokens_per_s": tokens / wall if wall > 0 else math.nan,
        "requests_per_s": len(reqs) / wall if wall > 0 else math.nan,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p90_s": percentile(ttft, 90),
        "itl_p50_s": percentile(itl, 50),
        "itl_p90_s": percentile(itl, 90),
        "tpot_p50_s": percentile(tpot, 50),
        "e2e_p50_s": percentile(e2e, 50),
    }


_LOADED = re.compile(r"Model loading took ([0-9.]+) GiB")
_KV_TOKENS = re.compile(r"GPU KV cache size: ([0-9,]+) tokens")


def from_log(text: str) -> dict[str, float]:
    """Figures vLLM prints at start, read where the engine could not be asked directly."""
    out: dict[str, float] = {}
    if m := _LOADED.search(text):
        out[WEIGHTS] = float(m.group(1)) * 2**30
    if m := _KV_TOKENS.search(text):
        out[KV_TOKENS] = float(m.group(1).replace(",", ""))
    return out


def summarize(raw: Mapping[str, Any], context: int, log_text: str = "") -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, document) of one engine run: the run's record and checks/serving.json."""
    metrics: dict[str, float] = {COLD_START: float(raw["seconds_engine_start"])}
    if raw.get("seconds_import") is not None:
        metrics[PROCESS_START] = float(raw["seconds_import"]) + float(raw["seconds_engine_start"])
    if raw.get("weights_bytes") is not None:
        metrics[WEIGHTS] = float(raw["weights_bytes"])
    if raw.get("param_bytes") is not None:
        metrics[PARAMS] = float(raw["param_bytes"])
    blocks, size = raw.get("kv_blocks"), raw.get("block_size")
    if blocks and size:
        metrics |= {KV_BLOCKS: float(blocks), KV_BLOCK_SIZE: float(size), KV_TOKENS: float(blocks * size)}
    for key, value in from_log(log_text).items():
        metrics.setdefault(key, value)
    if KV_TOKENS in metrics:
        per_seq = math.ceil(context / size) * size if size else context  # a sequence holds whole blocks
        metrics[max_concurrency_name(context)] = float(int(metrics[KV_TOKENS] // per_seq))
    levels = []
    for lv in raw.get("levels", []):
        figures = level_figures(lv)
        metrics |= {level_name(lv["shape"], lv["concurrency"], k): v for k, v in figures.items() if not math.isnan(v)}
        levels.append(
            {k: lv[k] for k in ("shape", "concurrency", "input_tokens", "output_tokens", "seconds")}
            | {"requests": len(lv["requests"])}
            | figures
        )
    doc = {
        "engine": raw.get("engine"),
        "version": raw.get("version"),
        "quantization": raw.get("quantization"),
        "max_model_len": raw.get("max_model_len"),
        "max_num_seqs": raw.get("max_num_seqs"),
        "max_num_batched_tokens": raw.get("max_num_batched_tokens"),
        "context": context,
        "levels": levels,
        "greedy": raw.get("greedy") or [],
        "notes": raw.get("notes", []) + ([raw["weights_note"]] if raw.get("weights_note") else []),
    }
    return metrics, doc


def greedy_agreement(variant: Sequence[Sequence[int]], base: Sequence[Sequence[int]]) -> dict[str, float]:
    """Exact-match share, and the mean share of each base output matched before the first difference."""
    pairs = list(zip(variant, base, strict=False))
    if not pairs or len(variant) != len(base):
        return {}
    exact = sum(list(a) == list(b) for a, b in pairs) / len(pairs)

    def prefix(a: Sequence[int], b: Sequence[int]) -> float:
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        return n / max(len(b), 1)

    return {GREEDY_EXACT: exact, GREEDY_AGREE: sum(prefix(a, b) for a, b in pairs) / len(pairs)}

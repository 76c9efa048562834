"""Layer sensitivity: how much perplexity one decoder layer (or the embeddings / lm_head) costs when it alone is
rounded to a low integer grid. Round-to-nearest in place on the loaded model, restored after each probe: one
perplexity pass per layer, no checkpoint written, so a 30-layer model is profiled in minutes on a CPU."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.calibration import heldout_windows, read_text
from farm.methods.precision import Grid, Layer
from farm.sources import cache_root
from farm.stages.engines.fakequant import round_to_grid
from farm.stages.evaluate import perplexity
from farm.stages.modelio import load_model, load_tokenizer, pick_device

PROFILE_FORMAT = 2  # part of the cache key: a profile measured another way (before experts counted) is not reused
_LAYER = re.compile(r"^(?P<prefix>.*\blayers)\.(?P<index>\d+)$")


@dataclass
class Profile:
    """Perplexity deltas over the unquantized model, per decoder layer and for the embeddings / lm_head."""

    grid: Grid
    base_perplexity: float
    tokens: int
    layers: dict[int, float]
    extra: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    cached: bool = False  # read back from FARM_CACHE instead of measured now

    def to_json(self) -> dict[str, Any]:
        return {
            "grid": {"bits": self.grid.bits, "group_size": self.grid.group_size, "symmetric": self.grid.symmetric},
            "base_perplexity": self.base_perplexity,
            "tokens": self.tokens,
            "layers": {str(i): d for i, d in sorted(self.layers.items())},
            "extra": self.extra,
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Profile:
        return cls(
            Grid(d["grid"]["bits"], d["grid"]["group_size"], d["grid"].get("symmetric", True)),
            d["base_perplexity"],
            d["tokens"],
            {int(i): float(x) for i, x in d["layers"].items()},
            dict(d["extra"]),
            d["seconds"],
            cached=True,
        )

    def metrics(self) -> dict[str, float]:
        out = {f"sensitivity.layer_{i:03d}": d for i, d in self.layers.items()}
        return out | {f"sensitivity.{k}": d for k, d in self.extra.items()}


def with_linear_experts(model: Any) -> Any:
    """The model with each mixture-of-experts block's fused 3-D expert weights split into one Linear per expert
    (llm-compressor's `linearize_moe`, what its oneshot does to a model before calibrating it; a dense model is
    returned as it is). Without it a profile and a mixed recipe see only the attention Linears of an MoE layer and
    its experts would silently stay unquantized."""
    from llmcompressor.modeling.moe.linearize import linearize_moe

    return linearize_moe(model)


def decoder_layers(model: Any) -> list[Layer]:
    """The decoder layers (modules named `...layers.<i>`) with the Linear modules inside each."""
    import torch

    found: dict[int, Layer] = {}
    for name, module in model.named_modules():
        m = _LAYER.match(name)
        if not m:
            continue
        linears = [(sub, mod) for sub, mod in module.named_modules() if isinstance(mod, torch.nn.Linear) and sub]
        if linears:
            found[int(m["index"])] = Layer(
                int(m["index"]), tuple(s for s, _ in linears), sum(mod.weight.numel() for _, mod in linears)
            )
    return [found[i] for i in sorted(found)]


def _with_rounded(model: Any, names: list[str], grid: Grid, score: Any) -> float:
    modules = dict(model.named_modules())
    saved = {n: modules[n].weight.data.clone() for n in names}
    try:
        for n in names:
            modules[n].weight.data = round_to_grid(saved[n], grid)
        return float(score())
    finally:
        for n, w in saved.items():
            modules[n].weight.data = w


def profile_model(model: Any, windows: list[list[int]], grid: Grid, device: str) -> Profile:
    """Round each decoder layer alone (then the input embeddings and, if separate, lm_head) and score it."""
    t0 = time.perf_counter()
    base, tokens = perplexity(model, windows, device)

    def score() -> float:
        return perplexity(model, windows, device)[0] - base

    layers = decoder_layers(model)
    prefix = {int(m["index"]): m["prefix"] for n, _ in model.named_modules() if (m := _LAYER.match(n))}
    deltas = {
        layer.index: _with_rounded(
            model, [f"{prefix[layer.index]}.{layer.index}.{s}" for s in layer.linears], grid, score
        )
        for layer in layers
    }
    extra: dict[str, float] = {}
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(mod): n for n, mod in model.named_modules()}
    if inp is not None and id(inp) in names:
        tied = out is not None and out.weight is inp.weight
        extra["embeddings_tied_lm_head" if tied else "embeddings"] = _with_rounded(model, [names[id(inp)]], grid, score)
        if out is not None and not tied and id(out) in names:
            extra["lm_head"] = _with_rounded(model, [names[id(out)]], grid, score)
    return Profile(grid, base, tokens, deltas, extra, time.perf_counter() - t0)


def probe_windows(source: str, tokenizer: Any, tokens: int, seq_len: int) -> list[list[int]]:
    """The text `farm sensitivity` scores on: the start of the job's validation text (its calibration text when it
    has none), never the evaluation's held-out text (a recipe tuned on the test set would flatter itself)."""
    return heldout_windows(read_text(source), tokenizer, tokens, seq_len)


def profile_cached(model: Any, model_dir: str, windows: list[list[int]], grid: Grid, device: str) -> Profile:
    """`profile_model`, remembered under FARM_CACHE by (checkpoint files, grid, scored windows): a profile is
    minutes of perplexity passes on a CPU, and the same base is profiled again by `farm sensitivity`, by a mixed
    variant with another budget, by a re-run."""
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(model_dir).glob("*.safetensors"))
    key = hashlib.sha256(
        json.dumps(
            [
                PROFILE_FORMAT,
                str(Path(model_dir).resolve()),
                files,
                [grid.bits, grid.group_size, grid.symmetric],
                windows,
            ]
        ).encode()
    ).hexdigest()
    path = cache_root() / "sensitivity" / f"{key[:32]}.json"
    if path.exists():
        return Profile.from_json(json.loads(path.read_text()))
    prof = profile_model(model, windows, grid, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(prof.to_json()))
    os.replace(tmp, path)
    return prof


def measure(
    model_dir: str, source: str, grid: Grid, tokens: int = 4096, seq_len: int = 512, trust_remote_code: bool = False
) -> Profile:
    """Load a checkpoint and profile it on `source` (the `farm sensitivity` command's stage)."""
    device = pick_device()
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    model = with_linear_experts(load_model(model_dir, device, trust_remote_code))
    return profile_cached(model, model_dir, probe_windows(source, tokenizer, tokens, seq_len), grid, device)

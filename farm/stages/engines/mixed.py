"""The mixed-precision quantize stage: profile the base, rank its layers, then bisect over real quantizations
(GPTQ or RTN, with the variant's own calibration draw) for the fewest layers kept at the high grid that hold
the perplexity delta on the job's validation text within the budget. Only passing probes are written, the
best one becomes the variant; the profile and every probe are returned as documents for MLflow, and every probe
as a candidate row (one MLflow run each)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from farm.methods.mixed import MixedConfig
from farm.methods.precision import Search, predicted_upgrades, quantized_bytes, rank_layers, smallest_meeting
from farm.stages.engines.registry import register_engine
from farm.stages.engines.sensitivity import decoder_layers, profile_cached, with_linear_experts
from farm.stages.engines.validation import allowed_delta, judging, perplexity_of
from farm.stages.evaluate import perplexity
from farm.stages.modelio import load_model, pick_device
from farm.stages.quantize import QuantizeRequest, QuantizeResult, _dataset, calibrate, save

RELOAD_TOLERANCE = 0.01  # relative: kernels of a reloaded model may round differently, a lost transform does not


@register_engine(MixedConfig)
def quantize_mixed(req: QuantizeRequest) -> QuantizeResult:
    method = req.method
    if not isinstance(method, MixedConfig):
        raise TypeError(f"quantize_mixed needs a MixedConfig, got {type(method).__name__}")
    device = pick_device()
    t0 = time.perf_counter()
    tokenizer, windows = judging(req, "a mixed variant")
    dataset = _dataset(req, tokenizer) if method.requires_calibration else None
    base = with_linear_experts(
        load_model(req.model_dir, req.load_device or device, req.trust_remote_code, compute=device)
    )
    layers = decoder_layers(base)
    if not layers:
        raise ValueError("no decoder layers (modules named '...layers.<i>' holding Linear modules) to assign")
    low, high = method.low.grid(), method.high.grid()
    profile = profile_cached(base, req.model_dir, windows, low, device)
    del base
    order = rank_layers(profile.layers, layers, low, high)
    budget = allowed_delta(method.budget, method.budget_unit, profile.base_perplexity)
    t1 = time.perf_counter()

    out = Path(req.out_dir)
    kept: dict[str, Any] = {}
    notes: list[str] = []
    seconds: dict[int, float] = {}

    def probe(k: int, keep: bool = False) -> float:
        """Quantize with the k most fragile layers high; write it if it is the best passing one so far (or
        `keep`: a fixed assignment, or every layer high when even that misses the budget)."""
        start = time.perf_counter()
        model = load_model(req.model_dir, req.load_device or device, req.trust_remote_code, compute=device)
        notes[:] = calibrate(req, model, tokenizer, method.modifiers_for(layers, set(order[:k])), dataset)
        delta = perplexity(model, windows, device)[0] - profile.base_perplexity
        seconds[k] = time.perf_counter() - start
        if keep or k == len(order) or (delta <= budget and k < kept.get("k", len(order) + 1)):
            shutil.rmtree(out, ignore_errors=True)
            kept.update(k=k, recipe=save(model, tokenizer, out))
        return delta

    if method.high_layers is not None:
        unknown = sorted(set(method.high_layers) - set(order))
        if unknown:
            raise ValueError(
                f"high_layers {unknown} are not decoder layers of this model "
                f"(it has {order and min(order)}..{order and max(order)})"
            )
        fixed = sorted(set(method.high_layers))
        order = fixed + [i for i in order if i not in fixed]
        delta = probe(len(fixed), keep=True)
        search = Search(len(fixed), delta <= budget, {len(fixed): delta})
    else:
        search = smallest_meeting(
            probe, len(order), budget, guess=lambda d0: predicted_upgrades(profile.layers, order, d0, budget)
        )
    reloaded = perplexity_of(req.out_dir, windows, req.load_device or device, req.trust_remote_code)
    built = profile.base_perplexity + search.probes[kept["k"]]
    if abs(reloaded - built) > RELOAD_TOLERANCE * built:  # judged in memory: the checkpoint must be that model
        raise RuntimeError(
            f"the mixed checkpoint does not reload as it was judged: validation perplexity {built:.3f} in memory, "
            f"{reloaded:.3f} reloaded with transformers"
        )
    t2 = time.perf_counter()
    chosen = sorted(order[: search.upgraded])
    size = quantized_bytes(layers, set(chosen), low, high)
    uniform = quantized_bytes(layers, set(), low, high)
    params = sum(layer.params for layer in layers)
    if not search.met:
        notes.append(
            f"budget {method.budget:g} ({method.budget_unit}) not met even with every layer at {high.bits} bits"
        )
    if profile.cached:
        notes.append("sensitivity profile reused from FARM_CACHE (same checkpoint, grid and validation windows)")
    notes.append(
        f"mixed precision: {len(chosen)} of {len(layers)} decoder layers at {high.bits} bits "
        f"({', '.join(map(str, chosen)) or 'none'}); {len(search.probes)} probe quantizations"
    )
    search_doc = {
        "order": order,
        "high_layers": chosen,
        "budget": method.budget,
        "budget_unit": method.budget_unit,
        "allowed_delta": budget,
        "met": search.met,
        "probes": [
            {
                "upgraded": k,
                "high_layers": sorted(order[:k]),
                "perplexity_delta": d,
                "quantized_bytes": quantized_bytes(layers, set(order[:k]), low, high),
            }
            for k, d in sorted(search.probes.items())
        ],
        "validation_base_perplexity": profile.base_perplexity,
        "validation_tokens": profile.tokens,
    }
    rows = [
        {
            "index": i,
            "label": f"{method.label()}.high{k}",
            "method": {**method.identity(), "high_layers": sorted(order[:k])},
            "status": "chosen" if k == search.upgraded else "passed" if d <= budget else "missed",
            "error": None,
            "metrics": {
                "validation_perplexity": profile.base_perplexity + d,
                "validation_perplexity_delta": d,
                "quantized_bytes_estimate": quantized_bytes(layers, set(order[:k]), low, high),
                "seconds_candidate": seconds.get(k, 0.0),
            },
        }
        for i, (k, d) in enumerate(sorted(search.probes.items()))
    ]
    t3 = time.perf_counter()
    return QuantizeResult(
        out_dir=req.out_dir,
        device=device,
        seconds_load=t1 - t0,
        seconds_oneshot=t2 - t1,
        seconds_save=t3 - t2,
        recipe=kept["recipe"],
        notes=notes,
        calibration_report=dict(req.report),
        metrics={
            "mixed.high_layers": float(len(chosen)),
            "mixed.decoder_layers": float(len(layers)),
            "mixed.avg_weight_bits": 8 * size / params,
            "mixed.size_vs_uniform_low": size / uniform,
            "mixed.validation_perplexity_delta": search.probes.get(search.upgraded, float("nan")),
            "mixed.allowed_delta": budget,
            "mixed.validation_perplexity_reloaded": reloaded,
            "mixed.probes": float(len(search.probes)),
            "sensitivity.seconds": profile.seconds,
            **profile.metrics(),
        },
        documents={"sensitivity.json": profile.to_json(), "mixed_search.json": search_doc},
        candidates=rows,
    )

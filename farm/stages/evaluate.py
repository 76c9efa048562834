"""Evaluate stage: perplexity on held-out text, size on disk, a greedy generation sample.

It loads the checkpoint exactly as a user would (plain `AutoModelForCausalLM.from_pretrained`), so a variant
that does not reload or generate fails here rather than in production.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from farm.calibration import heldout_windows, read_text
from farm.stages.modelio import decoder_linear_bytes, dir_bytes, load_model, load_tokenizer, pick_device, weights_bytes


@dataclass(frozen=True)
class EvaluateRequest:
    model_dir: str
    ppl_source: str
    ppl_max_tokens: int
    ppl_seq_len: int
    prompt: str
    max_new_tokens: int
    trust_remote_code: bool = False


@dataclass
class EvaluateResult:
    perplexity: float
    ppl_tokens: int
    weights_bytes: int
    dir_bytes: int
    generation: str
    device: str
    seconds_load: float
    seconds_perplexity: float
    seconds_generate: float
    decoder_linear_bytes: int = 0  # the decoder layers' Linear modules: the bytes quantization changes


def perplexity(model: object, windows: list[list[int]], device: str) -> tuple[float, int]:
    """exp(mean next-token NLL) over non-overlapping windows; every window scores seq_len - 1 tokens."""
    import torch

    nll, count = 0.0, 0
    with torch.inference_mode():
        for w in windows:
            ids = torch.tensor([w], device=device)
            out = model(input_ids=ids, labels=ids)  # type: ignore[operator]
            n = len(w) - 1
            nll += float(out.loss) * n
            count += n
    return math.exp(nll / count), count


@dataclass
class Loaded:
    """A checkpoint loaded once for every measurement of it (evaluation and the checks)."""

    model: Any
    tokenizer: Any
    device: str
    seconds: float


def load(req: EvaluateRequest) -> Loaded:
    device = pick_device()
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(req.model_dir, req.trust_remote_code)
    model = load_model(req.model_dir, device, req.trust_remote_code)
    return Loaded(model, tokenizer, device, time.perf_counter() - t0)


def evaluate(req: EvaluateRequest, loaded: Loaded | None = None) -> EvaluateResult:
    import torch

    loaded = loaded or load(req)
    model, tokenizer, device = loaded.model, loaded.tokenizer, loaded.device
    t1 = time.perf_counter()
    windows = heldout_windows(read_text(req.ppl_source), tokenizer, req.ppl_max_tokens, req.ppl_seq_len)
    ppl, tokens = perplexity(model, windows, device)
    t2 = time.perf_counter()
    enc = tokenizer(req.prompt, return_tensors="pt").to(device)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=req.max_new_tokens, do_sample=False)
    text = tokenizer.decode(out[0][enc["input_ids"].shape[1] :], skip_special_tokens=True)
    t3 = time.perf_counter()
    return EvaluateResult(
        perplexity=ppl,
        ppl_tokens=tokens,
        weights_bytes=weights_bytes(req.model_dir),
        dir_bytes=dir_bytes(req.model_dir),
        generation=text,
        device=device,
        seconds_load=loaded.seconds,
        seconds_perplexity=t2 - t1,
        seconds_generate=t3 - t2,
        decoder_linear_bytes=decoder_linear_bytes(req.model_dir),
    )

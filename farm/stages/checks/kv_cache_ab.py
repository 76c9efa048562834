"""KV-cache quantization A/B: one long multi-turn conversation generated twice - with the model's usual KV
cache and with an FP8 one - transcripts kept side by side, scored for agreement and coherence.

The FP8 cache is simulated storage: every key/value chunk written to the cache is rounded through
float8_e4m3fn with a per-head absmax scale (what an FP8 KV cache keeps), then used as usual. Coherence of a
transcript = mean MiniLM similarity of each reply to the user turn it answers; agreement = identical replies
and MiniLM similarity between the two transcripts' replies.
"""

from __future__ import annotations

from typing import Any

from farm.spec import KVCacheSpec
from farm.stages.checks.behaviour import chat_text, similarity

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_round(x: Any) -> Any:
    import torch

    scale = x.abs().amax(dim=(-2, -1), keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return ((x.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


def fp8_cache_class() -> type:
    from transformers import DynamicCache

    class FP8DynamicCache(DynamicCache):  # type: ignore[misc]
        def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
            return super().update(fp8_round(key_states), fp8_round(value_states), layer_idx, *args, **kwargs)

    return FP8DynamicCache


def converse(model: Any, tokenizer: Any, spec: KVCacheSpec, device: str, cache_cls: type | None) -> list[str]:
    import torch

    history: list[dict[str, str]] = []
    replies = []
    for turn in spec.turns:
        history.append({"role": "user", "content": turn})
        text = chat_text(tokenizer, history)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
        kwargs = {"past_key_values": cache_cls(config=model.config)} if cache_cls else {}
        with torch.inference_mode():
            ids = model.generate(
                **enc,
                max_new_tokens=spec.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
                **kwargs,
            )
        reply = tokenizer.decode(ids[0][enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        replies.append(reply)
        history.append({"role": "assistant", "content": reply})
    return replies


def ab(model: Any, tokenizer: Any, spec: KVCacheSpec, device: str) -> dict[str, Any]:
    plain = converse(model, tokenizer, spec, device, None)
    fp8 = converse(model, tokenizer, spec, device, fp8_cache_class())
    metrics = {"kv_fp8_exact_match": sum(a == b for a, b in zip(plain, fp8, strict=True)) / len(plain)}
    between = similarity(plain, fp8)
    if between is not None:
        metrics |= {
            "kv_fp8_similarity": between,
            "kv_coherence_plain": similarity(plain, list(spec.turns)) or 0.0,
            "kv_coherence_fp8": similarity(fp8, list(spec.turns)) or 0.0,
        }
    transcript = [{"user": u, "plain_cache": a, "fp8_cache": b} for u, a, b in zip(spec.turns, plain, fp8, strict=True)]
    return {"metrics": metrics, "transcript": transcript}

"""The QLoRA pattern: a LoRA adapter trained on the base, applied on top of each quantized variant.

A compressed-tensors checkpoint is loaded dequantized (the rounded weights, densified: what the quantized
kernels compute) so PEFT can wrap its Linear modules; the adapter's output is added in the model's dtype, as
QLoRA does over its 4-bit base. The same adapter on the unquantized base is the reference. `train_lora` makes
the small adapter farm ships (scripts/make_adapter.py)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from farm.calibration import draw, heldout_windows, read_text
from farm.spec import AdapterSpec, EvaluationSpec
from farm.stages.evaluate import perplexity
from farm.stages.modelio import load_tokenizer, pick_device


def load_dense(model_dir: str, device: str, trust_remote_code: bool = False) -> Any:
    """Load a checkpoint with plain Linear weights: compressed-tensors checkpoints are dequantized on load."""
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    config = json.loads((Path(model_dir) / "config.json").read_text())
    kwargs: dict[str, Any] = {}
    if (config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors":
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, device_map=device, trust_remote_code=trust_remote_code, **kwargs
    )
    return model.eval()


def merge_into(model_dir: str, adapter_dir: str, out_dir: str, trust_remote_code: bool = False) -> str:
    """Base + adapter merged into plain weights (PEFT's merge_and_unload), saved in the base's dtype."""
    import torch
    from peft import PeftModel

    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    base = load_dense(model_dir, "cpu", trust_remote_code)  # merging is a few matmuls; the host is enough
    config = json.loads((Path(model_dir) / "config.json").read_text())
    dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"))
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().to(dtype)
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def evaluate_adapters(model_dir: str, ev: EvaluationSpec, trust_remote_code: bool = False) -> dict[str, float]:
    """Perplexity of model + each adapter on the adapter's text: one dense load, each adapter attached and then
    taken off again (PEFT's `unload` restores the plain modules)."""
    from peft import PeftModel

    device = pick_device()
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    model = load_dense(model_dir, device, trust_remote_code)
    metrics: dict[str, float] = {}
    for a in ev.adapters:
        windows = _windows(a, ev, tokenizer)
        t0 = time.perf_counter()
        wrapped = PeftModel.from_pretrained(model, a.source).eval()
        metrics[f"adapter_{a.name}_perplexity"] = perplexity(wrapped, windows, device)[0]
        metrics[f"seconds_check_adapter_{a.name}"] = time.perf_counter() - t0
        model = wrapped.unload()
    return metrics


def _windows(a: AdapterSpec, ev: EvaluationSpec, tokenizer: Any) -> list[list[int]]:
    return heldout_windows(read_text(a.eval_source or ev.perplexity.source), tokenizer, a.max_tokens, a.seq_len)


def train_lora(
    model_dir: str,
    text_source: str,
    out_dir: str,
    steps: int = 60,
    rank: int = 8,
    learning_rate: float = 2e-4,
    seq_len: int = 256,
    batch_size: int = 4,
    seed: int = 0,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
) -> dict[str, Any]:
    """Train a small LoRA adapter on text (next-token loss) and save it with PEFT; returns the loss curve."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    device = pick_device()
    tokenizer = load_tokenizer(model_dir)
    base = load_dense(model_dir, device)
    model = get_peft_model(
        base,
        LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            lora_dropout=0.0,
            bias="none",
            target_modules=list(target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    data = torch.tensor(draw(text_source, tokenizer, steps * batch_size, seq_len, seed))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    losses = []
    model.train()
    for step in range(steps):
        batch = data[step * batch_size : (step + 1) * batch_size].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError("adapter training diverged; lower the learning rate")
    model.save_pretrained(out_dir)
    info = {
        "base": Path(model_dir).name,
        "text": Path(text_source).name,
        "steps": steps,
        "rank": rank,
        "learning_rate": learning_rate,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "seed": seed,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }
    (Path(out_dir) / "farm_training.json").write_text(json.dumps(info, indent=1) + "\n")
    return info

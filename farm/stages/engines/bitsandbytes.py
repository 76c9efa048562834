"""The NF4/FP4 quantize stage: bitsandbytes quantizes while transformers loads the checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

from farm.methods.nf4 import NF4Config
from farm.stages.engines.registry import register_engine
from farm.stages.modelio import load_tokenizer, pick_device
from farm.stages.quantize import QuantizeRequest, QuantizeResult, yaml_recipe


@register_engine(NF4Config)
def quantize_bitsandbytes(req: QuantizeRequest) -> QuantizeResult:
    """bitsandbytes quantizes while transformers loads the checkpoint; saving writes its 4-bit serialization."""
    import torch
    from transformers import AutoModelForCausalLM

    from farm.methods.nf4 import NF4Config

    if not isinstance(req.method, NF4Config):
        raise TypeError(f"bitsandbytes runs NF4 configs, got {type(req.method).__name__}")

    device = pick_device()
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(req.model_dir, req.trust_remote_code)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(
        req.model_dir,
        dtype=dtype,
        device_map=device,
        trust_remote_code=req.trust_remote_code,
        quantization_config=req.method.quantization_config(device),
    )
    t1 = time.perf_counter()
    model.save_pretrained(req.out_dir)
    tokenizer.save_pretrained(req.out_dir)
    recipe = yaml_recipe(req.method, "bitsandbytes")
    (Path(req.out_dir) / "recipe.yaml").write_text(recipe)
    return QuantizeResult(
        out_dir=req.out_dir,
        device=device,
        seconds_load=0.0,
        seconds_oneshot=t1 - t0,
        seconds_save=time.perf_counter() - t1,
        recipe=recipe,
        notes=["bitsandbytes quantized the weights at load (data-free)"],
    )

"""GPTQ through GPTQModel (a second GPTQ implementation, its own GPTQ checkpoint format). Runs inside the
backend's Ray runtime environment (methods/backends.py); the calibration draw is farm's, the same windows
llm-compressor would see, so the two backends compare on equal inputs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

from farm.calibration import draw
from farm.methods.gptq import GPTQConfig
from farm.stages.engines.registry import register_engine
from farm.stages.modelio import load_tokenizer, pick_device
from farm.stages.quantize import QuantizeRequest, QuantizeResult


@register_engine(GPTQConfig, when=lambda c: c.backend == "gptqmodel")
def quantize_gptqmodel(req: QuantizeRequest) -> QuantizeResult:
    method = req.method
    if not isinstance(method, GPTQConfig):
        raise TypeError(f"the gptqmodel backend runs GPTQ configs, got {type(method).__name__}")
    try:
        import torch

        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, torch.get_num_threads())))
        from gptqmodel import GPTQModel, QuantizeConfig
    except ImportError as err:
        raise RuntimeError(
            f"backend gptqmodel is not installed in this worker ({err}); farm runs it in a Ray "
            "runtime_env with gptqmodel==7.6.0 (methods/backends.py)"
        ) from None
    device = pick_device()
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(req.model_dir, req.trust_remote_code)
    cal = req.calibration
    windows = draw(cal.source, tokenizer, cal.num_samples, cal.max_seq_length, cal.seed, expect_sha256=cal.sha256)
    settings = method.gptqmodel_config()
    model = GPTQModel.load(
        req.model_dir, QuantizeConfig(**settings), device=device, trust_remote_code=req.trust_remote_code
    )
    t1 = time.perf_counter()
    model.quantize([{"input_ids": w, "attention_mask": [1] * len(w)} for w in windows], batch_size=req.batch_size)
    t2 = time.perf_counter()
    model.save(req.out_dir)
    tokenizer.save_pretrained(req.out_dir)
    written = json.loads((Path(req.out_dir) / "config.json").read_text()).get("quantization_config", {})
    recipe = yaml.safe_dump(
        {
            "gptqmodel": {
                "quantize_config": settings,
                "written": {
                    k: written.get(k) for k in ("quant_method", "format", "bits", "group_size", "desc_act", "sym")
                },
            }
        },
        sort_keys=True,
    )
    (Path(req.out_dir) / "recipe.yaml").write_text(recipe)
    import gptqmodel

    return QuantizeResult(
        out_dir=req.out_dir,
        device=device,
        seconds_load=t1 - t0,
        seconds_oneshot=t2 - t1,
        seconds_save=time.perf_counter() - t2,
        recipe=recipe,
        notes=[f"backend gptqmodel {gptqmodel.__version__} ({written.get('format')} format)"],
    )

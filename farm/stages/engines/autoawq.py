"""AWQ through AutoAWQ 0.2.9 (archived upstream), in its own environment with transformers 4.51.

That transformers predates the checkpoint layout farm's stack writes (`rope_parameters`, the
`TokenizersBackend` tokenizer class), so the base is presented to it through a view: the same weight files
(symlinked) with a config and tokenizer config it can read. The calibration windows are farm's draw, so AutoAWQ
sees the same tokens llm-compressor's AWQ would. The variant is evaluated elsewhere (GPTQModel's environment
reads AutoAWQ's GEMM format with current transformers)."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from farm.calibration import draw
from farm.methods.awq import AWQConfig
from farm.stages.quantize import QuantizeRequest, QuantizeResult

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def legacy_view(model_dir: str, into: Path) -> Path:
    """A directory transformers 4.x reads as the same model: weights symlinked, config keys translated."""
    src = Path(model_dir)
    into.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors" or f.name == "model.safetensors.index.json":
            (into / f.name).symlink_to(f.resolve())
    config = json.loads((src / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or {}
    if "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = rope
    if "dtype" in config:
        config["torch_dtype"] = config.pop("dtype")
    (into / "config.json").write_text(json.dumps(config, indent=1))
    tok = json.loads((src / "tokenizer_config.json").read_text()) if (src / "tokenizer_config.json").exists() else {}
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    (into / "tokenizer_config.json").write_text(json.dumps(tok, indent=1))
    shutil.copy(src / "tokenizer.json", into / "tokenizer.json")
    return into


def quantize_autoawq(req: QuantizeRequest) -> dict[str, Any]:
    """Runs in the autoawq-quantize environment; returns a plain dict (QuantizeResult's fields) because the
    caller lives in another environment."""
    method = req.method
    if not isinstance(method, AWQConfig):
        raise TypeError(f"the autoawq backend runs AWQ configs, got {type(method).__name__}")
    import awq
    import torch
    import transformers
    from awq import AutoAWQForCausalLM
    from transformers import AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="farm-autoawq-") as tmp:
        view = legacy_view(req.model_dir, Path(tmp) / "base")
        tokenizer = AutoTokenizer.from_pretrained(view)
        cal = req.calibration
        windows = draw(cal.source, tokenizer, cal.num_samples, cal.max_seq_length, cal.seed, expect_sha256=cal.sha256)
        model = AutoAWQForCausalLM.from_pretrained(str(view), device_map=device)
        t1 = time.perf_counter()
        model.quantize(
            tokenizer,
            quant_config=method.autoawq_config(),
            calib_data=windows,
            max_calib_samples=len(windows),
            max_calib_seq_len=cal.max_seq_length,
        )
        t2 = time.perf_counter()
        model.save_quantized(req.out_dir)
    for name in TOKENIZER_FILES:  # the base's own tokenizer files, as current transformers wrote them
        if (Path(req.model_dir) / name).exists():
            shutil.copy(Path(req.model_dir) / name, Path(req.out_dir) / name)
    recipe = yaml.safe_dump(
        {
            "autoawq": {
                "quant_config": method.autoawq_config(),
                "version": awq.__version__,
                "transformers": transformers.__version__,
            }
        },
        sort_keys=True,
    )
    (Path(req.out_dir) / "recipe.yaml").write_text(recipe)
    return {
        "out_dir": req.out_dir,
        "device": device,
        "seconds_load": t1 - t0,
        "seconds_oneshot": t2 - t1,
        "seconds_save": time.perf_counter() - t2,
        "recipe": recipe,
        "notes": [f"backend autoawq {awq.__version__} (GEMM format, transformers {transformers.__version__})"],
    }


def as_result(fields: dict[str, Any]) -> QuantizeResult:
    return QuantizeResult(**fields)

"""NF4 / FP4 weights through bitsandbytes (the QLoRA storage format): data-free, quantized as transformers
loads the checkpoint and saved in bitsandbytes' serialization, which transformers reloads as Linear4bit.
bitsandbytes 0.50 runs on CPU as well as CUDA (measured here); vLLM serves it too, without fused kernels."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from farm.methods.base import MethodConfig


class NF4Config(MethodConfig):
    method: Literal["nf4"] = "nf4"
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit NormalFloat (QLoRA) or plain FP4")
    double_quant: bool = Field(True, description="quantize the per-block scales too (~0.4 bits/weight saved)")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype of the matmuls (auto: float32 on CPU, bfloat16 on GPUs)"
    )
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"], description="Linear modules kept in high precision, by name (no regexes)"
    )

    @field_validator("ignore")
    @classmethod
    def _names_only(cls, v: list[str]) -> list[str]:
        regexes = [x for x in v if x.startswith("re:")]
        if regexes:
            raise ValueError(f"bitsandbytes skips modules by name; regexes are not supported ({regexes[0]})")
        return v

    @property
    def requires_calibration(self) -> bool:
        return False

    @property
    def distributable(self) -> bool:
        return False

    def default_label(self) -> str:
        return self.quant_type + ("-dq" if self.double_quant else "")

    def modifiers(self) -> list[Any]:
        raise TypeError("nf4 is not an llm-compressor recipe; use quantization_config()")

    def quantization_config(self, device: str) -> Any:
        import torch
        from transformers import BitsAndBytesConfig

        dtype = self.compute_dtype if self.compute_dtype != "auto" else ("float32" if device == "cpu" else "bfloat16")
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, dtype),
            llm_int8_skip_modules=list(self.ignore) or None,
        )

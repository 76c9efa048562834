"""FP8: data-free E4M3 weights with dynamic per-token activations (or 128x128 block scales)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from farm.methods.base import MethodConfig


class FP8Config(MethodConfig):
    method: Literal["fp8"] = "fp8"
    cost_rank: ClassVar[int] = 3
    scheme: Literal["FP8_DYNAMIC", "FP8_BLOCK"] = Field("FP8_DYNAMIC", description="compressed-tensors preset")
    engine: Literal["oneshot", "model_free"] = Field(
        "oneshot",
        description="oneshot builds the model in transformers; model_free quantizes the safetensors "
        "shards directly (no model definition, shards spread over the worker's GPUs: resources.ranks GPUs)",
    )

    @property
    def requires_calibration(self) -> bool:
        return False

    def weight_bits(self) -> float:
        return 8.0  # one byte per weight; per-channel or per-block scales are negligible per weight

    def default_label(self) -> str:
        base = "fp8-dynamic" if self.scheme == "FP8_DYNAMIC" else "fp8-block"
        return base + ("-mf" if self.engine == "model_free" else "")

    def check_model(self, model_config: dict[str, Any]) -> list[str]:
        if self.scheme != "FP8_BLOCK":
            return []
        dims = {k: model_config.get(k) for k in ("hidden_size", "intermediate_size")}
        return [f"FP8_BLOCK needs {k}={v} divisible by 128" for k, v in dims.items() if isinstance(v, int) and v % 128]

    def modifiers(self) -> list[Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return [QuantizationModifier(targets="Linear", scheme=self.scheme, ignore=list(self.ignore))]


FP8_KV_CACHE = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


class FP8StaticConfig(MethodConfig):
    """FP8 weights and *static* per-tensor FP8 activations (scales calibrated), optionally with an FP8 KV cache
    (per-tensor k/v scales calibrated the same way)."""

    method: Literal["fp8_static"] = "fp8_static"
    kv_cache: bool = Field(False, description="also quantize the KV cache to FP8 (calibrated scales)")

    def default_label(self) -> str:
        return "fp8-static" + ("-kv" if self.kv_cache else "")

    def modifiers(self) -> list[Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return [
            QuantizationModifier(
                targets="Linear",
                scheme="FP8",
                ignore=list(self.ignore),
                kv_cache_scheme=FP8_KV_CACHE if self.kv_cache else None,
            )
        ]


class KVCacheFP8Config(MethodConfig):
    """Only the KV cache in FP8 (weights and activations untouched): the memory of long contexts halves."""

    method: Literal["kv_fp8"] = "kv_fp8"

    def default_label(self) -> str:
        return "kv-fp8"

    def modifiers(self) -> list[Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return [QuantizationModifier(ignore=list(self.ignore), kv_cache_scheme=FP8_KV_CACHE)]

"""FP8: data-free E4M3 weights with dynamic per-token activations (or 128x128 block scales)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from farm.methods.base import MethodConfig


class FP8Config(MethodConfig):
    requires_calibration: ClassVar[bool] = False

    method: Literal["fp8"] = "fp8"
    scheme: Literal["FP8_DYNAMIC", "FP8_BLOCK"] = Field("FP8_DYNAMIC", description="compressed-tensors preset")
    engine: Literal["oneshot", "model_free"] = Field(
        "oneshot", description="oneshot builds the model in transformers; model_free quantizes the safetensors "
        "shards directly (no model definition, shards spread over the worker's GPUs: resources.ranks GPUs)")

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

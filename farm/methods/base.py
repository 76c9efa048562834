"""What every method config shares: strict fields, a stable hash, the high-precision ignore list and the
divisibility check against a model's shapes. Configs are pure data; `modifiers()` imports llm-compressor
lazily so planning and validation never load torch."""

from __future__ import annotations

import hashlib
import json
from abc import abstractmethod
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

# lm_head, embeddings and norms stay in high precision unless a spec says otherwise. Embeddings and norms are
# not Linear modules (the only target) so they are never quantized; naming them keeps the intent explicit.
DEFAULT_IGNORE = ["lm_head", "re:.*embed_tokens$", "re:.*norm$"]


class CalibrationOverride(BaseModel):
    """Per-method calibration size, for methods (AWQ) whose cost grows faster with tokens than GPTQ's."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    num_samples: int | None = Field(None, gt=0, le=100_000, description="calibration samples for this method")
    max_seq_length: int | None = Field(None, gt=0, le=131_072, description="tokens per calibration sample")
    set: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="a named set from the job's calibration_sets (default: the job's calibration)",
    )


class MethodConfig(BaseModel):
    """Base of every method config in the registry."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    method: str
    name: str | None = Field(
        None, pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$", description="variant label (default: derived from settings)"
    )
    ignore: list[str] = Field(
        default_factory=lambda: list(DEFAULT_IGNORE),
        description="modules kept in high precision (names or 're:' regexes)",
    )
    calibration: CalibrationOverride | None = Field(None, description="override of the job's calibration size")

    @property
    def requires_calibration(self) -> bool:
        """Whether the recipe reads calibration data (data-free methods get the same variant for any set)."""
        return True

    @property
    def uses_validation(self) -> bool:
        """Whether the method chooses between candidates by scoring them on the job's validation text."""
        return False

    def candidate_methods(self) -> list[MethodConfig]:
        """The configs this method builds and chooses between (a search's candidates); empty for one recipe."""
        return []

    def calibration_sets_named(self) -> list[tuple[str, str]]:
        """(where in the config, set name) for every named calibration set this method reads."""
        named = [("", self.calibration.set)] if self.calibration and self.calibration.set else []
        for c in self.candidate_methods():
            named += [(f"candidates[{c.label()}].{where}", name) for where, name in c.calibration_sets_named()]
        return named

    @property
    def backend_name(self) -> str:
        """Which library quantizes (methods with a `backend` field choose; see methods/backends.py)."""
        return str(getattr(self, "backend", "llmcompressor"))

    @property
    def distributable(self) -> bool:
        """Whether calibration can be spread over ranks (a DDP gang): llm-compressor's distributed oneshot only."""
        return self.backend_name == "llmcompressor"

    # Start order in a job: lower runs first (a packed job finishes soonest when its slowest variants start early).
    cost_rank: ClassVar[int] = 9
    # Fields added after variants of this method were first published, with the value that reproduces those
    # variants: left at that value they stay out of the identity, so existing variant ids do not change.
    later_fields: ClassVar[dict[str, Any]] = {}

    def label(self) -> str:
        suffix = "" if self.backend_name == "llmcompressor" else f"-{self.backend_name}"
        return self.name or self.default_label() + suffix

    def default_label(self) -> str:
        return self.method

    def identity(self) -> dict[str, Any]:
        """Everything that changes the produced weights; the variant id hashes this."""
        out = self.model_dump(mode="json", exclude={"name"})
        if out.get("backend") == "llmcompressor":  # variants made before backends existed keep their ids
            out.pop("backend")
        for key, unchanged in self.later_fields.items():
            if key in out and out[key] == unchanged:
                out.pop(key)
        return out

    def weight_bits(self) -> float | None:
        """Estimated stored bits per quantized Linear weight (scales and zero points included), for ordering
        candidates by size before any is built; None where the method does not say."""
        return None

    def config_hash(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def group_sizes(self) -> list[int]:
        """Group sizes this method quantizes with (empty for per-channel / per-tensor schemes)."""
        return []

    def check_model(self, model_config: dict[str, Any]) -> list[str]:
        """Problems with applying this method to a model with this config.json, as readable strings."""
        problems = []
        dims = {k: model_config.get(k) for k in ("hidden_size", "intermediate_size", "head_dim")}
        if not dims["head_dim"] and dims["hidden_size"] and model_config.get("num_attention_heads"):
            dims["head_dim"] = dims["hidden_size"] // model_config["num_attention_heads"]
        dims.pop("head_dim")  # o_proj's input is heads * head_dim, which equals hidden_size for Llama-likes
        for group in self.group_sizes():
            for key, dim in dims.items():
                if isinstance(dim, int) and dim % group:
                    fits = [g for g in (128, 64, 32) if all(isinstance(d, int) and d % g == 0 for d in dims.values())]
                    hint = f" (use group_size {fits[0]})" if fits else ""
                    problems.append(f"group_size={group} does not divide the model's {key}={dim}{hint}")
                    break
        return problems

    @abstractmethod
    def modifiers(self) -> list[Any]:
        """The llm-compressor modifiers (the recipe) for this config."""


def int_weight_bits(num_bits: int, group_size: int | None, symmetric: bool) -> float:
    """Bits per weight of an int grid as compressed-tensors stores it: packed weights, a 16-bit scale per group
    (a per-channel scale is negligible per weight) and, when asymmetric, a zero point per group."""
    if not group_size:
        return float(num_bits)
    return num_bits + (16 + (0 if symmetric else num_bits)) / group_size


def int_weight_group(num_bits: int, group_size: int | None, symmetric: bool) -> dict[str, Any]:
    """A compressed-tensors config group quantizing Linear weights to int, grouped or per channel."""
    weights: dict[str, Any] = {"num_bits": num_bits, "type": "int", "symmetric": symmetric}
    if group_size:
        weights |= {"strategy": "group", "group_size": group_size}
    else:
        weights |= {"strategy": "channel"}
    return {"group_0": {"targets": ["Linear"], "weights": weights}}

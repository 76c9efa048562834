"""Recipe search: a declared space of recipes for a model (candidate methods x knobs x calibration sets), each
built for real and scored on the job's validation text; the smallest one within `budget` becomes the variant.

The space is `candidates` (method configs) crossed with `vary` (field -> values, applied to every candidate that
has the field). Candidates are tried smallest first (estimated stored bits per weight, then declared order) and
the search stops at a candidate within the budget once no untried candidate can be smaller (a uniform
candidate's size is known before it is built, so the first of those to pass ends it; a mixed candidate's is only
bounded below by its low grid, so after it passes the smaller-estimated candidates are still tried); with
`early_stop: false` every candidate is built and the smallest passing one wins. When none passes, the candidate
closest to the budget is the variant and its run says the budget was not met. The validation text is apart from
the calibration draw and the evaluation text, so the variant's evaluated perplexity stays a held-out figure.
Expansion is pure (no torch); stages/engines/search.py builds and scores."""

from __future__ import annotations

import itertools
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, ValidationError, model_validator

from farm.methods.autoround import AutoRoundConfig
from farm.methods.awq import AWQConfig
from farm.methods.base import MethodConfig
from farm.methods.budget import BUDGET_UNIT_HELP, BudgetUnit
from farm.methods.fp8 import FP8Config
from farm.methods.gptq import GPTQConfig
from farm.methods.int8 import INT8Config
from farm.methods.mixed import MixedConfig
from farm.methods.rtn import RTNConfig
from farm.methods.smoothquant import SmoothQuantConfig

CANDIDATE_TYPES: tuple[type[MethodConfig], ...] = (
    GPTQConfig,
    AWQConfig,
    AutoRoundConfig,
    RTNConfig,
    FP8Config,
    INT8Config,
    SmoothQuantConfig,
    MixedConfig,
)
AnyCandidate = Annotated[
    GPTQConfig | AWQConfig | AutoRoundConfig | RTNConfig | FP8Config | INT8Config | SmoothQuantConfig | MixedConfig,
    Field(discriminator="method"),
]
MAX_CANDIDATES = 64
NOT_VARIED = {"method", "name", "backend"}  # a candidate's kind and label come from its declaration


class SearchConfig(MethodConfig):
    method: Literal["search"] = "search"
    cost_rank: ClassVar[int] = -3  # the longest-running variant of a job: start it first
    budget: float = Field(gt=0, description="largest perplexity increase over the base allowed on validation text")
    budget_unit: BudgetUnit = Field("delta", description=BUDGET_UNIT_HELP)
    candidates: list[AnyCandidate] = Field(min_length=1, max_length=MAX_CANDIDATES, description="recipes to try")
    vary: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="field -> values crossed with every candidate that has the field (e.g. symmetric, actorder, "
        "dampening_frac, rotation, calibration)",
    )
    early_stop: bool = Field(True, description="stop at the first candidate (smallest first) within the budget")

    @model_validator(mode="after")
    def _space(self) -> SearchConfig:
        for key, values in self.vary.items():
            if key in NOT_VARIED:
                raise ValueError(f"vary.{key}: a candidate's {key} is declared, not varied")
            if not values:
                raise ValueError(f"vary.{key}: give at least one value")
            if not any(key in type(c).model_fields for c in self.candidates):
                kinds = ", ".join(sorted({c.method for c in self.candidates}))
                raise ValueError(f"vary.{key}: no candidate ({kinds}) has a field {key!r}")
        self.candidate_methods()  # every combination must be a valid config
        return self

    @property
    def uses_validation(self) -> bool:
        return True

    @property
    def requires_calibration(self) -> bool:
        return any(c.requires_calibration for c in self.candidate_methods())

    @property
    def distributable(self) -> bool:
        return False  # candidates are built one after another in one worker

    def default_label(self) -> str:
        return f"search-{self.budget_unit[0]}{self.budget:g}"

    def group_sizes(self) -> list[int]:
        return sorted({g for c in self.candidate_methods() for g in c.group_sizes()})

    def check_model(self, model_config: dict[str, Any]) -> list[str]:
        return [f"candidate {c.label()}: {p}" for c in self.candidate_methods() for p in c.check_model(model_config)]

    def candidate_methods(self) -> list[MethodConfig]:
        """Every candidate crossed with the values of `vary` it has a field for, smallest first (estimated
        stored bits per weight; unknown sizes last), then in declared order. Labels name what was varied."""
        out: list[MethodConfig] = []
        for declared in self.candidates:
            keys = [k for k in self.vary if k in type(declared).model_fields]
            if not declared.requires_calibration:  # a data-free recipe is the same whatever it would read
                keys = [k for k in keys if k != "calibration"]
            for values in itertools.product(*(self.vary[k] for k in keys)):
                data = declared.model_dump(mode="json", exclude_unset=True) | dict(zip(keys, values, strict=True))
                if "calibration" not in data and self.calibration:  # the search's own calibration is the default
                    data["calibration"] = self.calibration.model_dump(mode="json", exclude_none=True)
                data["name"] = _label(declared, dict(zip(keys, values, strict=True)))
                try:
                    out.append(type(declared).model_validate(data))
                except ValidationError as err:
                    first = err.errors()[0]
                    loc = ".".join(str(p) for p in first["loc"])
                    raise ValueError(f"candidate {data['name']}: {loc}: {first['msg']}") from None
        if len(out) > MAX_CANDIDATES:
            raise ValueError(f"the search space has {len(out)} candidates; the limit is {MAX_CANDIDATES}")
        labels = [c.label() for c in out]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"candidates repeat: {', '.join(dup)}; give the declared candidates distinct names")
        order = sorted(range(len(out)), key=lambda i: (estimated_bits(out[i]), i))
        return [out[i] for i in order]

    def modifiers(self) -> list[Any]:
        raise TypeError("a search builds its candidates' recipes one by one (stages/engines/search.py)")


def estimated_bits(c: MethodConfig) -> float:
    """Stored bits per weight a candidate is expected to take before it is built (a mixed candidate: its low
    grid's, the least it can take); unknown sizes sort last."""
    bits = c.weight_bits()
    return float("inf") if bits is None else bits


def _label(declared: MethodConfig, varied: dict[str, Any]) -> str:
    """A candidate's name: the declared label plus each varied value (lowercase, registry-alias safe)."""
    parts = [declared.label()]
    for key, value in varied.items():
        if isinstance(value, dict):
            keys = {"num_samples": "n", "max_seq_length": "l", "set": ""}
            text = "-".join(f"{keys.get(k, k)}{v}" for k, v in sorted(value.items()) if v is not None)
        elif value is None or isinstance(value, bool):
            text = {None: "none", True: "t", False: "f"}[value]
        else:
            text = f"{value:g}" if isinstance(value, float) else str(value)
        short = "".join(w[0] for w in key.split("_"))
        parts.append(f"{short}{text}")
    label = ".".join(parts).lower()
    label = "".join(ch if ch.isalnum() or ch in "_.-" else "-" for ch in label)
    return label[:64]

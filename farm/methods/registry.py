"""The method registry: one typed config per method name. A spec's `method:` key picks the entry."""

from __future__ import annotations

import operator
from functools import reduce
from typing import Annotated, Any

from pydantic import Field

from farm.methods.autoround import AutoRoundConfig
from farm.methods.awq import AWQConfig
from farm.methods.base import MethodConfig
from farm.methods.fp8 import FP8Config, FP8StaticConfig, KVCacheFP8Config
from farm.methods.gptq import GPTQConfig
from farm.methods.int8 import INT8Config
from farm.methods.mixed import MixedConfig
from farm.methods.nf4 import NF4Config
from farm.methods.qat import QATConfig
from farm.methods.rtn import RTNConfig
from farm.methods.search import SearchConfig
from farm.methods.smoothquant import SmoothQuantConfig

REGISTRY: dict[str, type[MethodConfig]] = {
    "gptq": GPTQConfig,
    "awq": AWQConfig,
    "autoround": AutoRoundConfig,
    "fp8": FP8Config,
    "fp8_static": FP8StaticConfig,
    "kv_fp8": KVCacheFP8Config,
    "smoothquant": SmoothQuantConfig,
    "int8": INT8Config,
    "rtn": RTNConfig,
    "mixed": MixedConfig,
    "qat": QATConfig,
    "nf4": NF4Config,
    "search": SearchConfig,
}


class UnknownMethodError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def get_method(name: str) -> type[MethodConfig]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}; available: {', '.join(sorted(REGISTRY))}") from None


def build_method(data: dict[str, Any]) -> MethodConfig:
    return get_method(str(data.get("method")))(**data)


# The pydantic type a spec field uses: a union discriminated on `method`, built from the registry.
AnyMethod = Annotated[reduce(operator.or_, REGISTRY.values()), Field(discriminator="method")]  # type: ignore[valid-type]

"""Method configs (pure data) and their registry."""

from farm.methods.base import DEFAULT_IGNORE, MethodConfig
from farm.methods.registry import REGISTRY, AnyMethod, build_method, get_method

__all__ = ["DEFAULT_IGNORE", "REGISTRY", "AnyMethod", "MethodConfig", "build_method", "get_method"]

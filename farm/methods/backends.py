"""Quantization backends other than llm-compressor, each run in its own Ray runtime environment (a virtualenv
on top of the worker's packages) so the main stack stays current. Pure data: the driver turns an entry into a
`runtime_env`, the stage imports the backend inside it.

Where each backend runs, with the evidence, is the README's backend matrix."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata
from typing import Any


@dataclass(frozen=True)
class Backend:
    name: str
    packages: tuple[str, ...] = ()  # pip requirements of the isolated environment (empty: the worker's own)
    env_vars: dict[str, str] = field(default_factory=dict)
    keep: tuple[str, ...] = ()  # distributions pinned at the worker's versions so pip cannot move them
    quantize_in: str | None = None  # another backend whose environment runs only the quantize step
    stage: str | None = None  # "module:function" of that quantize step (returns QuantizeResult's fields)

    def runtime_env(self) -> dict[str, Any] | None:
        """A Ray runtime_env for this backend, or None for the default stack."""
        if not self.packages:
            return None
        pins = []
        for dist in self.keep:
            try:
                pins.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
            except metadata.PackageNotFoundError:
                continue
        env: dict[str, Any] = {"pip": {"packages": [*self.packages, *pins], "pip_check": False}}
        if self.env_vars:
            env["env_vars"] = dict(self.env_vars)
        return env


GPTQMODEL = Backend(
    "gptqmodel",
    packages=("gptqmodel==7.6.0", "optimum==2.3.0"),
    env_vars={"GPTQMODEL_CPU_WORKERS": "2"},
    keep=("torch", "transformers"),
)

BACKENDS = {
    "llmcompressor": Backend("llmcompressor"),
    # GPTQModel 7.6.0 resolves with torch 2.13 / transformers 5.17 (7.7 needs newer); optimum lets plain
    # transformers reload its GPTQ checkpoints. It sizes a CPU thread pool from GPTQMODEL_CPU_WORKERS.
    "gptqmodel": GPTQMODEL,
    # AutoAWQ 0.2.9 (archived) imports only with transformers 4.51: it quantizes in that environment; the
    # variant's worker evaluates in GPTQModel's (current transformers + GPTQModel's AWQ kernels), because
    # AutoAWQ's own CPU reload needs intel_extension_for_pytorch, which refuses torch 2.13.
    "autoawq": Backend(
        "autoawq",
        packages=GPTQMODEL.packages,
        env_vars=GPTQMODEL.env_vars,
        keep=GPTQMODEL.keep,
        quantize_in="autoawq-quantize",
        stage="farm.stages.engines.autoawq:quantize_autoawq",
    ),
    "autoawq-quantize": Backend(
        "autoawq-quantize", packages=("autoawq==0.2.9", "transformers==4.51.3"), keep=("torch",)
    ),
}

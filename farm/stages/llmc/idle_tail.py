"""The sequential pipeline's last subgraph without the output head when nothing in the head is calibrated.

llm-compressor's sequential pipeline cuts the model into one subgraph per decoder layer and runs each twice per
batch, calibrating then propagating; the last one also holds the final norm and `lm_head`, and its outputs are
never used (nothing follows it). With `lm_head` left unquantized (farm's methods ignore it by default) both passes
still compute full-vocabulary logits for every calibration token: for an 8B Llama (vocabulary 128,256) and
128 x 2048 tokens ~550 TFLOP, and an 8 GiB logits tensor per calibration batch of 16. Here the last subgraph's
graph ends at its last module that carries a quantization scheme (torch.fx dead-code elimination drops what only
fed the discarded output), so every quantized module's inputs, Hessians, observers and weights are as they were.

Only for recipes of quantization modifiers (GPTQ, QuantizationModifier): those calibrate exactly the modules that
carry the schemes they attach before the pipeline traces. Mapping-based modifiers (SmoothQuant, AWQ) keep the
whole graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from farm.stages.llmc.swap import swapped

SCHEME_MODIFIERS = frozenset({"GPTQModifier", "QuantizationModifier"})


def applies(recipe: list[Any]) -> bool:
    """Whether every modifier of the recipe calibrates only modules that carry a quantization scheme."""
    return bool(recipe) and all(type(m).__name__ in SCHEME_MODIFIERS for m in recipe)


def quantized(module: Any) -> bool:
    return any(getattr(m, "quantization_scheme", None) is not None for m in module.modules())


def trim(subgraph: Any, model: Any) -> int:
    """End the subgraph's graph at its last call of a module with something quantized in it (its output is
    unused: the caller passes only the pipeline's last subgraph); returns how many graph nodes went."""
    graph = subgraph.graph
    calls = [n for n in graph.nodes if n.op == "call_module" and quantized(model.get_submodule(n.target))]
    if not calls:
        return 0
    output = next(n for n in graph.nodes if n.op == "output")
    before = len(graph.nodes)
    output.args = ({"farm_last_quantized": calls[-1]},)
    graph.eliminate_dead_code()
    graph.lint()
    subgraph._code = None  # generated from the graph on first use
    return before - len(graph.nodes)


@dataclass
class Trimmed:
    nodes: int = 0

    def note(self) -> str | None:
        if not self.nodes:
            return None
        return (
            f"sequential pipeline: the last subgraph ends at its last quantized module ({self.nodes} graph "
            "node(s) after it, the unquantized output head, not run)"
        )


@contextlib.contextmanager
def idle_tail_skipped(model: Any) -> Iterator[Trimmed]:
    """Within the block, the sequential pipeline's last subgraph stops after its last quantized module."""
    from llmcompressor.pipelines.sequential import pipeline

    trimmed = Trimmed()

    def make(original: Callable[..., list[Any]]) -> Callable[..., list[Any]]:
        def trace(traced_model: Any, *args: Any, **kwargs: Any) -> list[Any]:
            subgraphs = original(traced_model, *args, **kwargs)
            if traced_model is model and subgraphs:
                trimmed.nodes = trim(subgraphs[-1], model)
            return subgraphs

        return trace

    with swapped(pipeline, "trace_subgraphs", make, "skipping the idle output head"):
        yield trimmed

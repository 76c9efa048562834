"""The model released after a calibrated oneshot: llm-compressor's sequential pipeline leaves it registered in
torch.fx.

To trace a decoder, llm-compressor 0.14 (`pipelines/sequential/ast_helpers.autowrap_forward`) recompiles each
ancestor's `forward` in a copy of its module's globals with `self` bound to the module, and the generated code
calls `torch.fx.wrap("wrapped_N")` at its top level. `torch.fx.wrap` keeps that namespace in the process-wide
`torch.fx._symbolic_trace._wrapped_fns_to_patch` forever, so the model, with every weight, stays alive after
oneshot returns: a reused worker holds the last calibrated variant's weights on the GPU (~17 GB for an 8B
Llama) while the next variant or the serving engine starts, and every later trace patches the dead namespaces
again. Leaving the block, the entries the block added are dropped (the forwards they served were already put
back), together with the generated sources llm-compressor put in `linecache`.
"""

from __future__ import annotations

import contextlib
import linecache
from collections.abc import Iterator

from farm.stages.llmc import registry

KEY = "torch.fx._symbolic_trace._wrapped_fns_to_patch"
SOURCE_PREFIX = "<Autowrapped "  # the file name llm-compressor gives the recompiled forwards


@contextlib.contextmanager
def autowrap_namespaces_released() -> Iterator[None]:
    """Drop what the block registers in torch.fx's wrap table and the autowrapped sources it caches."""
    from torch.fx import _symbolic_trace

    table = getattr(_symbolic_trace, "_wrapped_fns_to_patch", None)
    if not isinstance(table, dict) or not registry.guard_key(KEY):
        yield
        return
    before = set(table)
    try:
        yield
    finally:
        for key in [k for k in table if k not in before]:
            table.pop(key, None)
        for name in [n for n in linecache.cache if isinstance(n, str) and n.startswith(SOURCE_PREFIX)]:
            linecache.cache.pop(name, None)

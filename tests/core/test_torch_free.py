"""This tier runs without torch, transformers, llm-compressor or Ray: planning, gating, identity, spec validation
and scheduling are plain code. Proven by running the tier again in a Python where those cannot be imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "transformers", "llmcompressor", "compressed_tensors", "ray", "vllm")
HERE = Path(__file__).resolve().parent

RUNNER = f"""
import sys
for name in {HEAVY!r}:
    sys.modules[name] = None  # `import name` now raises ImportError
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", {str(HERE)!r}, "--ignore", {str(HERE / "test_torch_free.py")!r}]))
"""


def test_the_core_tier_passes_where_torch_and_ray_cannot_be_imported() -> None:
    proc = subprocess.run([sys.executable, "-c", RUNNER], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

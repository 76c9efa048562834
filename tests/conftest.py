"""Shared fixtures: the offline fixture files (built once, cached in .fixtures/) and job specs on them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def fixture_paths() -> dict[str, Path]:
    from farm import fixtures

    return fixtures.ensure_all()


def tiny_spec(paths: dict[str, Path], out_root: str, **overrides: object) -> dict:
    """All four methods on the tiny Llama, small calibration: seconds per variant on CPU."""
    text = paths["shakespeare"]
    spec = {
        "name": "tiny",
        "models": [{"source": str(paths["tiny-llama"]), "name": "tiny-llama"}],
        "methods": [
            {"method": "gptq", "group_size": 64},
            {"method": "awq", "group_size": 64},
            {"method": "fp8"},
            {"method": "smoothquant"},
        ],
        "calibration": {"source": str(text / "calibration.txt"), "num_samples": 4, "max_seq_length": 64},
        "evaluation": {
            "perplexity": {"source": str(text / "heldout.txt"), "max_tokens": 512, "seq_len": 128},
            "generation": {"max_new_tokens": 4},
        },
        "resources": {"num_cpus": 1},
        "tracking": {"experiment": "tiny"},
        "output": {"root": out_root},
    }
    spec.update(overrides)
    return spec


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path

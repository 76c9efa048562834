"""The benchmark's GPTQ profile reads llm-compressor's log lines as llm-compressor 0.14 writes them."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("quantize_bench", ROOT / "bench" / "quantize_bench.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


LOG = """\
2026-11-27T15:24:51.0000 | compress_module_list | INFO - Quantizing 1 module(s): ['model.layers.0.mlp.down_proj']
2026-11-27T15:24:51.5000 | GPTQ | METRIC - time 0.40s
2026-11-27T15:24:51.5001 | GPTQ | METRIC - error 2.25
2026-11-27T15:24:51.6000 | compress_module_list | INFO - Quantizing 2 module(s): ['model.layers.0.mlp.gate_proj', \
'model.layers.0.mlp.up_proj']
2026-11-27T15:24:51.7000 | GPTQ | METRIC - time 0.10s
2026-11-27T15:24:51.7001 | GPTQ | METRIC - time 0.10s
2026-11-27T15:24:53.0000 | compress_module_list | INFO - Quantizing 1 module(s): ['model.layers.1.mlp.down_proj']
2026-11-27T15:24:53.3000 | GPTQ | METRIC - time 0.30s
"""


def test_profile_sums_solves_per_layer_and_counts_a_batch_once(tmp_path: Path) -> None:
    (tmp_path / "worker-abc-01000000-4242.out").write_text(LOG)
    (tmp_path / "worker-def-01000000-4343.out").write_text("no llm-compressor lines here\n")
    profile = _bench().gptq_profile(tmp_path)
    assert profile == {"4242": {"layers": 2, "solve_s": 0.8, "max_layer_solve_s": 0.5, "mean_layer_period_s": 2.0}}

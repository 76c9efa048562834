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


def test_oneshot_profiler_accounts_for_every_phase(tmp_path: Path) -> None:
    """bench/profile_oneshot.py on the CPU (tiny shape): the phases it reports add up to the oneshot, every
    attention call of calibration and propagation went through the fused path, the own-solve timer ran,
    --save profiled farm's save of the result, each layer has its period, and --repeat ran a second oneshot in
    the same process."""
    import json
    import subprocess
    import sys

    tok, text = ROOT / ".fixtures" / "models" / "tiny-llama", ROOT / ".fixtures" / "shakespeare" / "calibration.txt"
    if not tok.exists():
        import pytest

        pytest.skip("fixtures not built (make fixtures)")
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "profile_oneshot.py"),
            "--shape",
            "tiny",
            "--layers",
            "2",
            "--samples",
            "8",
            "--seq",
            "64",
            "--batch",
            "4",
            "--tokenizer",
            str(tok),
            "--text",
            str(text),
            "--work",
            str(tmp_path),
            "--parts",
            "--save",
            "--repeat",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    assert res.returncode == 0 and len(line) == 2, res.stderr[-2000:]
    r = json.loads(line[0][len("RESULT ") :])
    assert len(r["per_layer"]["periods"]) == 2 and {"trace_subgraphs", "intermediates_cache"} <= set(r["setup_parts_s"])
    parts = r["setup_s"] + r["calibrate_s"] + r["solve_s"] + r["propagate_s"] + r["other_s"]
    assert abs(parts - r["oneshot_s"]) < 0.05 and 0 < r["own_solves_s"] <= r["solve_s"] + 0.01
    assert any("8 calls" in n for n in r["notes"])  # 2 layers x 2 batches x (calibrate + propagate)
    assert {"prepare_batch", "update_batch_qparams", "observe"} <= set(r["solve_parts_s"])  # --parts timed them
    # the tiny model packs in a few ms: the compression is timed (a key) and lies within the save
    assert 0 <= r["save_compress_s"] <= r["save_s"] and r["saved_gb"] > 0 and "Ordered by" in res.stdout


def test_factor_parts_bench_compares_the_three_solves() -> None:
    """bench/gptq_factor_parts.py on the CPU: llm-compressor's, the one-Cholesky and the left-looking solve of one
    module, with their losses and how many quantized weights differ from llm-compressor's."""
    import json
    import subprocess
    import sys

    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gptq_factor_parts.py"),
            "--rows",
            "32",
            "--columns",
            "256",
            "--tokens",
            "1024",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = [x for x in res.stdout.splitlines() if x.startswith("FACTOR ")]
    assert res.returncode == 0 and line, res.stderr[-2000:]
    r = json.loads(line[0][len("FACTOR ") :])
    assert r["left_looking_changed_vs_lc"] < 0.01 and r["one_cholesky_changed_vs_lc"] < 0.01
    assert abs(r["left_looking_loss"] - r["llmcompressor_loss"]) <= 1e-4 * r["llmcompressor_loss"]

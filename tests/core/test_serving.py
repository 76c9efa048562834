"""The serving check's orchestration, torch-free: its spec, the figures from raw engine times, the request it
builds, the engine process's failures as one line, and the gate's serving rules. vLLM itself runs only on GPU
machines (tests/gpu/test_gpu_serving.py); nothing here invents its numbers."""

from __future__ import annotations

import math
import random
import stat
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from farm.promote import decide, default_rules
from farm.serving import measure
from farm.serving.runner import build_request, last_error_line, probe, prompt_offsets, run_engine
from farm.spec import EvaluationSpec, ServingSpec, parse_spec


def _level(requests: list[dict], seconds: float) -> dict:
    return {
        "shape": "default",
        "concurrency": 2,
        "input_tokens": 4,
        "output_tokens": 3,
        "seconds": seconds,
        "requests": requests,
    }


def test_level_figures_follow_the_bench_definitions() -> None:
    # two requests sent at 0 and 0.5; tokens arrive one per chunk, except one chunk of two
    reqs = [
        {"sent": 0.0, "times": [0.1, 0.2, 0.3], "counts": [1, 1, 1]},
        {"sent": 0.5, "times": [0.7, 0.9], "counts": [1, 2]},
    ]
    f = measure.level_figures(_level(reqs, 1.0))
    assert f["output_tokens_per_s"] == pytest.approx(6.0)
    assert f["requests_per_s"] == pytest.approx(2.0)
    assert f["ttft_p50_s"] == pytest.approx(0.15)  # 0.1 and 0.2
    # gaps: 0.1, 0.1 (first request); 0.2 over two tokens -> 0.1, 0.1
    assert f["itl_p50_s"] == pytest.approx(0.1) and f["itl_p90_s"] == pytest.approx(0.1)
    assert f["tpot_p50_s"] == pytest.approx((0.1 + 0.1) / 2)  # (0.3-0.1)/2 and (0.9-0.7)/2
    assert f["e2e_p50_s"] == pytest.approx(0.35)


def test_percentile_interpolates_like_numpy() -> None:
    assert measure.percentile([1, 2, 3, 4], 50) == 2.5
    assert measure.percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)
    assert math.isnan(measure.percentile([], 50))


def test_level_names_round_trip_and_unknown_figures_are_refused() -> None:
    name = measure.level_name("long_context", 256, "ttft_p90_s")
    assert name == "serve_long_context_c256_ttft_p90_s"
    assert measure.parse_level_name(name) == ("long_context", 256, "ttft_p90_s")
    assert measure.parse_level_name("serve_weights_bytes") is None
    with pytest.raises(ValueError, match="known: output_tokens_per_s"):
        measure.level_name("default", 1, "speed")


def test_summarize_records_kv_capacity_weights_and_every_level() -> None:
    raw = {
        "engine": "vllm",
        "version": "0.24.0",
        "seconds_import": 5.0,
        "seconds_engine_start": 40.0,
        "weights_bytes": 2 * 2**30,
        "param_bytes": 2 * 2**30 - 10,
        "kv_blocks": 1000,
        "block_size": 16,
        "levels": [_level([{"sent": 0.0, "times": [0.1, 0.2], "counts": [1, 1]}], 0.2)],
        "greedy": [[1, 2, 3]],
    }
    metrics, doc = measure.summarize(raw, context=640)
    assert metrics[measure.KV_TOKENS] == 16_000
    assert metrics[measure.max_concurrency_name(640)] == 25  # 640 tokens = 40 whole blocks
    assert metrics[measure.COLD_START] == 40.0 and metrics[measure.PROCESS_START] == 45.0
    assert metrics[measure.WEIGHTS] == 2 * 2**30
    assert metrics["serve_default_c2_output_tokens_per_s"] == pytest.approx(10.0)
    assert doc["levels"][0]["requests"] == 1 and doc["greedy"] == [[1, 2, 3]]


def test_figures_the_engine_could_not_be_asked_for_are_read_from_its_log() -> None:
    log = (
        "INFO 12-03 [gpu_model_runner.py:5256] Model loading took 14.99 GiB memory and 3.2 seconds\n"
        "INFO 12-03 [kv_cache_utils.py:2146] GPU KV cache size: 1,234,560 tokens\n"
    )
    raw = {"seconds_engine_start": 1.0, "levels": []}
    metrics, _ = measure.summarize(raw, context=1000, log_text=log)
    assert metrics[measure.WEIGHTS] == pytest.approx(14.99 * 2**30)
    assert metrics[measure.KV_TOKENS] == 1_234_560 and metrics[measure.max_concurrency_name(1000)] == 1234


def test_greedy_agreement() -> None:
    a = measure.greedy_agreement([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]])
    assert a[measure.GREEDY_EXACT] == 0.5
    assert a[measure.GREEDY_AGREE] == pytest.approx((1 + 1 / 3) / 2)
    assert measure.greedy_agreement([[1]], [[1], [2]]) == {}


def test_request_is_seeded_distinct_per_level_and_sized_by_the_spec() -> None:
    spec = ServingSpec(
        shapes=["default", {"name": "tiny", "input_tokens": 8, "output_tokens": 4}],
        concurrency=[1, 4],
        warmup_requests=2,
        greedy_prompts=3,
    )
    corpus = list(range(5000))
    r1 = build_request("/m", spec, corpus, 0.5, False)
    r2 = build_request("/other", spec, corpus, 0.5, False)
    assert [lv["offsets"] for lv in r1["levels"]] == [lv["offsets"] for lv in r2["levels"]]  # base = variants
    assert [(lv["shape"], lv["concurrency"], len(lv["offsets"])) for lv in r1["levels"]] == [
        ("default", 1, 8),
        ("default", 4, 8),
        ("tiny", 1, 8),
        ("tiny", 4, 8),
    ]
    assert len(set(r1["levels"][0]["offsets"])) == 8
    assert r1["levels"][0]["offsets"] != r1["levels"][1]["offsets"]
    assert r1["gpu_memory_utilization"] == pytest.approx(0.425)  # 0.85 of a half-GPU share
    assert r1["max_model_len"] == 640 and r1["engine_args"] == {}
    assert len(r1["warmup"]["offsets"]) == 2 and len(r1["greedy"]["offsets"]) == 3


def test_a_text_shorter_than_a_prompt_is_tiled_and_offsets_stay_in_range() -> None:
    spec = ServingSpec(concurrency=[2])
    r = build_request("/m", spec, list(range(100)), 1.0, False)
    assert len(r["corpus"]) > 512
    assert all(0 <= o <= len(r["corpus"]) - 512 for lv in r["levels"] for o in lv["offsets"])
    with pytest.raises(ValueError, match="needs more"):
        prompt_offsets(10, 20, 1, random.Random(0))


def test_spec_refuses_serving_without_a_gpu_and_bad_levels() -> None:
    base = {
        "name": "j",
        "models": [{"source": "/m"}],
        "methods": [{"method": "fp8"}],
        "calibration": {"source": "/c.txt"},
        "evaluation": {"perplexity": {"source": "/h.txt"}, "serving": {}},
    }
    with pytest.raises(Exception, match=r"resources\.num_gpus is 0"):
        parse_spec(base)
    assert parse_spec({**base, "resources": {"num_gpus": 1}}).evaluation.serving is not None
    for bad in (
        {"concurrency": [0]},
        {"concurrency": [4, 4]},
        {"engine": "tgi"},
        {"shapes": ["huge"]},
        {"gpu_memory_utilization": 1.5},
        {"nope": 1},
    ):
        with pytest.raises(ValidationError):
            ServingSpec.model_validate(bad)


def test_serving_changes_the_base_evaluation_id_but_not_where_the_engine_lives() -> None:
    a = ServingSpec(python="/a/bin/python", pythonpath=["/x"])
    b = ServingSpec(python="/b/bin/python", env={"K": "V"}, timeout_s=5)
    assert a.identity() == b.identity()
    assert a.identity() != ServingSpec(concurrency=[1]).identity()


def test_gate_judges_speed_and_memory_on_serving_figures_only() -> None:
    ev = EvaluationSpec.model_validate(
        {"perplexity": {"source": "/h.txt"}, "latency": {}, "memory": {}, "serving": {"concurrency": [1, 64]}}
    )
    rules = {r.metric: r for r in default_rules(ev)}
    assert "tokens_per_s_batch1" not in rules and "weights_in_memory_bytes" not in rules
    low, high = "serve_default_c1_output_tokens_per_s", "serve_default_c64_output_tokens_per_s"
    assert {low, high, measure.WEIGHTS} <= set(rules)
    base = {"perplexity": 10.0, low: 100.0, high: 1000.0, measure.WEIGHTS: 16e9}
    good = {"perplexity": 10.2, low: 150.0, high: 900.0, measure.WEIGHTS: 5e9}
    assert decide(list(rules.values()), good, base).outcome == "promoted"
    slow = decide(list(rules.values()), {**good, high: 500.0}, base)
    assert slow.outcome == "promoted" and any(high in w for w in slow.warnings)  # advisory
    unserved = decide(list(rules.values()), {"perplexity": 10.2}, base)
    assert unserved.outcome == "promoted" and len(unserved.warnings) == 3  # "metric missing", not a rejection


def test_probe_names_the_interpreter_and_path_when_vllm_is_absent(tmp_path: Path) -> None:
    problem, version = probe(ServingSpec(pythonpath=[str(tmp_path)]))
    assert version == "" and problem is not None
    assert "vLLM cannot be imported by" in problem and str(tmp_path) in problem and "\n" not in problem
    problem, _ = probe(ServingSpec(python=str(tmp_path / "no-such-python")))
    assert problem == f"evaluation.serving.python: {tmp_path / 'no-such-python'} does not exist"


def test_engine_without_vllm_is_one_line_in_the_result(tmp_path: Path) -> None:
    """The real engine script under an interpreter without vLLM: its import fails, and farm gets one line."""
    spec = ServingSpec(concurrency=[1])
    request = build_request(str(tmp_path), spec, list(range(2000)), 1.0, False)
    r = run_engine(request, spec, 640)
    assert r.error == "vllm: ModuleNotFoundError: No module named 'vllm'"
    assert not r.metrics and r.tags[measure.TAG_ENGINE] == "vllm"
    assert any("Traceback" in line for line in r.document["log_tail"])  # the trace stays in the log


def test_a_hung_engine_is_stopped_with_its_children(tmp_path: Path) -> None:
    """An engine that never answers (here: a process that sleeps, with a child) is ended as a process group
    at the spec's timeout, and the check says so in one line."""
    pidfile = tmp_path / "child.pid"
    hang = tmp_path / "hang"
    hang.write_text(f"#!/bin/sh\nsleep 600 &\necho $! > {pidfile}\nwait\n")
    hang.chmod(hang.stat().st_mode | stat.S_IEXEC)
    spec = ServingSpec(python=str(hang), concurrency=[1], timeout_s=1.5)
    t0 = time.monotonic()
    r = run_engine(build_request(str(tmp_path), spec, list(range(2000)), 1.0, False), spec, 640)
    assert time.monotonic() - t0 < 30
    assert r.error is not None and r.error.startswith("serving engine did not finish within 1.5 s")
    child = int(pidfile.read_text())
    for _ in range(50):
        if not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the engine's child outlived the check")


def test_last_error_line_prefers_the_exception() -> None:
    log = "INFO loading\nTraceback (most recent call last):\n  File x\nValueError: quantization nf4 not supported\n"
    assert last_error_line(log) == "ValueError: quantization nf4 not supported"
    assert last_error_line("just this\n") == "just this" and last_error_line("") == "no output"


def test_engine_script_imports_only_the_standard_library_at_module_level() -> None:
    import ast

    tree = ast.parse(Path(measure.__file__).with_name("vllm_engine.py").read_text())
    top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert top <= set(sys.stdlib_module_names) | {"__future__"}


def test_report_plots_throughput_and_latency_per_variant_and_base() -> None:
    pytest.importorskip("matplotlib")
    from farm.report_html import Point, render

    def served(scale: float) -> dict[str, float]:
        m = {}
        for c in (1, 16, 64):
            m[measure.level_name("default", c, "output_tokens_per_s")] = scale * 100 * c**0.8
            m[measure.level_name("default", c, "ttft_p50_s")] = 0.02 * c**0.5 / scale
        return m

    page = render(
        "j",
        served(1.0),
        [
            Point("fp8", {"perplexity_delta": 0.1, "weights_bytes": 8e9, **served(1.5)}),
            Point("gptq", {"perplexity_delta": 0.4, "weights_bytes": 5e9, **served(1.3)}),
        ],
    )
    for plot in ("plot-serving-throughput-default", "plot-serving-latency-default"):
        assert f'id="{plot}"' in page
    assert "output tokens/s as served" in page and "dense reference" not in page
    assert 'id="plot-sensitivity"' not in page  # no variant measured a profile


def test_report_shows_the_layer_profile_of_mixed_variants() -> None:
    pytest.importorskip("matplotlib")
    from farm.report_html import Point, render

    profile = {f"sensitivity.layer_{i:03d}": 0.1 * i for i in range(4)}
    page = render("j", {}, [Point("mixed", {"perplexity_delta": 0.5, "weights_bytes": 1e9, **profile})])
    assert 'id="plot-sensitivity"' in page and "Layer sensitivity" in page


def test_the_engine_cores_reason_replaces_the_generic_front_end_error() -> None:
    """vLLM's front end raises 'Engine core initialization failed. See root cause above'; the cause is the
    engine-core process's own exception line earlier in the log."""
    log = (
        '(EngineCore pid=2350)   File "/x/vllm/v1/worker/utils.py", line 415, in request_memory\n'
        "(EngineCore pid=2350) ValueError: Free memory on device cuda:0 (89.89/139.8 GiB) on startup is less "
        "than desired GPU memory utilization (0.85, 118.83 GiB).\n"
        "Traceback (most recent call last):\n"
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}\n"
    )
    assert last_error_line(log).startswith("ValueError: Free memory on device cuda:0 (89.89/139.8 GiB)")


def test_farm_run_prints_the_served_headline_per_variant() -> None:
    from types import SimpleNamespace

    from farm.cli import _served_rows

    spec = SimpleNamespace(evaluation=SimpleNamespace(serving=ServingSpec(concurrency=[1, 64])))
    m = {
        "serve_default_c1_output_tokens_per_s": 415.2,
        "serve_default_c64_output_tokens_per_s": 12044.0,
        "serve_default_c1_ttft_p50_s": 0.0113,
        measure.WEIGHTS: 3.0e9,
        measure.KV_TOKENS: 3768608.0,
    }
    rows = _served_rows(
        spec,
        [
            SimpleNamespace(variant=SimpleNamespace(label="m/fp8"), metrics=m),
            SimpleNamespace(variant=SimpleNamespace(label="m/gptq"), metrics={}),
        ],
    )
    assert rows[0][:3] == ["variant", "tok/s c1", "tok/s c64"]
    assert rows[1] == ["m/fp8", "415", "12044", "11.3", "3.00", "3768608"]
    assert rows[2][0] == "m/gptq" and rows[2][1] != "415"
    assert _served_rows(SimpleNamespace(evaluation=SimpleNamespace(serving=None)), []) == []

"""On CUDA machines: the newer methods, the evaluation checks with CUDA memory measurements, model_free_ptq
over every GPU, and a data-parallel variant over two GPUs through `farm run` (NCCL). Skipped without CUDA (CI);
results in docs/BENCHMARKS.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.gpu.test_gpu_stages import TEXT, small_llama, torch  # noqa: F401 - the model fixture is shared

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize(
    "spec",
    [
        {"method": "rtn", "scheme": "W4A16", "group_size": 128},
        {"method": "int8"},
        {"method": "int8", "activations": "static", "weights": "gptq"},
        {"method": "fp8_static", "kv_cache": True},
        {"method": "kv_fp8"},
    ],
)
def test_more_methods_on_gpu(spec: dict, small_llama: Path, tmp_path: Path) -> None:  # noqa: F811
    from farm.methods import build_method
    from farm.stages.evaluate import EvaluateRequest, evaluate
    from farm.stages.quantize import CalibrationDraw, QuantizeRequest, quantize

    q = quantize(
        QuantizeRequest(
            str(small_llama),
            build_method(spec),
            CalibrationDraw(str(TEXT), 16, 256, 0),
            str(tmp_path / "q"),
            offload_device="cuda",
            batch_size=4,
        )
    )
    e = evaluate(EvaluateRequest(str(tmp_path / "q"), str(TEXT), 1024, 256, "Hello", 8))
    assert q.device == "cuda" and e.device == "cuda" and e.perplexity > 1
    print(f"GPU {build_method(spec).label()}: oneshot {q.seconds_oneshot:.1f} s, ppl {e.perplexity:.1f}")


def test_checks_on_gpu(small_llama: Path) -> None:  # noqa: F811
    from farm.spec import EvaluationSpec
    from farm.stages.checks.runner import run_checks

    ev = EvaluationSpec.model_validate(
        {
            "perplexity": {"source": str(TEXT)},
            "latency": {},
            "memory": {"budget_gb": 2, "context": 512},
            "outputs": {},
            "safety": {},
            "speculative": {},
            "kv_cache": {"max_new_tokens": 16},
        }
    )
    r = run_checks(str(small_llama), ev, str(small_llama))
    m = r.metrics
    assert m["max_batch_at_512"] >= 1 and m["max_context_batch1"] >= 64 and m["peak_generation_bytes"] > 0
    assert m["spec_acceptance"] == 1.0 and m["determinism"] == 1.0 and m["kv_fp8_exact_match"] >= 0
    print("GPU checks:", json.dumps({k: round(v, 4) for k, v in m.items()}))


def test_model_free_over_every_gpu(small_llama: Path, tmp_path: Path) -> None:  # noqa: F811
    from farm.methods import build_method
    from farm.stages.quantize import CalibrationDraw, QuantizeRequest, quantize

    q = quantize(
        QuantizeRequest(
            str(small_llama),
            build_method({"method": "fp8", "engine": "model_free"}),
            CalibrationDraw(str(TEXT), 1, 16, 0),
            str(tmp_path / "mf"),
        )
    )
    assert q.device == f"cuda x{torch.cuda.device_count()}" and (tmp_path / "mf" / "config.json").exists()
    print(f"GPU model_free over {torch.cuda.device_count()} GPU(s): {q.seconds_oneshot:.1f} s")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ddp_variant_over_two_gpus(small_llama: Path, tmp_path: Path) -> None:  # noqa: F811
    from mlflow.tracking import MlflowClient

    ppl = {}
    for ranks, sends in ((1, "llmcompressor"), (2, "llmcompressor"), (2, "forward_order")):
        key = f"{ranks}-{sends}" if ranks > 1 else 1
        spec = {
            "name": f"ddp{ranks}",
            "models": [{"source": str(small_llama), "name": "small"}],
            "methods": [{"method": "gptq", "group_size": 128}],
            "calibration": {"source": str(TEXT), "num_samples": 32, "max_seq_length": 512},
            "evaluation": {"perplexity": {"source": str(TEXT), "max_tokens": 2048, "seq_len": 512}},
            "resources": {"num_gpus": 1, "num_cpus": 2, "ranks": ranks, "gptq_broadcast": sends},
            "tracking": {"experiment": f"ddp{ranks}"},
            "output": {"root": str(tmp_path / f"out{key}")},
        }
        path = tmp_path / f"ddp{ranks}.yaml"
        path.write_text(yaml.safe_dump(spec))
        res = subprocess.run(
            [sys.executable, "-m", "farm.cli", "run", str(path)],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=tmp_path,
        )
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        client = MlflowClient(f"sqlite:///{tmp_path / f'out{key}' / 'mlflow.db'}")
        run = client.search_runs(
            [client.get_experiment_by_name(f"ddp{ranks}").experiment_id], "tags.`farm.role` = 'variant'"
        )[0]
        ppl[key] = run.data.metrics["perplexity"]
        if sends == "forward_order":  # stages/llmc/ddp_forward_order.py, stages/distributed/rank_shares.py
            assert "modules' results broadcast in forward order" in run.data.tags["farm.notes"]
            assert "samples per rank [" in run.data.tags["farm.notes"]
        if ranks == 2:
            assert run.data.tags["farm.ddp_world_size"] == "2" and "(nccl)" in run.data.tags["farm.notes"]
            assert "checkpoint read 1/2 per rank" in run.data.tags["farm.notes"]  # stages/distributed/split_load.py
            print("GPU DDP ranks:", run.data.tags["farm.ddp_ranks"], "oneshot", run.data.metrics["seconds_oneshot"])
        assert "the last subgraph ends at its last quantized module" in run.data.tags["farm.notes"]
    assert all(abs(ppl[k] - ppl[1]) / ppl[1] < 0.02 for k in ppl), ppl
    print("GPU DDP perplexity 1 vs 2 ranks:", ppl)


ONE_RANK = r"""
import json, sys, contextlib
import torch
from farm.methods import build_method
from farm.runtime import ddp
from farm.stages.llmc.ddp_forward_order import forward_ordered
from farm.stages.modelio import load_model, load_tokenizer
from farm.stages.quantize import CalibrationDraw, QuantizeRequest, _dataset, calibrate
from farm.stages.distributed.split_load import dispatch_replica

model_dir, text = sys.argv[1], sys.argv[2]
ddp.init(ddp.Rank(0, 1, "127.0.0.1", ddp.free_port()))
try:
    req = QuantizeRequest(model_dir, build_method({"method": "gptq", "group_size": 128}),
                          CalibrationDraw(text, 16, 256, 0), "unused", batch_size=4, offload_device="cuda")
    tok = load_tokenizer(model_dir)
    out = {}
    for mode in ("llmcompressor", "forward_order"):
        model = load_model(model_dir, "cuda:0")
        dispatch_replica(model, "cuda:0")
        ctx = forward_ordered() if mode == "forward_order" else contextlib.nullcontext()
        with ctx as pending:
            notes = calibrate(req, model, tok, req.method.modifiers(), _dataset(req, tok))
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        out[mode] = (state, (pending.note() if pending is not None else None))
    a, b = out["llmcompressor"][0], out["forward_order"][0]
    same = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    print("RESULT " + json.dumps({"same": same, "note": out["forward_order"][1], "tensors": len(a)}))
finally:
    ddp.destroy()
"""


def test_forward_order_on_a_one_rank_nccl_group_gives_upstreams_weights(
    small_llama: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """stages/llmc/ddp_forward_order.py on a GPU through llm-compressor's real pipeline (one GPU is enough: a one-rank
    NCCL group takes the distributed GPTQ path, broadcasts included): the same weights as upstream's, bit for
    bit, and every broadcast waited for."""
    res = subprocess.run(
        [sys.executable, "-c", ONE_RANK, str(small_llama), str(TEXT)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    assert res.returncode == 0 and line, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads(line[0][len("RESULT ") :])
    assert result["same"] and result["tensors"] > 0, result
    assert "modules' results broadcast in forward order" in result["note"], result
    print("GPU forward-order GPTQ on a one-rank NCCL group:", result)

"""On a CUDA machine with vLLM in its own environment: the serving check measures a base and its FP8 variant as
vLLM serves them, and a checkpoint vLLM refuses is one line. Skipped without CUDA (CI) or without vLLM.

Where vLLM lives: FARM_VLLM_PYTHON (an interpreter) and/or FARM_VLLM_PYTHONPATH (directories, os.pathsep
separated); FARM_VLLM_ENV holds K=V,K=V for its process. Inputs as in test_gpu_stages.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = Path(os.environ.get("FARM_GPU_TOKENIZER", ROOT / ".fixtures" / "models" / "tiny-llama")).resolve()
TEXT = Path(os.environ.get("FARM_GPU_TEXT", ROOT / ".fixtures" / "shakespeare" / "calibration.txt")).resolve()


@pytest.fixture(scope="module")
def serving_spec():  # type: ignore[no-untyped-def]
    from farm.serving.runner import probe
    from farm.spec import ServingSpec

    env = dict(kv.split("=", 1) for kv in os.environ.get("FARM_VLLM_ENV", "").split(",") if "=" in kv)
    path = [p for p in os.environ.get("FARM_VLLM_PYTHONPATH", "").split(os.pathsep) if p]
    spec = ServingSpec(
        python=os.environ.get("FARM_VLLM_PYTHON"),
        pythonpath=path,
        env=env,
        concurrency=[1, 8],
        requests_per_level=16,
        greedy_prompts=4,
        greedy_tokens=16,
        shapes=[{"name": "short", "input_tokens": 128, "output_tokens": 32}],
        timeout_s=600,
    )
    problem, version = probe(spec)
    if problem:
        pytest.skip(problem)
    print(f"vLLM {version}")
    return spec


@pytest.fixture(scope="module")
def base_and_fp8(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from farm.methods import build_method
    from farm.stages.quantize import CalibrationDraw, QuantizeRequest, quantize

    out = tmp_path_factory.mktemp("serve")
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    quantize(
        QuantizeRequest(
            str(out / "base"), build_method({"method": "fp8"}), CalibrationDraw(str(TEXT), 4, 64, 0), str(out / "fp8")
        )
    )
    torch.cuda.empty_cache()
    return out / "base", out / "fp8"


def test_base_and_fp8_as_vllm_serves_them(serving_spec, base_and_fp8) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    from farm.serving import measure
    from farm.serving.runner import serve

    base_dir, fp8_dir = base_and_fp8
    tok = AutoTokenizer.from_pretrained(base_dir)
    text = TEXT.read_text()[:400_000]
    base = serve(str(base_dir), serving_spec, text, tok, num_gpus=0.5)
    fp8 = serve(str(fp8_dir), serving_spec, text, tok, num_gpus=0.5)
    for name, r in (("base", base), ("fp8", fp8)):
        assert r.error is None, f"{name}: {r.error}"
        m = r.metrics
        print(f"GPU serving {name}: " + json.dumps({k: round(v, 4) for k, v in sorted(m.items())}))
        assert r.tags[measure.TAG_VERSION] and m[measure.KV_TOKENS] > 0 and m[measure.COLD_START] > 0
        for c in (1, 8):
            assert m[measure.level_name("short", c, "output_tokens_per_s")] > 0
            assert 0 < m[measure.level_name("short", c, "ttft_p50_s")] < 60
        assert len(r.document["greedy"]) == 4
    assert fp8.tags[measure.TAG_QUANTIZATION] == "compressed-tensors"
    assert fp8.metrics[measure.PARAMS] < base.metrics[measure.PARAMS]  # FP8 weights are half the bytes on the GPU
    agree = measure.greedy_agreement(fp8.document["greedy"], base.document["greedy"])
    print(f"GPU serving fp8 vs base greedy: {agree}")
    assert set(agree) == {measure.GREEDY_EXACT, measure.GREEDY_AGREE}


def test_a_checkpoint_vllm_refuses_is_one_line(serving_spec, base_and_fp8, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from transformers import AutoTokenizer

    from farm.serving.runner import serve

    bad = tmp_path / "bad"
    shutil.copytree(base_and_fp8[0], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "no_such_format"}
    (bad / "config.json").write_text(json.dumps(cfg))
    r = serve(str(bad), serving_spec, TEXT.read_text()[:100_000], AutoTokenizer.from_pretrained(bad), num_gpus=0.5)
    print(f"GPU serving refused: {r.error}")
    assert r.error is not None and r.error.startswith("vllm: ") and "\n" not in r.error and not r.metrics

"""On a CUDA machine: every method quantizes, reloads and generates on the GPU through farm's stages (with the
settings farm's tuning picks), AWQ without the CPU fix. Skipped without CUDA (CI); results in docs/BENCHMARKS.md.

Inputs default to the fixtures; on a machine without them set FARM_GPU_TOKENIZER (a tokenizer directory) and
FARM_GPU_TEXT (a text file)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = Path(os.environ.get("FARM_GPU_TOKENIZER", ROOT / ".fixtures" / "models" / "tiny-llama")).resolve()
TEXT = Path(os.environ.get("FARM_GPU_TEXT", ROOT / ".fixtures" / "shakespeare" / "calibration.txt")).resolve()
VALIDATION = Path(os.environ.get("FARM_GPU_VALIDATION", ROOT / ".fixtures" / "validation" / "validation.txt")).resolve()


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("llama")
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


EXTRA = {
    "gptq": {"group_size": 128},
    "awq": {"group_size": 128},
    "mixed": {"low": {"bits": 4, "group_size": 128}},
    "autoround": {"group_size": 128, "iters": 20},
    "qat": {"group_size": 128, "steps": 20, "train_samples": 64},
}


@pytest.mark.parametrize("name", ["gptq", "awq", "autoround", "fp8", "smoothquant", "nf4", "qat", "mixed"])
def test_method_on_gpu(name: str, small_llama: Path, tmp_path: Path) -> None:
    pytest.importorskip({"nf4": "bitsandbytes", "qat": "torchao"}.get(name, "torch"))  # optional backends
    from farm.methods import build_method
    from farm.stages.evaluate import EvaluateRequest, evaluate
    from farm.stages.llmc.cpu_pinning import cpu_safe_pinning
    from farm.stages.quantize import CalibrationDraw, QuantizeRequest, ValidationText, quantize
    from farm.stages.tuning import choose

    free, _ = torch.cuda.mem_get_info()
    tuned = choose("cuda", free, 32, 512, 512, 1536, 8)
    assert tuned.offload_device == "cuda"
    with cpu_safe_pinning() as guarded:
        assert not guarded  # the CPU fix never applies on a GPU machine
    method = build_method({"method": name, **EXTRA.get(name, {})})
    q = quantize(
        QuantizeRequest(
            str(small_llama),
            method,
            CalibrationDraw(str(TEXT), 32, 512, 0),
            str(tmp_path / "q"),
            batch_size=tuned.batch_size,
            offload_device=tuned.offload_device,
            validation=ValidationText(str(VALIDATION), None, 2048, 512),
        )
    )
    assert q.device == "cuda"
    e = evaluate(EvaluateRequest(str(tmp_path / "q"), str(TEXT), 2048, 512, "Hello", 8))
    assert e.device == "cuda" and e.perplexity > 1 and e.weights_bytes > 0
    print(
        f"GPU {name}: oneshot {q.seconds_oneshot:.1f} s, save {q.seconds_save:.1f} s, ppl {e.perplexity:.1f}, "
        f"batch {tuned.batch_size}, {e.weights_bytes / 1e6:.1f} MB; {'; '.join(q.notes)}"
    )


def test_lora_adapter_over_nf4_on_gpu(small_llama: Path, tmp_path: Path) -> None:
    """QLoRA proper: the adapter runs over bitsandbytes' 4-bit Linear modules on the GPU."""
    pytest.importorskip("bitsandbytes")
    from farm.methods import build_method
    from farm.spec import EvaluationSpec
    from farm.stages.checks.adapters import evaluate_adapters, train_lora
    from farm.stages.quantize import CalibrationDraw, QuantizeRequest, quantize

    train_lora(str(small_llama), str(TEXT), str(tmp_path / "adapter"), steps=10, seq_len=128)
    quantize(
        QuantizeRequest(
            str(small_llama),
            build_method({"method": "nf4"}),
            CalibrationDraw(str(TEXT), 4, 64, 0),
            str(tmp_path / "nf4"),
        )
    )
    ev = EvaluationSpec.model_validate(
        {
            "perplexity": {"source": str(TEXT)},
            "adapters": [{"name": "a", "source": str(tmp_path / "adapter"), "max_tokens": 2048}],
        }
    )
    base, nf4 = evaluate_adapters(str(small_llama), ev), evaluate_adapters(str(tmp_path / "nf4"), ev)
    print(
        f"GPU LoRA: base+adapter ppl {base['adapter_a_perplexity']:.1f}, nf4+adapter {nf4['adapter_a_perplexity']:.1f}"
    )
    assert base["adapter_a_perplexity"] > 1 and nf4["adapter_a_perplexity"] > 1


def test_onloaded_under_a_budget_matches_the_resident_variant(small_llama: Path, tmp_path: Path) -> None:
    """A variant whose weights stay on the host (tuning's "cpu" load device) and are onloaded a layer at a time,
    under a CUDA allocator cap below its weights, gives the same checkpoint as the same variant resident on
    the GPU: calibrated in the same dtype, its GPTQ solves and its perplexity agree."""
    from safetensors.torch import load_file

    from farm.methods import build_method
    from farm.runtime.workers import gpu_memory_capped
    from farm.stages.evaluate import EvaluateRequest, evaluate
    from farm.stages.quantize import CalibrationDraw, QuantizeRequest, quantize

    weights = sum(f.stat().st_size for f in small_llama.glob("*.safetensors"))
    out = {}
    cap = weights * 3 // 4  # below the weights (a resident copy cannot fit), above the embedding table
    for where, budget in (("resident", 0), ("onloaded", cap)):
        with gpu_memory_capped(budget) as memory:
            quantize(
                QuantizeRequest(
                    str(small_llama),
                    build_method({"method": "gptq", "group_size": 128}),
                    CalibrationDraw(str(TEXT), 32, 512, 0),
                    str(tmp_path / where),
                    load_device="cpu" if where == "onloaded" else None,
                )
            )
        ppl = evaluate(EvaluateRequest(str(tmp_path / where), str(TEXT), 2048, 512, "Hello", 8)).perplexity
        tensors = {}
        for f in sorted((tmp_path / where).glob("*.safetensors")):
            tensors |= load_file(f)
        out[where] = (tensors, ppl, memory["gpu_peak_bytes"])
    (a, ppl_a, _), (b, ppl_b, peak_b) = out["resident"], out["onloaded"]
    assert peak_b < cap
    assert sorted(a) == sorted(b)
    packed = [k for k in a if k.endswith("weight_packed")]
    same = sum(torch.equal(a[k], b[k]) for k in packed) / len(packed)
    assert same > 0.9, f"only {same:.0%} of packed weights match"
    assert abs(ppl_a - ppl_b) / ppl_a < 0.01
    print(
        f"GPU onloaded: {same:.0%} packed tensors equal, ppl {ppl_a:.2f} vs {ppl_b:.2f}, peak {peak_b / 2**20:.0f} MiB"
    )

"""Quantize + evaluate on the tiny Llama, no Ray: every method produces a checkpoint that reloads with plain
transformers and generates; AWQ included on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from farm.methods import REGISTRY, build_method
from farm.stages.engines.registry import engine_for
from farm.stages.evaluate import EvaluateRequest, evaluate
from farm.stages.quantize import CalibrationDraw, QuantizeRequest, ValidationText, quantize

SETTINGS = {
    "gptq": {"group_size": 64},
    "awq": {"group_size": 64},
    "autoround": {"group_size": 64, "iters": 4, "batch_size": 2},
    "search": {"budget": 1e9, "candidates": [{"method": "rtn"}]},
}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_method_round_trip(name: str, fixture_paths: dict, tmp_path: Path) -> None:
    method = build_method({"method": name, **SETTINGS.get(name, {})})
    text = fixture_paths["shakespeare"]
    q = quantize(
        QuantizeRequest(
            model_dir=str(fixture_paths["tiny-llama"]),
            method=method,
            calibration=CalibrationDraw(str(text / "calibration.txt"), 4, 64, 0),
            out_dir=str(tmp_path / "q"),
            validation=ValidationText(str(fixture_paths["validation"] / "validation.txt"), None, 256, 128),
        )
    )
    assert (tmp_path / "q" / "recipe.yaml").exists() and q.recipe
    assert any("pin" in n for n in q.notes) == (name == "awq")  # only AWQ needs the CPU fix
    config = (tmp_path / "q" / "config.json").read_text()
    fmt = "bitsandbytes" if name == "nf4" else "compressed-tensors"  # NF4 is bitsandbytes' own format
    assert "quantization_config" in config and fmt in config
    if engine_for(method) is None:  # oneshot's own path splits its load and save (the GPU benches read these)
        assert 0 < q.metrics["seconds_save_compress"] < q.seconds_save
        # the tokenizer is read alongside the weights: each part lies within the load, their sum need not
        assert max(q.metrics["seconds_load_tokenizer"], q.metrics["seconds_load_device"]) <= q.seconds_load
    e = evaluate(EvaluateRequest(str(tmp_path / "q"), str(text / "heldout.txt"), 256, 128, "Hello", 4))
    assert e.perplexity > 1 and e.ppl_tokens == 254 and e.weights_bytes > 0
    assert isinstance(e.generation, str)


def test_fp8_model_free_matches_oneshot(fixture_paths: dict, tmp_path: Path) -> None:
    """model_free_ptq works from the shards without building the model; its FP8 weights are the same as
    oneshot's (same scheme, same ignore list) and the checkpoint reloads and evaluates the same."""
    from safetensors.torch import load_file

    text = fixture_paths["shakespeare"]
    outs = {}
    for engine in ("oneshot", "model_free"):
        q = quantize(
            QuantizeRequest(
                model_dir=str(fixture_paths["tiny-llama"]),
                method=build_method({"method": "fp8", "engine": engine}),
                calibration=CalibrationDraw(str(text / "calibration.txt"), 4, 64, 0),
                out_dir=str(tmp_path / engine),
            )
        )
        e = evaluate(EvaluateRequest(str(tmp_path / engine), str(text / "heldout.txt"), 256, 128, "Hello", 4))
        outs[engine] = (load_file(tmp_path / engine / "model.safetensors"), e.perplexity, q)
    (a, ppl_a, _), (b, ppl_b, q_mf) = outs["oneshot"], outs["model_free"]
    assert "model_free_ptq" in q_mf.notes[0] and "model_free_ptq" in q_mf.recipe
    weights = [k for k in a if k.endswith(".weight") and a[k].dtype.itemsize == 1]
    assert weights and all(k in b and (a[k].view(dtype=a[k].dtype).float() == b[k].float()).all() for k in weights)
    assert abs(ppl_a - ppl_b) / ppl_a < 1e-3


def test_release_device_memory_drops_the_last_oneshot_model(fixture_paths: dict, tmp_path: Path) -> None:
    """A reused worker must not keep the previous variant's weights (on a GPU: while the serving engine starts
    beside it). Two things held them: llm-compressor's global session, until the next oneshot resets it, and the
    namespaces its sequential pipeline's autowrapped forwards register in torch.fx (farm drops those after
    oneshot, stages/llmc/fx_wrap_release.py)."""
    import gc
    import weakref

    from llmcompressor.core import active_session
    from torch.fx import _symbolic_trace

    from farm.runtime.workers import release_device_memory

    wrapped = len(_symbolic_trace._wrapped_fns_to_patch)
    quantize(
        QuantizeRequest(
            model_dir=str(fixture_paths["tiny-llama"]),
            method=build_method({"method": "gptq", "group_size": 64}),
            calibration=CalibrationDraw(str(fixture_paths["shakespeare"] / "calibration.txt"), 2, 32, 0),
            out_dir=str(tmp_path / "q"),
        )
    )
    assert len(_symbolic_trace._wrapped_fns_to_patch) == wrapped
    held = active_session().state.model
    assert held is not None
    ref = weakref.ref(held)
    del held
    gc.collect()
    assert ref() is not None  # the session alone keeps it alive
    release_device_memory()
    assert active_session().state.model is None and ref() is None


def test_cpu_workers_pin_their_kernels_before_torch_loads() -> None:
    """A CPU-only worker gives the same numbers on any x86-64 host: torch's, MKL's and oneDNN's kernels are
    pinned to AVX2 (an AVX-512 host otherwise rounds differently); a variable the user set wins."""
    import platform
    import subprocess
    import sys

    code = (
        "import os; os.environ['MKL_CBWR'] = 'COMPATIBLE'\n"
        "from farm.stages.modelio import pin_cpu_kernels\n"
        "pinned = pin_cpu_kernels()\n"
        "import torch\n"
        "print(sorted(pinned), os.environ['MKL_CBWR'], torch.backends.cpu.get_cpu_capability())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if platform.machine().lower() not in ("x86_64", "amd64") or "avx2" not in Path("/proc/cpuinfo").read_text():
        assert out[:1] == ["[]"]
        return
    assert out == ["['ATEN_CPU_CAPABILITY',", "'ONEDNN_MAX_CPU_ISA']", "COMPATIBLE", "AVX2"]


def test_engines_are_registered_by_config_type() -> None:
    """One entry per config type (with a condition where a type has several engines); everything else is
    llm-compressor's oneshot. Looking engines up imports no torch (the engine modules load it lazily)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from farm.methods import build_method\n"
        "from farm.stages.engines.registry import engine_for\n"
        "cases = [{'method': 'gptq'}, {'method': 'gptq', 'backend': 'gptqmodel'}, {'method': 'fp8'},\n"
        "         {'method': 'fp8', 'engine': 'model_free'}, {'method': 'nf4'}, {'method': 'mixed'},\n"
        "         {'method': 'qat'}]\n"
        "print([getattr(engine_for(build_method(c)), '__name__', None) for c in cases], 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == (
        "[None, 'quantize_gptqmodel', None, 'quantize_model_free', 'quantize_bitsandbytes', 'quantize_mixed', "
        "'quantize_qat'] False"
    )

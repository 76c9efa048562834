"""The left-looking GPTQ solve (Cholesky factor of H only) quantizes exactly as llm-compressor's right-looking
`quantize_weight` does, up to fp32 rounding, with the same contract (CPU, fp32)."""

import pytest

torch = pytest.importorskip("torch")

from compressed_tensors.quantization import QuantizationArgs  # noqa: E402
from llmcompressor.modifiers.gptq import base  # noqa: E402
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight  # noqa: E402

from farm.spec import ResourceSpec  # noqa: E402
from farm.stages.llmc.gptq_left_looking import hessian_factor, left_looking_quantize_weight, left_looking_solve  # noqa: E402
from tests.gptq_losses import assert_scoped_swap, gptq_problem  # noqa: E402


@pytest.mark.parametrize("actorder", [None, "static", "weight"])
def test_same_quantization_as_llm_compressor(actorder: str | None) -> None:
    w, h, scale, zero = gptq_problem(2, 16, 320)  # 2.5 blocks of 128: the last block is narrower
    qargs = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32, actorder=actorder)
    ref_q, ref_loss, ref_flag = quantize_weight(w.clone(), h.clone(), scale, zero, None, qargs)
    q, loss, flag = left_looking_quantize_weight(w.clone(), h.clone(), scale, zero, None, qargs)
    assert (q != ref_q).float().mean() < 1e-3  # a rounding tie may fall the other way, nothing more
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
    assert flag.tolist() == ref_flag.tolist() == [False, False]


@pytest.mark.parametrize("kind", ["int8 channel", "int4 asymmetric channel", "fp8 tensor"])
def test_same_quantization_for_other_strategies(kind: str) -> None:
    """Channel-wise, asymmetric and per-tensor FP8 weights go through the same block update as llm-compressor's."""
    w, h, _, _ = gptq_problem(2, 16, 256)
    if kind == "fp8 tensor":
        qargs = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="tensor")
        scale = w.abs().amax(dim=(1, 2)).reshape(2, 1, 1) / 448
        zero = torch.zeros_like(scale)
    else:
        bits = 8 if kind.startswith("int8") else 4
        symmetric = "asymmetric" not in kind
        qargs = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="channel")
        if symmetric:
            scale = w.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 0.5)
            zero = torch.zeros_like(scale, dtype=torch.int8)
        else:
            lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            scale = (hi - lo) / (2**bits - 1)
            zero = (-(2 ** (bits - 1)) - torch.round(lo / scale)).to(torch.int8)
    ref_q, ref_loss, _ = quantize_weight(w.clone(), h.clone(), scale, zero, None, qargs)
    q, loss, _ = left_looking_quantize_weight(w.clone(), h.clone(), scale, zero, None, qargs)
    assert (q != ref_q).float().mean() < 1e-3 and (ref_loss > 0).all()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)


def test_factor_is_the_upper_cholesky_factor_of_h() -> None:
    _, h, _, _ = gptq_problem(1, 4, 64)
    v = hessian_factor(torch.zeros(1, 4, 64), h.clone(), 0.01, torch.zeros(1, dtype=torch.bool))
    damped = h.clone()
    damped[0].diagonal().add_(0.01 * damped[0].diagonal().mean())
    assert torch.equal(v, v.triu())
    torch.testing.assert_close(v @ v.transpose(1, 2), damped, rtol=1e-4, atol=1e-4)


def test_dead_columns_and_a_hessian_that_is_not_positive_definite() -> None:
    w, h, scale, zero = gptq_problem(2, 8, 128)
    h[0, 5, :] = 0
    h[0, :, 5] = 0  # a column no calibration token touched
    h[1] = -torch.eye(128)  # not positive definite even after dampening: round to nearest
    qargs = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    ref_q, _, ref_flag = quantize_weight(w.clone(), h.clone(), scale, zero, None, qargs)
    q, _, flag = left_looking_quantize_weight(w.clone(), h.clone(), scale, zero, None, qargs)
    assert flag.tolist() == ref_flag.tolist() == [False, True]
    assert (q[0, :, 5] == 0).all() and torch.equal(q[1], ref_q[1])
    torch.testing.assert_close(q, ref_q, rtol=0, atol=1e-6)


def test_swap_is_scoped_and_leaves_cpu_to_llm_compressor() -> None:
    assert_scoped_swap(base, "quantize_weight", left_looking_solve())
    w, h, scale, zero = gptq_problem(1, 4, 64)
    qargs = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    with left_looking_solve() as usage:  # CPU tensors: llm-compressor's own function
        base.quantize_weight(w, h, scale, zero, None, qargs)
    assert usage.n == 0 and usage.note() is None
    with left_looking_solve(cpu=True) as usage:
        base.quantize_weight(w, h, scale, zero, None, qargs)
    assert usage.n == 1 and "left-looking" in (usage.note() or "")


def test_spec_choice() -> None:
    assert ResourceSpec(gptq_inverse="left_looking").gptq_inverse == "left_looking"


def test_gptq_objective_unchanged_on_the_tiny_model() -> None:
    """A whole GPTQ oneshot (tiny Llama fixture, fp32 on CPU) solved left-looking: GPTQ's own summed layer loss
    equals llm-compressor's to fp32 rounding."""
    from tests.gptq_losses import tiny_oneshot_loss

    ref, _ = tiny_oneshot_loss()
    ours, usage = tiny_oneshot_loss(left_looking_solve(cpu=True))
    print(f"CPU GPTQ summed loss: llm-compressor {ref:.6f}, left-looking {ours:.6f} ({usage.n} modules)")
    assert usage.n > 0
    assert abs(ours - ref) / ref < 1e-4, (ours, ref)

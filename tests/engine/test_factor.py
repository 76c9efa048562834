"""GPTQ's inverse-Hessian factor from one Cholesky equals llm-compressor's three-factorisation one, with the same
contract for dead columns and Hessians that are not positive definite (CPU, fp32)."""

import pytest

torch = pytest.importorskip("torch")

from llmcompressor.modifiers.gptq import gptq_quantize  # noqa: E402
from llmcompressor.modifiers.gptq.helpers import factorize_hessian  # noqa: E402

from farm.spec import ResourceSpec  # noqa: E402
from farm.stages.llmc.gptq_one_cholesky import covers, one_cholesky_factor, upper_inverse_factor  # noqa: E402
from tests.gptq_losses import assert_scoped_swap  # noqa: E402


def hessians(batch: int, n: int, tokens: int = 400) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(batch, tokens, n)
    return 2 * x.transpose(1, 2) @ x / tokens


def both(h: torch.Tensor, w: torch.Tensor) -> tuple:
    ours_w, ref_w = w.clone(), w.clone()
    ours_flag, ref_flag = torch.zeros(h.shape[0], dtype=torch.bool), torch.zeros(h.shape[0], dtype=torch.bool)
    ours = upper_inverse_factor(ours_w, h.clone(), 0.01, ours_flag)
    ref = factorize_hessian(ref_w, h.clone(), 0.01, ref_flag)
    return ours, ref, ours_w, ref_w, ours_flag, ref_flag


def test_same_factor_as_llm_compressor() -> None:
    h = hessians(2, 96)
    ours, ref, *_ = both(h, torch.randn(2, 8, 96))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(ours, ours.triu())  # upper triangular, and U^T U is the dampened inverse
    damped = h.clone()
    for i in range(2):
        damped[i].diagonal().add_(0.01 * damped[i].diagonal().mean())
    torch.testing.assert_close(ours.transpose(1, 2) @ ours, torch.linalg.inv(damped), rtol=1e-3, atol=1e-4)


def test_dead_columns_and_a_hessian_that_is_not_positive_definite() -> None:
    h = hessians(2, 32)
    h[0, 5, :] = 0
    h[0, :, 5] = 0  # a column no calibration token touched
    h[1] = -torch.eye(32)  # not positive definite even after dampening
    ours, ref, ours_w, ref_w, ours_flag, ref_flag = both(h, torch.randn(2, 4, 32))
    assert torch.equal(ours_w, ref_w) and (ours_w[0, :, 5] == 0).all()
    assert ours_flag.tolist() == ref_flag.tolist() == [False, True]
    assert torch.equal(ours[1], torch.eye(32))
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-4, atol=1e-5)


def test_swap_is_scoped_and_leaves_cpu_to_llm_compressor() -> None:
    assert_scoped_swap(gptq_quantize, "factorize_hessian", one_cholesky_factor())
    assert not covers(torch.zeros(1, 2, 4), torch.zeros(1, 4, 4))  # CPU: llm-compressor's own function
    with one_cholesky_factor() as usage:
        gptq_quantize.factorize_hessian(
            torch.zeros(1, 2, 4), torch.eye(4).unsqueeze(0), 0.01, torch.zeros(1, dtype=torch.bool)
        )
    assert usage.n == 0


def test_spec_default_and_choices() -> None:
    assert ResourceSpec().gptq_inverse == "left_looking"  # stages/llmc/gptq_left_looking.py; this factor stays a choice
    assert ResourceSpec(gptq_inverse="reversed_cholesky").gptq_inverse == "reversed_cholesky"
    assert ResourceSpec(gptq_inverse="llmcompressor").gptq_inverse == "llmcompressor"
    with pytest.raises(ValueError):
        ResourceSpec(gptq_inverse="lu")


def test_gptq_objective_unchanged_on_the_tiny_model() -> None:
    """A whole GPTQ oneshot (tiny Llama fixture, fp32 on CPU) with the one-Cholesky factor forced on: GPTQ's own
    summed layer loss equals llm-compressor's to fp32 rounding."""
    from tests.gptq_losses import tiny_oneshot_loss

    ref, _ = tiny_oneshot_loss()
    ours, usage = tiny_oneshot_loss(one_cholesky_factor(cpu=True))
    print(f"CPU GPTQ summed loss: llm-compressor's factor {ref:.6f}, one Cholesky {ours:.6f} ({usage.n} factors)")
    assert usage.n > 0
    assert abs(ours - ref) / ref < 1e-4, (ours, ref)

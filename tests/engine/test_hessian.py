"""The tensor-core Hessian path computes llm-compressor's Hessian (CPU: same arithmetic via the fp32 fallback)."""

import pytest

torch = pytest.importorskip("torch")

from llmcompressor.modifiers.gptq import base  # noqa: E402
from llmcompressor.modifiers.gptq.helpers import accumulate_hessian as upstream  # noqa: E402

from farm.stages.llmc.hessian_tensor_cores import accumulate, covers, tensor_core_hessians  # noqa: E402
from tests.gptq_losses import assert_scoped_swap  # noqa: E402


def test_same_hessian_and_sample_count_as_llm_compressor() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 32)
    ours, ours_n = torch.zeros(96, 96), torch.zeros(())
    ref, ref_n = torch.zeros(96, 96), torch.zeros(())
    for shape in [(4, 64, 96), (2, 64, 96), (64, 96)]:  # batches of windows, and a 2-D input
        x = torch.randn(*shape).to(torch.bfloat16)
        ours, ours_n = accumulate(x, ours, ours_n)
        ref, ref_n = upstream(x, linear, ref, ref_n)
    assert ours_n.item() == ref_n.item() == 7
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    assert torch.equal(ours, ours.t())


def test_only_half_precision_linear_inputs_on_cuda_take_the_fast_path() -> None:
    x = torch.randn(2, 8, 16, dtype=torch.bfloat16)
    linear = torch.nn.Linear(16, 4)
    assert not covers(x, linear, torch.zeros(16, 16))  # a CPU Hessian: upstream's function
    assert not covers(x.float(), linear, torch.zeros(16, 16))
    assert not covers(x, torch.nn.Conv2d(16, 4, 1), torch.zeros(16, 16))


def test_the_swap_is_scoped_and_undone_on_error() -> None:
    assert_scoped_swap(base, "accumulate_hessian", tensor_core_hessians())


def test_inside_the_block_other_inputs_still_reach_upstream() -> None:
    linear = torch.nn.Linear(16, 4)
    x = torch.randn(3, 5, 16)  # fp32 activations: not covered
    ref, ref_n = upstream(x, linear, torch.zeros(16, 16), torch.zeros(()))
    with tensor_core_hessians():
        got, got_n = base.accumulate_hessian(x, linear, torch.zeros(16, 16), torch.zeros(()))
    assert torch.equal(got, ref) and got_n.item() == ref_n.item()


def test_chunked_sums_equal_one_product() -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 50, 24).to(torch.bfloat16)
    one, _ = accumulate(x, torch.zeros(24, 24), torch.zeros(()), chunk=0)
    chunked, n = accumulate(x, torch.zeros(24, 24), torch.zeros(()), chunk=16)  # 150 tokens in 10 chunks
    torch.testing.assert_close(chunked, one, rtol=1e-5, atol=1e-4)
    assert n.item() == 3


def test_without_the_upstream_hook_oneshot_runs_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(base, "accumulate_hessian")
    with tensor_core_hessians():
        assert not hasattr(base, "accumulate_hessian")


def test_a_job_can_keep_llm_compressors_fp32_hessians() -> None:
    from farm.errors import SpecError
    from farm.spec import ResourceSpec

    assert ResourceSpec().gptq_hessian == "tensor_cores"
    assert ResourceSpec(gptq_hessian="fp32").gptq_hessian == "fp32"
    with pytest.raises((ValueError, SpecError)):
        ResourceSpec(gptq_hessian="tf32")
    with tensor_core_hessians() as usage:
        assert usage.n == 0 and usage.note() is None  # nothing on CPU is taken over

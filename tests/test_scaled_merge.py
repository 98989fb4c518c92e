"""slao::scaled_merge_: Triton kernel and C++ kernel against the reference, the
finite check (all or nothing), and bad input."""

import pytest
import torch
from conftest import KERNEL_DEVICE

import slao_kernels
from slao_kernels import reference
from slao_kernels.ops import scaled_merge as op

# A Llama-like layer set: mixed shapes (q/k/v/o/gate/up/down at rank 4), one
# tensor spanning several kernel blocks, one empty, mixed dtypes.
SHAPES = [(64, 4), (16, 4), (16, 4), (64, 4), (96, 4), (96, 4), (64, 4), (3 * op.BLOCK + 5,), (0, 4)]


def layer_set(dtypes, device="cpu"):
    merged, fine = [], []
    for i, shape in enumerate(SHAPES):
        dt = dtypes[i % len(dtypes)]
        merged.append(torch.randn(shape).to(device=device, dtype=dt))
        fine.append(torch.randn(shape).to(device=device, dtype=dt))
    return merged, fine


def expected(merged, fine, lam):
    want = [m.clone() for m in merged]
    reference.scaled_merge_ref(want, fine, lam, False)
    return want


def assert_merged(got, want):
    # The kernels and the reference compute m + lam·(f − m) in fp32; they may
    # differ by one rounding (FMA contraction), which the dtype tolerances cover.
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.bfloat16,), (torch.float16,),
                                    (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("lam", [1.0, 2 ** -0.5, 1 / 3])
def test_triton_matches_reference(dtypes, lam):
    merged, fine = layer_set(dtypes, KERNEL_DEVICE)
    want = expected(merged, fine, lam)
    op.scaled_merge_triton(merged, fine, lam, check_finite=True)
    assert_merged(merged, want)


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.bfloat16,), (torch.float16,), (torch.float64,),
                                    (torch.float32, torch.bfloat16)])
def test_op_matches_reference(dtypes):
    merged, fine = layer_set(dtypes)
    want = expected(merged, fine, 0.5 ** 0.5)
    out = slao_kernels.scaled_merge_(merged, fine, 0.5 ** 0.5, check_finite=True)
    assert out is merged
    assert_merged(merged, want)


@pytest.mark.parametrize("path", ["op", "triton"])
def test_lam_one_copies_exactly_lam_zero_keeps(path):
    """SLAO's first task: λ(1) = 1 sets B_merge = B_ft bit for bit."""
    device = "cpu" if path == "op" else KERNEL_DEVICE
    run = slao_kernels.scaled_merge_ if path == "op" else op.scaled_merge_triton
    merged, fine = layer_set((torch.float32, torch.bfloat16), device)
    before = [m.clone() for m in merged]
    run(merged, fine, 0.0, False)
    assert all(torch.equal(m, b) for m, b in zip(merged, before, strict=True))
    run(merged, fine, 1.0, False)
    assert all(torch.equal(m, f) for m, f in zip(merged, fine, strict=True))


def test_single_tensor_api():
    m, f = torch.randn(7, 3), torch.randn(7, 3)
    want = 0.75 * m + 0.25 * f
    assert slao_kernels.scaled_merge_(m, f, 0.25) is m
    torch.testing.assert_close(m, want)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("path", ["op", "triton"])
def test_check_finite_writes_nothing(bad_value, path):
    """The bad tensor sits in the second dtype group: the first group must not be written either."""
    device = "cpu" if path == "op" else KERNEL_DEVICE
    merged, fine = layer_set((torch.float32, torch.bfloat16), device)
    fine[5].view(-1)[3] = bad_value  # a bf16 tensor
    before = [m.clone() for m in merged]
    run = slao_kernels.scaled_merge_ if path == "op" else op.scaled_merge_triton
    with pytest.raises(ValueError, match=r"non-finite values into tensor 5 .*nothing was written"):
        run(merged, fine, 0.5, check_finite=True)
    assert all(torch.equal(m, b) for m, b in zip(merged, before, strict=True))
    run(merged, fine, 0.5, check_finite=False)  # without the check the NaN/Inf goes through
    assert not torch.isfinite(merged[5]).all()


# The interpreter's numpy cast reports the overflow this test provokes on purpose.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("path", ["op", "triton"])
def test_overflow_of_the_stored_dtype_is_caught(path):
    """Finite in fp32, Inf once stored as fp16: 2·6e4 + 6e4 = 1.8e5 > 65504."""
    device = "cpu" if path == "op" else KERNEL_DEVICE
    run = slao_kernels.scaled_merge_ if path == "op" else op.scaled_merge_triton
    m = torch.full((4,), 6e4, dtype=torch.float16, device=device)
    f = torch.full((4,), -6e4, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="non-finite"):
        run([m], [f], -1.0, True)
    assert torch.equal(m, torch.full_like(m, 6e4))


def test_opcheck():
    merged, fine = layer_set((torch.float32,))
    torch.library.opcheck(torch.ops.slao.scaled_merge_.default, (merged, fine, 0.5, True))


def test_empty_list_is_a_noop():
    assert slao_kernels.scaled_merge_([], [], 0.5) == []


@pytest.mark.parametrize("merged,fine,lam,exc,match", [
    ([torch.zeros(3)], [torch.zeros(3), torch.zeros(3)], 0.5, ValueError, "1 merged tensors but 2"),
    ([torch.zeros(3)], [torch.zeros(4)], 0.5, ValueError, r"merged\[0\] is \(3,\)"),
    ([torch.zeros(3)], [torch.zeros(3, dtype=torch.float64)], 0.5, ValueError, "torch.float64"),
    ([torch.zeros(3, 2).t()], [torch.zeros(2, 3)], 0.5, ValueError, "contiguous"),
    ([torch.zeros(3, dtype=torch.int32)], [torch.zeros(3, dtype=torch.int32)], 0.5, TypeError, "floating-point"),
    ([torch.zeros(3)], [torch.zeros(3)], float("nan"), TypeError, "lam must be a finite float"),
    ([torch.zeros(3)], [torch.zeros(3, device="meta")], 0.5, ValueError, "on meta"),
])
def test_bad_input(merged, fine, lam, exc, match):
    with pytest.raises(exc, match=match):
        slao_kernels.scaled_merge_(merged, fine, lam)


def test_requires_grad_outside_no_grad_is_refused_before_any_write():
    """Merging into a Parameter under grad mode would be an in-place write autograd cannot track:
    refused with a message saying so, and no tensor of the list is written (not even the ones before)."""
    plain, param = torch.zeros(4, 2), torch.nn.Parameter(torch.zeros(3, 2))
    fine = [torch.ones(4, 2), torch.ones(3, 2)]
    with pytest.raises(ValueError, match=r"merged\[1\] requires grad and grad mode is on.*torch.no_grad"):
        slao_kernels.scaled_merge_([plain, param], fine, 0.5)
    assert torch.equal(plain, torch.zeros(4, 2)) and torch.equal(param.detach(), torch.zeros(3, 2))
    with torch.no_grad():  # what SLAO's end_task does
        slao_kernels.scaled_merge_([plain, param], fine, 0.5)
    assert torch.equal(param.detach(), torch.full((3, 2), 0.5)) and torch.equal(plain, torch.full((4, 2), 0.5))

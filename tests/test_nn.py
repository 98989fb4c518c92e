"""LoRALinear: wrapping without copies, init, scaling, merge/unmerge, dropout, repr, bad input."""

import math

import pytest
import torch
from torch import nn

from slao_kernels import LoRALinear
from slao_kernels.nn import StackedLoRALinear
from slao_kernels.reference import lora_linear_ref


def test_wraps_without_copy_and_freezes_base():
    base = nn.Linear(32, 24)
    weight, bias = base.weight, base.bias
    m = LoRALinear(base, rank=4, alpha=8)
    assert m.weight is weight and m.bias is bias
    # the shell kept for to_linear() pins no tensor (FSDP2 replaces the module's parameters)
    assert base.weight is None and base.bias is None and list(base.parameters()) == []
    assert m.to_linear() is base and base.weight is weight and base.bias is bias
    assert not m.weight.requires_grad and not m.bias.requires_grad
    assert m.lora_A.shape == (4, 32) and m.lora_B.shape == (24, 4)
    assert m.lora_A.requires_grad and m.lora_B.requires_grad
    assert set(dict(m.named_parameters())) == {"weight", "bias", "lora_A", "lora_B"}
    assert torch.equal(m.lora_B, torch.zeros_like(m.lora_B)) and m.lora_A.abs().sum() > 0


def test_fresh_adapter_leaves_output_unchanged():
    base = nn.Linear(32, 24)
    x = torch.randn(3, 5, 32)
    expected = base(x)
    m = LoRALinear(base, rank=4, alpha=8)
    assert torch.equal(m(x), expected)


@pytest.mark.parametrize("rslora,expected", [(False, 16 / 4), (True, 16 / math.sqrt(4))])
def test_scaling(rslora, expected):
    m = LoRALinear(nn.Linear(8, 8), rank=4, alpha=16, rslora=rslora)
    assert m.scaling == pytest.approx(expected)


def test_forward_backward_matches_reference():
    m = LoRALinear(nn.Linear(32, 24), rank=4, alpha=8)
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(7, 32, requires_grad=True)
    y = m(x)
    want, _ = lora_linear_ref(x, m.weight, m.bias, m.lora_A, m.lora_B, m.scaling)
    torch.testing.assert_close(y, want)
    y.sum().backward()
    assert m.lora_A.grad is not None and m.lora_B.grad is not None and x.grad is not None
    assert m.weight.grad is None


def test_bf16_base_gets_fp32_adapter():
    m = LoRALinear(nn.Linear(32, 24).to(torch.bfloat16), rank=4, alpha=8)
    assert m.lora_A.dtype == torch.float32
    assert m(torch.randn(2, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
    m16 = LoRALinear(nn.Linear(32, 24).to(torch.bfloat16), rank=4, alpha=8, dtype=torch.bfloat16)
    assert m16.lora_A.dtype == torch.bfloat16


def test_merge_unmerge():
    base = nn.Linear(32, 24)
    w0 = base.weight.detach().clone()
    m = LoRALinear(base, rank=4, alpha=8)
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(5, 32)
    y = m(x)
    m.merge()
    assert m.merged
    torch.testing.assert_close(m(x), y)  # same function, now one GEMM
    torch.testing.assert_close(m.weight, w0 + m.scaling * m.lora_B @ m.lora_A)
    with pytest.raises(RuntimeError, match="already merged"):
        m.merge()
    m.unmerge()
    torch.testing.assert_close(m.weight, w0)  # fp32: exact up to one rounding
    with pytest.raises(RuntimeError, match="not merged"):
        m.unmerge()


def test_dropout_only_on_adapter_path_in_training():
    m = LoRALinear(nn.Linear(32, 24), rank=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(64, 32)
    m.eval()
    y_eval = m(x)
    torch.testing.assert_close(y_eval, lora_linear_ref(x, m.weight, m.bias, m.lora_A, m.lora_B, m.scaling)[0])
    m.train()
    y_train = m(x)
    assert not torch.allclose(y_train, y_eval)
    # The base path never sees dropout: removing the adapter's part leaves the base output.
    with torch.no_grad():
        m.lora_B.zero_()
    torch.testing.assert_close(m(x), nn.functional.linear(x, m.weight, m.bias))


def test_repr_is_informative():
    r = repr(LoRALinear(nn.Linear(32, 24, bias=False), rank=4, alpha=8))
    for part in ("in_features=32", "out_features=24", "bias=False", "rank=4", "alpha=8", "scaling=2", "merged=False"):
        assert part in r


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(rank=0), ValueError, "rank must be >= 1"),
    (dict(rank=25), ValueError, "exceeds min"),
    (dict(rank=2.0), TypeError, "rank must be an int"),
    (dict(rank=2, dropout=1.0), ValueError, "dropout must be in"),
])
def test_bad_construction(kwargs, exc, match):
    kwargs = {"alpha": 8, **kwargs}
    with pytest.raises(exc, match=match):
        LoRALinear(nn.Linear(32, 24), **kwargs)


def test_wrapping_a_non_linear_is_refused():
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        LoRALinear(nn.Conv1d(3, 3, 1), rank=1, alpha=1)


def test_frozen_adapters_add_up_and_merge():
    """freeze_adapter keeps the output, the frozen factors take no gradient, and merge /
    delta_weight cover the frozen adapters with the trainable one."""
    torch.manual_seed(0)
    m = StackedLoRALinear.install(LoRALinear(torch.nn.Linear(24, 20), rank=3, alpha=6.0))
    x = torch.randn(5, 24)
    adapters = []
    for _ in range(3):
        with torch.no_grad():
            m.lora_B.normal_()
        adapters.append((m.lora_A.detach().clone(), m.lora_B.detach().clone()))
        before = m(x)
        m.freeze_adapter()
        torch.testing.assert_close(m(x), before)  # the new adapter starts at B = 0
    assert m.frozen_A.shape == (9, 24) and m.frozen_B.shape == (20, 9) and "frozen_adapters=3" in repr(m)
    expected = sum(B @ A for A, B in adapters) * 2.0
    torch.testing.assert_close(m.delta_weight(), expected, rtol=1e-5, atol=1e-6)
    m(x).sum().backward()
    assert m.lora_B.grad is not None and m.frozen_B.grad is None
    assert "frozen_A" not in m.state_dict()  # strategies checkpoint them, the model's state dict is unchanged
    out = m(x)
    m.merge()
    torch.testing.assert_close(m(x), out, rtol=1e-5, atol=1e-5)


def test_a_plain_lora_linear_holds_one_adapter_and_stacking_is_installed_in_place():
    """LoRALinear carries no frozen-adapter state; StackedLoRALinear.install keeps the module's
    identity, Parameters, output and state-dict keys, and is idempotent."""
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(nn.Linear(24, 20), rank=3, alpha=6.0))
    m = model[0]
    assert not hasattr(m, "frozen_A") and not hasattr(m, "freeze_adapter") and "frozen" not in repr(m)
    assert list(dict(m.named_buffers())) == []
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(5, 24)
    before, keys, params = m(x), list(model.state_dict()), (m.weight, m.lora_A, m.lora_B)
    stacked = StackedLoRALinear.install(m)
    assert stacked is m and model[0] is m and isinstance(m, StackedLoRALinear)
    assert (m.weight, m.lora_A, m.lora_B) == params and list(model.state_dict()) == keys
    assert m.frozen_A.shape == (0, 24) and m.frozen_B.shape == (20, 0) and m.frozen_adapters == 0
    assert torch.equal(m(x), before)
    m.freeze_adapter()
    assert StackedLoRALinear.install(m) is m and m.frozen_adapters == 1  # a second install changes nothing
    with pytest.raises(TypeError, match="expected a LoRALinear"):
        StackedLoRALinear.install(nn.Linear(3, 3))


# --- issue 12 (defect 10): every argument checked at construction, naming it; the base is untouched on refusal ---


@pytest.mark.parametrize("kwargs,exc,field", [
    (dict(alpha=float("nan")), ValueError, "alpha"),
    (dict(alpha=float("inf")), ValueError, "alpha"),
    (dict(alpha=10 ** 400), ValueError, "alpha"),  # float() of it would be an OverflowError
    (dict(alpha="8"), TypeError, "alpha"),
    (dict(alpha=None), TypeError, "alpha"),
    (dict(alpha=False), TypeError, "alpha"),
    (dict(alpha=2j), TypeError, "alpha"),
    (dict(alpha=1e300), ValueError, "scaling"),  # 2.5e299 does not fit the fp32 adapter or weight
    (dict(rslora="no"), TypeError, "rslora"),
    (dict(rslora=0), TypeError, "rslora"),
    (dict(dropout=True), TypeError, "dropout"),
    (dict(dropout=None), TypeError, "dropout"),
    (dict(dropout=float("nan")), ValueError, "dropout"),
    (dict(dropout=-0.5), ValueError, "dropout"),
    (dict(dtype=torch.complex64), TypeError, "dtype"),
    (dict(dtype=torch.int32), TypeError, "dtype"),
    (dict(dtype=torch.float8_e5m2), TypeError, "dtype"),
    (dict(dtype="float32"), TypeError, "dtype"),
    (dict(rank=True), TypeError, "rank"),
    (dict(rank="4"), TypeError, "rank"),
])
def test_bad_argument_is_refused_and_the_base_is_untouched(kwargs, exc, field):
    base = nn.Linear(32, 24)
    weight, bias = base.weight, base.bias
    kwargs = {"rank": 4, "alpha": 8, **kwargs}
    with pytest.raises(exc) as err:
        LoRALinear(base, **kwargs)
    msg = str(err.value)
    assert msg.startswith("LoRALinear") and f"{field}" in msg and "\n" not in msg, msg
    assert base.weight is weight and base.bias is bias  # still registered on the linear layer
    assert weight.requires_grad and bias.requires_grad


@pytest.mark.parametrize("base_dtype,lora_dtype,alpha,ok", [
    (torch.float16, torch.float32, 65504.0, True),   # rank 1: scaling 65504, float16's largest finite value
    (torch.float16, torch.float32, 65536.0, False),  # beyond float16 though the fp32 adapter could hold it
    (torch.float32, torch.float16, 1e5, False),      # beyond the fp16 adapter
    (torch.float32, torch.float32, 3e38, True),
    (torch.float64, torch.float64, 1e300, True),     # float64 holds it
    (torch.float64, torch.float32, 1e300, False),
])
def test_scaling_must_fit_adapter_and_base_dtype(base_dtype, lora_dtype, alpha, ok):
    base = nn.Linear(8, 8).to(base_dtype)
    if ok:
        assert LoRALinear(base, rank=1, alpha=alpha, dtype=lora_dtype).scaling == alpha
    else:
        with pytest.raises(ValueError, match=r"LoRALinear: scaling = alpha/rank = .* overflows"):
            LoRALinear(base, rank=1, alpha=alpha, dtype=lora_dtype)
        assert isinstance(base.weight, nn.Parameter) and base.weight.requires_grad


def test_rslora_scaling_check_uses_the_square_root():
    # alpha/√r = 1e39/√4 = 5e38 > float32's 3.4e38; alpha/r = 2.5e38 would fit
    assert LoRALinear(nn.Linear(8, 8), rank=4, alpha=1e39).scaling == pytest.approx(2.5e38)
    with pytest.raises(ValueError, match=r"scaling = alpha/√rank"):
        LoRALinear(nn.Linear(8, 8), rank=4, alpha=1e39, rslora=True)


def test_wrapping_the_kept_aside_shell_is_refused():
    base = nn.Linear(16, 16)
    LoRALinear(base, rank=2, alpha=4)
    with pytest.raises(TypeError, match="LoRALinear: the nn.Linear's weight must be an nn.Parameter.*shell"):
        LoRALinear(base, rank=2, alpha=4)


def test_merge_refuses_a_non_finite_result_and_keeps_the_weight():
    m = LoRALinear(nn.Linear(16, 12), rank=2, alpha=4)
    with torch.no_grad():
        m.lora_B.normal_()
        m.lora_A[0, 3] = float("inf")
    w0 = m.weight.detach().clone()
    with pytest.raises(ValueError, match="not finite.*left unchanged"):
        m.merge()
    assert torch.equal(m.weight, w0) and not m.merged


def test_merge_keeps_an_fp64_weight_in_fp64():
    """The fold W + s·B·A runs in the wider of the weight's and fp32 (it used to round an fp64 W to fp32)."""
    m = LoRALinear(nn.Linear(16, 12).double(), rank=2, alpha=4)
    with torch.no_grad():
        m.lora_B.normal_()
    w0 = m.weight.detach().clone()
    m.merge()
    # fp64: entries of size ~1 carry ~1e-16 rounding; fp32 rounding of W would leave ~6e-8
    torch.testing.assert_close(m.weight, w0 + m.scaling * m.lora_B @ m.lora_A, rtol=0, atol=1e-12)
    m.unmerge()
    torch.testing.assert_close(m.weight, w0, rtol=0, atol=1e-12)

"""Property-based tests (hypothesis) of the three ops on the CPU (C++) kernels against fp64.

Shapes from zero rows up, leading dimensions, non-contiguous strides and every dtype pair are drawn at
random (a fixed seed, ``derandomize=True``: the same examples on every run, no database written), a
few dozen examples per property so the file runs in seconds. Tolerances: the three-way rule of
``conftest.assert_close_to_ref`` for lora_linear (through the checks of test_lora_linear), and bounds
derived from the dtype for the other two ops (each says why).
"""

import warnings

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_lora_linear import check_backward, check_forward

import slao_kernels
from slao_kernels.reference import orthonormalize_rows_ref

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

LORA_DTYPE_PAIRS = [  # (activations/base, adapter)
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16), (torch.float16, torch.float32), (torch.float64, torch.float64),
]
FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _randn(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _strided(t, how):
    """``t``'s values in a non-contiguous layout: a view with stride 2 in the last dimension, or the
    leading dimensions stored transposed."""
    if how == "step":
        big = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if how == "transposed" and t.dim() >= 3:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    return t


# --------------------------------------------------------------------------- lora_linear


@st.composite
def lora_cases(draw):
    n = draw(st.integers(1, 40))
    m = draw(st.integers(1, 40))
    r = draw(st.integers(1, min(n, m, 16)))
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    rows = draw(st.integers(1, 20))  # no rows at all: the explicit examples below
    dt, lora_dt = draw(st.sampled_from(LORA_DTYPE_PAIRS))
    return dict(n=n, m=m, r=r, shape=(*lead, rows, n), dt=dt, lora_dt=lora_dt, bias=draw(st.booleans()),
                layout=draw(st.sampled_from(["step", "transposed", "contiguous"])),
                scaling=draw(st.sampled_from([0.5, 2.0, 16.0])), seed=draw(st.integers(0, 2**16)))


EMPTY_LORA_CASES = [  # zero rows, alone and under leading dimensions (one of them empty too)
    dict(n=5, m=7, r=2, shape=(0, 5), dt=torch.float32, lora_dt=torch.float32, bias=True, layout="contiguous",
         scaling=2.0, seed=1),
    dict(n=6, m=4, r=3, shape=(2, 0, 6), dt=torch.bfloat16, lora_dt=torch.float32, bias=False, layout="step",
         scaling=0.5, seed=2),
    dict(n=3, m=3, r=1, shape=(0, 2, 3), dt=torch.float16, lora_dt=torch.float16, bias=True, layout="transposed",
         scaling=16.0, seed=3),
]


def _with_empty_examples(test):
    for case in EMPTY_LORA_CASES:
        test = example(case=case)(test)
    return test


@PROPERTY
@_with_empty_examples
@given(case=lora_cases())
def test_lora_linear_forward_backward_match_fp64(case):
    """Forward (out, lora_act) and backward (grad_x, grad_A, grad_B) of the C++ op within the three-way
    rule against fp64, the torch baseline keeping the adapter in its own dtype."""
    n, m, r, dt, lora_dt, seed = case["n"], case["m"], case["r"], case["dt"], case["lora_dt"], case["seed"]
    x = _strided(_randn(case["shape"], dt, seed), case["layout"])
    weight = _randn((m, n), dt, seed + 1, n ** -0.5)
    bias = _randn((m,), dt, seed + 2) if case["bias"] else None
    A = _randn((r, n), lora_dt, seed + 3, n ** -0.5)
    B = _randn((m, r), lora_dt, seed + 4, r ** -0.5)
    s = case["scaling"]
    out, act = torch.ops.slao.lora_linear(x, weight, bias, A, B, s)
    check_forward(out, act, x, weight, bias, A, B, s)
    dy = _strided(_randn(out.shape, dt, seed + 5), case["layout"])
    ga = _randn(act.shape, act.dtype, seed + 6)
    grads = torch.ops.slao.lora_linear_backward(dy, ga, x, weight, A, B, act, s, True)
    check_backward(grads, dy, ga, x, weight, A, B, act, s)


@PROPERTY
@_with_empty_examples
@given(case=lora_cases())
def test_lora_linear_autograd_matches_fp64_eager(case):
    """Through the public functional and autograd (x, A, B all require grad): the gradients of a fixed
    linear loss equal those of the fp64 eager composition within a bound of the compute dtype:
    |err| ≤ 8·eps·(Σ|terms|), with Σ|terms| the same products taken on absolute values (a rigorous
    bound on the rounding of any summation order is k·u·Σ|terms| for a k-term sum; 8·eps covers the
    two or three roundings in a row here, and one rounding of the stored dtype)."""
    n, m, r, dt, lora_dt, seed = case["n"], case["m"], case["r"], case["dt"], case["lora_dt"], case["seed"]
    x = _strided(_randn(case["shape"], dt, seed), case["layout"]).requires_grad_(True)
    weight = _randn((m, n), dt, seed + 1, n ** -0.5)
    A = _randn((r, n), lora_dt, seed + 3, n ** -0.5).requires_grad_(True)
    B = _randn((m, r), lora_dt, seed + 4, r ** -0.5).requires_grad_(True)
    s = case["scaling"]
    y = slao_kernels.lora_linear(x, weight, None, A, B, s)
    assert y.dtype == dt and y.shape == (*case["shape"][:-1], m)
    w_out = _randn(y.shape, torch.float64, seed + 7)
    gx, gA, gB = torch.autograd.grad((y.double() * w_out).sum(), (x, A, B))
    # fp64 expectations: dy = w_out; g = s·dy·B; grad_x = dy·W + g·A; grad_A = gᵀ·x; grad_B = s·dyᵀ·(x·Aᵀ).
    X, W, A64, B64 = x.detach().double(), weight.double(), A.detach().double(), B.detach().double()
    dy = w_out.reshape(-1, m)
    X2 = X.reshape(-1, n)
    g = s * dy @ B64
    want = (dy @ W + g @ A64, g.t() @ X2, s * dy.t() @ (X2 @ A64.t()))
    g_abs = s * dy.abs() @ B64.abs()
    bound = (dy.abs() @ W.abs() + g_abs @ A64.abs(), g_abs.t() @ X2.abs(),
             s * dy.abs().t() @ (X2.abs() @ A64.abs().t()))
    eps = torch.finfo(torch.float32 if dt == torch.float64 else dt).eps
    for name, got, w, b, like in zip(("grad_x", "grad_A", "grad_B"), (gx.reshape(-1, n), gA, gB), want, bound,
                                     (x, A, B), strict=True):
        assert got.dtype == like.dtype, name
        e = eps if like.dtype != torch.float64 else torch.finfo(torch.float64).eps
        err = (got.double() - w).abs()
        assert (err <= 8 * e * b + torch.finfo(like.dtype).tiny).all(), (name, err.max().item())


# --------------------------------------------------------------------------- orthonormalize_rows(_)


@st.composite
def ortho_cases(draw):
    r = draw(st.integers(1, 12))
    n = draw(st.integers(r, 48))
    return dict(batch=draw(st.integers(1, 4)), r=r, n=n, dtype=draw(st.sampled_from(FLOATS)),
                scale=draw(st.sampled_from([1e-3, 1.0, 1e3])), transposed=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


def _ortho_input(case):
    shape = (case["batch"], case["r"], case["n"])
    A = _randn(shape, case["dtype"], case["seed"], case["scale"])
    if case["transposed"]:  # the same values, stored n-major: a non-contiguous (b, r, n) view
        A = A.transpose(1, 2).contiguous().transpose(1, 2)
    return A


def _ortho_tol(dtype, n):
    """max|QQᵀ − I| allowed: fp64 is Householder in fp64 (≤ n·2^-52 in its error analysis); fp32 the
    kernel's checked contract 1e-5; 16-bit one rounding of an orthonormal row to eps/2 per entry, which
    moves a row's norm² by at most eps·Σ|q_k| ≤ eps·√n (and an off-diagonal entry likewise)."""
    if dtype == torch.float64:
        return n * torch.finfo(torch.float64).eps
    if dtype == torch.float32:
        return 1e-5
    return torch.finfo(dtype).eps * n ** 0.5 + 1e-5


@PROPERTY
@given(ortho_cases())
def test_orthonormalize_rows_properties(case):
    """For any A: the same shape and dtype; orthonormal rows; A's rows in their span; Q·Aᵀ (= R of
    Aᵀ = Q·R) upper triangular with a non-negative diagonal; and Q equal to the fp64 Householder
    reference where Q is determined (cond(A) small enough for the bound cond·√n·u to say something)."""
    A = _ortho_input(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a rank-deficient draw warns; its completion is still checked
        Q = slao_kernels.orthonormalize_rows(A)
    assert Q.shape == A.shape and Q.dtype == A.dtype
    n, dt = case["n"], case["dtype"]
    Qd, Ad = Q.double(), A.double()
    eye = torch.eye(case["r"], dtype=torch.float64)
    assert (Qd @ Qd.transpose(1, 2) - eye).abs().max().item() <= _ortho_tol(dt, n)
    acc_eps = torch.finfo(torch.float64 if dt == torch.float64 else torch.float32).eps
    out_eps = torch.finfo(dt).eps
    sv = torch.linalg.svdvals(Ad)
    cond = (sv[:, 0] / sv[:, -1]).clamp_max(1e30)
    norm = sv[:, 0]
    for i in range(A.shape[0]):
        # Span: A = (A·Qᵀ)·Q to the output's rounding (Q stored to eps/2, so ‖A − AQᵀQ‖ ≲ 2·√n·eps·‖A‖).
        resid = (Ad[i] - Ad[i] @ Qd[i].t() @ Qd[i]).abs().max().item()
        assert resid <= 4 * n ** 0.5 * out_eps * norm[i].item(), (i, resid)
        R = Qd[i] @ Ad[i].t()
        below = torch.tril(R, diagonal=-1).abs().max().item() if case["r"] > 1 else 0.0
        assert below <= 4 * n ** 0.5 * out_eps * norm[i].item()
        assert (torch.diagonal(R) >= -4 * n ** 0.5 * out_eps * norm[i].item()).all()
    Q_ref = orthonormalize_rows_ref(Ad)[0]
    for i in range(A.shape[0]):
        # Perturbation of QR: ‖ΔQ‖ ≲ cond·(backward error ~ √n·u) of the compute precision, plus the
        # output's rounding; compared only where that bound is below 0.1.
        bound = 4 * cond[i].item() * n ** 0.5 * acc_eps + out_eps
        if bound < 0.1:
            assert (Qd[i] - Q_ref[i]).abs().max().item() <= bound, (i, cond[i].item())


@PROPERTY
@given(ortho_cases())
def test_orthonormalize_rows_in_place_is_the_functional(case):
    """The in-place op writes exactly (bit for bit) what the functional returns, on the list of the
    matrices and on the contiguous batch; the fp64 properties of the result are those checked above."""
    A = _ortho_input(case).contiguous()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = slao_kernels.orthonormalize_rows(A)
        as_list = [M.clone() for M in A]
        assert slao_kernels.orthonormalize_rows_(as_list) is as_list
        batch = A.clone()
        slao_kernels.orthonormalize_rows_(batch)
    for i, M in enumerate(as_list):
        assert torch.equal(M, want[i]), i
    assert torch.equal(batch, want)


@pytest.mark.parametrize("dtype", FLOATS)
def test_orthonormalize_rows_empty_batch(dtype):
    """A batch of no matrices: an empty result of the same shape and dtype, in place a no-op."""
    A = torch.zeros(0, 3, 7, dtype=dtype)
    Q = slao_kernels.orthonormalize_rows(A)
    assert Q.shape == (0, 3, 7) and Q.dtype == dtype
    assert slao_kernels.orthonormalize_rows_(A) is A and slao_kernels.orthonormalize_rows([]) == []


@PROPERTY
@given(st.integers(0, 5), st.integers(1, 8), st.sampled_from(FLOATS))
def test_orthonormalize_rows_rejects_bad_shapes(r_minus, n, dtype):
    """No rows, or more rows than columns: a ValueError naming the shape, never a kernel error."""
    r = 0 if r_minus == 0 else n + r_minus
    with pytest.raises(ValueError, match="no rows|more rows than columns"):
        slao_kernels.orthonormalize_rows(torch.zeros(r, n, dtype=dtype))


# --------------------------------------------------------------------------- scaled_merge_


@st.composite
def merge_cases(draw):
    shapes = draw(st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=3).map(tuple), max_size=4))
    return dict(shapes=shapes, dtypes=[draw(st.sampled_from(FLOATS)) for _ in shapes],
                lam=draw(st.sampled_from([0.0, 1.0, 0.5 ** 0.5, 1 / 3, -0.25, 1.5])),
                check_finite=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


@PROPERTY
@given(merge_cases())
def test_scaled_merge_matches_fp64(case):
    """m ← (1 − λ)·m + λ·f per tensor, any shapes (empty ones too) and dtypes in one call, against fp64:
    the op computes in fp32 (fp64 for fp64), two products and a sum, each rounded (≤ 3 roundings of
    u_acc = eps_acc/2 on |1 − λ|·|m| + |λ|·|f|), then rounds once to the stored dtype (eps/2 of the
    result); subnormals add at most the dtype's smallest normal. λ = 0 and 1 are exact."""
    lam = case["lam"]
    layers = list(enumerate(zip(case["shapes"], case["dtypes"], strict=True)))
    merged = [_randn(s, d, case["seed"] + i) for i, (s, d) in layers]
    fine = [_randn(s, d, case["seed"] + 100 + i) for i, (s, d) in layers]
    before = [m.clone() for m in merged]
    assert slao_kernels.scaled_merge_(merged, fine, lam, check_finite=case["check_finite"]) is merged
    for m, m0, f in zip(merged, before, fine, strict=True):
        assert m.dtype == m0.dtype and m.shape == m0.shape
        if lam in (0.0, 1.0):
            assert torch.equal(m, m0 if lam == 0.0 else f)
            continue
        exact = (1 - lam) * m0.double() + lam * f.double()
        u_acc = torch.finfo(torch.float64 if m.dtype == torch.float64 else torch.float32).eps / 2
        bound = (3 * u_acc * (abs(1 - lam) * m0.double().abs() + abs(lam) * f.double().abs())
                 + torch.finfo(m.dtype).eps / 2 * exact.abs() + torch.finfo(m.dtype).tiny)
        assert ((m.double() - exact).abs() <= bound).all()


@PROPERTY
@given(merge_cases(), st.integers(0, 3))
def test_scaled_merge_refuses_a_non_contiguous_tensor_and_writes_nothing(case, which):
    """A non-contiguous tensor anywhere in the list: ValueError naming it, and no tensor written."""
    if not case["shapes"]:
        return
    which = which % len(case["shapes"])
    layers = enumerate(zip(case["shapes"], case["dtypes"], strict=True))
    merged = [_randn((*s, 2), d, case["seed"] + i) for i, (s, d) in layers]
    fine = [torch.zeros_like(m) for m in merged]
    merged[which] = merged[which].transpose(-1, -2).contiguous().transpose(-1, -2)
    fine[which] = torch.zeros_like(merged[which])  # same strides as its counterpart
    if merged[which].is_contiguous():  # a size-1 or empty dimension keeps it contiguous
        return
    before = [m.clone() for m in merged]
    with pytest.raises(ValueError, match=rf"merged\[{which}\] and fine_tuned\[{which}\] must be contiguous"):
        slao_kernels.scaled_merge_(merged, fine, 0.5)
    assert all(torch.equal(m, b) for m, b in zip(merged, before, strict=True))

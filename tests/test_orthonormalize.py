"""slao::orthonormalize_rows against an fp64 Householder reference: accuracy by
condition number, the stable path, rank deficiency, zero input, dtypes, lists."""

import warnings

import pytest
import torch

import slao_kernels
from slao_kernels.reference import orthonormalize_rows_inplace_ref, orthonormalize_rows_ref


def with_condition(b, r, n, cond, dtype=torch.float32, seed=0):
    """b random r×n matrices with singular values spread log-evenly over [1/cond, 1]."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(b, r, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(b, n, r, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), r, dtype=torch.float64)
    return ((U * s) @ V.transpose(1, 2)).to(dtype)


def orthonormality_error(Q):
    Q = Q.double()
    return (Q @ Q.transpose(-1, -2) - torch.eye(Q.shape[-2], dtype=torch.float64)).abs().amax().item()


@pytest.mark.parametrize("cond", [1.0, 1e1, 1e2, 1e3])
# (8, 70) and (16, 512), (64, 200) and (80, 300): the CPU Gram's two loop orders (column-blocked up to rank 32,
# per tile above)
@pytest.mark.parametrize("r,n", [(1, 70), (8, 70), (16, 512), (64, 200), (80, 300)])
def test_matches_fp64_householder_up_to_cond_1e3(cond, r, n):
    """‖Q − Q_ref‖ (max entry) ≤ 1e-5 for cond ≤ 1e3: fp32 arithmetic gives ~cond·2^-24 ≈ 6e-5 in the
    worst case, and 1e-5 in practice because the Gram matrices and Cholesky factors are fp64."""
    A = with_condition(6, r, n, cond)
    Q = slao_kernels.orthonormalize_rows(A)
    Q_ref = orthonormalize_rows_ref(A.double())[0]
    assert Q.dtype == A.dtype and Q.shape == A.shape
    assert (Q.double() - Q_ref).abs().amax().item() <= 1e-5
    assert orthonormality_error(Q) <= 1e-5


@pytest.mark.parametrize("cond,deficient", [(1e4, False), (1e5, None), (1e6, True), (1e7, True)])
def test_ill_conditioned_stays_orthonormal(cond, deficient):
    """Beyond CholeskyQR2's range the check routes matrices to Householder: still orthonormal rows,
    still the sign-fixed factor (diag(Q·Aᵀ) = diag(R) > 0)."""
    A = with_condition(6, 16, 300, cond)
    # Rank rule at fp32: min|R_jj| ≤ n·eps·max|R_jj| (n·eps = 3.6e-5 here). |R_jj| ≥ σ_min, so
    # cond 1e5 sits on the boundary (None: not asserted); 1e4 is clearly full rank, 1e6+ clearly not.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Q = slao_kernels.orthonormalize_rows(A)
    if deficient is not None:
        assert any("rank-deficient" in str(w.message) for w in caught) == deficient
    assert orthonormality_error(Q) <= 1e-5
    diag_R = torch.diagonal(Q.double() @ A.double().transpose(1, 2), dim1=-2, dim2=-1)
    assert (diag_R > 0).all()


def test_rank_deficient_and_zero_input_complete_the_basis_with_a_warning():
    A = torch.randn(3, 4, 50)
    A[0, 2] = A[0, 0] + A[0, 1]  # rank 3
    A[1] = 0.0  # rank 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Q = slao_kernels.orthonormalize_rows(A)
    messages = [str(w.message) for w in caught if "rank-deficient" in str(w.message)]
    assert len(messages) == 1 and "A[0], A[1] are numerically rank-deficient" in messages[0], messages
    assert orthonormality_error(Q) <= 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(slao_kernels.orthonormalize_rows(A), Q)  # deterministic
    # The full-rank part of the span is kept: rows 0 and 1 of A[0] lie in span(Q[0]).
    P = Q[0].double().t() @ Q[0].double()
    torch.testing.assert_close(A[0, :2].double() @ P, A[0, :2].double())
    torch.testing.assert_close(Q[1].double() @ Q[1].double().t(), torch.eye(4, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(dtype):
    A = with_condition(4, 8, 64, 10.0, dtype)
    Q = slao_kernels.orthonormalize_rows(A)
    assert Q.dtype == dtype
    Q_ref = orthonormalize_rows_ref(A.double())[0]
    tol = 1e-12 if dtype == torch.float64 else torch.finfo(dtype).eps  # one rounding to the output dtype
    assert (Q.double() - Q_ref).abs().amax().item() <= tol


@pytest.mark.parametrize("cond", [1.0, 1e4, 1e8])
@pytest.mark.parametrize("path", ["batch", "in_place"])
def test_fp64_has_fp64_accuracy(cond, path):
    """The fp64 contract: fp64 Householder on every path, so the rows are orthonormal to fp64 rounding and
    Q is within cond·n·2^-53 of an independent fp64 QR (numpy's LAPACK through torch.linalg.qr of the same
    Aᵀ, signs fixed here). One-pass CholeskyQR in fp64 was accepted at cond 1e4 with an error of ~3e-9."""
    A = with_condition(4, 16, 300, cond, torch.float64, seed=3)
    if path == "batch":
        Q = slao_kernels.orthonormalize_rows(A)
    else:
        Q = A.clone()
        slao_kernels.orthonormalize_rows_(Q)
    Qh, R = torch.linalg.qr(A.transpose(1, 2))
    Qh = (Qh * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)).transpose(1, 2)
    eps = torch.finfo(torch.float64).eps
    assert orthonormality_error(Q) <= 300 * eps  # n·u: Householder's orthogonality
    assert (Q - Qh).abs().amax().item() <= cond * 300 * eps  # forward error of any backward-stable QR


def test_sign_convention_matches_linalg_qr_with_positive_diagonal():
    A = torch.randn(5, 6, 40, dtype=torch.float64)
    Q = slao_kernels.orthonormalize_rows(A)
    R = Q @ A.transpose(1, 2)  # = R of Aᵀ = Q·R, upper triangular
    assert (torch.diagonal(R, dim1=-2, dim2=-1) > 0).all()
    torch.testing.assert_close(torch.tril(R, diagonal=-1), torch.zeros_like(R), atol=1e-12, rtol=0)


def test_list_of_mixed_shapes_keeps_order():
    mats = [torch.randn(4, 64), torch.randn(4, 32), torch.randn(4, 64, dtype=torch.float64), torch.randn(4, 64)]
    out = slao_kernels.orthonormalize_rows(mats)
    assert [tuple(q.shape) for q in out] == [tuple(m.shape) for m in mats]
    for m, q in zip(mats, out, strict=True):
        torch.testing.assert_close(q.double(), orthonormalize_rows_ref(m.double()[None])[0][0], atol=1e-5, rtol=0)


def test_single_matrix_and_opcheck():
    A = torch.randn(4, 20)
    assert slao_kernels.orthonormalize_rows(A).shape == (4, 20)
    torch.library.opcheck(torch.ops.slao.orthonormalize_rows.default, (torch.randn(3, 4, 20),))


@pytest.mark.parametrize("A,exc,match", [
    (torch.randn(5, 4), ValueError, "more rows than columns"),
    (torch.randn(2, 2, 4, 5), ValueError, r"\(r, n\) or \(batch, r, n\)"),
    (torch.randint(0, 3, (2, 5)), TypeError, "floating-point"),
    ([torch.randn(2, 5), torch.randn(1, 2, 5)], ValueError, r"A\[1\] must be a 2-D"),
    (torch.randn(0, 5), ValueError, "has no rows"),
])
def test_bad_input(A, exc, match):
    with pytest.raises(exc, match=match):
        slao_kernels.orthonormalize_rows(A)


# --------------------------------------------------------------------------- in place

def test_in_place_matches_the_result_of_the_functional():
    """The in-place op computes exactly what orthonormalize_rows returns, for every path:
    CholeskyQR with one pass, with two (cond 1e3), Householder (cond 1e6), other dtypes, shapes."""
    A = [with_condition(1, 16, 300, 1.0)[0], with_condition(1, 16, 300, 1e3)[0], with_condition(1, 8, 64, 1e6)[0],
         torch.randn(4, 70).bfloat16(), torch.randn(3, 33, dtype=torch.float64), torch.randn(16, 300)]
    work = [a.clone() for a in A]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cond 1e6 is rank-deficient at fp32: warned, tested below
        expected = slao_kernels.orthonormalize_rows([a.clone() for a in A])
        assert slao_kernels.orthonormalize_rows_(work) is work
    for i, (got, want) in enumerate(zip(work, expected, strict=True)):
        assert got.dtype == A[i].dtype and torch.equal(got, want), i
    batch = with_condition(5, 8, 90, 10.0)
    same = slao_kernels.orthonormalize_rows_(batch)
    assert same is batch and torch.equal(batch, slao_kernels.orthonormalize_rows(with_condition(5, 8, 90, 10.0)))


def test_in_place_warns_for_rank_deficient_matrices_and_passes_opcheck():
    A = [torch.randn(4, 50), torch.zeros(4, 50)]
    with pytest.warns(RuntimeWarning, match=r"orthonormalize_rows_: A\[1\] is numerically rank-deficient"):
        slao_kernels.orthonormalize_rows_(A)
    assert orthonormality_error(A[1]) <= 1e-12  # completed in fp64, stored in fp32 exactly enough
    torch.library.opcheck(torch.ops.slao.orthonormalize_rows_.default, ([torch.randn(3, 20), torch.randn(2, 9)],))


def test_in_place_bad_input():
    with pytest.raises(ValueError, match="must be contiguous"):
        slao_kernels.orthonormalize_rows_([torch.randn(20, 4).t()])
    with pytest.raises(ValueError, match="more rows than columns"):
        slao_kernels.orthonormalize_rows_([torch.randn(5, 4)])


@pytest.mark.parametrize("threads", [1, 2])
def test_in_place_on_parameters_under_no_grad_at_any_thread_count(threads):
    """SLAO's task switch: orthonormalize_rows_ on the layers' nn.Parameters inside torch.no_grad(). With two
    threads the parallel workers did not inherit no_grad and the kernel's GEMMs raised
    "mm(): functions with out=... arguments don't support automatic differentiation"."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        params = [torch.nn.Parameter(with_condition(1, 8, 64, 10.0, seed=i)[0]) for i in range(4)]
        expected = slao_kernels.orthonormalize_rows([p.detach().clone() for p in params])
        with torch.no_grad():
            assert slao_kernels.orthonormalize_rows_(params) is params
        for p, q in zip(params, expected, strict=True):
            assert p.requires_grad and torch.equal(p.detach(), q)
    finally:
        torch.set_num_threads(old)


def test_functional_on_a_tensor_that_requires_grad():
    """The functional's kernel ran its GEMMs on a tensor that requires grad and raised (any thread count)."""
    A = torch.randn(4, 8, 64, requires_grad=True)
    torch.testing.assert_close(slao_kernels.orthonormalize_rows(A).double(),
                               orthonormalize_rows_ref(A.detach().double())[0], atol=1e-5, rtol=0)


def test_in_place_under_grad_mode_is_refused_before_any_write():
    plain, param = torch.randn(4, 30), torch.nn.Parameter(torch.randn(4, 30))
    before = [plain.clone(), param.detach().clone()]
    with pytest.raises(ValueError, match=r"A\[1\] requires grad and grad mode is on.*torch.no_grad"):
        slao_kernels.orthonormalize_rows_([plain, param])
    assert torch.equal(plain, before[0]) and torch.equal(param.detach(), before[1])
    with pytest.raises(ValueError, match=r"A requires grad and grad mode is on"):
        slao_kernels.orthonormalize_rows_(torch.randn(2, 4, 30, requires_grad=True))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_non_finite_input_is_refused_naming_the_matrix(bad, dtype):
    """A NaN/Inf matrix has no row basis: ValueError naming it (the result used to be NaN), and the in-place
    op writes nothing, not even the finite matrices around it."""
    A = torch.randn(3, 4, 30).to(dtype)
    A[1, 2, 7] = bad
    with pytest.raises(ValueError, match=r"A\[1\] holds NaN or Inf"):
        slao_kernels.orthonormalize_rows(A)
    with pytest.raises(ValueError, match=r"A\[1\] holds NaN or Inf"):
        slao_kernels.orthonormalize_rows([A[0], A[1], A[2]])
    with pytest.raises(ValueError, match=r"^A holds NaN or Inf"):
        slao_kernels.orthonormalize_rows(A[1])
    work = [a.clone() for a in A]
    with pytest.raises(ValueError, match=r"A\[1\] holds NaN or Inf.*nothing was written"):
        slao_kernels.orthonormalize_rows_(work)
    for w, a in zip(work, A, strict=True):
        torch.testing.assert_close(w, a, rtol=0, atol=0, equal_nan=True)  # untouched, NaN included
    with pytest.raises(ValueError, match=r"A\[1\] holds NaN or Inf"):
        orthonormalize_rows_ref(A)
    with pytest.raises(ValueError, match=r"A\[1\] holds NaN or Inf.*nothing was written"):
        orthonormalize_rows_inplace_ref(work)  # the CPU kernel when the C++ build is missing
    torch.testing.assert_close(work[0], A[0], rtol=0, atol=0)


def test_finite_input_whose_gram_overflows_is_not_refused():
    """Entries near 1e25 are finite in fp32 but their squares are not: the CPU kernel's finiteness check,
    which reads the fp32 matrices' first Gram diagonal, must tell that overflow from an Inf or NaN entry
    (an exact check of that matrix), and the result comes from the fp64 path, orthonormal and sign-fixed."""
    A = torch.randn(3, 4, 30, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    A[1] *= 1e25  # |a|² ≈ 1e50 > fp32 max (3.4e38)
    A = A.float()
    assert torch.isfinite(A).all() and not torch.isfinite(A[1].square().sum(1)).all()
    work = [a.clone() for a in A]
    Q = slao_kernels.orthonormalize_rows(A)
    slao_kernels.orthonormalize_rows_(work)
    Q_ref = orthonormalize_rows_ref(A.double())[0]
    for q in (Q, torch.stack(work)):
        assert orthonormality_error(q) <= 1e-5
        # well conditioned (cond of a 4x30 Gaussian ~2), so ΔQ ≲ cond·√n·2^-24 + one fp32 rounding
        assert (q.double() - Q_ref).abs().amax().item() <= 1e-5
    assert torch.equal(Q, torch.stack(work))


def duplicated_row_matrices(dtype):
    """Matrices with an exactly repeated row (and a zero one): the repeated row's R_jj is rounding noise.
    Before the fix the CPU fast path accepted a few of these small ones (5 of the 200 (2, 3) fp32 matrices)
    with the noise row's direction, up to 1.8 away from the reference's."""
    g = torch.Generator().manual_seed(0)
    mats = []
    for (r, n), count in [((2, 3), 200), ((2, 4), 200), ((3, 5), 200), ((4, 30), 6), ((8, 64), 6), ((16, 300), 6)]:
        batch = torch.randn(count, r, n, generator=g).to(dtype)
        batch[:, r - 1] = batch[:, 0]
        mats.extend(batch.unbind(0))
    mats.append(torch.zeros(4, 9, dtype=dtype))
    return mats


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rank_deficient_completion_is_the_same_on_every_path(dtype):
    """The completion depends on the matrix alone: batched, one matrix at a time, in a list, in place
    (list and batch) and the reference give the same bits; its rows are orthonormal, span the matrix's
    rows, and rows without a direction of their own get the deterministic canonical completion."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mats = duplicated_row_matrices(dtype)
        by_shape = {}
        for i, M in enumerate(mats):
            by_shape.setdefault(tuple(M.shape), []).append(i)
        single = [slao_kernels.orthonormalize_rows(M) for M in mats]
        listed = slao_kernels.orthonormalize_rows(mats)
        in_place = [M.clone() for M in mats]
        slao_kernels.orthonormalize_rows_(in_place)
        for idx in by_shape.values():
            batch = torch.stack([mats[i] for i in idx])
            batched = slao_kernels.orthonormalize_rows(batch)
            ref = orthonormalize_rows_ref(batch)[0]
            slao_kernels.orthonormalize_rows_(batch)
            for j, i in enumerate(idx):
                for name, got in (("batched", batched[j]), ("listed", listed[i]), ("in place", in_place[i]),
                                  ("batch in place", batch[j]), ("reference", ref[j])):
                    assert torch.equal(got, single[i]), (name, tuple(mats[i].shape), j)
    for M, Q in zip(mats, single, strict=True):
        tol = 1e-12 if dtype == torch.float64 else torch.finfo(dtype).eps  # one rounding of fp64 results
        Qd, Md = Q.double(), M.double()
        assert orthonormality_error(Qd) <= 2 * tol * M.shape[1] ** 0.5
        scale = Md.abs().max().item() or 1.0
        assert (Md @ Qd.t() @ Qd - Md).abs().max().item() <= 4 * tol * scale * M.shape[1] ** 0.5  # span kept
    Z = single[-1]
    assert torch.equal(Z, torch.eye(4, 9, dtype=dtype))  # zero matrix: the identity rows


# --------------------------------------------------------------------------- the Triton kernel

from conftest import KERNEL_DEVICE  # noqa: E402

from slao_kernels.ops.orthonormalize import orthonormalize_rows_triton  # noqa: E402


@pytest.mark.parametrize("r,n", [(1, 40), (8, 70), (16, 150), (40, 90), (64, 64)])
def test_triton_matches_fp64_householder(r, n):
    A = with_condition(2, r, n, 1e3).to(KERNEL_DEVICE)
    Q, deficient = orthonormalize_rows_triton(A)
    Q_ref = orthonormalize_rows_ref(A.double().cpu())[0]
    assert Q.dtype == A.dtype and not deficient.any()
    assert (Q.double().cpu() - Q_ref).abs().amax().item() <= 1e-5
    assert orthonormality_error(Q.cpu()) <= 1e-5


def test_triton_routes_ill_conditioned_and_rank_deficient_to_householder():
    A = torch.cat([with_condition(1, 8, 60, 1e6), with_condition(1, 8, 60, 10.0), torch.zeros(1, 8, 60)])
    A[1, 3] = A[1, 0] - A[1, 2]
    Q, deficient = orthonormalize_rows_triton(A.to(KERNEL_DEVICE))
    assert deficient.tolist() == [True, True, True]  # cond 1e6 > 1/(n·eps) in fp32; the others by construction
    assert orthonormality_error(Q.cpu()) <= 1e-5
    torch.testing.assert_close(Q.cpu()[2], torch.eye(8, 60))  # zero input: the canonical completion


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision_inputs(dtype):
    A = with_condition(2, 8, 70, 10.0, dtype).to(KERNEL_DEVICE)
    Q, _ = orthonormalize_rows_triton(A)
    assert Q.dtype == dtype
    assert (Q.double().cpu() - orthonormalize_rows_ref(A.double().cpu())[0]).abs().amax() <= torch.finfo(dtype).eps


def test_cuda_entry_points_refuse_non_finite_before_writing():
    """The CUDA registrations (here on KERNEL_DEVICE) check every matrix before the first launch or write."""
    from slao_kernels.ops.orthonormalize import _cuda, _cuda_inplace

    A = torch.randn(3, 4, 40, device=KERNEL_DEVICE)
    A[2, 1, 5] = float("inf")
    with pytest.raises(ValueError, match=r"orthonormalize_rows: A\[2\] holds NaN or Inf"):
        _cuda(A)
    work = [torch.randn(4, 40, device=KERNEL_DEVICE), torch.randn(4, 20, device=KERNEL_DEVICE), A[2].clone()]
    before = [w.clone() for w in work]
    with pytest.raises(ValueError, match=r"orthonormalize_rows_: A\[2\] holds NaN or Inf.*nothing was written"):
        _cuda_inplace(work)
    for w, b in zip(work, before, strict=True):
        torch.testing.assert_close(w, b, rtol=0, atol=0)

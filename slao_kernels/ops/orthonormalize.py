r"""Batched orthonormalization of LoRA A factors: SLAO's initialization.

For task i ≥ 2, every adapted layer starts from ``A ← Qᵀ`` where
``A_ft,i−1ᵀ = Q·R`` is the reduced QR factorization with ``diag(R) > 0``
(sign(0) = +1). ``Qᵀ`` (r×n) has orthonormal rows spanning the previous
fine-tuned A's row space. Source: "Merge before Forget" (arXiv 2512.23017),
docs/design.md §1.2.

Inputs are a (b, r, n) batch or a list of (r, n) matrices of mixed shapes
(q/k/v/o/gate/up/down), grouped by shape, one kernel call per group. Computed
in fp32 at least; returned in the input dtype.

CPU: ``csrc/orthonormalize.cpp``: CholeskyQR2 per matrix, in place in the
output, every result checked (``max|QQᵀ − I| ≤ 1e-5``, and every
``diag(R) > max(n·eps, √eps)·max_j ‖a_j‖``) and the failures (ill-conditioned
or rank-deficient) redone by fp64 Householder QR, one matrix at a time.

Accuracy contract, per input dtype (tests/test_orthonormalize.py):

* fp64: always fp64 Householder QR (``torch.linalg.qr``), so the result is
  orthonormal to fp64 rounding (``max|QQᵀ − I|`` ~ n·2^-53) and equals the
  reference's.
* fp32: ``max|QQᵀ − I| ≤ 1e-5``; ``Q`` within ~cond(A)·2^-24 of the fp64 result.
* bf16 / fp16: computed as fp32, then one rounding to the input dtype.

Rank deficiency: a row whose ``R_jj`` is at the fp64 rounding level has no
direction of its own; it gets a deterministic completion (the canonical vector
with the largest residual against the rows before it; a zero matrix gives the
identity rows), computed by the same fp64 steps on every path (batched, one
matrix, in place, Triton's host fallback) and in the reference, so no path's
result depends on rounding noise. Non-finite input raises ``ValueError``
naming the matrix; nothing is written. The in-place op on tensors that require
grad must run under ``torch.no_grad()`` (it raises otherwise); there it works
on ``nn.Parameter`` s at any thread count.
CUDA (Triton): the same algorithm, one program per matrix. The Gram matrices
are ``tl.dot`` products over column tiles (IEEE fp32), the r×r Cholesky and
triangular inverse run in registers (column j extracted by a masked
reduction), and ``X ← L⁻¹·X`` is applied tile by tile in place in an fp32
workspace. The same checks flag matrices for the host's fp64 Householder
fallback. Ranks above 64 use the reference.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from slao_kernels import reference
from slao_kernels._checks import check_tensor
from slao_kernels._ops import register_kernels
from slao_kernels.ops._triton import AotSpec, rank_block
from slao_kernels.ops.tuning import Candidate, problem_key, tuner

ORTHO_TOL = tl.constexpr(1e-5)  # largest accepted max|QQᵀ − I|, as in csrc/orthonormalize.cpp

# --------------------------------------------------------------------------- kernels


@triton.jit
def _cholesky_inverse(G, R, R_PAD: tl.constexpr):
    """``(L⁻¹, ok)`` for ``G = L·Lᵀ`` (R_PAD×R_PAD fp32, valid block R×R); padding acts as identity."""
    rows = tl.arange(0, R_PAD)
    cols = tl.arange(0, R_PAD)
    eye = (rows[:, None] == cols[None, :]).to(tl.float32)
    G = G + eye * (rows[:, None] >= R).to(tl.float32)
    L = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
    ok = True
    for j in range(0, R_PAD):  # right-looking Cholesky
        col = tl.sum(tl.where(cols[None, :] == j, G, 0.0), axis=1)  # G[:, j]
        d = tl.sum(tl.where(rows == j, col, 0.0), axis=0)  # G[j, j]
        ok = ok & (d > 0.0)
        s = tl.sqrt(tl.where(d > 0.0, d, 1.0))
        lj = tl.where(rows >= j, col / s, 0.0)  # L[:, j]
        L = tl.where(cols[None, :] == j, lj[:, None], L)
        G = G - lj[:, None] * lj[None, :]
    Linv = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
    for i in range(0, R_PAD):  # forward substitution, row i of L⁻¹ from rows < i
        l_row = tl.sum(tl.where(rows[:, None] == i, L, 0.0), axis=0)  # L[i, :]
        l_ii = tl.sum(tl.where(cols == i, l_row, 0.0), axis=0)
        l_ii = tl.where(l_ii != 0.0, l_ii, 1.0)  # a failed factorization (ok = False) stays finite
        coef = tl.where(cols < i, l_row, 0.0)
        acc = tl.sum(coef[:, None] * Linv, axis=0)  # Σ_k<i L[i,k]·L⁻¹[k,:]
        row_i = ((cols == i).to(tl.float32) - acc) / l_ii
        Linv = tl.where(rows[:, None] == i, row_i[None, :], Linv)
    return Linv, ok


@triton.jit
def _column_tile(a_rows, q_rows, n0, offs, N, row_ok, stride_an, stride_qn, from_a):
    """``(tile, mask)``: columns [n0, n0 + BLOCK_N) of A (as fp32) when ``from_a``, else of Q."""
    mask = row_ok[:, None] & (n0 + offs < N)[None, :]
    if from_a:
        x = tl.load(a_rows + (n0 + offs)[None, :] * stride_an, mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.load(q_rows + (n0 + offs)[None, :] * stride_qn, mask=mask, other=0.0)
    return x, mask


@triton.jit
def _cholesky_qr2_kernel(
    a_ptr, q_ptr, ok_ptr,
    R, N,
    stride_ab, stride_ar, stride_an, stride_qb, stride_qr, stride_qn,
    accept_tol,
    R_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One matrix: q ← CholeskyQR2(a) (fp32), ok ← the result passed every check."""
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, R_PAD)
    offs = tl.arange(0, BLOCK_N)
    row_ok = rows < R
    a_rows = a_ptr + pid * stride_ab + rows[:, None] * stride_ar
    q_rows = q_ptr + pid * stride_qb + rows[:, None] * stride_qr
    ok = True
    for p in range(0, 2):  # pass 1 reads a, pass 2 reads q; both write q
        G = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            x, _ = _column_tile(a_rows, q_rows, n0, offs, N, row_ok, stride_an, stride_qn, p == 0)
            G = tl.dot(x, tl.trans(x), G, input_precision="ieee")
        Linv, ok_p = _cholesky_inverse(G, R, R_PAD)
        ok = ok & ok_p
        for n0 in range(0, N, BLOCK_N):
            x, mask = _column_tile(a_rows, q_rows, n0, offs, N, row_ok, stride_an, stride_qn, p == 0)
            # Column tiles are independent: each is overwritten by its own product.
            tl.store(q_rows + (n0 + offs)[None, :] * stride_qn, tl.dot(Linv, x, input_precision="ieee"), mask=mask)
    # Checks: max|QQᵀ − I| and diag(Q·Aᵀ) = diag(R), accurate to ~u·‖A‖.
    G = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
    diag_r = tl.zeros((R_PAD,), dtype=tl.float32)
    norm2 = tl.zeros((R_PAD,), dtype=tl.float32)  # ‖a_j‖²: the scale of the acceptance floor
    for n0 in range(0, N, BLOCK_N):
        q, _ = _column_tile(a_rows, q_rows, n0, offs, N, row_ok, stride_an, stride_qn, False)
        a, _ = _column_tile(a_rows, q_rows, n0, offs, N, row_ok, stride_an, stride_qn, True)
        G = tl.dot(q, tl.trans(q), G, input_precision="ieee")
        diag_r += tl.sum(q * a, axis=1)
        norm2 += tl.sum(a * a, axis=1)
    cols = tl.arange(0, R_PAD)
    valid = row_ok[:, None] & (cols < R)[None, :]
    eye = (rows[:, None] == cols[None, :]).to(tl.float32)
    err = tl.max(tl.max(tl.where(valid, tl.abs(G - eye), 0.0), axis=1), axis=0)
    lo = tl.min(tl.where(row_ok, diag_r, float("inf")), axis=0)
    a_max = tl.sqrt(tl.max(tl.where(row_ok, norm2, 0.0), axis=0))
    # accept_tol = max(n·eps, √eps): a row that depends on the others (a noise direction) stays below it.
    ok = ok & (err <= ORTHO_TOL) & (lo > accept_tol * a_max)
    tl.store(ok_ptr + pid, ok.to(tl.int32))


# --------------------------------------------------------------------------- launcher

TRITON_MAX_RANK = 64
NUM_WARPS = 4


def _block_n(r_pad: int) -> int:
    return 128 if r_pad <= 32 else 64  # an r_pad×BLOCK_N fp32 tile stays ≤ 16 KB of registers


def orthonormalize_rows_triton(A):
    """``(Qᵀ, rank_deficient)`` of ``slao::orthonormalize_rows`` on the Triton kernel."""
    b, r, n = A.shape
    work = torch.empty((b, r, n), device=A.device, dtype=torch.float32)
    deficient = torch.zeros((b,), device=A.device, dtype=torch.bool)
    if work.numel() == 0:
        return work.to(A.dtype), deficient
    ok = torch.empty((b,), device=A.device, dtype=torch.int32)
    r_pad = rank_block(r)
    _cholesky_qr2_kernel[(b,)](
        A, work, ok, r, n,
        A.stride(0), A.stride(1), A.stride(2), work.stride(0), work.stride(1), work.stride(2),
        _accept_tol(n),
        R_PAD=r_pad, BLOCK_N=_block_n(r_pad), num_warps=NUM_WARPS,
    )
    return _with_fallback(A, work, ok != 0, deficient)


def _accept_tol(n: int) -> float:
    eps = torch.finfo(torch.float32).eps
    return max(n * eps, eps ** 0.5)  # as in csrc/orthonormalize.cpp


def _accepted(A: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Per matrix, the kernel's checks: ``max|QQᵀ − I| ≤ 1e-5`` and ``diag(Q·Aᵀ) > accept_tol·max‖a_j‖``."""
    Af = A.float()
    eye = torch.eye(A.shape[1], device=A.device)
    err = (Q @ Q.transpose(1, 2) - eye).abs().flatten(1).amax(1)
    lo = (Q * Af).sum(2).amin(1)
    a_max = Af.square().sum(2).amax(1).sqrt()
    return torch.isfinite(err) & (err <= float(ORTHO_TOL.value)) & (lo > _accept_tol(A.shape[2]) * a_max)


def _with_fallback(A, work, ok, deficient):
    """The matrices that failed the checks (ill-conditioned, rank-deficient) redone by the reference."""
    bad = torch.nonzero(~ok).flatten()
    if bad.numel():  # ill-conditioned or rank-deficient: the fp64 Householder path
        q_bad, deficient_bad = reference.orthonormalize_rows_ref(A.index_select(0, bad))
        work.index_copy_(0, bad, q_bad.to(torch.float32))
        deficient.index_copy_(0, bad, deficient_bad)
    return work.to(A.dtype), deficient


def cholesky_qr2_torch(A):
    """``slao::orthonormalize_rows`` by the kernel's algorithm in batched torch ops (a candidate):
    CholeskyQR2 in fp32, the same checks, the same fallback."""
    X = A.float()
    ok = torch.ones(A.shape[0], dtype=torch.bool, device=A.device)
    with _ieee_fp32():
        for _ in range(2):
            L, info = torch.linalg.cholesky_ex(X @ X.transpose(1, 2))
            ok &= info == 0
            X = torch.linalg.solve_triangular(L, X, upper=False)
        ok &= _accepted(A, X)
    deficient = torch.zeros((A.shape[0],), device=A.device, dtype=torch.bool)
    return _with_fallback(A, torch.nan_to_num(X), ok, deficient)


def householder_torch(A):
    """``slao::orthonormalize_rows`` by ``torch.linalg.qr`` in fp32 with the sign fix (a candidate),
    the same checks, the same fallback."""
    Q, R = torch.linalg.qr(A.float().transpose(1, 2))
    signs = torch.where(torch.diagonal(R, dim1=1, dim2=2) < 0, -1.0, 1.0)
    X = (Q * signs[:, None, :]).transpose(1, 2).contiguous()
    with _ieee_fp32():
        ok = _accepted(A, X)
    deficient = torch.zeros((A.shape[0],), device=A.device, dtype=torch.bool)
    return _with_fallback(A, X, ok, deficient)


class _ieee_fp32:
    """fp32 matmuls without TF32 inside the block (the checks and the Gram matrices need fp32)."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def _check_finite(matrices, op: str) -> None:
    """ValueError naming the first matrix (of a list or a batch) that holds NaN or ±Inf (one device sync)."""
    if len(matrices) == 0:
        return
    if isinstance(matrices, torch.Tensor):  # a (b, r, n) batch: one reduction
        finite = torch.isfinite(matrices).flatten(1).all(1).cpu()
    else:
        finite = torch.stack([torch.isfinite(M).all() for M in matrices]).cpu()
    if not finite.all():
        i = int(torch.nonzero(~finite)[0, 0])
        written = " (nothing was written)" if op.endswith("_") else ""
        raise ValueError(f"{op}: A[{i}] holds NaN or Inf values; it has no orthonormal row basis{written}")


def _cuda(A):
    _check_finite(A, "orthonormalize_rows")
    if A.shape[1] > TRITON_MAX_RANK or A.dtype == torch.float64:
        return reference.orthonormalize_rows_ref(A)
    if A.numel() == 0:
        return orthonormalize_rows_triton(A)
    b, r, n = A.shape
    key = problem_key("orthonormalize_rows", (A.dtype,), n, 0, r, b)
    out = {}

    def run(fn):
        return lambda: out.__setitem__("result", fn(A))
    candidates = [Candidate("triton", run(orthonormalize_rows_triton)),
                  Candidate("torch-cholesky-qr2", run(cholesky_qr2_torch)),
                  Candidate("linalg_qr", run(householder_torch))]
    chosen = tuner(A.device).choose(key, candidates, allow_timing=not torch.cuda.is_current_stream_capturing())
    chosen.run()
    return out["result"]


def _cuda_inplace(A):
    """In place on CUDA: per group of equal shape and dtype, one batched launch into
    a stacked copy, written back (device memory traffic is cheap next to the launch count)."""
    deficient = torch.zeros((len(A),), dtype=torch.bool, device=A[0].device if len(A) else "cpu")
    _check_finite(list(A), "orthonormalize_rows_")  # every check before any write
    for idx in _groups(A).values():
        Q, flags = _cuda(torch.stack([A[i] for i in idx]))
        torch._foreach_copy_([A[i] for i in idx], list(Q.unbind(0)))
        deficient[idx] = flags
    return deficient


register_kernels("orthonormalize_rows", _cuda, reference.orthonormalize_rows_ref)
register_kernels("orthonormalize_rows_", _cuda_inplace, reference.orthonormalize_rows_inplace_ref)


def aot_specs():
    """Every configuration the launcher can launch on a GPU."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for r_pad in (16, 32, 64):
            yield AotSpec(_cholesky_qr2_kernel, (("a_ptr", dtype), ("q_ptr", torch.float32), ("ok_ptr", torch.int32)),
                          (("R_PAD", r_pad), ("BLOCK_N", _block_n(r_pad))), NUM_WARPS, float_args=("accept_tol",))


def _check_matrix(name: str, A: torch.Tensor) -> None:
    check_tensor(name, A)
    r, n = A.shape[-2:]
    if r > n:
        raise ValueError(f"{name} has more rows than columns ({r} > {n}): its rows cannot be orthonormal")
    if r == 0:
        raise ValueError(f"{name} has no rows (shape {tuple(A.shape)})")


def _check_finite_named(A: torch.Tensor) -> None:
    if not torch.isfinite(A).all():
        raise ValueError("A holds NaN or Inf values; it has no orthonormal row basis")


def _check_no_grad(name: str, M: torch.Tensor) -> None:
    if M.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"orthonormalize_rows_: {name} requires grad and grad mode is on; autograd cannot track "
                         "this in-place write. Call it under torch.no_grad() (or pass .detach()ed tensors)")


def _warn_deficient(deficient: torch.Tensor, names, op: str) -> None:
    if deficient.any():
        which = [names[i] for i in torch.nonzero(deficient).flatten().tolist()]
        verb = "is" if len(which) == 1 else "are"
        warnings.warn(f"{op}: {', '.join(which)} {verb} numerically rank-deficient; the row basis was "
                      "completed with a deterministic orthonormal complement", RuntimeWarning, stacklevel=4)


def _orthonormalize(batch: torch.Tensor, names) -> torch.Tensor:
    Q, deficient = torch.ops.slao.orthonormalize_rows(batch)
    _warn_deficient(deficient, names, "orthonormalize_rows")
    return Q


def _groups(matrices) -> dict[tuple, list[int]]:
    """Indices of the matrices by (shape, dtype, device): one launch per group."""
    groups: dict[tuple, list[int]] = {}
    for i, M in enumerate(matrices):
        groups.setdefault((tuple(M.shape), M.dtype, M.device), []).append(i)
    return groups


def _check_list(matrices) -> None:
    for i, M in enumerate(matrices):
        _check_matrix(f"A[{i}]", M)
        if M.dim() != 2:
            raise ValueError(f"A[{i}] must be a 2-D (r, n) matrix, got shape {tuple(M.shape)}")


def orthonormalize_rows(A):
    """``Qᵀ`` with orthonormal rows, where ``Aᵀ = Q·R`` and ``diag(R) > 0``, per matrix.

    Args:
        A: a (r, n) matrix, a (b, r, n) batch, or a list of (r, n) matrices
            whose shapes, dtypes and devices may differ (one call per group).

    Returns:
        The same structure as ``A`` (a tensor, or a new list in the same
        order), each result in its input's dtype. A rank-deficient matrix gets
        a deterministic orthonormal completion of its row basis, with a
        warning (once). Accuracy per dtype: see the module docstring.

    Raises:
        ValueError: a matrix has more rows than columns, no rows, or holds NaN/±Inf.
        TypeError: a matrix is not a floating-point tensor.
    """
    if isinstance(A, torch.Tensor):
        if A.dim() not in (2, 3):
            raise ValueError(f"A must be (r, n) or (batch, r, n), got shape {tuple(A.shape)}")
        _check_matrix("A", A)
        if A.dim() == 2:
            _check_finite_named(A)
        batch = A if A.dim() == 3 else A.unsqueeze(0)
        out = _orthonormalize(batch, [f"A[{i}]" for i in range(batch.shape[0])] if A.dim() == 3 else ["A"])
        return out if A.dim() == 3 else out.squeeze(0)
    matrices = list(A)
    _check_list(matrices)
    result: list[torch.Tensor | None] = [None] * len(matrices)
    for idx in _groups(matrices).values():
        out = _orthonormalize(torch.stack([matrices[i] for i in idx]), [f"A[{i}]" for i in idx])
        for j, i in enumerate(idx):
            result[i] = out[j]
    return result


def orthonormalize_rows_(A):
    """In-place :func:`orthonormalize_rows`: each matrix is replaced by its ``Qᵀ``.

    What SLAO's task switch needs (A ← Qᵀ of the previous fine-tuned A) without
    allocating a result or stacking the layers: on CPU the kernel works on the
    list of matrices as they are, whatever their shapes and dtypes.

    Args:
        A: a (r, n) matrix, a (b, r, n) batch, or a list of (r, n) matrices
            (contiguous; shapes, dtypes and devices may differ).

    Returns:
        ``A`` itself. Results are those of :func:`orthonormalize_rows`, with the
        same warning for rank-deficient matrices.

    Raises:
        ValueError: as :func:`orthonormalize_rows`; also for a non-contiguous
            matrix, and for a matrix that requires grad while grad mode is on
            (autograd cannot track this write: call it under ``torch.no_grad()``,
            as SLAO's task switch does). On any error nothing has been written.
    """
    if isinstance(A, torch.Tensor):
        if A.dim() not in (2, 3):
            raise ValueError(f"A must be (r, n) or (batch, r, n), got shape {tuple(A.shape)}")
        _check_matrix("A", A)
        _check_no_grad("A", A)
        if A.dim() == 2:
            _check_finite_named(A)
        if not A.is_contiguous():
            raise ValueError(f"A must be contiguous to be orthonormalized in place (strides {A.stride()})")
        matrices = list(A.unbind(0)) if A.dim() == 3 else [A]
        names = [f"A[{i}]" for i in range(len(matrices))] if A.dim() == 3 else ["A"]
    else:
        matrices = list(A)
        _check_list(matrices)
        bad = next((i for i, M in enumerate(matrices) if not M.is_contiguous()), None)
        if bad is not None:
            raise ValueError(f"A[{bad}] must be contiguous to be orthonormalized in place "
                             f"(strides {matrices[bad].stride()})")
        names = [f"A[{i}]" for i in range(len(matrices))]
        for name, M in zip(names, matrices, strict=True):
            _check_no_grad(name, M)
    devices = list(dict.fromkeys(M.device for M in matrices))
    if len(devices) > 1:  # one op call per device: all of them checked before the first writes
        _check_finite(matrices, "orthonormalize_rows_")
    for device in devices:
        idx = [i for i, M in enumerate(matrices) if M.device == device]
        deficient = torch.ops.slao.orthonormalize_rows_([matrices[i] for i in idx])
        _warn_deficient(deficient, [names[i] for i in idx], "orthonormalize_rows_")
    return A

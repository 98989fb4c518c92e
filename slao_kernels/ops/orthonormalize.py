r"""Batched orthonormalization of LoRA A factors: SLAO's initialization.

For task i ≥ 2, every adapted layer starts from ``A ← Qᵀ`` where
``A_ft,i−1ᵀ = Q·R`` is the reduced QR factorization with ``diag(R) > 0``
(sign(0) = +1). ``Qᵀ`` (r×n) has orthonormal rows spanning the previous
fine-tuned A's row space. Source: "Merge before Forget" (arXiv 2512.23017),
DESIGN.md §1.

Inputs are a (b, r, n) batch or a list of (r, n) matrices of mixed shapes
(q/k/v/o/gate/up/down), grouped by shape, one kernel call per group. Computed
in fp32 at least; returned in the input dtype.

CPU: ``csrc/orthonormalize.cpp``: CholeskyQR2 per matrix, in place in the
output, every result checked (``max|QQᵀ − I| ≤ 1e-5``) and the failures
(ill-conditioned or rank-deficient) redone by fp64 Householder QR.
CUDA: the fp64 Householder reference for now; a Triton CholeskyQR2 kernel is
the next step (issue 3).
"""

from __future__ import annotations

import warnings

import torch

from slao_kernels import reference
from slao_kernels._checks import check_tensor
from slao_kernels._ops import LIB, NATIVE_CPU

LIB.impl("orthonormalize_rows", reference.orthonormalize_rows_ref, "CompositeExplicitAutograd")
if not NATIVE_CPU:
    LIB.impl("orthonormalize_rows", reference.orthonormalize_rows_ref, "CPU")


def _check_matrix(name: str, A: torch.Tensor) -> None:
    check_tensor(name, A)
    r, n = A.shape[-2:]
    if r > n:
        raise ValueError(f"{name} has more rows than columns ({r} > {n}): its rows cannot be orthonormal")
    if r == 0:
        raise ValueError(f"{name} has no rows (shape {tuple(A.shape)})")


def _orthonormalize(batch: torch.Tensor, names) -> torch.Tensor:
    Q, deficient = torch.ops.slao.orthonormalize_rows(batch)
    if deficient.any():
        which = [names[i] for i in torch.nonzero(deficient).flatten().tolist()]
        warnings.warn(f"orthonormalize_rows: {', '.join(which)} rank-deficient; the row basis was completed with a "
                      "deterministic orthonormal complement", RuntimeWarning, stacklevel=3)
    return Q


def orthonormalize_rows(A):
    """``Qᵀ`` with orthonormal rows, where ``Aᵀ = Q·R`` and ``diag(R) > 0``, per matrix.

    Args:
        A: a (r, n) matrix, a (b, r, n) batch, or a list of (r, n) matrices
            whose shapes, dtypes and devices may differ (one call per group).

    Returns:
        The same structure as ``A`` (a tensor, or a new list in the same
        order), each result in its input's dtype. A rank-deficient matrix gets
        a deterministic orthonormal completion of its row basis, with a
        warning (once).
    """
    if isinstance(A, torch.Tensor):
        if A.dim() not in (2, 3):
            raise ValueError(f"A must be (r, n) or (batch, r, n), got shape {tuple(A.shape)}")
        _check_matrix("A", A)
        batch = A if A.dim() == 3 else A.unsqueeze(0)
        out = _orthonormalize(batch, [f"A[{i}] is" for i in range(batch.shape[0])] if A.dim() == 3 else ["A is"])
        return out if A.dim() == 3 else out.squeeze(0)
    matrices = list(A)
    groups: dict[tuple, list[int]] = {}
    for i, M in enumerate(matrices):
        _check_matrix(f"A[{i}]", M)
        if M.dim() != 2:
            raise ValueError(f"A[{i}] must be a 2-D (r, n) matrix, got shape {tuple(M.shape)}")
        groups.setdefault((tuple(M.shape), M.dtype, M.device), []).append(i)
    result: list[torch.Tensor | None] = [None] * len(matrices)
    for idx in groups.values():
        out = _orthonormalize(torch.stack([matrices[i] for i in idx]), [f"A[{i}] is" for i in idx])
        for j, i in enumerate(idx):
            result[i] = out[j]
    return result

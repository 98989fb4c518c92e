"""Pure-torch reference versions of every ``slao`` op.

They define the semantics the kernels are tested against and are the
last-resort kernels (CPU without the C++ extension, devices other than CUDA).
Each ``*_ref`` takes and returns exactly what the op of the same name does
(see ``slao_kernels._ops``). The stock-torch baselines the benchmarks time
live in :mod:`slao_kernels.benchmarking.references`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slao_kernels._ops import act_dtype, compute_dtype


def lora_linear_ref(x, weight, bias, lora_A, lora_B, scaling):
    """``(out, lora_act)`` of ``slao::lora_linear``, composed from torch ops.

    The low-rank path runs in the promotion of ``x`` and the adapter dtype
    (PEFT's behaviour for an fp32 adapter on a bf16 model); the sum is cast
    back to ``x.dtype``.
    """
    cdt = compute_dtype(x.dtype, lora_A.dtype)
    act = F.linear(x.to(cdt), lora_A.to(cdt))
    out = F.linear(x, weight, bias).to(cdt) + scaling * F.linear(act, lora_B.to(cdt))
    return out.to(x.dtype), act.to(act_dtype(x.dtype, lora_A.dtype))


def lora_linear_backward_ref(grad_out, grad_act, x, weight, lora_A, lora_B, lora_act, scaling, input_grad):
    """``(grad_x, grad_A, grad_B)`` of ``slao::lora_linear_backward``."""
    cdt = compute_dtype(x.dtype, lora_A.dtype)
    dy = grad_out.reshape(-1, grad_out.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    act = lora_act.reshape(-1, lora_act.shape[-1]).to(cdt)
    g = scaling * (dy.to(cdt) @ lora_B.to(cdt))
    if grad_act is not None:
        g = g + grad_act.reshape(g.shape).to(cdt)
    grad_A = (g.t() @ x2.to(cdt)).to(lora_A.dtype)
    grad_B = (scaling * (dy.to(cdt).t() @ act)).to(lora_B.dtype)
    if input_grad:
        grad_x = ((dy @ weight).to(cdt) + g @ lora_A.to(cdt)).to(x.dtype).reshape(x.shape)
    else:
        grad_x = x.new_empty((0,))
    return grad_x, grad_A, grad_B


def scaled_merge_ref(merged, fine_tuned, lam, check_finite):
    """In-place ``merged[i] ← merged[i] + lam·(fine_tuned[i] − merged[i])`` (``slao::scaled_merge_``)."""
    results = []
    for i, (m, f) in enumerate(zip(merged, fine_tuned, strict=True)):
        acc = torch.promote_types(m.dtype, torch.float32)
        out = ((1.0 - lam) * m.to(acc) + lam * f.to(acc)).to(m.dtype)  # exact at lam = 0 and 1
        if check_finite and not torch.isfinite(out).all():
            raise ValueError(f"scaled_merge_: the merge would write non-finite values into tensor {i} "
                             f"(shape {tuple(m.shape)}); nothing was written")
        results.append(out)
    for m, out in zip(merged, results, strict=True):
        m.copy_(out)


def _completed_rows(M):
    """Sign-fixed ``Qᵀ`` (fp64) of one (r, n) fp64 matrix, from Householder QR of ``Mᵀ``.

    Row j with ``|R_jj| ≤ n·eps64·max|R|`` (the fp64 rounding level: its direction
    would be noise) is replaced by the canonical vector ``e_m`` with the largest
    residual against rows 0..j−1 (the first m on ties), scaled to ``max|R|`` (1 for
    a zero matrix), and the QR redone: the completion depends on the matrix alone,
    and a zero matrix gives the identity rows. The CPU kernel
    (``csrc/orthonormalize.cpp``, ``stable_rows``) runs the same sequence of ops.
    """
    r, n = M.shape
    Q, R = torch.linalg.qr(M.t())  # (n, r), (r, r)
    scale = R.abs().max().item()
    j0 = 0
    while True:
        lim = n * torch.finfo(torch.float64).eps * R.abs().max().item()
        noise = torch.nonzero(R.diagonal().abs()[j0:] <= lim).flatten()
        if noise.numel() == 0:
            break
        j = j0 + int(noise[0])
        m = int((1.0 - Q[:, :j].square().sum(1)).argmax())
        M = M.clone()
        M[j] = 0.0
        M[j, m] = scale if scale > 0.0 else 1.0
        Q, R = torch.linalg.qr(M.t())
        j0 = j + 1
    return (Q * torch.where(R.diagonal() < 0, -1.0, 1.0).to(Q.dtype)).t()


def orthonormalize_rows_ref(A):
    """``slao::orthonormalize_rows``: Householder QR of each ``Aᵀ`` in fp64, signs
    fixed so ``diag(R) > 0`` (sign(0) = +1); returns ``(Qᵀ in A.dtype, rank_deficient)``.

    ``rank_deficient``: some ``|R_jj| ≤ n·eps·max|R|`` with eps of the precision
    computed in (fp32 for 16-bit and fp32 input). Rows whose ``R_jj`` is at the
    fp64 rounding level are completed deterministically (see :func:`_completed_rows`).
    Results are rounded to fp32 (fp64 for fp64) and then to ``A.dtype``, as the kernels round.
    Non-finite input is refused with a ``ValueError`` naming the matrix.
    """
    acc = torch.promote_types(A.dtype, torch.float32)
    bad = torch.nonzero(~torch.isfinite(A).flatten(1).all(1)).flatten() if A.numel() else []
    if len(bad):
        raise ValueError(f"orthonormalize_rows: A[{int(bad[0])}] holds NaN or Inf values; it has no orthonormal "
                         "row basis")
    A64 = A.to(torch.float64)
    Q, R = torch.linalg.qr(A64.transpose(-1, -2))  # (b, n, r), (b, r, r)
    diag = torch.diagonal(R, dim1=-2, dim2=-1)
    signs = torch.where(diag < 0, -1.0, 1.0).to(Q.dtype)
    absmax = R.abs().amax(dim=(-2, -1), keepdim=True).squeeze(-1)
    eps = torch.finfo(acc).eps  # rank at the precision computed in
    deficient = (diag.abs() <= A.shape[-1] * eps * absmax.clamp_min(1e-300)).any(dim=-1)
    Qt = (Q * signs.unsqueeze(-2)).transpose(-1, -2)
    noise = (diag.abs() <= A.shape[-1] * torch.finfo(torch.float64).eps * absmax).any(dim=-1)
    if noise.any():
        Qt = Qt.clone()
        for i in torch.nonzero(noise).flatten().tolist():
            Qt[i] = _completed_rows(A64[i].clone())
    return Qt.to(acc).to(A.dtype).contiguous(), deficient


def orthonormalize_rows_inplace_ref(A):
    """``slao::orthonormalize_rows_``: :func:`orthonormalize_rows_ref` of each (r, n)
    matrix of the list, written back into it; returns ``rank_deficient`` (on A[0]'s device)."""
    for i, M in enumerate(A):  # every check before the first write
        if not torch.isfinite(M).all():
            raise ValueError(f"orthonormalize_rows_: A[{i}] holds NaN or Inf values; it has no orthonormal row "
                             "basis (nothing was written)")
    results = [orthonormalize_rows_ref(M.unsqueeze(0)) for M in A]
    for M, (Q, _) in zip(A, results, strict=True):
        M.copy_(Q.squeeze(0))
    flags = [deficient for _, deficient in results]
    return torch.cat(flags) if flags else torch.zeros((0,), dtype=torch.bool)

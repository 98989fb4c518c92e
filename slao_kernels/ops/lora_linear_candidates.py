r"""The CUDA candidates of ``lora_linear``'s two big products, and the choice among them.

Both products have the shape ``C = X·Wᵀ + scale·P·Lᵀ (+ b)``: the forward
(``x·W0ᵀ + s·u·Bᵀ + b``) and the backward's ``dx`` (``dy·W0 + g·A``). Three ways
to compute it compete (:mod:`slao_kernels.ops.tuning` times them once per shape):

* ``fused:<tile>``: the Triton GEMM with the rank-r product as one extra K-step
  (``_gemm_lowrank_kernel`` in :mod:`~slao_kernels.ops.lora_linear`), at each tile
  configuration of the dtype;
* ``cublas+update``: cuBLAS computes ``X·Wᵀ (+ b)`` into ``C`` (``torch.addmm`` /
  ``torch.mm`` with ``out=``), then ``_lowrank_update_kernel`` adds
  ``scale·P·Lᵀ`` in place, reading and writing ``C`` once;
* ``torch``: the composition ``addmm`` then ``addmm_`` with ``P`` and ``L`` rounded
  to ``C``'s dtype, what PEFT-style code costs; it is always a candidate, so the
  op is never slower than it.

The rank-r "down" products (``u = x·Aᵀ``, ``g = s·dy·B``) and the weight
gradients (``dA``, ``dB``) choose the same way between their Triton kernel and the
torch product (:func:`project_torch`, :func:`rank_outer_torch`, :func:`choose_small`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slao_kernels.ops._triton import AotSpec, dot_acc, dot_dtype, gpu_dot_variants, rank_block
from slao_kernels.ops.tuning import Candidate, problem_key, tuner

UPDATE_BLOCK_M, UPDATE_BLOCK_N = 64, 64
UPDATE_NUM_WARPS = 4


@triton.jit
def _lowrank_update_kernel(
    c_ptr, p_ptr, l_ptr,
    M, N, R,
    stride_cm, stride_cn, stride_pm, stride_pr, stride_ln, stride_lr,
    scale,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``C[M, N] += scale·P[M, R]·L[N, R]ᵀ`` in place: each tile of C is read once and written once."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):  # R ≤ 64 in practice: one or a few steps of a padded (≥ 16) rank tile
        rr = r0 + tl.arange(0, BLOCK_R)
        p = tl.load(p_ptr + rm[:, None] * stride_pm + rr[None, :] * stride_pr,
                    mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        lt = tl.load(l_ptr + rn[None, :] * stride_ln + rr[:, None] * stride_lr,
                     mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0)
        acc = dot_acc(p, lt, acc, DOT_DTYPE, PRECISION)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    c = tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)  # fp32 sum, one rounding to C's dtype
    tl.store(c_ptrs, (c + acc * scale).to(c_ptr.dtype.element_ty), mask=mask)


def lowrank_update(out, p, lt, scale):
    """``out += scale·p·ltᵀ`` in place; ``out`` M×N, ``p`` M×R (fp32), ``lt`` N×R (any strides).

    ``p`` and ``lt`` enter the dot in ``out``'s dtype (fp32 accumulation), as in the fused kernel."""
    M, N = out.shape
    R = p.shape[1]
    if M == 0 or N == 0 or R == 0:
        return out
    dot, precision = dot_dtype(out.dtype)
    grid = (triton.cdiv(M, UPDATE_BLOCK_M), triton.cdiv(N, UPDATE_BLOCK_N))
    _lowrank_update_kernel[grid](
        out, p, lt,
        M, N, R,
        out.stride(0), out.stride(1), p.stride(0), p.stride(1), lt.stride(0), lt.stride(1),
        float(scale),
        DOT_DTYPE=dot, PRECISION=precision,
        BLOCK_M=UPDATE_BLOCK_M, BLOCK_N=UPDATE_BLOCK_N, BLOCK_R=rank_block(R),
        num_warps=UPDATE_NUM_WARPS,
    )
    return out


def base_then_update(x2, w, p, lt, scale, bias, out):
    """The ``cublas+update`` candidate: ``out ← x2·wᵀ (+ bias)`` by cuBLAS, then the rank-r update."""
    if bias is not None:
        torch.addmm(bias, x2, w.t(), out=out)
    else:
        torch.mm(x2, w.t(), out=out)
    return lowrank_update(out, p, lt, scale)


def composed(x2, w, p, lt, scale, bias, out):
    """The ``torch`` candidate: ``addmm`` then ``addmm_``, the rank-r factors in ``out``'s dtype."""
    if bias is not None:
        torch.addmm(bias, x2, w.t(), out=out)
    else:
        torch.mm(x2, w.t(), out=out)
    return out.addmm_(p.to(out.dtype), lt.t().to(out.dtype), alpha=scale)


def candidates(x2, w, p, lt, scale, bias, out, fused, configs) -> list[Candidate]:
    """Every way to compute ``out ← x2·wᵀ + scale·p·ltᵀ (+ bias)``; the static choice first.

    ``fused(x2, w, p, lt, scale, bias, out, config)`` is the fused Triton GEMM and ``configs``
    its tile configurations, the heuristic's pick first."""
    def run(fn, *extra):
        return lambda: fn(x2, w, p, lt, scale, bias, out, *extra)
    fused_ones = [Candidate(f"fused:{c.block_m}x{c.block_n}x{c.block_k}", run(fused, c)) for c in configs]
    return fused_ones + [Candidate("cublas+update", run(base_then_update)), Candidate("torch", run(composed))]


def select(op: str, x2, w, p, lt, scale, bias, out, fused, configs) -> Candidate:
    """The candidate to run for this problem on ``out``'s device (timed once, then cached)."""
    M, K = x2.shape
    key = problem_key(op, (x2.dtype, lt.dtype, out.dtype), w.shape[0], K, p.shape[1], M)
    options = candidates(x2, w, p, lt, scale, bias, out, fused, configs)
    capturing = out.is_cuda and torch.cuda.is_current_stream_capturing()
    return tuner(out.device).choose(key, options, allow_timing=not capturing)


def aot_specs():
    """Every configuration ``lowrank_update`` can launch (for :mod:`slao_kernels.ops.aot`)."""
    from slao_kernels.ops._triton import DTYPE_PAIRS, RANK_BLOCKS

    for out_dt in sorted({x for x, _ in DTYPE_PAIRS}, key=str):
        for lt_dt in sorted({a for x, a in DTYPE_PAIRS if x == out_dt}, key=str):
            for dot, precision in gpu_dot_variants(out_dt):
                for block_r in RANK_BLOCKS:
                    yield AotSpec(_lowrank_update_kernel,
                                  (("c_ptr", out_dt), ("p_ptr", torch.float32), ("l_ptr", lt_dt)),
                                  (("DOT_DTYPE", dot), ("PRECISION", precision), ("BLOCK_M", UPDATE_BLOCK_M),
                                   ("BLOCK_N", UPDATE_BLOCK_N), ("BLOCK_R", block_r)),
                                  UPDATE_NUM_WARPS)


def project_torch(x2, lt, scale, add=None, *, compute):
    """The torch candidate of the down product: ``scale·x2·ltᵀ (+ add)`` as fp32, the product in ``compute``."""
    out = torch.mm(x2.to(compute), lt.t().to(compute)).float()
    if scale != 1.0:
        out.mul_(scale)
    return out.add_(add) if add is not None else out


def rank_outer_torch(p, y, scale, out, *, compute):
    """The torch candidate of the weight gradient: ``out ← scale·pᵀ·y``, the product in ``compute``."""
    return out.copy_(torch.mm(p.t().to(compute), y.to(compute)).float().mul_(scale))


def choose_small(key: str, device, triton_run, torch_run) -> Candidate:
    """The faster of a small product's Triton kernel and its torch product (both rewrite their output)."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    return tuner(device).choose(key, [Candidate("triton", triton_run), Candidate("torch", torch_run)],
                                allow_timing=not capturing)

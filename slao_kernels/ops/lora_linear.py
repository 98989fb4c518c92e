r"""Fused LoRA linear: ``y = x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ`` and its backward.

Shapes: ``x`` (..., n), ``W0`` (m, n) frozen, ``b`` (m,) frozen or None,
``A`` (r, n), ``B`` (m, r), ``s`` a float (``alpha/r``, or ``alpha/√r`` for
rsLoRA). Flatten ``x`` to M×n rows. Gradients, with ``dy = ∂L/∂y`` (M×m)::

    u   = x·Aᵀ                      (M×r, saved by the forward)
    g   = s·dy·B  (+ ∂L/∂u)         (M×r)
    dx  = dy·W0 + g·A               (M×n)
    dA  = gᵀ·x                      (r×n)
    dB  = s·dyᵀ·u                   (m×r)

CUDA design (Triton). Three kernels cover all five products:

* ``_project_kernel``   P = scale·X·Lᵀ (+ add): the rank-r "down" products
  ``u = x·Aᵀ`` and ``g = s·dy·B``; one pass over X, fp32 result.
* ``_gemm_lowrank_kernel``  C = X·Wᵀ + scale·P·Lᵀ + b: the base GEMM with the
  rank-r "up" product as one extra K-step before the single store. It serves
  the forward (``x·W0ᵀ + s·u·Bᵀ``) and ``dx`` (``dy·W0 + g·A``, transposed
  views). The output is written once: no second read-modify-write of an M×m
  tensor, which is what an unfused ``addmm_`` epilogue costs.
* ``_rank_outer_kernel``  G = scale·Pᵀ·Y: the rank-r weight gradients ``dA``
  and ``dB``, split over M into a deterministic fp32 workspace when the
  output alone gives too few programs.

The rank-r intermediates are saved/written once (M×r is ~1/500 of the
activations at r=16) rather than recomputed. The rank tile is padded to ≥ 16
so the compiled ``tl.dot`` is legal for 16-bit operands.

CPU: C++ kernels in ``csrc/lora_linear.cpp`` (MKL GEMM for the base product,
one fused pass over rows for the rank-r products). Schemas and fakes:
``slao_kernels/_ops.py``. Reference: ``slao_kernels.reference``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from slao_kernels import reference
from slao_kernels._checks import check_frozen, check_lora_linear_args
from slao_kernels._ops import LIB, NATIVE_CPU, act_dtype, compute_dtype, register_kernels
from slao_kernels.ops._triton import (
    DTYPE_PAIRS,
    RANK_BLOCKS,
    AotSpec,
    dot_acc,
    dot_dtype,
    gpu_dot_variants,
    rank_block,
)
from slao_kernels.ops.lora_linear_candidates import aot_specs as _update_aot_specs
from slao_kernels.ops.lora_linear_candidates import choose_small, project_torch, rank_outer_torch, select
from slao_kernels.ops.tuning import multiprocessor_count, problem_key

# --------------------------------------------------------------------------- kernels


@triton.jit
def _project_kernel(
    x_ptr, l_ptr, add_ptr, p_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_lr, stride_lk, stride_am, stride_ar, stride_pm, stride_pr,
    scale,
    HAS_ADD: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """p[M, R] = scale · x[M, K] · l[R, K]ᵀ (+ add[M, R]), stored in p's dtype (fp32)."""
    # int64 before pointer math: M·stride overflows int32 at 8k tokens × 14k features.
    pid_m = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_r = offs_r < R
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    l_ptrs = l_ptr + offs_k[:, None] * stride_lk + offs_r[None, :] * stride_lr
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        lt = tl.load(l_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = dot_acc(x, lt, acc, DOT_DTYPE, PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        l_ptrs += BLOCK_K * stride_lk
    acc = acc * scale
    mask = mask_m[:, None] & mask_r[None, :]
    if HAS_ADD:
        add = tl.load(add_ptr + offs_m[:, None] * stride_am + offs_r[None, :] * stride_ar, mask=mask, other=0.0)
        acc += add.to(tl.float32)
    tl.store(p_ptr + offs_m[:, None] * stride_pm + offs_r[None, :] * stride_pr,
             acc.to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_lowrank_kernel(
    x_ptr, w_ptr, p_ptr, l_ptr, bias_ptr, c_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_pm, stride_pr, stride_ln, stride_lr,
    stride_cm, stride_cn,
    scale,
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """c[M, N] = x[M, K]·w[N, K]ᵀ + scale·p[M, R]·l[N, R]ᵀ + bias[N], one store per tile."""
    # Grouped launch order: GROUP_M row-blocks sweep the columns together, so the
    # w tiles they share stay in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = (first_m + (pid % group_size) % group_m).to(tl.int64)
    pid_n = ((pid % group_size) // group_m).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = dot_acc(x, w, acc, DOT_DTYPE, PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # The low-rank update: R/BLOCK_R more K-steps with the base GEMM's operand
    # dtype (tensor cores; an fp32 dot here would run on CUDA cores). BLOCK_R is
    # kept at 16: these tiles come on top of the pipelined main-loop buffers in
    # shared memory, and 64-wide ones overflow an A100's.
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        mask_r = offs_r < R - r0
        p = tl.load(p_ptr + offs_m[:, None] * stride_pm + (r0 + offs_r)[None, :] * stride_pr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        lt = tl.load(l_ptr + (r0 + offs_r)[:, None] * stride_lr + offs_n[None, :] * stride_ln,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        # Scale the M×R operand, not the M×N product: R/N of the multiplies. The
        # explicit rounding to x's dtype is what the GPU's 16-bit dot does anyway;
        # spelled out, the interpreter (fp32 dots for bf16) reproduces it.
        p = (p.to(tl.float32) * scale).to(x_ptr.dtype.element_ty)
        acc = dot_acc(p, lt.to(x_ptr.dtype.element_ty), acc, DOT_DTYPE, PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _rank_outer_kernel(
    p_ptr, y_ptr, g_ptr,
    M, N, R, ROWS_PER_SPLIT,
    stride_pm, stride_pr, stride_ym, stride_yn, stride_gs, stride_gr, stride_gn,
    scale,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """g[split, R, N] = scale · p[rows, R]ᵀ · y[rows, N] over this split's rows of M."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_r = offs_r < R
    row0 = pid_s * ROWS_PER_SPLIT
    row_end = tl.minimum(row0 + ROWS_PER_SPLIT, M)
    p_ptrs = p_ptr + (row0 + offs_m)[None, :] * stride_pm + offs_r[:, None] * stride_pr
    y_ptrs = y_ptr + (row0 + offs_m)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for m0 in range(row0, row_end, BLOCK_M):
        mask_m = offs_m < row_end - m0
        pt = tl.load(p_ptrs, mask=mask_r[:, None] & mask_m[None, :], other=0.0)
        y = tl.load(y_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        acc = dot_acc(pt, y, acc, DOT_DTYPE, PRECISION)
        p_ptrs += BLOCK_M * stride_pm
        y_ptrs += BLOCK_M * stride_ym
    acc = acc * scale
    tl.store(g_ptr + pid_s * stride_gs + offs_r[:, None] * stride_gr + offs_n[None, :] * stride_gn,
             acc.to(g_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------- launch configs


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and schedule of ``_gemm_lowrank_kernel``."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8


# Largest first. 16-bit tiles of 128×256×64 at 3 stages take 144 KiB of shared
# memory: under the A100's 163 KiB and the H100's 227 KiB (the test suite
# compiles every entry for sm_80 and sm_90 and checks).
GEMM_CONFIGS = {
    16: (GemmConfig(128, 256, 64, 8, 3), GemmConfig(128, 128, 64, 4, 4), GemmConfig(64, 64, 64, 4, 4)),
    32: (GemmConfig(128, 128, 32, 8, 3), GemmConfig(64, 64, 32, 4, 3)),
}
LOWRANK_BLOCK = 16  # rank tile of the GEMM epilogue (see _gemm_lowrank_kernel)
PROJECT_BLOCK_M = 64
OUTER_BLOCK_M, OUTER_BLOCK_N = 64, 64
SMALL_NUM_WARPS = 4
ROWS_PER_SPLIT = 1024  # outer-product rows per program before splitting M


INTERPRETER_SMS = 8
"""The SM count assumed where there is no GPU (the interpreter): speed does not matter there, and
8 gives every tile and split path programs enough to run at test sizes."""


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (queried from the device once), or :data:`INTERPRETER_SMS`."""
    return multiprocessor_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else INTERPRETER_SMS


def gemm_configs(M: int, N: int, dtype: torch.dtype, sms: int) -> tuple[GemmConfig, ...]:
    """The tiles for an M×N output, the heuristic's pick first: the largest tile that still gives
    every one of the device's ``sms`` SMs a program, else the smallest."""
    configs = GEMM_CONFIGS[32 if dtype == torch.float32 else 16]
    pick = next((c for c in configs if triton.cdiv(M, c.block_m) * triton.cdiv(N, c.block_n) >= sms), configs[-1])
    return (pick, *(c for c in configs if c is not pick))


def outer_splits(M: int, programs: int, sms: int = INTERPRETER_SMS) -> int:
    """Number of M-splits of ``_rank_outer_kernel``: enough programs to fill the
    GPU (~2 per SM), each with at least ROWS_PER_SPLIT rows."""
    want = triton.cdiv(2 * sms, max(programs, 1))
    return max(1, min(want, triton.cdiv(M, ROWS_PER_SPLIT)))


def _k_block(dtype: torch.dtype) -> int:
    return 32 if dtype == torch.float32 else 64


# --------------------------------------------------------------------------- launchers


def project(x2, lt, scale, add=None, *, compute):
    """``scale·x2·ltᵀ (+ add)`` as fp32 (M×R); ``lt`` is an R×K view (any strides). On a GPU the
    faster of the Triton kernel and the torch product (timed once per shape), else the kernel."""
    if not x2.is_cuda or x2.shape[0] == 0:
        return project_triton(x2, lt, scale, add, compute=compute)
    key = problem_key("lora_linear.project", (x2.dtype, lt.dtype, compute), lt.shape[0], x2.shape[1], 0, x2.shape[0])
    result = {}
    chosen = choose_small(key, x2.device,
                          lambda: result.__setitem__("p", project_triton(x2, lt, scale, add, compute=compute)),
                          lambda: result.__setitem__("p", project_torch(x2, lt, scale, add, compute=compute)))
    chosen.run()
    return result["p"]


def project_triton(x2, lt, scale, add=None, *, compute):
    """:func:`project` on ``_project_kernel``."""
    M, K = x2.shape
    R = lt.shape[0]
    out = torch.empty((M, R), device=x2.device, dtype=torch.float32)
    if M == 0:
        return out
    block_r = rank_block(R)
    dot, precision = dot_dtype(compute)
    add_t = add if add is not None else out  # never read when HAS_ADD is False
    grid = (triton.cdiv(M, PROJECT_BLOCK_M), triton.cdiv(R, block_r))
    _project_kernel[grid](
        x2, lt, add_t, out,
        M, K, R,
        x2.stride(0), x2.stride(1), lt.stride(0), lt.stride(1), add_t.stride(0), add_t.stride(1),
        out.stride(0), out.stride(1),
        float(scale),
        HAS_ADD=add is not None, DOT_DTYPE=dot, PRECISION=precision,
        BLOCK_M=PROJECT_BLOCK_M, BLOCK_K=_k_block(x2.dtype), BLOCK_R=block_r,
        num_warps=SMALL_NUM_WARPS,
    )
    return out


def gemm_lowrank(x2, w, p, lt, scale, bias, out, cfg: GemmConfig | None = None):
    """``out ← x2·wᵀ + scale·p·ltᵀ + bias``; ``w`` is N×K and ``lt`` N×R (any strides);
    ``cfg`` the tile (default: the heuristic's, :func:`gemm_configs`).

    Both products run in ``x2``'s dtype with fp32 accumulation: ``p`` and ``lt``
    are rounded to it, an error of the order of the output's own rounding."""
    M, K = x2.shape
    N = w.shape[0]
    R = p.shape[1]
    if M == 0 or N == 0:
        return out
    cfg = cfg or gemm_configs(M, N, x2.dtype, multiprocessors(x2.device))[0]
    dot, precision = dot_dtype(x2.dtype)
    bias_t = bias if bias is not None else out  # never read when HAS_BIAS is False
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _gemm_lowrank_kernel[grid](
        x2, w, p, lt, bias_t, out,
        M, N, K, R,
        x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), p.stride(0), p.stride(1),
        lt.stride(0), lt.stride(1), out.stride(0), out.stride(1),
        float(scale),
        HAS_BIAS=bias is not None, DOT_DTYPE=dot, PRECISION=precision,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=LOWRANK_BLOCK,
        GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def rank_outer(p, y, scale, out, *, compute):
    """``out ← scale·pᵀ·y`` with ``out`` an R×N view (any strides, any float dtype). On a GPU the
    faster of the Triton kernel and the torch product (timed once per shape), else the kernel."""
    if not p.is_cuda or p.shape[0] == 0:
        return rank_outer_triton(p, y, scale, out, compute=compute)
    key = problem_key("lora_linear.rank_outer", (p.dtype, y.dtype, out.dtype, compute), y.shape[1], 0, p.shape[1],
                      p.shape[0])
    choose_small(key, p.device, lambda: rank_outer_triton(p, y, scale, out, compute=compute),
                 lambda: rank_outer_torch(p, y, scale, out, compute=compute)).run()
    return out


def rank_outer_triton(p, y, scale, out, *, compute):
    """:func:`rank_outer` on ``_rank_outer_kernel``."""
    M, R = p.shape
    N = y.shape[1]
    if M == 0:
        return out.zero_()
    block_r = rank_block(R)
    programs = triton.cdiv(N, OUTER_BLOCK_N) * triton.cdiv(R, block_r)
    splits = outer_splits(M, programs, multiprocessors(p.device))
    rows = triton.cdiv(M, splits)
    # One split writes the result directly; several write fp32 partials that are
    # summed in a fixed order (deterministic, unlike atomics).
    ws = out.unsqueeze(0) if splits == 1 else torch.empty((splits, R, N), device=p.device, dtype=torch.float32)
    dot, precision = dot_dtype(compute)
    _rank_outer_kernel[(triton.cdiv(N, OUTER_BLOCK_N), triton.cdiv(R, block_r), splits)](
        p, y, ws,
        M, N, R, rows,
        p.stride(0), p.stride(1), y.stride(0), y.stride(1), ws.stride(0), ws.stride(1), ws.stride(2),
        float(scale),
        DOT_DTYPE=dot, PRECISION=precision,
        BLOCK_M=OUTER_BLOCK_M, BLOCK_N=OUTER_BLOCK_N, BLOCK_R=block_r,
        num_warps=SMALL_NUM_WARPS,
    )
    if splits > 1:
        out.copy_(ws.sum(dim=0))
    return out


def lowrank_product(op: str, x2, w, p, lt, scale, bias, out):
    """``out ← x2·wᵀ + scale·p·ltᵀ + bias`` by the fastest candidate on a GPU (timed once per shape,
    :mod:`slao_kernels.ops.lora_linear_candidates`); the fused kernel's heuristic tile elsewhere."""
    if not out.is_cuda or x2.shape[0] == 0 or w.shape[0] == 0:
        return gemm_lowrank(x2, w, p, lt, scale, bias, out)
    configs = gemm_configs(x2.shape[0], w.shape[0], x2.dtype, multiprocessors(out.device))
    select(op, x2, w, p, lt, scale, bias, out, gemm_lowrank, configs).run()
    return out


def _rows(t):
    """2-D row view of ``t`` (copies only when the leading dims cannot be merged)."""
    return t.reshape(-1, t.shape[-1])


def lora_linear_triton(x, weight, bias, lora_A, lora_B, scaling):
    """Forward on the Triton kernels: ``(out, lora_act)`` of ``slao::lora_linear``."""
    cdt = compute_dtype(x.dtype, lora_A.dtype)
    x2 = _rows(x)
    act = project(x2, lora_A, 1.0, compute=cdt)
    out = torch.empty((x2.shape[0], weight.shape[0]), device=x.device, dtype=x.dtype)
    lowrank_product("lora_linear.forward", x2, weight, act, lora_B, scaling, bias, out)
    lead = x.shape[:-1]
    return out.reshape(*lead, weight.shape[0]), act.to(act_dtype(x.dtype, lora_A.dtype)).reshape(*lead, lora_A.shape[0])


def lora_linear_backward_triton(grad_out, grad_act, x, weight, lora_A, lora_B, lora_act, scaling, input_grad):
    """Backward on the Triton kernels: ``(grad_x, grad_A, grad_B)`` of ``slao::lora_linear_backward``."""
    cdt = compute_dtype(x.dtype, lora_A.dtype)
    dy, x2, act = _rows(grad_out), _rows(x), _rows(lora_act)
    add = _rows(grad_act) if grad_act is not None else None
    g = project(dy, lora_B.t(), scaling, add, compute=cdt)  # s·dy·B (+ ∂L/∂u)
    grad_A = rank_outer(g, x2, 1.0, torch.empty_like(lora_A), compute=cdt)
    grad_B = torch.empty_like(lora_B)
    rank_outer(act, dy, scaling, grad_B.t(), compute=cdt)  # written through the transposed view
    if not input_grad:
        return x.new_empty((0,)), grad_A, grad_B
    grad_x = torch.empty((x2.shape[0], x2.shape[1]), device=x.device, dtype=x.dtype)
    lowrank_product("lora_linear.dx", dy, weight.t(), g, lora_A.t(), 1.0, None, grad_x)
    return grad_x.reshape(x.shape), grad_A, grad_B


# --------------------------------------------------------------------------- registration


def _cuda_forward(x, weight, bias, lora_A, lora_B, scaling):
    if compute_dtype(x.dtype, lora_A.dtype) == torch.float64:  # Triton path is fp32/bf16/fp16
        return reference.lora_linear_ref(x, weight, bias, lora_A, lora_B, scaling)
    return lora_linear_triton(x, weight, bias, lora_A, lora_B, scaling)


def _cuda_backward(grad_out, grad_act, x, weight, lora_A, lora_B, lora_act, scaling, input_grad):
    if compute_dtype(x.dtype, lora_A.dtype) == torch.float64:
        return reference.lora_linear_backward_ref(
            grad_out, grad_act, x, weight, lora_A, lora_B, lora_act, scaling, input_grad)
    return lora_linear_backward_triton(grad_out, grad_act, x, weight, lora_A, lora_B, lora_act, scaling, input_grad)


register_kernels("lora_linear", _cuda_forward, reference.lora_linear_ref)
register_kernels("lora_linear_backward", _cuda_backward, reference.lora_linear_backward_ref)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling = inputs
    check_frozen(weight, bias)
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1])
    ctx.scaling = scaling
    # Leave the gradient of the (usually unused) lora_act output as None
    # instead of an M×r tensor of zeros.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_act):
    x, weight, lora_A, lora_B, act = ctx.saved_tensors
    if grad_out is None:
        grad_out = x.new_zeros((*x.shape[:-1], weight.shape[0]))
    grad_x, grad_A, grad_B = torch.ops.slao.lora_linear_backward(
        grad_out, grad_act, x, weight, lora_A, lora_B, act, ctx.scaling, ctx.needs_input_grad[0])
    return (grad_x if ctx.needs_input_grad[0] else None, None, None,
            grad_A if ctx.needs_input_grad[3] else None, grad_B if ctx.needs_input_grad[4] else None, None)


torch.library.register_autograd("slao::lora_linear", _backward, setup_context=_setup_context)


def _autocast_kernel(device_type: str):
    """Under autocast, run the base GEMM in the autocast dtype (as ``F.linear``
    would) and keep the adapter in its own dtype: the kernels handle the mix.

    Like torch's own autocast, fp64 tensors are left in fp64 (autocast casts
    only the other floating dtypes); a base whose tensors then differ in dtype
    (fp64 with anything else) is refused, as ``F.linear`` refuses it."""

    def kernel(x, weight, bias, lora_A, lora_B, scaling):
        dtype = torch.get_autocast_dtype(device_type)

        def cast(t):
            return t if t is None or t.dtype == torch.float64 else t.to(dtype)

        x_c, w_c, b_c = cast(x), cast(weight), cast(bias)
        mixed = [(name, t) for name, t in (("weight", w_c), ("bias", b_c)) if t is not None and t.dtype != x_c.dtype]
        if mixed:
            name, t = mixed[0]
            raise TypeError(f"under autocast, x is {x.dtype} and {name} is "
                            f"{weight.dtype if name == 'weight' else bias.dtype}: autocast keeps float64 and casts "
                            f"the other to {dtype}, so the base GEMM would mix {x_c.dtype} and {t.dtype}; give x, "
                            "weight and bias one dtype")
        with torch.autocast(device_type, enabled=False):
            return torch.ops.slao.lora_linear(x_c, w_c, b_c, lora_A, lora_B, scaling)

    return kernel


LIB.impl("lora_linear", _autocast_kernel("cuda"), "AutocastCUDA")
LIB.impl("lora_linear", _autocast_kernel("cpu"), "AutocastCPU")


# --------------------------------------------------------------------------- functional


class _EagerLoRALinear(torch.autograd.Function):
    """The autograd of ``slao::lora_linear`` for plain eager calls: the same two ops and the same
    saved tensors as the registered autograd (:func:`_setup_context`, :func:`_backward`), so the
    same results bit for bit, without ``torch.library``'s per-call Python dispatch around them
    (about 0.3 ms a call fwd+bwd on the 2-vCPU Xeon at SmolLM2's q_proj shape, 512 tokens: 7% of
    that layer's step); on the CPU the same autograd runs in C++ (``slao::lora_linear_eager``,
    ``csrc/lora_linear.cpp``), without a Python frame either. :func:`lora_linear` takes the registered
    op whenever something must see it
    as one op: ``torch.compile``, autocast (its cast runs in the dispatcher, before autograd), and
    tensor subclasses (``__torch_function__``), and devices other than CPU and CUDA (meta)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):
        out, act = torch.ops.slao.lora_linear(x, weight, bias, lora_A, lora_B, scaling)
        ctx.save_for_backward(x, weight, lora_A, lora_B, act)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B, act = ctx.saved_tensors
        need_x, _, _, need_A, need_B, _ = ctx.needs_input_grad
        grad_x, grad_A, grad_B = torch.ops.slao.lora_linear_backward(
            grad_out, None, x, weight, lora_A, lora_B, act, ctx.scaling, need_x)
        return grad_x if need_x else None, None, None, grad_A if need_A else None, grad_B if need_B else None, None


def _eager(x, tensors) -> bool:
    """Whether a call may take :class:`_EagerLoRALinear` (see its docstring)."""
    return (torch.is_grad_enabled() and x.device.type in ("cpu", "cuda") and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled(x.device.type)
            and not torch.overrides.has_torch_function(tensors))


def lora_linear(x, weight, bias, lora_A, lora_B, scaling):
    """``x·weightᵀ + bias + scaling·(x·lora_Aᵀ)·lora_Bᵀ``, differentiable in ``x``, ``lora_A``, ``lora_B``.

    ``x`` (..., in), ``weight`` (out, in) and ``bias`` (out,) share a dtype and
    are frozen; ``lora_A`` (r, in) and ``lora_B`` (out, r) may be fp32 on a
    16-bit model. Runs Triton kernels on CUDA, C++ kernels on CPU.
    """
    check_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling)
    check_frozen(weight, bias)
    tensors = (x, weight, lora_A, lora_B) if bias is None else (x, weight, bias, lora_A, lora_B)
    if _eager(x, tensors):
        if x.device.type == "cpu" and NATIVE_CPU:  # the same autograd in C++ (csrc/lora_linear.cpp)
            return torch.ops.slao.lora_linear_eager(x, weight, bias, lora_A, lora_B, float(scaling))
        return _EagerLoRALinear.apply(x, weight, bias, lora_A, lora_B, float(scaling))
    return torch.ops.slao.lora_linear(x, weight, bias, lora_A, lora_B, float(scaling))[0]


# --------------------------------------------------------------------------- every launch configuration


def aot_specs():
    """Every configuration the launchers above can launch on a GPU (for
    ``slao_kernels.ops.aot``, which compiles them all for sm_80 and sm_90)."""
    f32 = torch.float32
    for x_dt, lora_dt in DTYPE_PAIRS:
        cdt = compute_dtype(x_dt, lora_dt)
        for dot, precision in gpu_dot_variants(cdt):
            for block_r in RANK_BLOCKS:
                for has_add in (False, True):  # u = x·Aᵀ (forward), g = s·dy·B + ∂L/∂u (backward)
                    yield AotSpec(_project_kernel,
                                  (("x_ptr", x_dt), ("l_ptr", lora_dt), ("add_ptr", f32), ("p_ptr", f32)),
                                  (("HAS_ADD", has_add), ("DOT_DTYPE", dot), ("PRECISION", precision),
                                   ("BLOCK_M", PROJECT_BLOCK_M), ("BLOCK_K", _k_block(x_dt)), ("BLOCK_R", block_r)),
                                  SMALL_NUM_WARPS)
                for g_dt in sorted({f32, lora_dt}, key=str):  # fp32 workspace, or the adapter grad itself
                    yield AotSpec(_rank_outer_kernel,
                                  (("p_ptr", f32), ("y_ptr", x_dt), ("g_ptr", g_dt)),
                                  (("DOT_DTYPE", dot), ("PRECISION", precision), ("BLOCK_M", OUTER_BLOCK_M),
                                   ("BLOCK_N", OUTER_BLOCK_N), ("BLOCK_R", block_r)),
                                  SMALL_NUM_WARPS)
        for dot, precision in gpu_dot_variants(x_dt):
            for cfg in GEMM_CONFIGS[32 if x_dt == f32 else 16]:
                for has_bias in (False, True):  # forward (bias or not), dx (never)
                    yield AotSpec(_gemm_lowrank_kernel,
                                  (("x_ptr", x_dt), ("w_ptr", x_dt), ("p_ptr", f32), ("l_ptr", lora_dt),
                                   ("bias_ptr", x_dt), ("c_ptr", x_dt)),
                                  (("HAS_BIAS", has_bias), ("DOT_DTYPE", dot), ("PRECISION", precision),
                                   ("BLOCK_M", cfg.block_m), ("BLOCK_N", cfg.block_n), ("BLOCK_K", cfg.block_k),
                                   ("BLOCK_R", LOWRANK_BLOCK), ("GROUP_M", cfg.group_m)),
                                  cfg.num_warps, cfg.num_stages)
    yield from _update_aot_specs()  # the cublas+update candidate's kernel

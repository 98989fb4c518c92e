r"""SLAO's time-scaled merge of the B factors, over all layers at once.

For every adapted layer i, in place::

    B_merge[i] ← B_merge[i] + λ·(B_ft[i] − B_merge[i])

with ``λ = λ(t)`` of task t (SLAO: ``1/√t``), computed in fp32 (fp64 for
fp64) as ``(1 − λ)·B_merge + λ·B_ft``: the same value, but exact at λ = 1
(SLAO's first task sets ``B_merge = B_ft``) and at λ = 0. Shapes may differ
per layer (q/k/v/o/gate/up/down); each pair shares a shape, dtype and device.
Source: "Merge before Forget" (arXiv 2512.23017), the B-merge step;
docs/design.md §1.2.

CUDA design (Triton): one launch per dtype for all layers. The host builds a
table of (layer, first element) per BLOCK-sized chunk and the layers' data
pointers as int64; each program merges one chunk. A few hundred adapter
tensors of a few thousand elements each would otherwise cost a few hundred
launches. With ``check_finite`` a read-only pass of the same kernel flags
chunks whose result is not finite, and nothing is written if any is.

CPU: ``csrc/scaled_merge.cpp`` (one parallel region over all layers' chunks).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from slao_kernels import reference
from slao_kernels._checks import check_tensor
from slao_kernels._ops import register_kernels
from slao_kernels.ops._triton import AotSpec, dtype_of
from slao_kernels.ops.tuning import Candidate, problem_key, tuner

# --------------------------------------------------------------------------- kernel


@triton.jit
def _scaled_merge_kernel(
    merged_ptrs, fine_tuned_ptrs, numels_ptr, chunk_layer_ptr, chunk_start_ptr, flags_ptr,
    lam,
    DTYPE: tl.constexpr, WRITE: tl.constexpr, BLOCK: tl.constexpr,
):
    """One chunk of one layer: m ← m + lam·(f − m). WRITE=False only flags a non-finite result."""
    pid = tl.program_id(0)
    layer = tl.load(chunk_layer_ptr + pid)
    start = tl.load(chunk_start_ptr + pid)  # int64: a layer may hold more than 2^31 elements
    numel = tl.load(numels_ptr + layer)
    # The layers' addresses arrive as int64; reinterpret them as typed pointers.
    m_ptr = tl.load(merged_ptrs + layer).to(tl.pointer_type(DTYPE))
    f_ptr = tl.load(fine_tuned_ptrs + layer).to(tl.pointer_type(DTYPE))
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = (1.0 - lam) * m + lam * f  # exact at lam = 1 and lam = 0, unlike m + lam·(f − m)
    if WRITE:
        tl.store(m_ptr + offs, out.to(DTYPE), mask=mask)
    else:
        stored = out.to(DTYPE).to(tl.float32)  # as it would be stored: a 16-bit store can overflow
        bad = (stored != stored) | (tl.abs(stored) == float("inf"))
        tl.store(flags_ptr + pid, tl.sum((bad & mask).to(tl.int32), axis=0))


# --------------------------------------------------------------------------- launcher

BLOCK = 4096
NUM_WARPS = 4
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _chunk_table(layers: list[torch.Tensor], device):
    """(numels, chunk → layer, chunk → first element) as device tensors."""
    numels = [t.numel() for t in layers]
    chunk_layer, chunk_start = [], []
    for i, n in enumerate(numels):
        starts = range(0, n, BLOCK)
        chunk_layer.extend([i] * len(starts))
        chunk_start.extend(starts)

    def dev(values, dtype):
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    return dev(numels, torch.int64), dev(chunk_layer, torch.int32), dev(chunk_start, torch.int64)


def scaled_merge_triton(merged, fine_tuned, lam, check_finite):
    """``slao::scaled_merge_`` on the Triton kernel: one launch per dtype (two with ``check_finite``)."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(merged):
        groups.setdefault(t.dtype, []).append(i)
    launches = []
    for dtype, idx in groups.items():
        layers = [merged[i] for i in idx if merged[i].numel()]
        sources = [fine_tuned[i] for i in idx if merged[i].numel()]
        if not layers:
            continue
        device = layers[0].device
        ptrs_m = torch.tensor([t.data_ptr() for t in layers], dtype=torch.int64).to(device, non_blocking=True)
        ptrs_f = torch.tensor([t.data_ptr() for t in sources], dtype=torch.int64).to(device, non_blocking=True)
        numels, chunk_layer, chunk_start = _chunk_table(layers, device)
        flags = torch.zeros(chunk_layer.numel(), dtype=torch.int32, device=device)
        args = (ptrs_m, ptrs_f, numels, chunk_layer, chunk_start, flags, float(lam))
        launches.append((dtype, [i for i in idx if merged[i].numel()], chunk_layer, flags, args))
    if check_finite:  # every check before any write
        for dtype, idx, chunk_layer, flags, args in launches:
            _scaled_merge_kernel[(flags.numel(),)](*args, DTYPE=dtype_of(dtype), WRITE=False, BLOCK=BLOCK,
                                                    num_warps=NUM_WARPS)
            bad = torch.nonzero(flags)
            if bad.numel():
                i = idx[int(chunk_layer[bad[0, 0]])]
                raise ValueError(f"scaled_merge_: the merge would write non-finite values into tensor {i} "
                                 f"(shape {tuple(merged[i].shape)}); nothing was written")
    for dtype, _, _, flags, args in launches:
        _scaled_merge_kernel[(flags.numel(),)](*args, DTYPE=dtype_of(dtype), WRITE=True, BLOCK=BLOCK,
                                                num_warps=NUM_WARPS)


# --------------------------------------------------------------------------- registration


def lerp_merge(merged, fine_tuned, lam, check_finite):
    """``slao::scaled_merge_`` by ``torch._foreach_lerp_`` (the torch candidate; exact at λ = 0 and 1
    too). With ``check_finite`` the results are computed aside, checked, then copied in."""
    if not check_finite:
        torch._foreach_lerp_(list(merged), list(fine_tuned), float(lam))
        return
    results = torch._foreach_lerp(list(merged), list(fine_tuned), float(lam))
    finite = torch.stack([torch.isfinite(t).all() for t in results]).cpu()
    if not finite.all():
        i = int(torch.nonzero(~finite)[0, 0])
        raise ValueError(f"scaled_merge_: the merge would write non-finite values into tensor {i} "
                         f"(shape {tuple(merged[i].shape)}); nothing was written")
    torch._foreach_copy_(list(merged), results)


def _candidates(merged, fine_tuned, lam, check_finite) -> list[Candidate]:
    return [Candidate("triton", lambda: scaled_merge_triton(merged, fine_tuned, lam, check_finite)),
            Candidate("foreach_lerp", lambda: lerp_merge(merged, fine_tuned, lam, check_finite))]


def _cuda(merged, fine_tuned, lam, check_finite):
    if any(t.dtype not in TRITON_DTYPES for t in merged):  # fp64 adapters: the reference
        return reference.scaled_merge_ref(merged, fine_tuned, lam, check_finite)
    if not merged:
        return None
    numels = [t.numel() for t in merged]
    key = problem_key("scaled_merge_", sorted({t.dtype for t in merged}, key=str), len(merged), max(numels),
                      int(check_finite), sum(numels))
    chooser = tuner(merged[0].device)
    capturing = torch.cuda.is_current_stream_capturing()
    if chooser.needs_timing(key) and not capturing:  # timed on zeros: the caller's tensors are written once
        scratch_m, scratch_f = [torch.zeros_like(t) for t in merged], [torch.zeros_like(t) for t in fine_tuned]
        chooser.choose(key, _candidates(scratch_m, scratch_f, lam, check_finite))
    chooser.choose(key, _candidates(merged, fine_tuned, lam, check_finite), allow_timing=False).run()
    return None


register_kernels("scaled_merge_", _cuda, reference.scaled_merge_ref)


def aot_specs():
    """Every configuration the launcher can launch on a GPU."""
    ptrs = (("merged_ptrs", torch.int64), ("fine_tuned_ptrs", torch.int64), ("numels_ptr", torch.int64),
            ("chunk_layer_ptr", torch.int32), ("chunk_start_ptr", torch.int64), ("flags_ptr", torch.int32))
    for dtype in TRITON_DTYPES:
        for write in (False, True):
            yield AotSpec(_scaled_merge_kernel, ptrs,
                          (("DTYPE", dtype_of(dtype)), ("WRITE", write), ("BLOCK", BLOCK)),
                          NUM_WARPS, float_args=("lam",))


# --------------------------------------------------------------------------- functional


def scaled_merge_(merged, fine_tuned, lam: float, check_finite: bool = False):
    """In place, for every layer: ``merged ← merged + lam·(fine_tuned − merged)``.

    Args:
        merged: a tensor or a list of tensors (e.g. every layer's ``B_merge``);
            shapes and dtypes may differ between layers.
        fine_tuned: the same number of tensors, each with the shape, dtype and
            device of its ``merged`` counterpart.
        lam: the merge weight (SLAO: ``1/√t`` for task t).
        check_finite: raise ``ValueError``, writing nothing, when a result would
            hold NaN or ±Inf (costs a read-only pass and, on CUDA, a sync).

    Returns:
        ``merged``.

    Raises:
        ValueError: mismatched counts, shapes, dtypes or devices, a non-contiguous
            tensor, a ``merged`` tensor that requires grad while grad mode is on
            (autograd cannot track this write: call it under ``torch.no_grad()``),
            or, with ``check_finite``, a non-finite result. Nothing is written then.
        TypeError: a non-floating-point tensor or a ``lam`` that is not a finite number.
    """
    single = isinstance(merged, torch.Tensor)
    m_list = [merged] if single else list(merged)
    f_list = [fine_tuned] if isinstance(fine_tuned, torch.Tensor) else list(fine_tuned)
    if len(m_list) != len(f_list):
        raise ValueError(f"scaled_merge_: {len(m_list)} merged tensors but {len(f_list)} fine-tuned ones")
    for i, (m, f) in enumerate(zip(m_list, f_list, strict=True)):
        check_tensor(f"merged[{i}]", m)
        check_tensor(f"fine_tuned[{i}]", f)
        if m.shape != f.shape or m.dtype != f.dtype or m.device != f.device:
            raise ValueError(f"merged[{i}] is {tuple(m.shape)} {m.dtype} on {m.device} but fine_tuned[{i}] is "
                             f"{tuple(f.shape)} {f.dtype} on {f.device}")
        if not (m.is_contiguous() and f.is_contiguous()):
            raise ValueError(f"merged[{i}] and fine_tuned[{i}] must be contiguous")
        if m.device != m_list[0].device:
            raise ValueError(f"merged[{i}] is on {m.device} but merged[0] is on {m_list[0].device}")
        if m.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"scaled_merge_: merged[{i}] requires grad and grad mode is on; autograd cannot track "
                             "this in-place write. Call it under torch.no_grad() (or pass .detach()ed tensors)")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise TypeError(f"lam must be a finite float, got {lam!r}")
    if m_list:
        torch.ops.slao.scaled_merge_(m_list, f_list, float(lam), bool(check_finite))
    return merged

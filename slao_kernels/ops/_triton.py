"""Triton helpers shared by the op files: dot-operand dtype selection and
interpreter detection. Nothing here queries a device at import time."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def dtype_of(dtype: torch.dtype):
    """The Triton dtype of a floating torch dtype the kernels support."""
    if dtype not in _TL_DTYPE:
        raise TypeError(f"Triton kernels take float32/bfloat16/float16 tensors, not {dtype}")
    return _TL_DTYPE[dtype]


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_dtype(compute: torch.dtype):
    """``(DOT_DTYPE, PRECISION)`` constexprs for a ``tl.dot`` computed in ``compute``.

    16-bit dots stay 16-bit (tensor cores, fp32 accumulation). fp32 dots follow
    torch's own switch, ``torch.backends.cuda.matmul.allow_tf32``, so a fp32 op
    is exactly as precise as the ``torch.matmul`` it replaces.
    The interpreter computes bf16 ``tl.dot`` wrongly (it has no bf16
    arithmetic), so there bf16 operands go through an IEEE fp32 dot: products of
    bf16 values are exact in fp32, so this is the GPU's math up to summation order.
    """
    if compute not in _TL_DTYPE:
        raise TypeError(f"Triton kernels compute in float32/bfloat16/float16, not {compute}")
    if compute == torch.bfloat16 and interpreting():
        return tl.float32, "ieee"
    if compute == torch.float32:
        tf32 = torch.backends.cuda.matmul.allow_tf32 and not interpreting()
        return tl.float32, "tf32" if tf32 else "ieee"
    return _TL_DTYPE[compute], "ieee"


def rank_block(rank: int) -> int:
    """Rank tile: a power of two ≥ 16, since compiled ``tl.dot`` needs K ≥ 16 for
    16-bit operands (rank 8 passes the interpreter and fails on a GPU); capped at
    64, larger ranks loop over several tiles."""
    return max(16, min(64, triton.next_power_of_2(rank)))


@triton.jit
def dot_acc(a, b, acc, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` with both operands cast to ``DOT_DTYPE``, fp32 accumulation."""
    if DOT_DTYPE == tl.float32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    else:
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)
    return acc


# --------------------------------------------------------------------------- ahead-of-time compilation

PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int64: "*i64",
       torch.int32: "*i32"}


@dataclass(frozen=True)
class AotSpec:
    """One launch configuration of a kernel, compilable without a GPU."""

    kernel: object  # the @triton.jit function
    ptr_dtypes: tuple  # ((arg name, torch dtype), ...) for the pointer arguments
    constexprs: tuple  # ((arg name, value), ...)
    num_warps: int
    num_stages: int = 3
    float_args: tuple = ("scale",)  # scalar arguments typed fp32; the other scalars are i32

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        ptrs = ",".join(f"{k}={str(v).replace('torch.', '')}" for k, v in self.ptr_dtypes)
        cex = ",".join(f"{k}={getattr(v, 'name', v)}" for k, v in self.constexprs)
        return f"{fn.__name__}[{ptrs};{cex};warps={self.num_warps},stages={self.num_stages}]"

    def signature(self) -> dict:
        """Triton signature: pointers typed, constexprs marked, ``float_args`` fp32, other scalars i32."""
        ptrs, cex = dict(self.ptr_dtypes), dict(self.constexprs)
        sig = {}
        for arg in self.kernel.arg_names:
            if arg in cex:
                sig[arg] = "constexpr"
            elif arg in ptrs:
                sig[arg] = PTR[ptrs[arg]]
            elif arg in self.float_args:
                sig[arg] = "fp32"
            else:
                sig[arg] = "i32"
        return sig


# Every (activation dtype, adapter dtype) pair the launchers accept on CUDA.
DTYPE_PAIRS = (
    (torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
    (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16), (torch.float16, torch.float32),
)
RANK_BLOCKS = (16, 32, 64)  # every value rank_block() returns


def gpu_dot_variants(compute: torch.dtype):
    """Every ``(DOT_DTYPE, PRECISION)`` that :func:`dot_dtype` yields on a GPU for ``compute``."""
    if compute == torch.float32:
        return ((tl.float32, "tf32"), (tl.float32, "ieee"))
    return ((_TL_DTYPE[compute], "ieee"),)

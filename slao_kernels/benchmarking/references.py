"""What the kernels are timed against: the stock-torch ways of computing the same ops.

These are baselines, not semantics: the semantics (and the CPU fallback) are the
``*_ref`` functions of :mod:`slao_kernels.reference`.

  lora_linear_eager     PEFT-style ``base(x) + B(A(x))·s``, differentiable by torch autograd
  lora_linear_composed  the best stock-torch forward: base GEMM, then ``addmm_`` of the update
  ComposedLoRALinear    that forward with the reference backward, as one autograd function
  qr_with_sign_fix      ``torch.linalg.qr`` with the signs fixed so diag(R) > 0
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slao_kernels import reference
from slao_kernels._ops import compute_dtype


def lora_linear_eager(x, weight, bias, lora_A, lora_B, scaling):
    """The PEFT-style eager composition ``base(x) + B(A(x))·s`` that users run
    today; the baseline of the benchmarks. Differentiable by torch autograd."""
    cdt = compute_dtype(x.dtype, lora_A.dtype)
    base = F.linear(x, weight, bias)
    return (base + F.linear(F.linear(x.to(cdt), lora_A.to(cdt)), lora_B.to(cdt)) * scaling).to(x.dtype)


def lora_linear_composed(x, weight, bias, lora_A, lora_B, scaling):
    """The best composition of stock torch ops: base GEMM, then the expand
    accumulated in place with ``addmm_`` (no temporary of the output size).
    Forward only (``addmm_`` on an autograd-tracked output is not allowed);
    :class:`ComposedLoRALinear` pairs it with the reference backward."""
    x2 = x.reshape(-1, x.shape[-1])
    cdt = compute_dtype(x.dtype, lora_A.dtype)
    out = F.linear(x2, weight, bias)
    act = x2.to(cdt) @ lora_A.t().to(cdt)
    out.addmm_(act.to(out.dtype), lora_B.t().to(out.dtype), alpha=scaling)
    return out.reshape(*x.shape[:-1], weight.shape[0])


class ComposedLoRALinear(torch.autograd.Function):
    """The ``composed`` provider with autograd: :func:`lora_linear_composed` forward
    (no bias), :func:`slao_kernels.reference.lora_linear_backward_ref` backward.

    ``ComposedLoRALinear.apply(x, weight, lora_A, lora_B, scaling)``; gradients
    for x, lora_A and lora_B.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, scaling):
        ctx.save_for_backward(x, weight, lora_A, lora_B)
        ctx.scaling = scaling
        return lora_linear_composed(x, weight, None, lora_A, lora_B, scaling)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B = ctx.saved_tensors
        act = x.to(lora_A.dtype) @ lora_A.t()
        gx, gA, gB = reference.lora_linear_backward_ref(grad_out, None, x, weight, lora_A, lora_B, act,
                                                        ctx.scaling, True)
        return gx, None, gA, gB, None


def qr_with_sign_fix(A: torch.Tensor) -> torch.Tensor:
    """What a user would write: ``torch.linalg.qr`` of Aᵀ, signs fixed so diag(R) > 0."""
    Q, R = torch.linalg.qr(A.transpose(1, 2))
    signs = torch.where(torch.diagonal(R, dim1=-2, dim2=-1) < 0, -1.0, 1.0)
    return (Q * signs.unsqueeze(-2)).transpose(1, 2)

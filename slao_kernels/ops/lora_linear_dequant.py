r"""LoRA linear on a base weight that is stored compressed: ``y = x·deq()ᵀ + b + s·(x·Aᵀ)·Bᵀ``.

The base weight ``W0`` (m×n) is not a tensor here but a zero-argument callable
``dequantize`` that returns it (m×n, in the compute dtype) from whatever storage
the caller keeps (e.g. a bitsandbytes 4-bit or 8-bit layer). Per call:

* forward: ``W0 = dequantize()``, then the fused op ``slao::lora_linear`` on it;
  ``W0`` is dropped when the forward returns (autograd does not save it);
* backward: ``W0 = dequantize()`` again for ``dx = dy·W0 + g·A`` (the fused
  ``slao::lora_linear_backward``), dropped when the backward returns.

So at most one layer's dequantized weight is alive at a time (the peak extra
memory is m·n elements of the compute dtype), never the whole model's. The
gradients are those of ``slao::lora_linear`` (docs/design.md §1.1): ``dx``,
``dA``, ``dB``; the base gets none. Saved for the backward: ``x``, ``A``, ``B``
and the rank-r activation ``u = x·Aᵀ`` (M×r), as for the plain op.

No bitsandbytes here: the callable is the caller's (``slao_kernels.quantized``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from slao_kernels._checks import check_lora_linear_args


class _LoRALinearDequant(torch.autograd.Function):
    """Autograd of :func:`lora_linear_dequant` (the weight re-dequantized in the backward)."""

    @staticmethod
    def forward(ctx, x, bias, lora_A, lora_B, scaling, dequantize):
        weight = dequantize()
        check_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling)
        out, act = torch.ops.slao.lora_linear(x, weight, bias, lora_A, lora_B, float(scaling))
        ctx.save_for_backward(x, lora_A, lora_B, act)
        ctx.scaling = float(scaling)
        ctx.dequantize = dequantize
        ctx.out_features = weight.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_A, lora_B, act = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        # The weight is needed only for dx: the adapter gradients read x, u, dy and B alone.
        weight = ctx.dequantize() if need_x else x.new_empty((ctx.out_features, x.shape[-1]))
        grad_x, grad_A, grad_B = torch.ops.slao.lora_linear_backward(
            grad_out, None, x, weight, lora_A, lora_B, act, ctx.scaling, need_x)
        return (grad_x if need_x else None, None, grad_A if ctx.needs_input_grad[2] else None,
                grad_B if ctx.needs_input_grad[3] else None, None, None)


class _LinearDequant(torch.autograd.Function):
    """Autograd of :func:`linear_dequant`."""

    @staticmethod
    def forward(ctx, x, bias, dequantize):
        ctx.dequantize = dequantize
        return torch.nn.functional.linear(x, dequantize(), bias)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad_out @ ctx.dequantize().to(grad_out.dtype), None, None


def _under_autocast(apply, x, bias, dequantize, *rest):
    """Run ``apply`` as autocast would run the base product: ``x``, the bias and the dequantized
    weight (forward and backward alike) in the autocast dtype, the adapter in its own, with
    autocast off inside (so the fused op's own autocast kernel does not cast again behind the
    saved tensors' back). fp64 ``x`` stays fp64, as torch's autocast leaves it; without autocast
    this is ``apply`` itself."""
    device = x.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device) or x.dtype == torch.float64:
        return apply(x, bias, dequantize, *rest)
    dtype = torch.get_autocast_dtype(device)

    def dequantize_cast():
        return dequantize().to(dtype)

    with torch.autocast(device, enabled=False):
        return apply(x.to(dtype), None if bias is None else bias.to(dtype), dequantize_cast, *rest)


def linear_dequant(x: torch.Tensor, dequantize: Callable[[], torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    """``x·Wᵀ + bias`` with ``W = dequantize()``, differentiable in ``x`` only, with the weight
    dequantized again in the backward instead of saved (the base product alone, for an adapter
    whose own path runs separately, as with dropout)."""
    if not callable(dequantize):
        raise TypeError(f"linear_dequant: dequantize must be a callable returning the base weight, "
                        f"got {type(dequantize).__name__}")
    return _under_autocast(lambda x, bias, deq: _LinearDequant.apply(x, bias, deq), x, bias, dequantize)


def lora_linear_dequant(x: torch.Tensor, dequantize: Callable[[], torch.Tensor], bias: torch.Tensor | None,
                        lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``x·Wᵀ + bias + scaling·(x·lora_Aᵀ)·lora_Bᵀ`` with ``W = dequantize()``, differentiable in ``x``,
    ``lora_A``, ``lora_B``.

    Args:
        x: activations (..., in), in the dtype ``dequantize`` returns.
        dequantize: a callable with no argument returning the frozen base weight (out, in) in ``x``'s
            dtype, without gradient; called once in the forward and once more in the backward when
            ``x`` needs a gradient (the weight is never kept between the two).
        bias: frozen (out,) in ``x``'s dtype, or None.
        lora_A, lora_B: the adapter (r, in) and (out, r), fp32 or ``x``'s dtype.
        scaling: the adapter's scale s.

    The shapes and dtypes are checked as :func:`slao_kernels.lora_linear` checks them, on the first
    dequantized weight, before anything is computed. Under autocast the base product runs in the
    autocast dtype (as ``F.linear`` and :func:`slao_kernels.lora_linear` do) and the adapter in its own.
    """
    if not callable(dequantize):
        raise TypeError(f"lora_linear_dequant: dequantize must be a callable returning the base weight, "
                        f"got {type(dequantize).__name__}")
    if bias is not None and bias.requires_grad:
        raise ValueError("lora_linear_dequant: bias requires grad, but the base is frozen (no gradient is computed "
                         "for it); call bias.requires_grad_(False)")
    return _under_autocast(lambda x, bias, deq, A, B, s: _LoRALinearDequant.apply(x, bias, A, B, s, deq),
                           x, bias, dequantize, lora_A, lora_B, scaling)

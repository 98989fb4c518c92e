"""Argument validation shared by the functionals and the modules.

Every check raises before any kernel runs, naming the tensor, what was
expected and what was given. The checks read only metadata (shapes, dtypes,
devices), so they are free to run on every call and trace cleanly under
``torch.compile``.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensor(name: str, t, ndim: int | None = None, min_ndim: int | None = None) -> None:
    """``t`` is a floating-point tensor with the given number of dimensions."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32/bfloat16/float16/float64), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")


def check_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling) -> None:
    """Validate the arguments of ``lora_linear`` (shapes, dtypes, devices).

    Under autocast the base dtypes may differ (autocast casts them)."""
    check_tensor("x", x, min_ndim=1)
    autocast = _autocast_enabled(x.device.type)
    check_tensor("weight", weight, ndim=2)
    check_tensor("lora_A", lora_A, ndim=2)
    check_tensor("lora_B", lora_B, ndim=2)
    out_features, in_features = weight.shape
    rank = lora_A.shape[0]
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x has {x.shape[-1]} input features (shape {tuple(x.shape)}) but weight expects "
            f"{in_features} (weight shape {tuple(weight.shape)})"
        )
    if lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A must have shape (rank, {in_features}), got {tuple(lora_A.shape)}")
    if lora_B.shape != (out_features, rank):
        raise ValueError(
            f"lora_B must have shape ({out_features}, {rank}) to match weight {tuple(weight.shape)} and "
            f"lora_A {tuple(lora_A.shape)}, got {tuple(lora_B.shape)}"
        )
    check_rank(rank, in_features, out_features)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != out_features:
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    named = [("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)]
    if bias is not None:
        named.append(("bias", bias))
    for name, t in named[1:]:
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share a device")
    if weight.dtype != x.dtype and not autocast:
        raise TypeError(
            f"weight dtype {weight.dtype} differs from x dtype {x.dtype}; cast one of them or run under "
            "torch.autocast"
        )
    if bias is not None and bias.dtype != x.dtype and not autocast:
        raise TypeError(f"bias dtype {bias.dtype} differs from x dtype {x.dtype}")
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_B dtype {lora_B.dtype} differs from lora_A dtype {lora_A.dtype}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise TypeError(f"scaling must be a finite float, got {scaling!r}")


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        return False


def check_rank(rank: int, in_features: int, out_features: int) -> None:
    """``1 ≤ rank ≤ min(in_features, out_features)``."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if rank > min(in_features, out_features):
        raise ValueError(
            f"LoRA rank {rank} exceeds min(in_features, out_features) = {min(in_features, out_features)}"
        )


def check_frozen(weight, bias) -> None:
    """The base weight and bias are frozen: ``lora_linear`` has no gradient for them."""
    if weight.requires_grad:
        raise ValueError(
            "weight requires grad, but lora_linear keeps the base weight frozen (it computes no gradient "
            "for it); call weight.requires_grad_(False)"
        )
    if bias is not None and bias.requires_grad:
        raise ValueError("bias requires grad, but lora_linear keeps the bias frozen; call bias.requires_grad_(False)")

"""Argument validation shared by the functionals and the modules.

Every check raises before any kernel runs, naming the tensor, what was
expected and what was given. The checks read only metadata (shapes, dtypes,
devices), so they are free to run on every call and trace cleanly under
``torch.compile``.
"""

from __future__ import annotations

import math
import numbers

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


def check_rank(rank: int, in_features: int, out_features: int, where: str = "") -> None:
    """``1 ≤ rank ≤ min(in_features, out_features)``; ``where`` (e.g. a module path) prefixes the message."""
    prefix = f"{where}: " if where else ""
    if rank < 1:
        raise ValueError(f"{prefix}LoRA rank must be >= 1, got {rank}")
    if rank > min(in_features, out_features):
        raise ValueError(
            f"{prefix}LoRA rank {rank} exceeds min(in_features, out_features) = {min(in_features, out_features)} "
            f"(in_features={in_features}, out_features={out_features})"
        )


# --- adapter configuration (LoRAConfig, LoRALinear): checked at construction, not at the first forward ---


def check_config_rank(rank, field: str = "rank") -> int:
    """``rank`` is an integer ≥ 1 (not a bool, not a float); returns it as an ``int``."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"{field} must be an int >= 1, got {rank!r} ({type(rank).__name__})")
    if rank < 1:
        raise ValueError(f"{field} must be an int >= 1, got {rank!r}")
    return int(rank)


def check_alpha(alpha, field: str = "alpha") -> float:
    """``alpha`` is a finite real number (not a bool, str, None or complex); returns it as a ``float``."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"{field} must be a finite real number, got {alpha!r} ({type(alpha).__name__})")
    try:
        value = float(alpha)
    except OverflowError:  # an int beyond float64's range (e.g. 10**400)
        raise ValueError(f"{field} must be a finite real number, got {alpha!r} (beyond float64's range)") from None
    if not math.isfinite(value):
        raise ValueError(f"{field} must be a finite real number, got {alpha!r}")
    return value


def check_dropout(dropout, field: str = "dropout") -> float:
    """``dropout`` is a real number in [0, 1) (not a bool); returns it as a ``float``."""
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
        raise TypeError(f"{field} must be a real number in [0, 1), got {dropout!r} ({type(dropout).__name__})")
    value = float(dropout)
    if not 0.0 <= value < 1.0:  # NaN fails this too
        raise ValueError(f"{field} must be in [0, 1), got {dropout!r}")
    return value


def check_rslora(rslora, field: str = "rslora") -> bool:
    """``rslora`` is a ``bool`` (a string such as ``"no"`` would be truthy)."""
    if not isinstance(rslora, bool):
        raise TypeError(f"{field} must be a bool, got {rslora!r} ({type(rslora).__name__})")
    return rslora


def check_adapter_dtype(dtype, field: str = "dtype") -> None:
    """``dtype`` is None or one of the real floating dtypes the kernels take (:data:`FLOAT_DTYPES`)."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES)
        raise TypeError(f"{field} must be a floating torch.dtype ({names}) or None, got {dtype!r}")


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    """``alpha / r``, or ``alpha / √r`` with rsLoRA (rank-stabilized)."""
    return alpha / (math.sqrt(rank) if rslora else rank)


def check_scaling(scaling: float, dtypes, where: str = "scaling") -> None:
    """``scaling`` is finite and representable in every one of ``dtypes`` (the adapter's and the base
    weight's): ``|scaling| ≤ finfo(d).max`` for the narrowest ``d``, else the first forward overflows."""
    if not math.isfinite(scaling):
        raise ValueError(f"{where} = {scaling!r} is not finite; lower alpha")
    for dtype in dtypes:
        limit = torch.finfo(dtype).max
        if abs(scaling) > limit:
            raise ValueError(f"{where} = {scaling:.6g} overflows {str(dtype).replace('torch.', '')} "
                             f"(largest finite value {limit:.6g}); lower alpha")


def check_frozen(weight, bias) -> None:
    """The base weight and bias are frozen: ``lora_linear`` has no gradient for them."""
    if weight.requires_grad:
        raise ValueError(
            "weight requires grad, but lora_linear keeps the base weight frozen (it computes no gradient "
            "for it); call weight.requires_grad_(False)"
        )
    if bias is not None and bias.requires_grad:
        raise ValueError("bias requires grad, but lora_linear keeps the bias frozen; call bias.requires_grad_(False)")

"""``LoRALinear``: an ``nn.Linear`` with one LoRA adapter, on the fused op.

The module takes over the wrapped linear's own ``weight`` and ``bias``
Parameter objects (no copy) under the same names, so a patched model's
``state_dict`` keeps the base keys (``...q_proj.weight``) and adds
``...q_proj.lora_A`` / ``...q_proj.lora_B``. The original ``nn.Linear`` is kept
aside, unregistered and without its parameters (so it pins no tensor that
FSDP2 or ``load_state_dict`` replaces), for :meth:`LoRALinear.to_linear`.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from slao_kernels._checks import (
    FLOAT_DTYPES,
    check_adapter_dtype,
    check_alpha,
    check_dropout,
    check_rank,
    check_rslora,
    check_scaling,
    lora_scaling,
)
from slao_kernels.ops.lora_linear import lora_linear


def default_lora_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters of 16-bit models are kept in fp32 (PEFT's default: the adapter
    is small and its updates are tiny next to bf16's resolution)."""
    return torch.float32 if base_dtype in (torch.bfloat16, torch.float16) else base_dtype


class LoRALinear(nn.Module):
    """``y = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ`` around an existing ``nn.Linear``.

    Args:
        base: the linear layer to adapt. Its weight and bias are frozen and
            shared, not copied.
        rank: adapter rank ``r``, an int, ``1 ≤ r ≤ min(in_features, out_features)``.
        alpha: LoRA alpha, a finite real number; ``scaling = alpha / r`` (``alpha / √r``
            with ``rslora``), which must be representable in the adapter's and the base
            weight's dtype.
        dropout: dropout probability on the adapter's input. With ``dropout > 0``
            in training mode the adapter path runs composed from torch ops (the
            base product must see the undropped input, the fused op sees one x).
        rslora: rank-stabilized scaling (a bool).
        dtype: adapter dtype (float32, bfloat16, float16, float64); default
            :func:`default_lora_dtype` of the base.

    Every argument is checked (:meth:`check_args`) before the base is touched: a
    refused construction raises ``TypeError``/``ValueError`` naming the argument and
    leaves ``base`` exactly as it was.

    ``lora_A`` (r×in) starts Kaiming-uniform and ``lora_B`` (out×r) at zero, so a
    new adapter leaves the output unchanged.

    One adapter: the strategies that keep earlier adapters frozen beside it (IncLoRA,
    O-LoRA) install :class:`StackedLoRALinear` on the modules they use, so the plain
    module's forward carries nothing of theirs.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dtype: torch.dtype | None = None):
        super().__init__()
        # Everything is checked, and the adapter allocated, before ``base`` is touched: a refused
        # construction leaves the linear layer (its parameters and their requires_grad) as it was.
        rank, alpha, dropout, rslora, lora_dtype = self.check_args(base, rank, alpha, dropout, rslora, dtype)
        weight, bias = base.weight, base.bias
        factory = {"device": weight.device, "dtype": lora_dtype}
        lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        lora_B = nn.Parameter(torch.empty(base.out_features, rank, **factory))
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.rank = rank
        self.alpha = alpha
        self.rslora = rslora
        self.scaling = lora_scaling(alpha, rank, rslora)
        self.merged = False
        self.lora_A = lora_A
        self.lora_B = lora_B
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()
        object.__setattr__(self, "_base", base)  # kept aside, not a registered submodule
        self.register_parameter("weight", weight)
        self.register_parameter("bias", bias)
        weight.requires_grad_(False)
        if bias is not None:
            bias.requires_grad_(False)
        # This module owns them now; the shell gets the current ones back in to_linear().
        base.register_parameter("weight", None)
        base.register_parameter("bias", None)

    @staticmethod
    def check_args(base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                   dtype: torch.dtype | None = None, where: str = "LoRALinear") -> tuple:
        """Check the constructor's arguments without building anything.

        Raises ``TypeError``/``ValueError`` naming the argument (prefixed by ``where``, e.g. a
        module path), the expected and the given value: ``base`` an ``nn.Linear`` holding a weight
        of a kernel dtype, ``rank`` an int in ``[1, min(in, out)]``, ``alpha`` a finite real,
        ``dropout`` a real in [0, 1), ``rslora`` a bool, ``dtype`` a real floating dtype or None,
        and the scaling representable in the adapter's and the base weight's dtype.

        Returns:
            ``(rank, alpha, dropout, rslora, lora_dtype)`` normalized (int, float, float, bool,
            the adapter dtype the module would get).
        """
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{where} wraps an nn.Linear, got {type(base).__name__}")
        weight, bias = base.weight, base.bias
        if not isinstance(weight, nn.Parameter):
            raise TypeError(f"{where}: the nn.Linear's weight must be an nn.Parameter, got "
                            f"{type(weight).__name__}" + (" (is it the kept-aside shell of another LoRALinear?)"
                                                          if weight is None else ""))
        if weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{where}: the base weight must be float32/bfloat16/float16/float64, got {weight.dtype}")
        if tuple(weight.shape) != (base.out_features, base.in_features):
            raise ValueError(f"{where}: the base weight has shape {tuple(weight.shape)}, but the nn.Linear says "
                             f"(out_features, in_features) = {(base.out_features, base.in_features)}")
        if bias is not None and (not isinstance(bias, nn.Parameter) or bias.dtype not in FLOAT_DTYPES
                                 or tuple(bias.shape) != (base.out_features,)):
            raise ValueError(f"{where}: the base bias must be None or a floating ({base.out_features},) "
                             f"nn.Parameter, got {type(bias).__name__} {getattr(bias, 'dtype', '')} "
                             f"{tuple(getattr(bias, 'shape', ()))}")
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
            raise TypeError(f"{where}: rank must be an int, got {rank!r} ({type(rank).__name__})")
        rank = int(rank)
        check_rank(rank, base.in_features, base.out_features, where)
        alpha = check_alpha(alpha, f"{where}: alpha")
        dropout = check_dropout(dropout, f"{where}: dropout")
        rslora = check_rslora(rslora, f"{where}: rslora")
        check_adapter_dtype(dtype, f"{where}: dtype")
        lora_dtype = dtype or default_lora_dtype(weight.dtype)
        check_scaling(lora_scaling(alpha, rank, rslora), (lora_dtype, weight.dtype),
                      f"{where}: scaling = alpha/{'√' if rslora else ''}rank")
        return rank, alpha, dropout, rslora, lora_dtype

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """Fresh adapter: ``A`` as :meth:`init_A_` draws it, ``B = 0``."""
        self.init_A_(self.lora_A)
        nn.init.zeros_(self.lora_B)

    @staticmethod
    def init_A_(A: torch.Tensor) -> torch.Tensor:
        """Fill ``A`` (r×in) the way a fresh adapter starts: Kaiming-uniform, as
        ``nn.Linear`` initializes its weight. Returns ``A``."""
        return nn.init.kaiming_uniform_(A, a=math.sqrt(5))

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of everything the forward adds: here the one adapter (subclasses add theirs)."""
        return self.lora_A, self.lora_B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        if isinstance(self.dropout, nn.Dropout) and self.training:
            return F.linear(x, self.weight, self.bias) + self.delta(self.dropout(x)).to(x.dtype)
        A, B = self._factors()
        return lora_linear(x, self.weight, self.bias, A, B, self.scaling)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution alone, ``scaling·(x·Aᵀ)·Bᵀ``, in the adapter dtype."""
        A, B = self._factors()
        u = F.linear(x.to(A.dtype), A)
        return F.linear(u, B) * self.scaling

    def delta_weight(self, factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``scaling·B·A`` (out×in) of the adapter (of all, in a :class:`StackedLoRALinear`), in fp32 or
        wider; of ``factors = (A, B)`` instead when given (shaped as ``lora_A``, ``lora_B``)."""
        A, B = self._factors() if factors is None else factors
        dt = torch.promote_types(A.dtype, torch.float32)
        return (B.to(dt) @ A.to(dt)) * self.scaling

    @torch.no_grad()
    def folded_weight(self, sign: int = 1, factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``W + sign·s·B·A`` in the weight's dtype, as a new tensor (the module is not changed); with
        ``factors = (A, B)``, of those instead of the module's own (to check a fold before installing them).

        Raises:
            ValueError: the result is not finite (a non-finite adapter, or a sum that overflows
                the weight's dtype): writing it would destroy the base weight for good.
        """
        if sign not in (1, -1):
            raise ValueError(f"LoRALinear.folded_weight: sign must be +1 or -1, got {sign!r}")
        delta = self.delta_weight(factors)
        dt = torch.promote_types(self.weight.dtype, delta.dtype)  # fp32 or wider: an fp64 W keeps its precision
        folded = (self.weight.to(dt) + sign * delta).to(self.weight.dtype)
        if not bool(torch.isfinite(folded).all()):
            raise ValueError(f"LoRALinear: W {'+' if sign > 0 else '-'} s·B·A is not finite in {self.weight.dtype} "
                             "(a non-finite lora_A/lora_B, or a sum beyond the dtype's range); "
                             "the base weight was left unchanged")
        return folded

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight for inference: ``W ← W + s·B·A``.

        Exact in fp32 up to rounding; on a 16-bit weight the sum is rounded to
        that dtype, so :meth:`unmerge` restores W only to within its precision.
        A non-finite result is refused (``ValueError``) before W is written.
        """
        if self.merged:
            raise RuntimeError("LoRALinear.merge(): the adapter is already merged")
        self.weight.copy_(self.folded_weight(+1))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: ``W ← W − s·B·A`` (a non-finite result is refused before W is written)."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge(): the adapter is not merged")
        self.weight.copy_(self.folded_weight(-1))
        self.merged = False

    def to_linear(self) -> nn.Linear:
        """The original ``nn.Linear``, holding this module's current weight and
        bias Parameters (whatever ``.to()``, ``load_state_dict`` or merging did)."""
        base = self._base
        base.weight = self.weight
        base.bias = self.bias
        return base

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:.4g}, rslora={self.rslora}, "
                f"lora_dtype={self.lora_A.dtype}, merged={self.merged}")


class StackedLoRALinear(LoRALinear):
    """A :class:`LoRALinear` that also adds earlier adapters, frozen: IncLoRA's and O-LoRA's layer.

    ``y = x·Wᵀ + b + s·Σ_i (x·A_iᵀ)·B_iᵀ`` over the frozen adapters ``i < k`` (one per past
    task) and the trainable one. The frozen ones sit in the buffers ``frozen_A`` (k·r×in)
    and ``frozen_B`` (out×k·r), stacked by :meth:`freeze_adapter`; all share the scaling,
    so the forward runs the fused op once on the concatenation ``[frozen_A; lora_A]``,
    ``[frozen_B, lora_B]``: one rank-(k+1)·r product. The buffers are not in the state
    dict (the strategies checkpoint them), so a model's ``state_dict`` keys do not change.

    Built by :meth:`install` on an existing module, in place (the way
    ``torch.nn.utils.parametrize`` gives a module its parametrized class): the module keeps
    its identity, its Parameters and its place in the model, so the optimizer, the
    strategies' module lists and :meth:`LoRALinear.to_linear` see no difference.
    """

    frozen_A: torch.Tensor
    frozen_B: torch.Tensor

    @classmethod
    def install(cls, module: LoRALinear) -> StackedLoRALinear:
        """Turn ``module`` into a :class:`StackedLoRALinear` with no frozen adapter yet (the output
        is unchanged); a module that is one already is returned as it is."""
        if isinstance(module, cls):
            return module
        # A LoRALinear subclass with a forward of its own (a quantized base) names its stacked class.
        stacked = cls if type(module) is LoRALinear else getattr(type(module), "stacked_class", None)
        if stacked is None:
            raise TypeError(f"StackedLoRALinear.install: expected a LoRALinear, got {type(module).__name__}")
        factory = {"device": module.lora_A.device, "dtype": module.lora_A.dtype}
        module.__class__ = stacked
        module.register_buffer("frozen_A", torch.empty(0, module.in_features, **factory), persistent=False)
        module.register_buffer("frozen_B", torch.empty(module.out_features, 0, **factory), persistent=False)
        return module

    @property
    def frozen_adapters(self) -> int:
        """How many frozen adapters the module adds (k)."""
        return self.frozen_A.shape[0] // self.rank

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of everything the forward adds: the trainable adapter, after the frozen ones."""
        if self.frozen_A.shape[0] == 0:
            return self.lora_A, self.lora_B
        return torch.cat([self.frozen_A, self.lora_A]), torch.cat([self.frozen_B, self.lora_B], dim=1)

    @torch.no_grad()
    def freeze_adapter(self) -> None:
        """Move the trainable adapter to the frozen ones and start a fresh one
        (:meth:`reset_lora_parameters`): the output is unchanged."""
        if self.merged:
            raise RuntimeError("StackedLoRALinear.freeze_adapter(): unmerge() first")
        self.frozen_A = torch.cat([self.frozen_A, self.lora_A.detach()])
        self.frozen_B = torch.cat([self.frozen_B, self.lora_B.detach()], dim=1)
        self.reset_lora_parameters()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, frozen_adapters={self.frozen_adapters}"

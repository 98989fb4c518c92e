"""Add LoRA adapters to a Hugging Face Llama-family model, and take them out again.

``patch_llama(model, config, filter_fn)`` follows torchao's ``quantize_``: in
place, idempotent, configured by a dataclass, optionally filtered per module.
Any model whose decoder layers name their projections the Llama way
(``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``: Llama, Mistral,
Qwen2, SmolLM) works; targets are matched on the last component of the module
path, so ``targets=("q_proj",)`` adapts every layer's ``self_attn.q_proj``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from slao_kernels.nn import LoRALinear

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_REQUIRES_GRAD = "_slao_requires_grad"  # model attribute: parameter name -> requires_grad before patching


@dataclass(frozen=True)
class LoRAConfig:
    """Shape of the adapters :func:`patch_llama` adds.

    Attributes:
        rank: adapter rank r (≥ 1 and ≤ min(in, out) of every target).
        alpha: LoRA alpha; scaling = alpha / r, or alpha / √r with ``rslora``.
        targets: last path component of the linears to adapt.
        dropout: dropout on the adapter input, in [0, 1).
        rslora: rank-stabilized scaling.
        dtype: adapter dtype; None keeps fp32 adapters on 16-bit models and the
            model's dtype otherwise.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0
    rslora: bool = False
    dtype: torch.dtype | None = None

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRAConfig.rank must be an int >= 1, got {self.rank!r}")
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        object.__setattr__(self, "targets", tuple(self.targets))
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"LoRAConfig.targets must be non-empty module names, got {self.targets!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.dtype is not None and not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise TypeError(f"LoRAConfig.dtype must be a floating torch.dtype or None, got {self.dtype!r}")

    def same_adapter(self, module: LoRALinear) -> bool:
        """Whether ``module`` already carries the adapter this config would add."""
        dtype = self.dtype or module.lora_A.dtype
        return (module.rank, module.alpha, module.rslora, module.lora_A.dtype) == (
            self.rank, float(self.alpha), self.rslora, dtype)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every :class:`LoRALinear` in ``model``, by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def patch_llama(model: nn.Module, config: LoRAConfig | None = None,
                filter_fn: Callable[[nn.Module, str], bool] | None = None) -> list[str]:
    """Replace the targeted ``nn.Linear`` modules of ``model`` by :class:`LoRALinear`, in place.

    Afterwards only the adapters train: every other parameter is frozen (the
    previous ``requires_grad`` flags are remembered for :func:`revert`).

    Args:
        model: a Hugging Face Llama-family model (any dtype or device).
        config: adapter shape and targets; default ``LoRAConfig()``.
        filter_fn: ``filter_fn(module, path) -> bool`` to adapt only some of the
            targeted linears (e.g. only some layers).

    Returns:
        The paths of all adapted modules, sorted. Patching again with the same
        config changes nothing (and warns so); with a different config it raises.

    Raises:
        ValueError: a target name matches no ``nn.Linear`` of the model, nothing
            would be adapted, or a rank does not fit a layer.
    """
    config = config or LoRAConfig()
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    found = {t: 0 for t in config.targets}
    new, existing = [], []
    for name, module in list(model.named_modules()):
        leaf = name.rpartition(".")[2]
        if leaf not in found or not isinstance(module, (nn.Linear, LoRALinear)):
            continue
        found[leaf] += 1
        if filter_fn is not None and not filter_fn(module, name):
            continue
        if isinstance(module, LoRALinear):
            if not config.same_adapter(module):
                raise ValueError(
                    f"{name} already has an adapter (rank={module.rank}, alpha={module.alpha:g}, "
                    f"dtype={module.lora_A.dtype}) that differs from {config}; revert(model) first")
            existing.append(name)
        else:
            new.append((name, module))
    missing = [t for t, n in found.items() if n == 0]
    if missing:
        linears = sorted({n.rpartition(".")[2] for n, m in model.named_modules()
                          if isinstance(m, (nn.Linear, LoRALinear))})
        raise ValueError(f"target(s) {missing} match no nn.Linear in {type(model).__name__}; "
                         f"its linear modules are named {linears}")
    if not new and not existing:
        raise ValueError(f"patch_llama adapted no module: filter_fn rejected every one of {list(config.targets)}")
    if not new:
        warnings.warn(f"patch_llama: all {len(existing)} targeted modules already carry this adapter; "
                      "nothing changed", stacklevel=2)
        return sorted(existing)

    if not hasattr(model, _REQUIRES_GRAD):
        object.__setattr__(model, _REQUIRES_GRAD, {n: p.requires_grad for n, p in model.named_parameters()})
    for name, linear in new:
        _set_submodule(model, name, LoRALinear(linear, config.rank, config.alpha, config.dropout,
                                               config.rslora, config.dtype))
    for pname, p in model.named_parameters():
        is_lora = pname.endswith(".lora_A") or pname.endswith(".lora_B")
        p.requires_grad_(is_lora)
    return sorted(existing + [n for n, _ in new])


def revert(model: nn.Module, merge: bool = False) -> list[str]:
    """Put the original ``nn.Linear`` modules back, in place.

    Args:
        merge: fold each adapter into its base weight first (``W ← W + s·B·A``).
            Without it the base weights come back bit-identical (an adapter that
            was merged with :meth:`LoRALinear.merge` is unmerged, which is exact
            only up to the weight's precision).

    Returns:
        The paths of the modules restored. The parameters' ``requires_grad``
        flags from before :func:`patch_llama` are restored too.
    """
    modules = lora_modules(model)
    for name, module in modules.items():
        if merge and not module.merged:
            module.merge()
        elif not merge and module.merged:
            module.unmerge()
        _set_submodule(model, name, module.to_linear())
    flags = getattr(model, _REQUIRES_GRAD, None)
    if flags is not None:
        for pname, p in model.named_parameters():
            if pname in flags:
                p.requires_grad_(flags[pname])
        object.__delattr__(model, _REQUIRES_GRAD)
    return sorted(modules)

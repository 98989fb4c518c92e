"""slao_kernels: kernel-accelerated continual learning of Llama models with one LoRA adapter.

Public API:
  lora_linear         the fused LoRA linear op (Triton on CUDA, C++ on CPU)
  scaled_merge_       SLAO's in-place B merge over all layers at once
  orthonormalize_rows SLAO's init: the sign-fixed orthonormal row basis of each A
  orthonormalize_rows_  the same, in place (what SLAO's task switch uses)
  LoRALinear          nn.Linear replacement holding one LoRA adapter
  LoRAConfig          which projections get an adapter, and its shape
  patch_llama         add adapters to a Hugging Face Llama-family model, in place
  revert              remove them again (optionally merging into the base weights)
  SLAO                the continual-learning controller (begin_task / end_task, save / load)
  save_peft_adapter   write the adapter in PEFT's format (loads in PEFT and vLLM)
  load_peft_adapter   read a PEFT-format LoRA adapter into a model
  NATIVE_CPU          whether the C++ CPU kernels are loaded
  __version__         the installed package's version (``slao_kernels._version``)

Layers flow one way (cli -> continual -> nn/patching -> ops -> kernels): this module
imports only the layers below the continual engine. ``SLAO`` is loaded on first use
(module ``__getattr__``), so ``import slao_kernels`` neither imports
``slao_kernels.continual`` nor transformers.
"""

from slao_kernels._ops import NATIVE_CPU
from slao_kernels._version import __version__
from slao_kernels.nn import LoRALinear
from slao_kernels.ops.lora_linear import lora_linear
from slao_kernels.ops.orthonormalize import orthonormalize_rows, orthonormalize_rows_
from slao_kernels.ops.scaled_merge import scaled_merge_
from slao_kernels.patching import LoRAConfig, patch_llama, revert
from slao_kernels.peft_format import load_peft_adapter, save_peft_adapter

__all__ = ["NATIVE_CPU", "SLAO", "LoRAConfig", "LoRALinear", "__version__", "lora_linear", "orthonormalize_rows",
           "orthonormalize_rows_",
           "load_peft_adapter", "patch_llama", "revert", "save_peft_adapter", "scaled_merge_"]

# Names of the continual engine the root exposes, loaded on first access: name -> module.
_LAZY = {"SLAO": "slao_kernels.continual.slao"}


def __getattr__(name):
    """The continual names of :data:`_LAZY`, imported on first access."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    """The module's names, the lazily loaded ones included."""
    return sorted(set(globals()) | set(_LAZY))

"""Continual-learning strategies over a LoRA-patched model."""

from slao_kernels.continual.slao import SLAO, merge_weight

__all__ = ["SLAO", "merge_weight"]

"""The strategy interface of the runner, and the strategies built on one adapter.

A strategy owns what happens to the adapters around each task's training:

* ``begin_task(task)`` — initialize the adapter for the next task;
* ``parameters()`` — what the optimizer trains (a new optimizer per task);
* ``extra_loss()`` — an optional term added to the task loss (None: none);
* ``end_task(task)`` — merge / freeze / consolidate; afterwards the model is
  what gets evaluated;
* ``state_bytes()`` — adapter memory held, reported per task;
* ``save(dir)`` / ``load(dir)`` — a checkpoint of its state between tasks.

Strategies here:

* ``slao``: :class:`~slao_kernels.SLAO` (options ``lam``, ``init``, ``merge``:
  its ablations);
* ``seqlora``: one LoRA fine-tuned task after task, no merging (the
  sequential-fine-tuning baseline).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slao_kernels.continual.slao import SLAO
from slao_kernels.continual.tasks import Task
from slao_kernels.patching import lora_modules


class Strategy:
    """Base class: subclasses override the hooks they need."""

    name = "strategy"

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = lora_modules(model)
        if not self.modules:
            raise ValueError(f"strategy {self.name!r} needs a model with LoRA adapters: call patch_llama first")

    def begin_task(self, task: Task) -> None:
        """Prepare the adapter for ``task``."""

    def parameters(self) -> list[nn.Parameter]:
        """The parameters to train on the current task."""
        return [p for m in self.modules.values() for p in (m.lora_A, m.lora_B)]

    def extra_loss(self) -> torch.Tensor | None:
        """A term added to every micro-batch's loss, or None."""
        return None

    def end_task(self, task: Task) -> dict:
        """Consolidate after training ``task``; returns facts for the report."""
        return {}

    def state_bytes(self) -> int:
        """Bytes of adapter state held (adapters in the model plus any buffers)."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def save(self, directory: str) -> None:
        """Checkpoint the adapter state (crash-safe)."""
        from slao_kernels.io import save_checkpoint

        tensors = {f"{n}.{f}": getattr(m, f) for n, m in self.modules.items() for f in ("lora_A", "lora_B")}
        save_checkpoint(directory, tensors, {"strategy": self.name})

    def load(self, directory: str) -> None:
        """Restore the state written by :meth:`save` (verified before the model is touched)."""
        from slao_kernels.io import load_checkpoint

        meta, tensors = load_checkpoint(directory)
        if meta.get("strategy") != self.name:
            raise ValueError(f"{directory} holds a {meta.get('strategy')!r} checkpoint, not {self.name!r}")
        for n, m in self.modules.items():
            for f in ("lora_A", "lora_B"):
                t = tensors.get(f"{n}.{f}")
                if t is None or t.shape != getattr(m, f).shape:
                    raise ValueError(f"{directory}: {n}.{f} is missing or has another shape than the model's")
        with torch.no_grad():
            for n, m in self.modules.items():
                m.lora_A.copy_(tensors[f"{n}.lora_A"])
                m.lora_B.copy_(tensors[f"{n}.lora_B"])

    def config(self) -> dict:
        """The options this strategy was built with (for the report)."""
        return {}


class SLAOStrategy(Strategy):
    """SLAO (DESIGN.md §1) through :class:`~slao_kernels.SLAO`."""

    name = "slao"

    def __init__(self, model: nn.Module, lam="inv_sqrt", init: str = "orthogonal", merge: str = "B"):
        super().__init__(model)
        self.slao = SLAO(model, lam=lam, init=init, merge=merge)

    def begin_task(self, task: Task) -> None:
        self.slao.begin_task()

    def parameters(self) -> list[nn.Parameter]:
        return list(self.slao.parameters())

    def end_task(self, task: Task) -> dict:
        return {"lambda": self.slao.end_task()}

    def state_bytes(self) -> int:
        return self.slao.state_bytes()

    def save(self, directory: str) -> None:
        self.slao.save(directory)

    def load(self, directory: str) -> None:
        loaded = SLAO.load(self.model, directory)
        if (loaded.lam, loaded.init, loaded.merge) != (self.slao.lam, self.slao.init, self.slao.merge):
            raise ValueError(f"{directory} was written by SLAO(lam={loaded.lam!r}, init={loaded.init!r}, "
                             f"merge={loaded.merge!r}), not {self.slao!r}")
        self.slao = loaded

    def config(self) -> dict:
        return {"lam": self.slao.lam, "init": self.slao.init, "merge": self.slao.merge}


class SeqLoRA(Strategy):
    """One LoRA, fine-tuned on each task in turn from where the last one ended."""

    name = "seqlora"


STRATEGIES: dict[str, Callable[..., Strategy]] = {"slao": SLAOStrategy, "seqlora": SeqLoRA}


def make_strategy(name: str, model: nn.Module, **options) -> Strategy:
    """Build a strategy by name (:data:`STRATEGIES`) with its options."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; available: {sorted(STRATEGIES)}")
    try:
        return STRATEGIES[name](model, **options)
    except TypeError as e:
        raise ValueError(f"strategy {name!r}: bad options {options} ({e})") from None

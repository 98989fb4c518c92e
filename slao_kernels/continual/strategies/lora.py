"""The strategies built on one LoRA adapter per layer: SLAO, SeqLoRA, IncLoRA, O-LoRA, MultiTask.

:class:`LoRAStrategy` is what they share (and the gradient inits build on): the
trainable parameters, the memory count and the checkpoint of the adapter, with the
rule that a checkpoint is checked whole before anything is restored. SLAO is the
exception: :class:`SLAOStrategy` only passes the runner's calls to
:class:`~slao_kernels.SLAO`, which has its own (see
:class:`~slao_kernels.continual.strategies.Strategy` for why it is an adapter).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from slao_kernels.continual.slao import SLAO
from slao_kernels.continual.strategies import StrategyConfig, own_config, register_strategy
from slao_kernels.continual.strategies.config import (
    IncLoRAConfig,
    MultiTaskConfig,
    OLoRAConfig,
    SeqLoRAConfig,
    SLAOConfig,
)
from slao_kernels.continual.tasks import Task
from slao_kernels.nn import LoRALinear, StackedLoRALinear
from slao_kernels.patching import lora_modules


class LoRAStrategy:
    """The shared implementation of :class:`~slao_kernels.continual.strategies.Strategy`:
    one adapter per layer, trained task after task; subclasses override the hooks they need.

    Args:
        model: a model patched with :func:`~slao_kernels.patch_llama`.
        config: the strategy's options (its ``config_class``; None: the defaults).
    """

    name: str  # the registry gives these (register_strategy)
    config_class: type[StrategyConfig]
    single_adapter = True
    writes_base = False

    def __init__(self, model: nn.Module, config: StrategyConfig | None = None):
        self.options = own_config(type(self), config)
        self.model = model
        self.modules: dict[str, LoRALinear] = lora_modules(model)
        if not self.modules:
            raise ValueError(f"strategy {self.name!r} needs a model with LoRA adapters: call patch_llama first")

    def attach(self, encoder, train_config, tasks: Sequence[Task] = ()) -> None:
        """Keep the runner's prompt encoder, training config and task stream."""
        self.encoder, self.train_config, self.tasks = encoder, train_config, list(tasks)

    def training_tasks(self, task: Task, seen: Sequence[Task]) -> list[Task]:
        """The task's own rows."""
        return [task]

    def begin_task(self, task: Task) -> None:
        """Nothing: train on from where the last task ended."""

    def parameters(self) -> list[nn.Parameter]:
        """``lora_A`` and ``lora_B`` of every layer."""
        return [p for m in self.modules.values() for p in (m.lora_A, m.lora_B)]

    def extra_loss(self) -> torch.Tensor | None:
        """None: no extra term."""
        return None

    def end_task(self, task: Task) -> dict:
        """Nothing to consolidate; no facts."""
        return {}

    def abort_task(self) -> bool:
        """False: a task cannot be undone here (resume from the last checkpoint instead)."""
        return False

    def state_bytes(self) -> int:
        """Bytes of the checkpointed state held in memory (the adapters; subclasses add theirs)."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def config(self) -> dict:
        """The options, as the report lists them."""
        return self.options.report()

    # ------------------------------------------------------------------ checkpoints

    def save(self, directory: str, metadata: dict | None = None) -> None:
        """Checkpoint the state (crash-safe); ``metadata`` (JSON) is stored with it."""
        from slao_kernels.continual.checkpoint import save_checkpoint

        meta = {"strategy": self.name, **self._state_meta()}
        if metadata is not None:
            meta["metadata"] = metadata
        save_checkpoint(directory, self._state_tensors(), meta)

    def load(self, directory: str) -> None:
        """Restore the state written by :meth:`save` (all of it checked before the model is touched)."""
        from slao_kernels.continual.checkpoint import load_checkpoint

        meta, tensors = load_checkpoint(directory)
        self._check_checkpoint(directory, meta, tensors)  # everything, before anything is restored
        self._restore(meta, tensors)

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of a checkpoint; subclasses add their own."""
        return {f"{n}.{f}": getattr(m, f) for n, m in self.modules.items() for f in ("lora_A", "lora_B")}

    def _state_meta(self) -> dict:
        """The JSON state of a checkpoint besides the tensors; subclasses add their own."""
        return {}

    def _checkpoint_shape(self, key: str, ours: torch.Tensor, tensors: dict) -> tuple:
        """The shape the checkpoint's tensor ``key`` must have: that of ours (subclasses whose
        state grows, like the frozen adapters, say what else they take)."""
        return tuple(ours.shape)

    def _check_checkpoint(self, directory: str, meta: dict, tensors: dict) -> None:
        """Raise ``ValueError`` naming the field unless the checkpoint is this strategy's and fits
        the model: the same tensors as :meth:`_state_tensors` with the shapes of
        :meth:`_checkpoint_shape`, and the fields of :meth:`_state_meta`."""
        if meta.get("strategy") != self.name:
            raise ValueError(f"{directory} holds a {meta.get('strategy')!r} checkpoint, not {self.name!r}")
        ours = self._state_tensors()
        if set(tensors) != set(ours):
            raise ValueError(f"{directory}: tensors only in the checkpoint {sorted(set(tensors) - set(ours))[:3]}, "
                             f"only in the model {sorted(set(ours) - set(tensors))[:3]}")
        for key, t in ours.items():
            got, want = tuple(tensors[key].shape), self._checkpoint_shape(key, t, tensors)
            if got != want:
                raise ValueError(f"{directory}: tensor {key} has shape {got}; the model needs {want}")
        if "tasks_begun" in self._state_meta():
            n = meta.get("tasks_begun")
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"{directory}: field 'tasks_begun' must be an int >= 0, got {n!r}")

    def _restore(self, meta: dict, tensors: dict) -> None:
        """Put a checked checkpoint's state in place; subclasses add their own parts."""
        with torch.no_grad():
            for n, m in self.modules.items():
                m.lora_A.copy_(tensors[f"{n}.lora_A"])
                m.lora_B.copy_(tensors[f"{n}.lora_B"])


@register_strategy("slao", SLAOConfig)
class SLAOStrategy:
    """SLAO (docs/design.md §1.2) for the runner: each hook is one call to the :class:`~slao_kernels.SLAO`
    it wraps, which holds the modules, the buffers and the checkpoint format; this adapter
    holds nothing but the options."""

    name: str
    config_class: type[StrategyConfig]
    single_adapter = True
    writes_base = False

    def __init__(self, model: nn.Module, config: SLAOConfig | None = None):
        self.options: SLAOConfig = own_config(type(self), config)
        self.slao = SLAO(model, lam=self.options.lam, init=self.options.init, merge=self.options.merge)

    @property
    def modules(self) -> dict[str, LoRALinear]:
        """The controller's modules."""
        return self.slao.modules

    def attach(self, encoder, train_config, tasks: Sequence[Task] = ()) -> None:
        """Nothing: SLAO needs neither the encoder nor the tasks."""

    def training_tasks(self, task: Task, seen: Sequence[Task]) -> list[Task]:
        """The task's own rows."""
        return [task]

    def begin_task(self, task: Task) -> None:
        """:meth:`SLAO.begin_task`."""
        self.slao.begin_task()

    def parameters(self) -> list[nn.Parameter]:
        """:meth:`SLAO.parameters`."""
        return list(self.slao.parameters())

    def extra_loss(self) -> torch.Tensor | None:
        """None: SLAO adds no loss term."""
        return None

    def end_task(self, task: Task) -> dict:
        """:meth:`SLAO.end_task`; the report gets the λ it merged with."""
        return {"lambda": self.slao.end_task()}

    def abort_task(self) -> bool:
        """:meth:`SLAO.abort_task`: SLAO can always undo a task (one that did not begin needs nothing)."""
        if self.slao.in_task:
            self.slao.abort_task()
        return True

    def state_bytes(self) -> int:
        """:meth:`SLAO.state_bytes`."""
        return self.slao.state_bytes()

    def save(self, directory: str, metadata: dict | None = None) -> None:
        """:meth:`SLAO.save`."""
        self.slao.save(directory, metadata=metadata)

    def load(self, directory: str) -> None:
        """:meth:`SLAO.load`, refused before the model is touched if the checkpoint was written
        with other options (another ablation is another run)."""
        from slao_kernels.continual.checkpoint import load_checkpoint

        saved = load_checkpoint(directory)[0].get("slao")
        ours = {"lam": self.options.lam, "init": self.options.init, "merge": self.options.merge}
        if isinstance(saved, dict) and saved != ours:  # a malformed entry: SLAO.load names it
            raise ValueError(f"{directory} was written by SLAO(lam={saved.get('lam')!r}, init={saved.get('init')!r}, "
                             f"merge={saved.get('merge')!r}), not {self.slao!r}")
        self.slao = SLAO.load(self.slao.model, directory)

    def config(self) -> dict:
        """The options, as the report lists them."""
        return self.options.report()


@register_strategy("seqlora", SeqLoRAConfig)
class SeqLoRA(LoRAStrategy):
    """One LoRA, fine-tuned on each task in turn from where the last one ended."""


@register_strategy("inclora", IncLoRAConfig)
class IncLoRA(LoRAStrategy):
    """A new LoRA per task; the earlier ones stay, frozen, and add up (memory O(T)).

    The layers become :class:`~slao_kernels.nn.StackedLoRALinear` (in place, when the
    strategy is built), which hold the frozen adapters; a plain ``LoRALinear`` has none.
    """

    single_adapter = False  # the frozen adapters are part of the result
    writes_base = False

    def __init__(self, model: nn.Module, config: StrategyConfig | None = None):
        super().__init__(model, config)
        self.modules: dict[str, StackedLoRALinear] = {n: StackedLoRALinear.install(m)
                                                      for n, m in self.modules.items()}
        self.tasks_begun = 0

    def begin_task(self, task: Task) -> None:
        """From task 2 on: freeze the last task's adapter, train a fresh one."""
        self.tasks_begun += 1
        if self.tasks_begun > 1:
            for m in self.modules.values():
                m.freeze_adapter()

    def state_bytes(self) -> int:
        """The trainable adapters and the frozen ones."""
        frozen = sum(t.numel() * t.element_size() for m in self.modules.values() for t in (m.frozen_A, m.frozen_B))
        return super().state_bytes() + frozen

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        frozen = {f"{n}.{f}": getattr(m, f) for n, m in self.modules.items() for f in ("frozen_A", "frozen_B")}
        return {**super()._state_tensors(), **frozen}

    def _state_meta(self) -> dict:
        return {"tasks_begun": self.tasks_begun}

    def _checkpoint_shape(self, key: str, ours: torch.Tensor, tensors: dict) -> tuple:
        module, _, factor = key.rpartition(".")
        if factor not in ("frozen_A", "frozen_B"):
            return super()._checkpoint_shape(key, ours, tensors)
        frozen_rank = tensors[f"{module}.frozen_A"].shape[0]  # k·r stacked adapters: k comes from the checkpoint
        if frozen_rank % self.modules[module].rank:
            frozen_rank = -1  # not a whole number of adapters: refused
        return (frozen_rank, ours.shape[1]) if factor == "frozen_A" else (ours.shape[0], frozen_rank)

    def _restore(self, meta: dict, tensors: dict) -> None:
        super()._restore(meta, tensors)
        for n, m in self.modules.items():
            m.frozen_A = tensors[f"{n}.frozen_A"].to(m.lora_A)
            m.frozen_B = tensors[f"{n}.frozen_B"].to(m.lora_B)
        self.tasks_begun = meta["tasks_begun"]


@register_strategy("olora", OLoRAConfig)
class OLoRA(IncLoRA):
    """IncLoRA with the orthogonality penalty ``weight·Σ_layers Σ_old |A_old·A_newᵀ|``."""

    def extra_loss(self) -> torch.Tensor | None:
        """The weighted penalty, from task 2 on (None before, or with weight 0)."""
        if self.tasks_begun < 2 or self.options.weight == 0:
            return None
        return self.options.weight * orthogonality_penalty(list(self.modules.values()))


def orthogonality_penalty(modules: Sequence[StackedLoRALinear]) -> torch.Tensor:
    """``Σ_layers Σ |frozen_A·lora_Aᵀ|``: the sum of absolute entries of every layer's
    (k·r × r) product of the frozen and the trainable A (differentiable in lora_A)."""
    terms = [(m.frozen_A @ m.lora_A.t()).abs().sum() for m in modules if m.frozen_A.shape[0]]
    return torch.stack(terms).sum() if terms else torch.zeros((), device=modules[0].lora_A.device)


@register_strategy("multitask", MultiTaskConfig)
class MultiTask(LoRAStrategy):
    """A fresh LoRA per stage, trained on every task seen so far (steps scale with
    their number, so each task gets the examples sequential training gives it)."""

    def training_tasks(self, task: Task, seen: Sequence[Task]) -> list[Task]:
        """Every task seen so far."""
        return list(seen)

    def begin_task(self, task: Task) -> None:
        """A fresh adapter."""
        for m in self.modules.values():
            m.reset_lora_parameters()

"""The strategy interface of the runner, and the registry of strategies by name.

A strategy owns what happens to the adapters around each task's training. The runner
(:func:`~slao_kernels.continual.run_stream`), the comparison and the CLI see only
:class:`Strategy`, a ``typing.Protocol``; where a strategy comes from is the registry:
:data:`STRATEGIES` maps a name to its config class (a frozen dataclass of typed,
validated options, :mod:`.config`) and its strategy class, as torchao maps a config
type to its handler. :func:`make_strategy` builds one by name.

The strategies (docs/design.md §1.5):

* ``slao``: :class:`~slao_kernels.SLAO` (options ``lam``, ``init``, ``merge``: its ablations);
* ``seqlora``: one LoRA fine-tuned task after task, no merging;
* ``inclora``: a new LoRA per task, the old ones frozen and summed (memory O(T));
* ``olora``: IncLoRA plus ``weight·Σ_layers Σ_old |A_old·A_newᵀ|`` (sum of absolute entries);
* ``multitask``: a fresh LoRA per stage trained on the union of the tasks seen so
  far (the upper bound, not continual learning);
* ``lora_ga``: each task's fresh adapter initialized from the task's gradient
  (LoRA-GA), trained, then merged into the base weights;
* ``slice``: SLICE: gradients of the task and of a replay buffer, PCGrad, SVD
  init with variance matching, trained, merged into the base weights.

The first five live in :mod:`.lora` (built on one adapter per layer), the last two in
:mod:`.gradient_init` (built on full-weight gradients).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from slao_kernels.continual.strategies.config import StrategyConfig
from slao_kernels.continual.tasks import Task
from slao_kernels.nn import LoRALinear


@runtime_checkable
class Strategy(Protocol):
    """What the runner calls, per task in this order: ``begin_task``, ``parameters`` (a new
    optimizer per task), training with ``extra_loss``, ``end_task``; ``abort_task`` when the
    task failed; ``save``/``load`` between tasks.

    Why :class:`~slao_kernels.SLAO` does not satisfy this itself: SLAO is the library's
    controller, used without the runner (the README's loop, the Trainer callback,
    distributed training), and its methods answer that use: ``begin_task()`` returns the
    task's index, ``end_task()`` the λ it merged with, ``abort_task()`` the number of tasks
    completed, and ``SLAO.load`` builds a controller (its ablation settings come from the
    checkpoint). It knows nothing of tasks, encoders or reports. The runner's hooks take the
    task and answer the runner. So ``slao`` is registered as a thin adapter
    (:class:`~slao_kernels.continual.strategies.lora.SLAOStrategy`) that holds no state of
    its own: every method is one call to the SLAO it wraps, whose ``modules``, parameters,
    memory accounting, merged-adapter check and checkpoint format are the only ones.

    Attributes:
        name: the registry name; a checkpoint records it.
        single_adapter: whether the result is the one adapter in the model over the
            original base weights (what the PEFT format holds); False where frozen
            adapters or merged base weights are part of it.
        writes_base: whether the strategy rewrites the base weights (so it cannot run on a
            quantized base, which has nowhere to store them).
        modules: the model's :class:`~slao_kernels.LoRALinear` modules by path.
    """

    name: str
    single_adapter: bool
    writes_base: bool
    modules: dict[str, LoRALinear]

    def attach(self, encoder, train_config, tasks: Sequence[Task] = ()) -> None:
        """Called once by the runner: its prompt encoder, training config and task stream
        (used by the strategies that compute gradients before training)."""

    def training_tasks(self, task: Task, seen: Sequence[Task]) -> list[Task]:
        """The tasks whose rows train ``task``'s stage (``seen`` ends with ``task``)."""

    def begin_task(self, task: Task) -> None:
        """Initialize the adapter for ``task``."""

    def parameters(self) -> list[nn.Parameter]:
        """What the optimizer trains on the current task."""

    def extra_loss(self) -> torch.Tensor | None:
        """A term added to every micro-batch's loss, or None."""

    def end_task(self, task: Task) -> dict:
        """Merge / freeze / consolidate after training ``task``; afterwards the model is what
        gets evaluated. Returns facts for the report (JSON values)."""

    def abort_task(self) -> bool:
        """Undo the task in progress, back to the state before :meth:`begin_task`; returns
        whether the strategy could (otherwise: resume from the last checkpoint)."""

    def state_bytes(self) -> int:
        """Bytes of adapter state held (adapters in the model plus any buffers), reported per task."""

    def save(self, directory: str, metadata: dict | None = None) -> None:
        """Checkpoint the state between tasks, crash-safe; ``metadata`` (the caller's JSON
        record) is stored in it and covered by its checksum."""

    def load(self, directory: str) -> None:
        """Restore what :meth:`save` wrote. Everything is checked (the strategy, the exact
        tensor set and shapes, the JSON state) before anything is restored."""

    def config(self) -> dict:
        """The options this strategy was built with (the report's ``strategy_config``)."""


class RegisteredStrategy(NamedTuple):
    """A registry entry: the config class of the strategy's options and the strategy class
    (called as ``strategy(model, config)``)."""

    config: type[StrategyConfig]
    strategy: type


STRATEGIES: dict[str, RegisteredStrategy] = {}
"""Every strategy by name (filled as :mod:`.lora` and :mod:`.gradient_init` are imported, below)."""


def register_strategy(name: str, config: type[StrategyConfig]):
    """Class decorator: register a strategy class under ``name`` with its config class, and
    give the class its ``name`` and ``config_class``."""
    if not (isinstance(config, type) and issubclass(config, StrategyConfig)):
        raise TypeError(f"register_strategy({name!r}): config must be a StrategyConfig subclass, got {config!r}")

    def decorate(cls):
        if name in STRATEGIES:
            raise ValueError(f"a strategy is already registered as {name!r}: {STRATEGIES[name].strategy.__name__}")
        cls.name, cls.config_class = name, config
        STRATEGIES[name] = RegisteredStrategy(config, cls)
        return cls

    return decorate


def registered_strategy(name: str) -> RegisteredStrategy:
    """The registry entry of ``name``; ``ValueError`` naming the available ones if there is none."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; available: {sorted(STRATEGIES)}")
    return STRATEGIES[name]


def own_config(cls, config: StrategyConfig | None) -> StrategyConfig:
    """``config`` checked to be an instance of ``cls.config_class`` (None: the defaults)."""
    if config is None:
        return cls.config_class()
    if type(config) is not cls.config_class:
        raise TypeError(f"strategy {cls.name!r} takes a {cls.config_class.__name__}, got {type(config).__name__}")
    return config


def make_strategy(name: str, model: nn.Module, config: StrategyConfig | None = None, **options) -> Strategy:
    """Build strategy ``name`` on ``model`` from its config, or from keyword options (checked:
    an unknown option or a value it does not accept raises ``ValueError``/``TypeError`` naming it)."""
    entry = registered_strategy(name)
    if config is not None and options:
        raise TypeError(f"make_strategy({name!r}): pass a config or keyword options, not both")
    if config is None:
        config = entry.config.from_options(options, where=f"strategy {name!r}")
    return entry.strategy(model, config)


# the strategy modules register themselves; imported last, as they build on the names above, and in
# this order (the registry's order: the CLI's --strategy choices)
from slao_kernels.continual.strategies.lora import (  # noqa: E402
    IncLoRA,
    LoRAStrategy,
    MultiTask,
    OLoRA,
    SeqLoRA,
    SLAOStrategy,
    orthogonality_penalty,
)

from slao_kernels.continual.strategies.gradient_init import LoRAGA, SLICE  # noqa: E402  isort: skip

__all__ = ["STRATEGIES", "SLICE", "IncLoRA", "LoRAGA", "LoRAStrategy", "MultiTask", "OLoRA", "RegisteredStrategy",
           "SLAOStrategy", "SeqLoRA", "Strategy", "StrategyConfig", "make_strategy", "orthogonality_penalty",
           "register_strategy", "registered_strategy"]

"""The strategies that initialize each task's adapter from gradients: LoRA-GA and SLICE.

Both take full-weight gradients of the task before training
(:mod:`slao_kernels.continual.gradients`), factor them into the task's fresh adapter,
correct the base weights so the model's output is unchanged at step 0
(``W0 ← W0 − s·B·A``), train, and fold the trained adapter into the base weights
(``W ← W + s·B·A``). A quantized base cannot hold those weights: both refuse it when built
(:class:`~slao_kernels.quantized.QuantizedBaseError`). Both folds are the module's own (:meth:`LoRALinear.folded_weight
<slao_kernels.nn.LoRALinear.folded_weight>`), so they round as ``merge``/``unmerge`` do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from slao_kernels.continual.strategies import StrategyConfig, register_strategy
from slao_kernels.continual.strategies.config import LoRAGAConfig, SLICEConfig
from slao_kernels.continual.strategies.lora import LoRAStrategy
from slao_kernels.continual.tasks import Task
from slao_kernels.quantized import QuantizedBaseError, QuantizedLoRALinear


class GradientInitStrategy(LoRAStrategy):
    """A fresh adapter per task from a gradient-based init (subclasses: :meth:`begin_task`),
    with the base-weight correction; after training it is merged into the base weights.
    The base weights change, so they are part of the checkpoint."""

    single_adapter = False  # the result is in the base weights
    writes_base = True

    def __init__(self, model: nn.Module, config: StrategyConfig | None = None):
        super().__init__(model, config)
        quantized = [n for n, m in self.modules.items() if isinstance(m, QuantizedLoRALinear)]
        if quantized:  # refused before anything is built or changed
            more = f" and {len(quantized) - 1} more module(s)" if len(quantized) > 1 else ""
            raise QuantizedBaseError(
                f"{self.name} rewrites the base weights (W0 <- W0 - s·B·A before training, W0 <- W0 + s·B·A after), "
                f"but {quantized[0]}{more} have a quantized base (bitsandbytes "
                f"{self.modules[quantized[0]].quantization}), which cannot store them without requantizing; use a "
                "strategy that leaves the base alone (slao, seqlora, inclora, olora, multitask) or load the model "
                "unquantized")
        merged = [n for n, m in self.modules.items() if m.merged]
        if merged:
            raise ValueError(f"{self.name} needs unmerged adapters; {merged[:3]} are merged")
        self.tasks_begun = 0

    def _batches(self, rows: Sequence[tuple[Task, object]], tag: str) -> list:
        """``grad_batches`` batches of the training batch size, drawn deterministically from ``rows``."""
        from slao_kernels.continual.prompts import collate_answers
        from slao_kernels.continual.train import row_order

        size = self.train_config.batch_size
        order = row_order(len(rows), self.options.grad_batches * size, self.options.seed, f"{self.name}:{tag}")
        device = next(iter(self.modules.values())).weight.device
        return [collate_answers([self.encoder.encode(t, r) for t, r in (rows[i] for i in order[k:k + size])],
                                self.encoder.pad_id).to(device) for k in range(0, len(order), size)]

    def gradients(self, rows, tag: str, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The mean full-weight gradients of the modules ``names`` over batches of ``rows``."""
        from slao_kernels.continual.gradients import full_weight_gradients
        from slao_kernels.continual.train import answer_loss

        return full_weight_gradients(self.model, self.modules, names, self._batches(rows, tag), answer_loss)

    @torch.no_grad()
    def _check_factors(self, factors: dict) -> None:
        """``FloatingPointError`` (the runner's failed-task path) naming the modules whose init is not
        finite, or whose base correction ``W − s·B·A`` would not be, before any is installed."""
        bad = [n for n, (A, B) in factors.items() if not (torch.isfinite(A).all() and torch.isfinite(B).all())]
        if bad:
            raise FloatingPointError(f"the gradient init of {bad[:3]} is not finite (NaN or inf); nothing installed")
        for n, (A, B) in factors.items():  # each fold computed once here and dropped: one weight at a time
            try:
                self.modules[n].folded_weight(-1, (A, B))
            except ValueError as e:
                raise FloatingPointError(f"{n}: {e}; nothing installed") from e

    @torch.no_grad()
    def _install(self, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
        """Put the init ``(A, B)`` in the adapter and take ``s·B·A`` off the base weight."""
        m = self.modules[name]
        m.lora_A.copy_(A)
        m.lora_B.copy_(B)
        m.weight.copy_(m.folded_weight(-1))

    def end_task(self, task: Task) -> dict:
        """Fold the trained adapter into the base weights, then ``B = 0`` (the output is unchanged).
        Every fold is checked before any weight is written (computed twice, one weight at a time), so a
        fold that overflows leaves every module as training made it."""
        with torch.no_grad():
            for n, m in self.modules.items():
                try:
                    m.folded_weight(+1)
                except ValueError as e:  # the runner's path for a task that went non-finite
                    raise FloatingPointError(f"{n}: {e}; no base weight changed") from e
            for m in self.modules.values():
                m.weight.copy_(m.folded_weight(+1))
                m.reset_lora_parameters()
        return {}

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {**super()._state_tensors(), **{f"{n}.weight": m.weight for n, m in self.modules.items()}}

    def _state_meta(self) -> dict:
        return {"tasks_begun": self.tasks_begun}

    def _restore(self, meta: dict, tensors: dict) -> None:
        super()._restore(meta, tensors)
        with torch.no_grad():
            for n, m in self.modules.items():
                m.weight.copy_(tensors[f"{n}.weight"])
        self.tasks_begun = meta["tasks_begun"]


@register_strategy("lora_ga", LoRAGAConfig)
class LoRAGA(GradientInitStrategy):
    """LoRA-GA init (arXiv 2407.05000) for every task's fresh adapter (options:
    ``gamma`` of the stable scale, ``grad_batches``, ``max_gradient_bytes``)."""

    def begin_task(self, task: Task) -> None:
        """The task's gradients, chunked to the memory cap, factored; installed together."""
        from slao_kernels.continual.gradients import lora_ga_factors, module_chunks

        rows = [(task, r) for r in task.train]
        factors = {}  # installed after every gradient is taken: all at the same W0
        for chunk in module_chunks(self.modules, self.options.max_gradient_bytes):
            grads = self.gradients(rows, task.name, chunk)
            for n in chunk:
                factors[n] = lora_ga_factors(grads.pop(n), self.modules[n].rank, self.options.gamma,
                                             seed=self.options.seed)
        self._check_factors(factors)
        for n, (A, B) in factors.items():
            self._install(n, A, B)
        self.tasks_begun += 1


@register_strategy("slice", SLICEConfig)
class SLICE(GradientInitStrategy):
    """SLICE (arXiv 2605.12752): a replay buffer of earlier tasks' rows, the task's and
    the buffer's gradients, PCGrad (strength ``c``, ``scope`` "global" or "module"),
    truncated-SVD init with variance matching, base-weight correction; trained,
    then merged into the base. ``buffer_per_task`` rows of every finished task are kept."""

    def __init__(self, model: nn.Module, config: SLICEConfig | None = None):
        super().__init__(model, config)
        self.buffer: list[tuple[Task, object]] = []  # rows only: (task, example)

    def begin_task(self, task: Task) -> None:
        """The task's gradients (and the buffer's, PCGrad-projected), factored; installed together."""
        from slao_kernels.continual.gradients import global_dots, module_chunks, pcgrad, slice_factors

        c, scope, seed = self.options.c, self.options.scope, self.options.seed
        rows = [(task, r) for r in task.train]
        replay = bool(self.buffer) and c > 0
        chunks = module_chunks(self.modules, self.options.max_gradient_bytes, kinds=2 if replay else 1)
        dots, factors = None, {}
        if replay and scope == "global" and len(chunks) > 1:
            # the global inner product needs every module's gradients before any is projected:
            # a first pass over the chunks sums them, the second recomputes and projects
            parts = {}
            for chunk in chunks:
                g_c, g_r = self.gradients(rows, task.name, chunk), self.gradients(self.buffer, "replay", chunk)
                parts.update({n: (float((g_c[n] * g_r[n]).sum()), float((g_r[n] * g_r[n]).sum())) for n in chunk})
            dots = global_dots(parts)
        for chunk in chunks:
            g = self.gradients(rows, task.name, chunk)
            if replay:
                g_r = self.gradients(self.buffer, "replay", chunk)
                if scope == "global" and dots is None:
                    dots = global_dots({n: (float((g[n] * g_r[n]).sum()), float((g_r[n] * g_r[n]).sum()))
                                        for n in chunk})
                g = pcgrad(g, g_r, c, dots if scope == "global" else None)
                del g_r
            for n in chunk:
                m = self.modules[n]
                factors[n] = slice_factors(g.pop(n), m.weight, m.rank, seed=seed)
        self._check_factors(factors)
        for n, (A, B) in factors.items():  # installed after every gradient is taken: all at the same W0
            self._install(n, A, B)
        self.tasks_begun += 1

    def end_task(self, task: Task) -> dict:
        """The merge, then ``buffer_per_task`` of the task's rows join the replay buffer."""
        from slao_kernels.continual.train import row_order

        info = super().end_task(task)
        keep = row_order(len(task.train), min(self.options.buffer_per_task, len(task.train)), self.options.seed,
                         f"buffer:{task.name}")
        self.buffer += [(task, task.train[i]) for i in keep]
        return {**info, "buffer_rows": len(self.buffer)}

    def _state_meta(self) -> dict:
        index = {t.name: {id(r): i for i, r in enumerate(t.train)} for t in {t for t, _ in self.buffer}}
        buffer = [[t.name, index[t.name][id(r)]] for t, r in self.buffer]  # rows by position, not copies
        return {**super()._state_meta(), "buffer": buffer}

    def _check_checkpoint(self, directory: str, meta: dict, tensors: dict) -> None:
        super()._check_checkpoint(directory, meta, tensors)
        by_name = {t.name: t for t in self.tasks}
        buffer = meta.get("buffer")
        if not isinstance(buffer, list) or not all(
                isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and isinstance(e[1], int)
                and not isinstance(e[1], bool) for e in buffer):
            raise ValueError(f"{directory}: field 'buffer' must be a list of [task name, row index] pairs")
        missing = sorted({name for name, _ in buffer} - set(by_name))
        if missing:
            raise ValueError(f"{directory}: the replay buffer holds rows of tasks {missing} this run does not have")
        outside = [(name, i) for name, i in buffer if not 0 <= i < len(by_name[name].train)]
        if outside:
            raise ValueError(f"{directory}: the replay buffer names rows {outside[:3]} its tasks do not have")

    def _restore(self, meta: dict, tensors: dict) -> None:
        super()._restore(meta, tensors)
        by_name = {t.name: t for t in self.tasks}
        self.buffer = [(by_name[name], by_name[name].train[i]) for name, i in meta["buffer"]]

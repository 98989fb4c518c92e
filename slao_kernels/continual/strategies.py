"""The strategy interface of the runner, and the strategies built on one adapter.

A strategy owns what happens to the adapters around each task's training:

* ``begin_task(task)`` — initialize the adapter for the next task;
* ``parameters()`` — what the optimizer trains (a new optimizer per task);
* ``extra_loss()`` — an optional term added to the task loss (None: none);
* ``end_task(task)`` — merge / freeze / consolidate; afterwards the model is
  what gets evaluated;
* ``state_bytes()`` — adapter memory held, reported per task;
* ``abort_task()`` — undo the task in progress (where the strategy can: SLAO);
* ``save(dir, metadata)`` / ``load(dir)`` — a checkpoint of its state between tasks
  (``metadata``: the caller's JSON record, stored in the checkpoint and covered by its checksum).

* ``training_tasks(task, seen)`` — whose rows the task trains on (default:
  the task's own);
* ``attach(encoder, train_config, tasks)`` — called once by the runner, for the
  strategies that compute gradients before training (LoRA-GA, SLICE).

Strategies (DESIGN.md §1):

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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from slao_kernels.continual.slao import SLAO
from slao_kernels.continual.tasks import Task
from slao_kernels.nn import LoRALinear
from slao_kernels.patching import lora_modules


class Strategy:
    """Base class: subclasses override the hooks they need."""

    name = "strategy"
    single_adapter = True
    """Whether the strategy's result is the one adapter in the model over the original base weights
    (what the PEFT format holds); False where frozen adapters or merged base weights are part of it."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = lora_modules(model)
        if not self.modules:
            raise ValueError(f"strategy {self.name!r} needs a model with LoRA adapters: call patch_llama first")

    def attach(self, encoder, train_config, tasks: Sequence[Task] = ()) -> None:
        """Give the strategy the runner's prompt encoder, training config and task stream."""
        self.encoder, self.train_config, self.tasks = encoder, train_config, list(tasks)

    def training_tasks(self, task: Task, seen: Sequence[Task]) -> list[Task]:
        """The tasks whose rows train ``task``'s stage (``seen`` ends with ``task``)."""
        return [task]

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

    def abort_task(self) -> bool:
        """Undo the task in progress, back to the state before :meth:`begin_task`.
        Returns whether the strategy could (the base class cannot: resume from the
        last checkpoint instead)."""
        return False

    def state_bytes(self) -> int:
        """Bytes of adapter state held (adapters in the model plus any buffers)."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def save(self, directory: str, metadata: dict | None = None) -> None:
        """Checkpoint the adapter state (crash-safe); ``metadata`` (JSON) is stored with it."""
        from slao_kernels.continual.checkpoint import save_checkpoint

        meta = {"strategy": self.name, **self._state_meta()}
        if metadata is not None:
            meta["metadata"] = metadata
        save_checkpoint(directory, self._state_tensors(), meta)

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of a checkpoint; subclasses add their own."""
        return {f"{n}.{f}": getattr(m, f) for n, m in self.modules.items() for f in ("lora_A", "lora_B")}

    def _state_meta(self) -> dict:
        """The JSON state of a checkpoint besides the tensors; subclasses add their own."""
        return {}

    def load(self, directory: str) -> None:
        """Restore the state written by :meth:`save` (verified before the model is touched)."""
        from slao_kernels.continual.checkpoint import load_checkpoint

        meta, tensors = load_checkpoint(directory)
        self._check_checkpoint(directory, meta, tensors)  # everything, before anything is restored
        self._restore(directory, meta, tensors)

    def _check_checkpoint(self, directory: str, meta: dict, tensors: dict) -> None:
        """Raise ``ValueError`` naming the field unless the checkpoint is this strategy's and fits
        the model: the same tensors as :meth:`_state_tensors` with their shapes (frozen adapters:
        any number of rank-r blocks), and the fields of :meth:`_state_meta`."""
        if meta.get("strategy") != self.name:
            raise ValueError(f"{directory} holds a {meta.get('strategy')!r} checkpoint, not {self.name!r}")
        ours = self._state_tensors()
        if set(tensors) != set(ours):
            raise ValueError(f"{directory}: tensors only in the checkpoint {sorted(set(tensors) - set(ours))[:3]}, "
                             f"only in the model {sorted(set(ours) - set(tensors))[:3]}")
        for key, t in ours.items():
            got, want = tuple(tensors[key].shape), tuple(t.shape)
            module, _, factor = key.rpartition(".")
            if factor in ("frozen_A", "frozen_B"):  # k·r stacked adapters: k comes from the checkpoint
                frozen_rank = tensors[f"{module}.frozen_A"].shape[0]
                if frozen_rank % self.modules[module].rank:
                    frozen_rank = -1  # not a whole number of adapters: refused below
                want = (frozen_rank, t.shape[1]) if factor == "frozen_A" else (t.shape[0], frozen_rank)
            if got != want:
                raise ValueError(f"{directory}: tensor {key} has shape {got}; the model needs {want}")
        if "tasks_begun" in self._state_meta():
            n = meta.get("tasks_begun")
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"{directory}: field 'tasks_begun' must be an int >= 0, got {n!r}")

    def _restore(self, directory: str, meta: dict, tensors: dict) -> None:
        """Put a checked checkpoint's state in place; subclasses add their own parts."""
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

    def abort_task(self) -> bool:
        self.slao.abort_task()
        return True

    def state_bytes(self) -> int:
        return self.slao.state_bytes()

    def save(self, directory: str, metadata: dict | None = None) -> None:
        self.slao.save(directory, metadata=metadata)

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


class IncLoRA(Strategy):
    """A new LoRA per task; the earlier ones stay, frozen, and add up (memory O(T))."""

    name = "inclora"
    single_adapter = False  # the frozen adapters are part of the result

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.tasks_begun = 0

    def begin_task(self, task: Task) -> None:
        self.tasks_begun += 1
        if self.tasks_begun > 1:
            for m in self.modules.values():
                m.freeze_adapter()

    def state_bytes(self) -> int:
        frozen = sum(t.numel() * t.element_size() for m in self.modules.values() for t in (m.frozen_A, m.frozen_B))
        return super().state_bytes() + frozen

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        frozen = {f"{n}.{f}": getattr(m, f) for n, m in self.modules.items() for f in ("frozen_A", "frozen_B")}
        return {**super()._state_tensors(), **frozen}

    def _state_meta(self) -> dict:
        return {"tasks_begun": self.tasks_begun}

    def _restore(self, directory: str, meta: dict, tensors: dict) -> None:
        super()._restore(directory, meta, tensors)
        for n, m in self.modules.items():
            m.frozen_A = tensors[f"{n}.frozen_A"].to(m.lora_A)
            m.frozen_B = tensors[f"{n}.frozen_B"].to(m.lora_B)
        self.tasks_begun = meta["tasks_begun"]


class OLoRA(IncLoRA):
    """IncLoRA with the orthogonality penalty ``weight·Σ_layers Σ_old |A_old·A_newᵀ|``."""

    name = "olora"

    def __init__(self, model: nn.Module, weight: float = 0.5):
        super().__init__(model)
        if not weight >= 0:
            raise ValueError(f"olora weight must be >= 0, got {weight!r}")
        self.weight = float(weight)

    def extra_loss(self) -> torch.Tensor | None:
        if self.tasks_begun < 2 or self.weight == 0:
            return None
        return self.weight * orthogonality_penalty(list(self.modules.values()))

    def config(self) -> dict:
        return {"weight": self.weight}


def orthogonality_penalty(modules: Sequence[LoRALinear]) -> torch.Tensor:
    """``Σ_layers Σ |frozen_A·lora_Aᵀ|``: the sum of absolute entries of every layer's
    (k·r × r) product of the frozen and the trainable A (differentiable in lora_A)."""
    terms = [(m.frozen_A @ m.lora_A.t()).abs().sum() for m in modules if m.frozen_A.shape[0]]
    return torch.stack(terms).sum() if terms else torch.zeros((), device=modules[0].lora_A.device)


class MultiTask(Strategy):
    """A fresh LoRA per stage, trained on every task seen so far (steps scale with
    their number, so each task gets the examples sequential training gives it)."""

    name = "multitask"

    def training_tasks(self, task: Task, seen: Sequence[Task]) -> list[Task]:
        return list(seen)

    def begin_task(self, task: Task) -> None:
        for m in self.modules.values():
            m.reset_lora_parameters()


class _MergedInit(Strategy):
    """A fresh adapter per task from a gradient-based init, with the base-weight
    correction ``W0 ← W0 − s·B·A`` (the model's output is unchanged at step 0);
    after training it is merged into the base weights (``W ← W + s·B·A``)."""

    single_adapter = False  # the result is in the base weights

    def __init__(self, model: nn.Module, grad_batches: int = 4, max_gradient_bytes: int | None = None,
                 seed: int = 0):
        super().__init__(model)
        if int(grad_batches) < 1:
            raise ValueError(f"grad_batches must be >= 1, got {grad_batches!r}")
        merged = [n for n, m in self.modules.items() if m.merged]
        if merged:
            raise ValueError(f"{self.name} needs unmerged adapters; {merged[:3]} are merged")
        self.grad_batches, self.max_gradient_bytes, self.seed = int(grad_batches), max_gradient_bytes, seed
        self.tasks_begun = 0

    def _batches(self, rows: Sequence[tuple[Task, object]], tag: str) -> list:
        """``grad_batches`` batches of the training batch size, drawn deterministically from ``rows``."""
        from slao_kernels.continual.prompts import collate_answers
        from slao_kernels.continual.train import row_order

        size = self.train_config.batch_size
        order = row_order(len(rows), self.grad_batches * size, self.seed, f"{self.name}:{tag}")
        device = next(iter(self.modules.values())).weight.device
        return [collate_answers([self.encoder.encode(t, r) for t, r in (rows[i] for i in order[k:k + size])],
                                self.encoder.pad_id).to(device) for k in range(0, len(order), size)]

    def gradients(self, rows, tag: str, names: Sequence[str]) -> dict[str, torch.Tensor]:
        from slao_kernels.continual.gradients import full_weight_gradients
        from slao_kernels.continual.train import answer_loss

        return full_weight_gradients(self.model, self.modules, names, self._batches(rows, tag), answer_loss)

    @torch.no_grad()
    def _install(self, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
        m = self.modules[name]
        m.lora_A.copy_(A)
        m.lora_B.copy_(B)
        delta = (m.lora_B.float() @ m.lora_A.float()) * m.scaling
        m.weight.copy_((m.weight.float() - delta).to(m.weight.dtype))

    def end_task(self, task: Task) -> dict:
        with torch.no_grad():
            for m in self.modules.values():
                m.weight.copy_((m.weight.float() + m.delta_weight()).to(m.weight.dtype))
                m.reset_lora_parameters()  # B = 0: the merged model's output is unchanged
        return {}

    def config(self) -> dict:
        return {"grad_batches": self.grad_batches, "max_gradient_bytes": self.max_gradient_bytes}

    def _state_tensors(self) -> dict[str, torch.Tensor]:  # the base weights change: they are part of the state
        return {**super()._state_tensors(), **{f"{n}.weight": m.weight for n, m in self.modules.items()}}

    def _state_meta(self) -> dict:
        return {"tasks_begun": self.tasks_begun}

    def _restore(self, directory: str, meta: dict, tensors: dict) -> None:
        super()._restore(directory, meta, tensors)
        with torch.no_grad():
            for n, m in self.modules.items():
                m.weight.copy_(tensors[f"{n}.weight"])
        self.tasks_begun = meta["tasks_begun"]


class LoRAGA(_MergedInit):
    """LoRA-GA init (arXiv 2407.05000) for every task's fresh adapter (options:
    ``gamma`` of the stable scale, ``grad_batches``, ``max_gradient_bytes``)."""

    name = "lora_ga"

    def __init__(self, model: nn.Module, gamma: float = 16.0, **options):
        super().__init__(model, **options)
        self.gamma = float(gamma)

    def begin_task(self, task: Task) -> None:
        from slao_kernels.continual.gradients import lora_ga_factors, module_chunks

        self.tasks_begun += 1
        rows = [(task, r) for r in task.train]
        factors = {}  # installed after every gradient is taken: all at the same W0
        for chunk in module_chunks(self.modules, self.max_gradient_bytes):
            grads = self.gradients(rows, task.name, chunk)
            for n in chunk:
                factors[n] = lora_ga_factors(grads.pop(n), self.modules[n].rank, self.gamma, seed=self.seed)
        for n, (A, B) in factors.items():
            self._install(n, A, B)

    def config(self) -> dict:
        return {**super().config(), "gamma": self.gamma}


class SLICE(_MergedInit):
    """SLICE (arXiv 2605.12752): a replay buffer of earlier tasks' rows, the task's and
    the buffer's gradients, PCGrad (strength ``c``, ``scope`` "global" or "module"),
    truncated-SVD init with variance matching, base-weight correction; trained,
    then merged into the base. ``buffer_per_task`` rows of every finished task are kept."""

    name = "slice"

    def __init__(self, model: nn.Module, c: float = 1.0, scope: str = "global", buffer_per_task: int = 32,
                 **options):
        super().__init__(model, **options)
        if not 0.0 <= c <= 1.0:
            raise ValueError(f"slice c must be in [0, 1], got {c!r}")
        if scope not in ("global", "module"):
            raise ValueError(f"slice scope must be 'global' or 'module', got {scope!r}")
        if int(buffer_per_task) < 0:
            raise ValueError(f"slice buffer_per_task must be >= 0, got {buffer_per_task!r}")
        self.c, self.scope, self.buffer_per_task = float(c), scope, int(buffer_per_task)
        self.buffer: list[tuple[Task, object]] = []  # rows only: (task, example)

    def begin_task(self, task: Task) -> None:
        from slao_kernels.continual.gradients import global_dots, module_chunks, pcgrad, slice_factors

        self.tasks_begun += 1
        rows = [(task, r) for r in task.train]
        replay = bool(self.buffer) and self.c > 0
        chunks = module_chunks(self.modules, self.max_gradient_bytes, kinds=2 if replay else 1)
        dots, factors = None, {}
        if replay and self.scope == "global" and len(chunks) > 1:
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
                if self.scope == "global" and dots is None:
                    dots = global_dots({n: (float((g[n] * g_r[n]).sum()), float((g_r[n] * g_r[n]).sum()))
                                        for n in chunk})
                g = pcgrad(g, g_r, self.c, dots if self.scope == "global" else None)
                del g_r
            for n in chunk:
                m = self.modules[n]
                factors[n] = slice_factors(g.pop(n), m.weight, m.rank, seed=self.seed)
        for n, (A, B) in factors.items():  # installed after every gradient is taken: all at the same W0
            self._install(n, A, B)

    def end_task(self, task: Task) -> dict:
        info = super().end_task(task)
        from slao_kernels.continual.train import row_order

        keep = row_order(len(task.train), min(self.buffer_per_task, len(task.train)), self.seed, f"buffer:{task.name}")
        self.buffer += [(task, task.train[i]) for i in keep]
        return {**info, "buffer_rows": len(self.buffer)}

    def config(self) -> dict:
        return {**super().config(), "c": self.c, "scope": self.scope, "buffer_per_task": self.buffer_per_task}

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

    def _restore(self, directory: str, meta: dict, tensors: dict) -> None:
        super()._restore(directory, meta, tensors)
        by_name = {t.name: t for t in self.tasks}
        self.buffer = [(by_name[name], by_name[name].train[i]) for name, i in meta["buffer"]]


STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "slao": SLAOStrategy, "seqlora": SeqLoRA, "inclora": IncLoRA, "olora": OLoRA, "multitask": MultiTask,
    "lora_ga": LoRAGA, "slice": SLICE}


def option_value(text: str):
    """A strategy option given as text (CLI, specs): an int, a float, true/false/none, or the string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def strategy_options(name: str) -> list[str]:
    """The option names strategy ``name`` accepts (its constructor's, through ``**options``)."""
    import inspect

    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; available: {sorted(STRATEGIES)}")
    names: list[str] = []
    for cls in STRATEGIES[name].__mro__:
        if "__init__" not in vars(cls):
            continue
        params = list(inspect.signature(cls.__init__).parameters.values())[2:]  # self, model
        names += [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def make_strategy(name: str, model: nn.Module, **options) -> Strategy:
    """Build a strategy by name (:data:`STRATEGIES`) with its options."""
    known = strategy_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"strategy {name!r} has no option(s) {unknown}; its options: {known}")
    return STRATEGIES[name](model, **options)

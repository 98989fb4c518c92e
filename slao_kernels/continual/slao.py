r"""The SLAO controller: one LoRA adapter per layer across a stream of tasks.

docs/design.md §1.2, "Merge before Forget" (arXiv 2512.23017). For task i (1-based):

* ``begin_task()``: task 1 keeps the fresh adapter (A Kaiming-uniform, B = 0).
  Task i ≥ 2 initializes, per layer, ``A ← Qᵀ`` with ``QR(A_ft,i−1ᵀ)`` sign-fixed
  (``init="orthogonal"``) and ``B ← B_ft,i−1`` (the previous *fine-tuned* B).
* the caller fine-tunes A and B on task i (a new optimizer per task, see below);
* ``end_task()``: ``A_merge,i = A_ft,i`` and
  ``B_merge,i = B_merge,i−1 + λ(i)·(B_ft,i − B_merge,i−1)`` with ``λ(i) = 1/√i``
  (λ(1) = 1, exactly). Afterwards the model holds the merged adapter, ready
  for evaluation and inference.

Memory is constant in the number of tasks: besides the adapter in the model,
one B-sized buffer per layer (holding ``B_ft`` between tasks and ``B_merge``
during training; the two are exchanged by swapping tensors, not copying), plus
one A-sized buffer per layer for the ablations that merge A.

Transactions: ``begin_task()`` and ``end_task()`` check every factor they will
keep, merge or orthonormalize (all finite) before writing anything; a refused
call raises ``ValueError`` naming the modules and changes nothing. During a
task the controller also holds one copy of each layer's A and B (the
adapter's own size again, freed by ``end_task``), so that :meth:`SLAO.abort_task`
can put the model and the controller back exactly as they were before the
task's ``begin_task()``: retry the task, or stop with the last merged adapter.

Ablations (the paper's table, and the ``last_ft`` control of an independent
reproduction): ``init`` ∈ {"orthogonal", "last_ft", "last_merge", "random"},
``merge`` ∈ {"B", "A", "AB", "none"}, ``lam`` ∈ {"inv_sqrt", "inv", float c}.

Distributed training (see :mod:`slao_kernels.distributed`): create the
controller on the model after wrapping it (DDP) or sharding it (FSDP2,
:func:`~slao_kernels.distributed.shard_llama`), and call every method on every
rank. With replicated adapters each rank runs the same task switch on the same
tensors, with no communication. With sharded ones the buffers are sharded like
their parameters, the merge runs on the local rows, and the orthonormal init
all-gathers each ``A`` (r×in); :meth:`save` gathers everything and writes from
rank 0 only, and :meth:`load` reads at any world size.

Optimizers: create a new one after every ``begin_task()``. Adam's moments
from task i−1 describe parameters that ``begin_task`` has just replaced
(orthonormalized A, the fine-tuned B); carrying them over would apply stale
momentum to the new task's first steps. The parameters keep their identity
across tasks, so ``[p for p in model.parameters() if p.requires_grad]`` is
always the right list.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
from torch import nn

from slao_kernels import distributed as dist_utils
from slao_kernels.distributed import gather, is_sharded, local, write_full_
from slao_kernels.nn import LoRALinear
from slao_kernels.ops.orthonormalize import orthonormalize_rows_
from slao_kernels.ops.scaled_merge import scaled_merge_
from slao_kernels.patching import lora_modules

INITS = ("orthogonal", "last_ft", "last_merge", "random")
MERGES = ("B", "A", "AB", "none")
LAMBDAS = ("inv_sqrt", "inv")


def merge_weight(lam, task: int) -> float:
    """λ(task) for a schedule: ``"inv_sqrt"`` 1/√i, ``"inv"`` 1/i, or a constant; λ(1) = 1 always."""
    if task == 1:
        return 1.0
    if lam == "inv_sqrt":
        return 1.0 / math.sqrt(task)
    if lam == "inv":
        return 1.0 / task
    return float(lam)


class SLAO:
    """Continual learning with one LoRA per layer: orthogonal init, time-scaled B merge.

    Args:
        model: a model patched with :func:`slao_kernels.patch_llama` (or holding
            :class:`~slao_kernels.LoRALinear` modules some other way).
        lam: merge schedule, ``"inv_sqrt"`` (SLAO), ``"inv"``, or a constant in (0, 1].
        init: initialization for task i ≥ 2 (see the module docstring).
        merge: which factor is merged across tasks.

    Example::

        slao = SLAO(model)
        for task in tasks:
            slao.begin_task()
            opt = torch.optim.AdamW(slao.parameters(), lr=1e-4)   # new optimizer per task
            train(model, task, opt)
            slao.end_task()                                      # model now holds the merged adapter
            evaluate(model)
    """

    def __init__(self, model: nn.Module, lam="inv_sqrt", init: str = "orthogonal", merge: str = "B"):
        if not (lam in LAMBDAS or (isinstance(lam, (int, float)) and not isinstance(lam, bool)
                                   and 0.0 < float(lam) <= 1.0)):
            raise ValueError(f"lam must be one of {LAMBDAS} or a constant in (0, 1], got {lam!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
        model = dist_utils.unwrap_model(model)  # DDP's "module." would leak into the checkpoint's names
        self.modules: dict[str, LoRALinear] = lora_modules(model)
        if not self.modules:
            raise ValueError("SLAO needs a model with LoRA adapters: call slao_kernels.patch_llama(model, config) "
                             "first")
        merged = [n for n, m in self.modules.items() if m.merged]
        if merged:
            raise ValueError(f"SLAO needs unmerged adapters; {merged[:3]} are merged into their base weights")
        self.model = model
        self.lam, self.init, self.merge = lam, init, merge
        self.task_index = 0  # tasks begun so far; the current (or last) task is number task_index
        self.in_task = False
        # The one buffer per layer (see the module docstring), allocated at the first end_task().
        self._b_other: dict[str, torch.Tensor] = {}
        self._a_other: dict[str, torch.Tensor] = {}
        # During a task: what begin_task() and training overwrite, for abort_task() (see _snapshot).
        self._undo: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ the two hooks

    @torch.no_grad()
    def begin_task(self) -> int:
        """Initialize the adapter for the next task; returns its 1-based index."""
        if self.in_task:
            raise RuntimeError(f"begin_task(): task {self.task_index} has not ended; call end_task() first")
        dist_utils.reshard(self.model)
        self._check_layout()
        # everything the init reads or keeps: the adapter in the model and the buffers
        self._check_finite("begin_task()", [(f"{n}.{f}", getattr(m, f)) for n, m in self.modules.items()
                                             for f in ("lora_A", "lora_B")]
                           + [(f"{n}.buffer_B", b) for n, b in self._b_other.items()]
                           + [(f"{n}.buffer_A", a) for n, a in self._a_other.items()],
                           "nothing changed")
        self._undo = self._snapshot()
        self.task_index += 1
        self.in_task = True
        if self.task_index == 1:
            return 1  # the fresh adapter of patch_llama (A Kaiming-uniform, B = 0)
        try:
            self._init_task()
        except BaseException:
            self.abort_task()  # the swaps are done, the init may be half-written: undo both
            raise
        return self.task_index

    def _init_task(self) -> None:
        """``begin_task`` of a task i ≥ 2: swap the fine-tuned factors in, then initialize."""
        layers = list(self.modules.values())
        names = list(self.modules)
        # Save the merged factors, put the fine-tuned ones (or the init) in the model.
        if self.init == "last_merge":  # train on from the merged adapter; remember it for the merge
            for n, m in zip(names, layers, strict=True):
                local(self._b_other[n]).copy_(local(m.lora_B))
                if self.merge in ("A", "AB"):
                    local(self._a_other[n]).copy_(local(m.lora_A))
            return
        for n, m in zip(names, layers, strict=True):
            self._swap(m.lora_B, self._b_other, n)  # model: B_ft,i−1; buffer: B_merge,i−1
            if self.merge in ("A", "AB"):
                self._swap(m.lora_A, self._a_other, n)  # model: A_ft,i−1; buffer: A_merge,i−1
        if self.init == "orthogonal":
            self._orthonormalize([m.lora_A for m in layers])
        elif self.init == "random":
            for m in layers:
                self._reset(m)

    @torch.no_grad()
    def end_task(self) -> float:
        """Merge the fine-tuned adapter into the running merge; the model then holds
        the merged adapter. Returns λ(i) used for this task.

        All or nothing: the factors are checked finite first, and the merge is computed
        into new tensors (one more adapter-sized set for the moment) before the model or
        the buffers change, so any failure leaves the task open as it was."""
        if not self.in_task:
            raise RuntimeError("end_task(): no task in progress; call begin_task() first")
        dist_utils.reshard(self.model)
        self._check_layout()
        # Every mode keeps both fine-tuned factors (merged, as A_merge, or as the next init): check them all
        # before anything is written, so a refused end_task leaves the task open to fix, retry or abort.
        self._check_finite("end_task()", [(f"{n}.{f}", getattr(m, f)) for n, m in self.modules.items()
                                           for f in ("lora_A", "lora_B")],
                           f"nothing merged; the model still holds task {self.task_index}'s fine-tuned adapter: "
                           "fix it and call end_task() again, or abort_task() to go back to the adapter "
                           "before this task")
        lam = merge_weight(self.lam, self.task_index)
        names = list(self.modules)
        layers = list(self.modules.values())
        # Stage: every allocation and the merge itself on new tensors, X_merge,i per factor and layer, while
        # the buffers still hold X_merge,i−1 and the model X_ft,i. Nothing the task's state consists of
        # changes until all of it succeeded, so a failure here (out of memory, Ctrl-C, a kernel error)
        # leaves the task open exactly as it was, for abort_task() or a retry.
        factors = [("lora_B", self._b_other, "B" in self.merge)]
        if self.merge in ("A", "AB"):
            factors.append(("lora_A", self._a_other, "A" in self.merge))
        staged = []
        for factor, buffers, merges in factors:
            params = [getattr(m, factor) for m in layers]
            merged = {n: torch.empty_like(p) for n, p in zip(names, params, strict=True)}
            # from X_merge,i−1; at λ(1) = 1, and for a factor that is not merged, X_merge,i = X_ft,i
            sources = [buffers[n] for n in names] if buffers and merges else params
            torch._foreach_copy_([local(merged[n]) for n in names], [local(t) for t in sources])  # one launch
            if buffers and merges:  # inputs checked finite above, on every rank
                # the local rows (all of them unless sharded); a rank can hold none of a small A
                pairs = [(local(merged[n]), local(p)) for n, p in zip(names, params, strict=True)]
                pairs = [(b, q) for b, q in pairs if b.numel()]
                if pairs:
                    scaled_merge_([b for b, _ in pairs], [q for _, q in pairs], lam, check_finite=False)
            # a sharded parameter swaps by copying (see _swap): its buffer must exist before the commit
            spare = {n: torch.empty_like(p) for n, p in zip(names, params, strict=True)
                     if is_sharded(p) and not buffers}
            staged.append((factor, buffers, merged, spare))
        # Commit: the model gets X_merge,i, the buffer keeps X_ft,i for the next init. Storage swaps for
        # plain tensors (no allocation, nothing to fail); copies into the local rows of sharded ones.
        for factor, buffers, merged, spare in staged:
            for n, m in zip(names, layers, strict=True):
                param = getattr(m, factor)
                if is_sharded(param):
                    if n not in buffers:  # the first task: the buffer allocated while staging
                        buffers[n] = spare[n]
                    local(buffers[n]).copy_(local(param))
                    local(param).copy_(local(merged[n]))
                else:
                    buffers[n], param.data = param.data, merged[n]
        self.in_task = False
        self._undo = {}
        return lam

    @torch.no_grad()
    def abort_task(self) -> int:
        """Undo the task in progress: the model's adapter and the controller are
        exactly (bit for bit) what they were before this task's ``begin_task()``
        — the merged adapter of task i−1, or for task 1 the adapter it started
        from. Use it when training diverged or ``end_task()`` refused the adapter;
        then retry the task with ``begin_task()`` or stop with a usable model.
        Returns the number of tasks completed (i−1). Create a new optimizer
        afterwards: the parameters' values changed under the old one."""
        if not self.in_task:
            raise RuntimeError("abort_task(): no task in progress")
        dist_utils.reshard(self.model)
        for n, m in self.modules.items():
            for factor, buffers, saved in (("lora_A", self._a_other, self._undo[n][0]),
                                           ("lora_B", self._b_other, self._undo[n][1])):
                param = getattr(m, factor)
                if n in buffers:  # the buffer holds the model's value from before the task (swapped or copied)
                    self._swap(param, buffers, n)
                    local(buffers[n]).copy_(saved)
                else:
                    local(param).copy_(saved)
        self.task_index -= 1
        self.in_task = False
        self._undo = {}
        return self.task_index

    def _snapshot(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Copies of what the next task overwrites, per layer ``(A, B)``: for a factor with a
        buffer, the buffer's value (begin_task moves it into the model, training changes it; the
        buffer then holds the model's old value); otherwise the model's value. This rank's rows."""
        def saved(n: str, factor: str, buffers: dict) -> torch.Tensor:
            source = buffers[n] if n in buffers else getattr(self.modules[n], factor)
            return local(source).detach().clone()
        return {n: (saved(n, "lora_A", self._a_other), saved(n, "lora_B", self._b_other)) for n in self.modules}

    def _check_finite(self, where: str, named: list[tuple[str, torch.Tensor]], consequence: str) -> None:
        """Raise ``ValueError`` naming the tensors that hold a NaN or an infinity. In a
        distributed run every rank takes part and all raise together (a rank that
        raised alone would leave the others waiting in the next collective)."""
        parts = [(name, local(t)) for name, t in named]
        parts = [(name, t) for name, t in parts if t.numel()]
        bad = []
        if parts:
            # One number per tensor, then one test; names only on a hit. A NaN or an infinity anywhere makes
            # its number non-finite, and finite data never does: on CUDA the max-abs (one multi-tensor
            # launch), on the CPU the sum in fp64 (no fp32 or 16-bit values can overflow it; ~3× faster
            # there than a per-tensor isfinite().all()).
            tensors = [t for _, t in parts]
            if tensors[0].is_cuda:
                peaks = [p.float() for p in torch._foreach_norm(tensors, float("inf"))]
            else:
                peaks = [t.sum(dtype=torch.float64) for t in tensors]
            if not bool(torch.stack([p.to(peaks[0].device) for p in peaks]).isfinite().all()):
                bad = [name for (name, _), peak in zip(parts, peaks, strict=True) if not torch.isfinite(peak)]
        device = local(named[0][1]).device if named else "cpu"
        if dist_utils.any_rank(bool(bad), device):
            where_bad = f"{bad[:4]}{' and more' if len(bad) > 4 else ''}" if bad else "another rank's shards"
            raise ValueError(f"SLAO.{where}: not finite (NaN or inf) in {where_bad}"
                             f"{' on this rank' if bad and dist_utils.initialized() else ''}; {consequence}")

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _swap(param: nn.Parameter, buffers: dict, name: str) -> None:
        """Exchange a parameter's values with its buffer's; the Parameter keeps its identity.

        Plain tensors swap storage (no copy). A sharded parameter's local rows live
        in storage FSDP2 owns and all-gathers from, so those are swapped by copying.
        """
        if is_sharded(param):
            mine, other = local(param), local(buffers[name])
            saved = mine.clone()
            mine.copy_(other)
            other.copy_(saved)
            return
        current = param.data
        param.data = buffers[name]
        buffers[name] = current

    def _orthonormalize(self, params: list[nn.Parameter]) -> None:
        """``A ← Qᵀ`` for every layer, in place (no result to allocate, no layers to stack).

        Sharded A's are gathered (r×in each), orthonormalized on every rank alike,
        and each rank keeps its rows.
        """
        if not any(is_sharded(p) for p in params):
            orthonormalize_rows_([p.detach() for p in params])
            return
        full = [gather(p) for p in params]
        orthonormalize_rows_(full)
        for p, f in zip(params, full, strict=True):
            write_full_(p, f)

    @staticmethod
    def _reset(module: LoRALinear) -> None:
        """A fresh adapter (the random-init ablation): ``A`` drawn anew, ``B = 0``, the
        same on every rank: in a distributed run rank 0's draw is broadcast, so ranks
        whose random generators differ still agree."""
        if not dist_utils.initialized():
            module.reset_lora_parameters()
            return
        A = module.lora_A
        full = LoRALinear.init_A_(torch.empty(A.shape, dtype=A.dtype, device=local(A).device))
        torch.distributed.broadcast(full, src=0)
        write_full_(A, full)
        local(module.lora_B).zero_()

    def _check_layout(self) -> None:
        """The buffers must be sharded exactly when the parameters are."""
        for n, b in self._b_other.items():
            param_sharded, buffer_sharded = is_sharded(self.modules[n].lora_B), is_sharded(b)
            if param_sharded != buffer_sharded:
                raise RuntimeError(f"SLAO: {n}.lora_B is {'' if param_sharded else 'not '}sharded but SLAO's buffer "
                                   f"for it is {'' if buffer_sharded else 'not'}; create the controller (or call "
                                   "SLAO.load) after fully_shard, not before")

    def parameters(self) -> Iterator[nn.Parameter]:
        """The trainable adapter parameters (lora_A and lora_B of every layer)."""
        for m in self.modules.values():
            yield m.lora_A
            yield m.lora_B

    def state_bytes(self) -> int:
        """Bytes held for SLAO on this rank: the adapters in the model plus the controller's buffers
        (and, during a task, the copy :meth:`abort_task` restores from)."""
        tensors = ([p for p in self.parameters()] + list(self._b_other.values()) + list(self._a_other.values())
                   + [t for pair in self._undo.values() for t in pair])
        return sum(local(t).numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------------ checkpoints

    def _layer_meta(self) -> dict:
        return {n: {"rank": m.rank, "alpha": m.alpha, "rslora": m.rslora, "in": m.in_features,
                    "out": m.out_features, "dtype": str(m.lora_A.dtype).replace("torch.", "")}
                for n, m in self.modules.items()}

    def save(self, directory: str, metadata: dict | None = None) -> str:
        """Checkpoint the adapter and the controller state between tasks (crash-safe,
        see :mod:`slao_kernels.continual.checkpoint`). Returns the path of ``slao.json``.

        ``metadata``: a JSON object of the caller's (a training loop's step count, a
        runner's record of the finished tasks), stored in ``slao.json`` under
        ``"metadata"``, covered by its checksum, and committed with the tensors.

        The checkpoint holds full tensors whatever the sharding. In a distributed
        run every rank must call it (sharded tensors are gathered); rank 0 writes,
        and every rank returns once the files are in place.
        """
        from slao_kernels._files import refuse_non_finite
        from slao_kernels._version import __version__
        from slao_kernels.continual.checkpoint import save_checkpoint, validate_slao_meta

        if self.in_task:
            raise RuntimeError(f"save(): task {self.task_index} is in progress; checkpoint after end_task()")
        dist_utils.reshard(self.model)
        tensors = {}
        for n, m in self.modules.items():  # the same order on every rank: the gathers are collectives
            tensors[f"{n}.lora_A"], tensors[f"{n}.lora_B"] = gather(m.lora_A), gather(m.lora_B)
            if n in self._b_other:
                tensors[f"{n}.buffer_B"] = gather(self._b_other[n])
            if n in self._a_other:
                tensors[f"{n}.buffer_A"] = gather(self._a_other[n])
        meta = {"library_version": __version__, "task_index": self.task_index,
                "slao": {"lam": self.lam, "init": self.init, "merge": self.merge}, "layers": self._layer_meta()}
        if metadata is not None:
            meta["metadata"] = metadata
        # on every rank (all hold the full tensors), before rank 0 writes: all raise alike, none waits forever
        validate_slao_meta(meta, tensors, where="SLAO.save")  # never write a checkpoint load() would refuse
        refuse_non_finite(tensors, "SLAO.save")
        # rank 0 writes; every rank waits for it and hears if it failed (nobody reads the checkpoint
        # before rank 0 has renamed it into place, nobody waits for a writer that failed)
        device = dist_utils.local(next(iter(self.modules.values())).lora_A).device
        path = dist_utils.write_on_main_process(lambda: save_checkpoint(directory, tensors, meta), "SLAO.save",
                                                device)
        return path if path is not None else os.path.join(directory, "slao.json")

    @classmethod
    def load(cls, model: nn.Module, directory: str) -> SLAO:
        """Resume from :meth:`save`: a controller over ``model`` (patched with the same
        targets, rank and shapes) in the saved state. A missing, corrupted or
        mismatched checkpoint raises before the model is touched.

        Works at any world size: call it on every rank, after wrapping or
        sharding the model; each rank reads the file and keeps the rows it holds.
        """
        from slao_kernels.continual.checkpoint import load_checkpoint, validate_slao_meta

        meta, tensors = load_checkpoint(directory)  # checksums, shapes, finiteness
        state = validate_slao_meta(meta, tensors, where=f"SLAO checkpoint {os.path.join(directory, 'slao.json')}")
        slao = cls(model, lam=state["lam"], init=state["init"], merge=state["merge"])  # reads the model only
        saved, ours = state["layers"], slao._layer_meta()
        if saved != ours:
            only_saved = sorted(set(saved) - set(ours))[:3]
            only_model = sorted(set(ours) - set(saved))[:3]
            differing = sorted(n for n in set(saved) & set(ours) if saved[n] != ours[n])[:3]
            raise ValueError(f"SLAO.load: the checkpoint does not fit this model (layers only in the checkpoint: "
                             f"{only_saved}, only in the model: {only_model}, with other shapes or config: "
                             f"{[(n, saved[n], ours[n]) for n in differing]})")
        # Everything is checked. Fill the controller's new buffers first (the model is not touched
        # yet), then copy the adapter into the model, and only then set the task index.
        dist_utils.reshard(slao.model)
        with torch.no_grad():
            for n, m in slao.modules.items():
                for key, param, buffers in ((f"{n}.buffer_B", m.lora_B, slao._b_other),
                                            (f"{n}.buffer_A", m.lora_A, slao._a_other)):
                    if key in tensors:
                        buffers[n] = torch.empty_like(param)  # sharded like the parameter
                        write_full_(buffers[n], tensors[key])
            for n, m in slao.modules.items():
                write_full_(m.lora_A, tensors[f"{n}.lora_A"])
                write_full_(m.lora_B, tensors[f"{n}.lora_B"])
        slao.task_index = state["task_index"]
        return slao

    def __repr__(self) -> str:
        return (f"SLAO(layers={len(self.modules)}, task_index={self.task_index}, in_task={self.in_task}, "
                f"lam={self.lam!r}, init={self.init!r}, merge={self.merge!r})")

r"""Replicated (DDP) and sharded (FSDP2) adapters: the pieces SLAO's task switch needs.

Under ``torchrun`` a model is either *replicated* (DDP, accelerate's default):
every rank holds every parameter as a plain tensor, or *sharded* (FSDP2,
``torch.distributed.fsdp.fully_shard``): between steps every parameter is a
``DTensor`` whose rows (dim 0) are split over the ranks, ``torch.chunk`` style,
so with r < world size some ranks hold none of an ``A``'s rows. Inside forward
and backward FSDP2 all-gathers each layer and the ops see plain local tensors,
so :class:`~slao_kernels.LoRALinear` needs nothing special; SLAO's task switch,
which works between steps, does:

* the merge ``B_merge ← B_merge + λ·(B_ft − B_merge)`` is elementwise, so every
  rank merges the rows it holds (:func:`local`): no communication;
* the orthonormal init needs all r rows of each ``A`` (its Gram matrix couples
  them): :func:`gather` all-gathers the r×in matrices, every rank computes the
  same ``Qᵀ`` from the same input (ranks of one job run the same kernels on the
  same shapes) and keeps its own rows (:func:`write_full_`);
* checkpoints hold full tensors: every rank takes part in the gather, the main
  rank writes, and any world size (1 included) reads them back.

``reshard`` comes first: after a forward under ``no_grad`` FSDP2 leaves the
root module's parameters unsharded, and a write to an unsharded parameter is
lost at the next reshard.

At the end of a run :func:`shutdown` destroys the process group in an order
that cannot hang at exit under DDP.

Nothing here needs a process group: without one every helper is the identity
(or a no-op), so single-process code runs the same path.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")

try:  # DTensor and FSDP2 are in every torch this project supports; guard the import anyway
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - a torch built without distributed support
    DTensor = FSDPModule = distribute_tensor = None


def initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if initialized() else 1


def is_main_process() -> bool:
    """Rank 0: the one process that writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Whether ``flag`` is true on any rank (a collective; ``flag`` itself without a
    process group). ``device``: where the process group's backend takes tensors
    (CUDA for NCCL)."""
    if not initialized():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def write_on_main_process(write: Callable[[], T], what: str, device: torch.device | str = "cpu") -> T | None:
    """Run ``write`` on rank 0 only, then tell every rank how it went (a collective, in place
    of a barrier): rank 0's own error is raised on rank 0, and the other ranks raise a
    ``RuntimeError`` naming ``what`` instead of waiting forever at a barrier for a writer that
    failed (a full disk, a permission). Returns ``write()``'s result on rank 0, None elsewhere;
    without a process group it is just ``write()``.

    ``device``: where the process group's backend takes tensors (CUDA for NCCL).
    """
    if not initialized():
        return write()
    result, error = None, None
    if is_main_process():
        try:
            result = write()
        except BaseException as exc:  # Ctrl-C too: the other ranks must hear of it
            error = exc
    # 0: written; 1: an error; 2: interrupted (every rank then raises KeyboardInterrupt, as rank 0 does)
    code = torch.tensor([0 if error is None else 2 if isinstance(error, KeyboardInterrupt) else 1],
                        dtype=torch.int32, device=device)
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    outcome = int(code.item())
    # The last collective is a barrier, as before this exchange existed: gloo's worker thread is done
    # with ``code`` when it returns. Otherwise a worker that drops a Python-made tensor's last
    # reference after the interpreter has begun to finalize cannot take the GIL and aborts the
    # process ("terminate called without an active exception": seen once in a 2-process FSDP2 run
    # that stopped right after a save).
    del code
    dist.barrier()
    if error is not None:
        raise error
    if outcome == 2:
        raise KeyboardInterrupt
    if outcome == 1:
        raise RuntimeError(f"{what}: rank 0 failed to write (its error says why); nothing else was written")
    return result


def _wrapper_chain(model: nn.Module):
    """``model``, then each model inside it through DDP / ``nn.DataParallel`` (``.module``)
    and ``torch.compile`` (``._orig_mod``) wrappers, outermost first."""
    while True:
        yield model
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / ``nn.DataParallel`` (``.module``) and ``torch.compile``
    (``._orig_mod``) wrappers, so module paths are the same as on one process.
    FSDP2 shards in place and needs no unwrapping."""
    *_, inner = _wrapper_chain(model)
    return inner


def _hold(*objects) -> None:
    """A finalizer callback that does nothing: its arguments live until it has run."""


def shutdown(*models: nn.Module) -> None:
    """Destroy the default process group, with what DDP needs for a clean exit (a no-op
    without a process group). Call it in place of ``dist.destroy_process_group()``
    at the end of a run, passing the DDP modules (or their ``torch.compile`` /
    accelerate wrappers); they cannot run forward or backward afterwards.

    Why: a DDP module's reducer holds a reference to its process group, and the
    reducer's C++ destructor runs with the GIL held. If it drops the group's last
    reference (the DDP module outlives ``destroy_process_group`` and is freed when
    the script's function returns), gloo's destructor joins its worker threads while
    holding the GIL, and a worker still freeing the last collective's tensors needs
    the GIL for that: the process hangs at exit, at random (torch 2.13, gloo: 2 hangs
    in 36 two-process runs of ``continual.scale_out`` on a 2-core machine). So each
    reducer is released first, while the group is still registered, and if anything
    else keeps it alive (``torch.compile(ddp)`` copies the module's attributes), the
    group's Python object is kept until the reducer is gone: the last reference is
    then dropped from Python, whose binding lets go of the GIL while gloo shuts down.
    """
    if not initialized():
        return
    for model in models:
        for wrapper in _wrapper_chain(model):
            if isinstance(wrapper, nn.parallel.DistributedDataParallel) and "reducer" in wrapper.__dict__:
                wrapper.__dict__.pop("logger", None)  # the logger holds the reducer as well
                reducer = wrapper.__dict__.pop("reducer")
                weakref.finalize(reducer, _hold, wrapper.process_group).atexit = False
                del reducer  # usually the last reference: the finalizer runs here, the group still registered
    dist.destroy_process_group()


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module of ``model`` back in its sharded state (no-op otherwise)."""
    if FSDPModule is None:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (an FSDP2 parameter, or a buffer made like one)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank holds, as a plain tensor sharing its storage
    (all of ``t`` unless it is sharded); detached, for writes under ``no_grad``."""
    return t.to_local().detach() if is_sharded(t) else t.detach()


def gather(t: torch.Tensor) -> torch.Tensor:
    """All of ``t`` as a plain tensor. For a sharded ``t`` this is a collective:
    every rank must call it, in the same order."""
    return t.full_tensor().detach() if is_sharded(t) else t.detach()


def write_full_(t: torch.Tensor, full: torch.Tensor) -> None:
    """Set ``t`` to ``full`` (``t``'s global shape): a sharded ``t`` copies only the
    rows this rank holds, without communication."""
    if tuple(full.shape) != tuple(t.shape):
        raise ValueError(f"write_full_: expected a tensor of shape {tuple(t.shape)}, got {tuple(full.shape)}")
    if is_sharded(t):
        # src_data_rank=None: every rank has `full` and slices out its own part locally
        full = distribute_tensor(full.detach().to(t.device), t.device_mesh, t.placements,
                                 src_data_rank=None).to_local()
    local(t).copy_(full)


def shard_llama(model: nn.Module, **fsdp_kwargs) -> nn.Module:
    """FSDP2 the way SLAO expects it: ``fully_shard`` on each decoder layer, then on the root.

    Patch first (:func:`slao_kernels.patch_llama`), shard second, and create
    (or :meth:`~slao_kernels.SLAO.load`) the controller after sharding. Keyword
    arguments go to every ``fully_shard`` call (``mesh``, ``mp_policy``,
    ``reshard_after_forward``, ...). Returns ``model``, sharded in place.
    """
    from torch.distributed.fsdp import fully_shard

    inner = unwrap_model(model)
    layers = getattr(getattr(inner, "model", inner), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"shard_llama: {type(inner).__name__} has no decoder layers at .model.layers; "
                         "call fully_shard on its blocks yourself")
    for layer in layers:
        fully_shard(layer, **fsdp_kwargs)
    fully_shard(inner, **fsdp_kwargs)
    return model

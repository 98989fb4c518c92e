r"""SLAO on several processes: a complete training script for ``torchrun`` and ``accelerate launch``.

It shows the whole recipe on the engines users already have, and the test
suite runs it (``tests/test_distributed.py``) to check that every engine
produces the adapter one process does::

    python -m slao_kernels.continual.scale_out --out runs/one                       # one process
    torchrun --nproc_per_node=2 -m slao_kernels.continual.scale_out --engine ddp --out runs/ddp
    torchrun --nproc_per_node=2 -m slao_kernels.continual.scale_out --engine fsdp2 --out runs/fsdp2
    accelerate launch --num_processes 2 -m slao_kernels.continual.scale_out --engine accelerate --out runs/acc
    python -m slao_kernels.continual.scale_out --out runs/fsdp2 --resume           # continue at world size 1

The recipe, whatever the engine: patch the model, wrap or shard it, create
:class:`~slao_kernels.SLAO` on the result, then per task ``begin_task()`` →
a new optimizer over ``slao.parameters()`` → train → ``end_task()`` →
``save()``, all on every rank; at the end :func:`~slao_kernels.distributed.shutdown`
(not ``destroy_process_group``: see there). The controller writes from rank 0 only and
its checkpoints resume at any world size.

The tasks are synthetic so the script runs anywhere (no data files, no
network): task t asks for the next token of an affine sequence
``x[i+1] = (a_t·x[i] + c_t) mod V`` from a random start. All sequences have the
same length, so the mean loss of each rank's share of a batch, averaged over
the ranks (what DDP and FSDP2 do to gradients), is the mean loss of the whole
batch: one process and N processes take the same steps up to rounding.

Writes into ``--out``: ``run.json`` (the arguments), ``checkpoint/`` (SLAO's,
after every task), ``progress.json`` (per-task loss and time, rewritten after
every task), and at the end ``adapter/`` (PEFT format) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from slao_kernels import distributed as dist_utils
from slao_kernels._files import write_json_atomic
from slao_kernels.continual.slao import SLAO
from slao_kernels.continual.train import adamw
from slao_kernels.patching import LLAMA_PROJECTIONS, LoRAConfig, lora_modules, patch_llama
from slao_kernels.peft_format import save_peft_adapter

ENGINES = ("none", "ddp", "fsdp2", "accelerate")
# The arguments that define the result; a resumed run must repeat them (engine and world size may change).
RESULT_ARGS = ("model", "tasks", "steps", "batch_size", "seq_len", "vocab", "optimizer", "lr", "rank", "alpha",
               "targets", "seed")
OPTIMIZERS = ("adamw", "sgd")


def build_parser() -> argparse.ArgumentParser:
    """The script's command line (``--help`` lists it)."""
    p = argparse.ArgumentParser(prog="python -m slao_kernels.continual.scale_out",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=ENGINES, default="none",
                   help="none: one process; ddp / fsdp2: under torchrun; accelerate: under accelerate launch")
    p.add_argument("--model", default="tiny",
                   help="'tiny' (a 2-layer Llama built from a config, seeded), 'default' (SmolLM2-135M) "
                        "or a Hugging Face model directory")
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per task")
    p.add_argument("--batch-size", type=int, default=8, help="global batch; a multiple of the world size")
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--vocab", type=int, default=64, help="token ids the tasks use (≤ the model's vocabulary)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                   help="adamw (what training uses), or plain sgd: its update is linear in the gradient, so "
                        "runs that differ only in the order of the gradient's sums stay within rounding "
                        "of each other (the equivalence tests use it)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint (any world size)")
    p.add_argument("--stop-after", type=int, default=None, metavar="K",
                   help="stop after task K (to be resumed later)")
    p.add_argument("--quiet", action="store_true")
    return p


def task_batch(task: int, step: int, args, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of the global batch ``step`` of task ``task`` (0-based), the same on every world size."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + task * 10_007 + step)
    a, c = 2 * task + 3, 7 * task + 1  # odd multipliers: every task is a permutation of the token ids
    start = torch.randint(0, args.vocab, (args.batch_size, 1), generator=g)
    seq = [start]
    for _ in range(args.seq_len - 1):
        seq.append((a * seq[-1] + c) % args.vocab)
    rows = args.batch_size // world
    return torch.cat(seq, dim=1)[rank * rows:(rank + 1) * rows]


def tiny_llama(vocab: int, seed: int):
    """A 2-layer Llama built from a config: the same weights in every process for the same seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)  # the same base weights in every process and every run
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.02)
    return LlamaForCausalLM(config).float()


def load(args):
    """The base model ``--model`` names, in fp32."""
    if args.model == "tiny":
        return tiny_llama(args.vocab, args.seed)
    from slao_kernels.continual.models import load_model

    model, _ = load_model(None if args.model == "default" else args.model)
    if args.vocab > model.config.vocab_size:
        raise SystemExit(f"--vocab {args.vocab} exceeds the model's vocabulary ({model.config.vocab_size})")
    return model


def check_args(args, world: int) -> None:
    """Exit with a message naming the bad argument, before any process group or model exists."""
    if args.engine == "none" and world > 1:
        raise SystemExit(f"--engine none runs one process, but WORLD_SIZE is {world}: pick ddp, fsdp2 or accelerate")
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the world size {world}")
    for name in ("tasks", "steps", "batch_size", "seq_len", "rank"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be ≥ 1")
    if args.seq_len < 2 or args.vocab < 2:
        raise SystemExit("--seq-len and --vocab must be ≥ 2")
    bad = [t for t in args.targets.split(",") if t not in LLAMA_PROJECTIONS]
    if bad:
        raise SystemExit(f"--targets: {bad} are not Llama projections {LLAMA_PROJECTIONS}")
    if args.stop_after is not None and not 1 <= args.stop_after <= args.tasks:
        raise SystemExit(f"--stop-after must be in [1, {args.tasks}]")


def replica_difference(slao: SLAO) -> float:
    """Largest difference between this rank's adapter and rank 0's (0.0 means bit-identical on
    every rank): replicated engines must keep the replicas equal through every task switch."""
    worst = torch.zeros((), dtype=torch.float64)
    for m in slao.modules.values():
        for p in (m.lora_A, m.lora_B):
            mine = p.detach()
            theirs = mine.clone()
            dist.broadcast(theirs, src=0)
            worst = torch.maximum(worst, (mine.double() - theirs.double()).abs().max().cpu())
    worst = worst.to(next(iter(slao.modules.values())).lora_A.device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def main(argv: list[str] | None = None) -> dict | None:
    """Run the script; returns the summary (None when stopped early by ``--stop-after``)."""
    args = build_parser().parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_args(args, world)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
        else torch.device("cpu")
    run_json, ckpt = os.path.join(args.out, "run.json"), os.path.join(args.out, "checkpoint")
    result_args = {k: getattr(args, k) for k in RESULT_ARGS}
    if args.engine in ("ddp", "fsdp2") and "RANK" not in os.environ:
        raise SystemExit(f"--engine {args.engine} runs under torchrun: "
                         f"torchrun --nproc_per_node=N -m slao_kernels.continual.scale_out --engine {args.engine} ...")
    if args.resume:
        if not os.path.isfile(os.path.join(ckpt, "slao.json")):
            raise SystemExit(f"--resume: no checkpoint in {ckpt} (a run that stopped before its first task "
                             "ended has nothing to resume: start it again without --resume)")
        with open(run_json) as f:
            saved = json.load(f)
        saved.setdefault("optimizer", "adamw")  # runs from before --optimizer existed
        differing = {k: (saved.get(k), v) for k, v in result_args.items() if saved.get(k) != v}
        if differing:
            raise SystemExit(f"--resume: arguments differ from the run in {args.out} (saved, now): {differing}")
    elif os.path.exists(os.path.join(ckpt, "slao.json")):
        raise SystemExit(f"{args.out} holds a run already: pass --resume to continue it, or another --out")

    accelerator = None
    if args.engine == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=device.type == "cpu")
        device = accelerator.device
    elif args.engine in ("ddp", "fsdp2"):
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist_utils.rank(), dist_utils.world_size()
    log = (lambda s: None) if args.quiet or rank else (lambda s: print(s, flush=True))

    model = load(args).to(device)
    patch_llama(model, LoRAConfig(rank=args.rank, alpha=args.alpha, targets=tuple(args.targets.split(","))))
    if args.engine == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                                            else None)
    elif args.engine == "fsdp2":
        wrapped = dist_utils.shard_llama(model)
    elif accelerator is not None:
        wrapped = accelerator.prepare(model)
    else:
        wrapped = model
    # After wrapping or sharding, on every rank; load() reads a checkpoint of any world size.
    slao = SLAO.load(wrapped, ckpt) if args.resume else SLAO(wrapped)
    if rank == 0 and not args.resume:
        os.makedirs(args.out, exist_ok=True)
        write_json_atomic(run_json, result_args)
    progress_path = os.path.join(args.out, "progress.json")
    progress = []
    if args.resume and os.path.isfile(progress_path):
        with open(progress_path) as f:
            progress = json.load(f)[: slao.task_index]
    log(f"{args.engine} on {world} process(es), {device.type}: {len(lora_modules(model))} adapters, "
        f"tasks {slao.task_index + 1}..{args.tasks}")

    last = args.tasks if args.stop_after is None else args.stop_after
    while slao.task_index < last:
        task = slao.begin_task()
        params = list(slao.parameters())
        optimizer = (adamw(params, lr=args.lr) if args.optimizer == "adamw"
                     else torch.optim.SGD(params, lr=args.lr))  # a new one per task
        if accelerator is not None:
            optimizer = accelerator.prepare_optimizer(optimizer)
        start, losses = time.perf_counter(), []
        wrapped.train()
        for step in tqdm(range(args.steps), desc=f"task {task}", disable=args.quiet or rank > 0, leave=False):
            ids = task_batch(task - 1, step, args, rank, world).to(device)
            loss = wrapped(input_ids=ids, labels=ids).loss
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        losses = torch.stack(losses).float()
        if world > 1:  # every rank saw its share of each batch: the batch's loss is the mean over ranks
            dist.all_reduce(losses)
            losses /= world
        slao.end_task()
        slao.save(ckpt)
        entry = {"task": task, "first_loss": float(losses[0]), "last_loss": float(losses[-1]),
                 "seconds": round(time.perf_counter() - start, 3), "world_size": world, "engine": args.engine}
        if args.engine in ("ddp", "accelerate") and world > 1:
            entry["replica_max_difference"] = replica_difference(slao)
        progress.append(entry)
        if rank == 0:
            write_json_atomic(progress_path, progress)
        log(f"task {task}: loss {entry['first_loss']:.3f} → {entry['last_loss']:.3f} in {entry['seconds']:.1f} s")

    summary = None
    if slao.task_index == args.tasks:
        save_peft_adapter(wrapped, os.path.join(args.out, "adapter"))
        summary = {"engine": args.engine, "world_size": world, "tasks": progress}
        if rank == 0:
            write_json_atomic(os.path.join(args.out, "summary.json"), summary)
    dist_utils.shutdown(wrapped)  # not dist.destroy_process_group(): DDP's reducer must go first (see shutdown)
    return summary


if __name__ == "__main__":
    main()

"""The ``slao`` command (also ``python -m slao_kernels``).

    slao run [--model M] [--data DIR] [--order a,b,c] [--strategy slao] [--out DIR] [--resume] ...
                                         continual learning over a task stream: accuracy matrix,
                                         AA/BWT/FWT/forgetting, report.json, plots, checkpoint, adapter
    slao eval RUN_DIR [--data DIR] [--order ...]
                                         evaluate a run's adapter on tasks
    slao export RUN_DIR --peft DIR       write a run's adapter in PEFT's format (PEFT, vLLM)
    slao bench [--quick] [--json FILE]   kernel throughput on this machine, as ratios to torch
    slao info                            versions, devices and which kernels are active

Exit status: 0 on success, 2 for bad input (a missing model or data path, an
unknown task or strategy, an output directory holding another run's report).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def cmd_bench(args) -> int:
    from slao_kernels import bench
    from slao_kernels.io import write_json_atomic

    device = "cuda" if args.device == "auto" and _cuda() else ("cpu" if args.device == "auto" else args.device)
    shapes = bench.default_shapes(device)
    if args.quick:
        shapes = shapes[:1]
    env = bench.environment()
    print(f"slao bench on {env.get('gpu', env['cpu'])} ({device}, {env['cpu_threads']} CPU threads; "
          f"torch {env['torch']}, triton {env['triton']}, native CPU kernels: {env['native_cpu_kernels']})")
    print("Timing eager (PEFT-style), composed (addmm_), slao and the base layer alone, interleaved; "
          "ratios < 1 mean slao is faster.\n")
    rows = bench.compare(shapes, device, modes=bench.MODES, rounds=args.rounds)
    print(bench.format_table(rows))
    print("\nSLAO's task switch (a Llama-3-8B adapter, r=16, all 7 projections: 224 matrices of 16x4096):")
    switch = bench.compare_task_switch_ops(device, rounds=5 if args.quick else 15)
    print(bench.format_task_switch_table(switch))
    if args.json:
        write_json_atomic(args.json, {"environment": env, "device": device, "results": rows,
                                      "task_switch_ops": switch})
        print(f"\nwrote {args.json}")
    return 0


def cmd_info(args) -> int:
    from slao_kernels import bench

    for k, v in bench.environment().items():
        print(f"{k:20s} {v}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()



class UsageError(Exception):
    """Bad command-line input: printed without a traceback, exit status 2."""


def _load_tasks(args, default_order: str | None = None):
    """Tasks from --data (CL_Benchmark layout) or the built-in generated suite, in --order."""
    from slao_kernels.continual import tasks as T

    order = args.order or default_order
    if args.data:
        return T.load_task_dir(args.data, order), {"source": "directory", "data": os.path.abspath(args.data)}
    return (T.generated_suite(order, train_size=args.train_size, test_size=args.test_size, seed=args.data_seed),
            {"source": "generated", "train_size": args.train_size, "test_size": args.test_size,
             "data_seed": args.data_seed})


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _load_model(spec, device: str, log):
    from slao_kernels.models import load_model

    t0 = time.perf_counter()
    log(f"loading model {spec or 'SmolLM2-135M-Instruct (embedded default)'} ...")
    model, tokenizer = load_model(spec)
    model.to(device)
    seconds = time.perf_counter() - t0
    log(f"loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters) "
        f"in {seconds:.1f} s on {device}")
    return model, tokenizer, seconds


def cmd_run(args) -> int:
    from slao_kernels.continual.report import format_report
    from slao_kernels.continual.strategies import option_value, strategy_options
    from slao_kernels.continual.runner import RunConfig, run_stream
    from slao_kernels.continual.train import TrainConfig
    from slao_kernels.patching import LoRAConfig

    out = os.path.abspath(args.out)
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out, --overwrite replaces it: pass one of them")
    if os.path.exists(os.path.join(out, "report.json")) and not (args.overwrite or args.resume):
        raise UsageError(f"{out} already holds a run's report.json; pass --resume to continue it, --overwrite to "
                         f"replace it, or choose another --out")
    if args.resume and not os.path.exists(os.path.join(out, "report.json")):
        raise UsageError(f"--resume: {out} holds no report.json to continue")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} exists and is not a directory")
    tasks, source = _load_tasks(args)  # before the model: bad task names fail in a second, not after loading
    options = {k: v for k, v in (("lam", args.lam), ("init", args.init), ("merge", args.merge)) if v is not None}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--option takes KEY=VALUE, got {item!r}")
        options[key] = option_value(value)
    if any(k in options for k in ("lam", "init", "merge")) and args.strategy != "slao":
        raise UsageError(f"--lam/--init/--merge are options of the slao strategy, not {args.strategy!r}")
    if "lam" in options and options["lam"] not in ("inv_sqrt", "inv"):
        try:
            options["lam"] = float(options["lam"])
        except ValueError:
            raise UsageError(f"--lam must be inv_sqrt, inv or a number in (0, 1], got {options['lam']!r}") from None
    try:
        config = RunConfig(
            lora=LoRAConfig(rank=args.rank, alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
                            targets=tuple(t.strip() for t in args.targets.split(",") if t.strip())),
            train=TrainConfig(steps=None if args.epochs is not None else args.steps,
                              epochs=args.epochs if args.epochs is not None else 1.0, batch_size=args.batch_size,
                              grad_accum=args.grad_accum, lr=args.lr, seed=args.seed),
            strategy=args.strategy, strategy_options=options, eval_batch_size=args.eval_batch_size,
            max_test=args.max_test, seed=args.seed)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    unknown = sorted(set(options) - set(strategy_options(args.strategy)))  # also: an unknown strategy
    if unknown:
        raise UsageError(f"strategy {args.strategy!r} has no option(s) {unknown}; its options: "
                         f"{strategy_options(args.strategy)}")
    log = print
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model, tokenizer, load_s = _load_model(args.model, _device(args.device), log)
    log(f"{args.strategy} over {len(tasks)} tasks: {' -> '.join(t.name for t in tasks)}; "
        f"rank {config.lora.rank} on {','.join(config.lora.targets)}; "
        f"{config.train.total_steps(len(tasks[0].train))} steps per task; writing to {out}")
    report = run_stream(model, tokenizer, tasks, config, out=out, progress=not args.quiet, log=log,
                        extra_report={"model": args.model or "default", "tasks_source": source,
                                      "model_load_s": load_s}, resume=args.resume)
    from slao_kernels.io import save_peft_adapter

    save_peft_adapter(model, os.path.join(out, "adapter"),
                      base_model_name_or_path=args.model or "HuggingFaceTB/SmolLM2-135M-Instruct")
    print()
    print(format_report(report))
    print(f"\nreport   {os.path.join(out, 'report.json')}")
    for path in report.get("plots", []):
        print(f"plot     {path}")
    print(f"adapter  {os.path.join(out, 'adapter')} (PEFT format)")
    print(f"total    {report['timings']['total_s'] + load_s:.0f} s")
    return 0


def _run_report(run_dir: str) -> dict:
    path = os.path.join(run_dir, "report.json")
    if not os.path.isfile(path):
        raise UsageError(f"{run_dir} is not a run directory: {path} does not exist")
    with open(path) as f:
        return json.load(f)


def _model_with_run_adapter(run_dir: str, device: str, log):
    """The run's model with the adapter of its last checkpoint loaded."""
    import torch

    from slao_kernels.io import load_checkpoint
    from slao_kernels.patching import LoRAConfig, lora_modules, patch_llama

    report = _run_report(run_dir)
    meta, tensors = load_checkpoint(os.path.join(run_dir, "checkpoint"))  # verified before the model loads
    cfg = report["config"]
    model_spec = None if cfg.get("model") in (None, "default") else cfg["model"]
    model, tokenizer, _ = _load_model(model_spec, device, log)
    lora = cfg["lora"]
    patch_llama(model, LoRAConfig(rank=lora["rank"], alpha=lora["alpha"], targets=tuple(lora["targets"]),
                                  rslora=lora["rslora"]))
    modules = lora_modules(model)
    missing = [f"{n}.{f}" for n in modules for f in ("lora_A", "lora_B") if f"{n}.{f}" not in tensors]
    if missing:
        raise UsageError(f"the checkpoint in {run_dir} does not fit the model: no {missing[:3]}")
    with torch.no_grad():
        for n, m in modules.items():
            for f in ("lora_A", "lora_B"):
                src, dst = tensors[f"{n}.{f}"], getattr(m, f)
                if src.shape != dst.shape:
                    raise UsageError(f"checkpoint tensor {n}.{f} is {tuple(src.shape)}, the model needs "
                                     f"{tuple(dst.shape)}")
                dst.copy_(src)
    return model, tokenizer, report, meta


def cmd_eval(args) -> int:
    from slao_kernels.continual.evaluate import evaluate_task
    from slao_kernels.continual.prompts import PromptEncoder

    report = _run_report(args.run)
    source = report["config"].get("tasks_source", {})
    if not args.data and source.get("source") == "directory":
        args.data = source["data"]
    if not args.data and source.get("source") == "generated":
        args.train_size, args.test_size = source["train_size"], source["test_size"]
        args.data_seed = source["data_seed"]
    tasks, _ = _load_tasks(args, default_order=",".join(report["tasks"]) if not args.data or
                           source.get("data") == os.path.abspath(args.data) else None)
    model, tokenizer, report, meta = _model_with_run_adapter(args.run, _device(args.device), print)
    encoder = PromptEncoder(tokenizer, report["config"].get("max_prompt_tokens", 256))
    results = {}
    for task in tasks:
        r = evaluate_task(model, encoder, task, args.eval_batch_size, args.max_test)
        results[task.name] = {"accuracy": r["accuracy"], "correct": r["correct"], "total": r["total"]}
        print(f"{task.name:24s} {r['accuracy']:.3f}  ({r['correct']}/{r['total']})")
    mean = sum(v["accuracy"] for v in results.values()) / len(results)
    print(f"{'mean':24s} {mean:.3f}")
    if args.json:
        from slao_kernels.io import write_json_atomic

        write_json_atomic(args.json, {"run": os.path.abspath(args.run), "tasks_trained": meta.get("task_index"),
                                      "results": results, "mean_accuracy": mean})
        print(f"wrote {args.json}")
    return 0


def cmd_export(args) -> int:
    from slao_kernels.io import save_peft_adapter

    if not args.peft:
        raise UsageError("export needs a destination: --peft DIR")
    model, _, report, _ = _model_with_run_adapter(args.run, "cpu", print)
    base = report["config"].get("model")
    files = save_peft_adapter(model, args.peft, base_model_name_or_path=None if base in (None, "default")
                              else base)
    for f in files:
        print(f"wrote {f}")
    return 0


def _add_task_args(p) -> None:
    p.add_argument("--data", default=None, help="task directory in the CL_Benchmark layout "
                   "(<task>/train.json, test.json, labels.json); default: the built-in generated suite")
    p.add_argument("--order", default=None, help="task order: comma-separated names or a named order "
                   "(order1..order4); default: every task")
    p.add_argument("--train-size", type=int, default=256, help="generated suite: training rows per task")
    p.add_argument("--test-size", type=int, default=100, help="generated suite: test rows per task")
    p.add_argument("--data-seed", type=int, default=0, help="generated suite: seed of the rows")
    p.add_argument("--max-test", type=int, default=None, help="evaluate on at most this many test rows per task")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slao", description="slao_kernels: continual learning with one LoRA (SLAO)")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="continual learning over a task stream (the main job)")
    r.add_argument("--model", default=None, help="a Hugging Face model directory or a .gguf file; "
                   "default: the embedded SmolLM2-135M-Instruct")
    _add_task_args(r)
    r.add_argument("--strategy", default="slao", help="slao (default), seqlora, inclora, olora, multitask, "
                   "lora_ga or slice")
    r.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a strategy option, repeatable (olora: weight=0.5; slice: c=1 scope=global "
                   "buffer_per_task=32; lora_ga/slice: grad_batches=4 max_gradient_bytes=...)")
    r.add_argument("--lam", default=None, help="slao: merge schedule inv_sqrt (default), inv or a constant")
    r.add_argument("--init", default=None, help="slao: orthogonal (default), last_ft, last_merge or random")
    r.add_argument("--merge", default=None, help="slao: B (default), A, AB or none")
    r.add_argument("--rank", type=int, default=8)
    r.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    r.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated projection names to adapt")
    r.add_argument("--steps", type=int, default=40, help="optimizer steps per task")
    r.add_argument("--epochs", type=float, default=None, help="epochs per task instead of --steps")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--grad-accum", type=int, default=1)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", default="slao-run", help="output directory (report, plots, checkpoint, adapter)")
    r.add_argument("--overwrite", action="store_true", help="replace the report of an earlier run in --out")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (same command "
                   "otherwise) from its last finished task")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_run)
    e = sub.add_parser("eval", help="evaluate a run's adapter on tasks")
    e.add_argument("run", help="a directory written by slao run")
    _add_task_args(e)
    e.add_argument("--json", default=None, help="also write the accuracies to this file")
    e.set_defaults(func=cmd_eval)
    x = sub.add_parser("export", help="write a run's adapter in PEFT's format")
    x.add_argument("run", help="a directory written by slao run")
    x.add_argument("--peft", default=None, help="destination directory (adapter_config.json, "
                   "adapter_model.safetensors)")
    x.set_defaults(func=cmd_export)
    b = sub.add_parser("bench", help="time the lora_linear kernels against torch on this machine")
    b.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    b.add_argument("--quick", action="store_true", help="only the first shape")
    b.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds per case")
    b.add_argument("--json", default=None, help="also write the results (with device and versions) to this file")
    b.set_defaults(func=cmd_bench)
    i = sub.add_parser("info", help="versions, devices, active kernels")
    i.set_defaults(func=cmd_info)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "device", None) == "cuda" and not _cuda():
        print("slao: --device cuda requested but no CUDA device is available", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (UsageError, FileNotFoundError, ValueError) as e:
        print(f"slao {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

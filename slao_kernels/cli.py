"""The ``slao`` command (also ``python -m slao_kernels``).

    slao run [--model M] [--data DIR] [--order a,b,c] [--strategy slao] [--out DIR] [--resume] ...
                                         continual learning over a task stream: accuracy matrix,
                                         AA/BWT/FWT/forgetting, report.json, plots, checkpoint, adapter
    slao eval RUN_DIR [--data DIR] [--order ...]
                                         evaluate a run's adapter on tasks
    slao export RUN_DIR --peft DIR       write a run's adapter in PEFT's format (PEFT, vLLM)
    slao bench [--quick] [--json FILE]   kernel throughput on this machine, as ratios to torch
    slao selftest [--json F] [--markdown F]
                                         every kernel against its reference, then the speed table and
                                         targets (the one command a session with a GPU runs)
    slao info                            versions, devices and which kernels are active

Exit status: 0 on success; 2 for bad input (a flag out of range, a missing model
or data path, an unknown task or strategy, an adapter that does not fit the
model, an output directory holding another run's report), with one line naming
what was wrong; 1 when a task of the run failed (a non-finite loss or adapter:
the run directory keeps the last good checkpoint, ``--resume`` retries the task);
130 after Ctrl-C. Every flag of ``slao run`` is checked, against the model's config
too, before the model's weights are loaded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import typing

from slao_kernels.continual.strategies import STRATEGIES

# --------------------------------------------------------------------------- argument types
# argparse turns an ArgumentTypeError into "argument --flag: <message>", exit status 2.


def _int_at_least(low: int):
    """An argparse ``type``: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _strategy_option(strategy: str, key: str):
    """An argparse ``type`` for a strategy option that has a flag of its own (``--lam``): the text
    read by the declared type of the option's config field, and range-checked."""
    config = STRATEGIES[strategy].config

    def parse(text: str):
        try:
            return config.parse_option(key, text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {config.accepts(key)}, got {text!r}") from None

    parse.__name__ = f"{strategy} option {key}"
    return parse


def _strategy_choices(strategy: str, key: str) -> tuple:
    """The values of a strategy option declared as a ``Literal`` (argparse ``choices``)."""
    return typing.get_args(STRATEGIES[strategy].config.option_types()[key])


def _strategy_options(args) -> dict:
    """The options of ``--strategy``: slao's --lam/--init/--merge (typed by argparse) and every
    --option KEY=VALUE, its value read by the declared type of the option's config field.

    Raises:
        UsageError: naming the option, what it accepts and what was given.
    """
    config = STRATEGIES[args.strategy].config
    names = config.option_names()
    options = {k: v for k, v in (("lam", args.lam), ("init", args.init), ("merge", args.merge)) if v is not None}
    if options and args.strategy != "slao":
        raise UsageError(f"--lam/--init/--merge are options of the slao strategy, not of --strategy "
                         f"{args.strategy}; its options (--option KEY=VALUE): {names}")
    pairs = []
    for item in args.option:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--option takes KEY=VALUE, got {item!r}")
        pairs.append((key, text))
    unknown = sorted({key for key, _ in pairs} - set(names))
    if unknown:
        raise UsageError(f"--option: strategy {args.strategy!r} has no option(s) {unknown}; its options: {names}")
    for key, text in pairs:
        try:
            options[key] = config.parse_option(key, text)
        except ValueError as e:
            raise UsageError(f"--strategy {args.strategy} with {key}={text}: {e}") from None
    return options


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): ``slao run: error: argument --rank: ...``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _check_output_file(flag: str, path: str | None) -> None:
    """A file the command writes at its end: refused now if it cannot be written there."""
    if path is None:
        return
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: expected a file path in an existing directory, got "
                         + ("a directory" if os.path.isdir(path) else f"a path under {parent}, which does not exist"))


def cmd_bench(args) -> int:
    """``slao bench``: lora_linear and the task-switch ops timed against torch on this machine."""
    from slao_kernels import benchmarking as bench
    from slao_kernels._files import write_json_atomic

    _check_output_file("--json", args.json)
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


def cmd_selftest(args) -> int:
    """``slao selftest``: correctness of every kernel and candidate, then speed (exit 1 on a failure)."""
    from slao_kernels.benchmarking.selftest import run

    _check_output_file("--json", args.json)
    _check_output_file("--markdown", args.markdown)
    data = run(args.json, args.markdown, quick=args.quick)
    for path in (args.json, args.markdown):
        if path:
            print(f"wrote {path}")
    return 0 if data["passed"] else 1


def cmd_info(args) -> int:
    """``slao info``: versions, devices and which kernels are active."""
    from slao_kernels.benchmarking.environment import environment

    for k, v in environment().items():
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
    T.resolve_order(order, list(T.GENERATED_RULES))  # an unknown task is named as such, not as a size
    try:
        tasks = T.generated_suite(order, train_size=args.train_size, test_size=args.test_size, seed=args.data_seed)
    except ValueError as e:
        raise UsageError(f"--train-size {args.train_size} / --test-size {args.test_size}: {e}") from None
    return tasks, {"source": "generated", "train_size": args.train_size, "test_size": args.test_size,
                   "data_seed": args.data_seed}


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _load_model(spec, device: str, log):
    from slao_kernels.continual.models import load_model

    t0 = time.perf_counter()
    log(f"loading model {spec or 'SmolLM2-135M-Instruct (embedded default)'} ...")
    model, tokenizer = load_model(spec)
    model.to(device)
    seconds = time.perf_counter() - t0
    log(f"loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters) "
        f"in {seconds:.1f} s on {device}")
    return model, tokenizer, seconds


def _check_adapter_fits(spec, lora, strategy: str | None = None, options: dict | None = None) -> None:
    """Check ``--targets``/``--rank`` (and the strategy with its options) against the
    model's config, before any weight is loaded: the adapter is added to a skeleton of
    the model on the meta device, and the strategy is built on it.

    Raises:
        UsageError: naming the flag, the accepted values and what was given.
    """
    from torch import nn

    from slao_kernels.continual.models import model_skeleton
    from slao_kernels.continual.strategies import make_strategy
    from slao_kernels.nn import LoRALinear
    from slao_kernels.patching import patch_llama

    skeleton = model_skeleton(spec)
    linears = {n: m for n, m in skeleton.named_modules() if isinstance(m, (nn.Linear, LoRALinear))}
    leaves = sorted({n.rpartition(".")[2] for n in linears})
    kind = type(skeleton).__name__
    missing = [t for t in lora.targets if t not in leaves]
    if missing:
        raise UsageError(f"--targets: {missing} match no linear layer of this {kind}; accepted: a "
                         f"comma-separated subset of {','.join(leaves)}, got {','.join(lora.targets)}")
    targeted = {n: m for n, m in linears.items() if n.rpartition(".")[2] in lora.targets}
    name, narrowest = min(targeted.items(), key=lambda item: min(item[1].in_features, item[1].out_features))
    limit = min(narrowest.in_features, narrowest.out_features)
    if lora.rank > limit:
        raise UsageError(f"--rank must be in [1, {limit}] for --targets {','.join(lora.targets)} of this {kind} "
                         f"({name} is {narrowest.in_features} -> {narrowest.out_features}), got {lora.rank}")
    try:  # whatever else the adapter or the strategy refuse, refused here, not after the weights loaded
        patch_llama(skeleton, lora)
    except (TypeError, ValueError) as e:
        raise UsageError(f"the adapter does not fit the model: {e}") from None
    if strategy is None:
        return
    try:
        make_strategy(strategy, skeleton, **(options or {}))
    except (TypeError, ValueError) as e:
        given = " ".join(f"{k}={v}" for k, v in (options or {}).items())
        raise UsageError(f"--strategy {strategy}" + (f" with {given}" if given else "") + f": {e}") from None


def _check_resumable(out: str, names: list[str], config: dict) -> None:
    """--resume: the run in ``out`` is over the same tasks with the same settings, checked
    before the model loads (the runner checks the same against the checkpoint; this is
    the early, flag-naming version of its check, on the entries known before training)."""
    from slao_kernels.continual.runner import RUN_SPECIFIC

    report = _run_report(out, need=("tasks", "config"))
    if report["tasks"] != names:
        raise UsageError(f"--resume: the run in {out} is over the tasks {report['tasks']}, not {names} "
                         f"(--order, --data)")
    ours = json.loads(json.dumps(config))  # as it reads back from report.json (tuples become lists)
    differ = sorted(k for k in ours if k not in RUN_SPECIFIC and report["config"].get(k) != ours[k])
    if differ:
        raise UsageError(f"--resume: the run in {out} has other settings ({', '.join(differ)}): pass the flags "
                         f"it was started with, or --overwrite to replace it")


def cmd_run(args) -> int:
    """``slao run``: every check first (flags, tasks, the adapter against the model's config),
    then the model loads and the stream runs."""
    from slao_kernels.continual.report import format_report
    from slao_kernels.continual.runner import RunConfig, run_stream
    from slao_kernels.continual.train import TrainConfig
    from slao_kernels.patching import LoRAConfig

    out = os.path.abspath(args.out)
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out, --overwrite replaces it: pass one of them")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} exists and is not a directory")
    if os.path.exists(os.path.join(out, "report.json")) and not (args.overwrite or args.resume):
        raise UsageError(f"{out} already holds a run's report.json; pass --resume to continue it, --overwrite to "
                         f"replace it, or choose another --out")
    if args.resume and not os.path.exists(os.path.join(out, "report.json")):
        raise UsageError(f"--resume: {out} holds no report.json to continue")
    tasks, source = _load_tasks(args)  # before the model: bad task names fail in a second, not after loading
    options = _strategy_options(args)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    if not targets:
        raise UsageError(f"--targets must name at least one projection, got {args.targets!r}")
    try:
        config = RunConfig(
            lora=LoRAConfig(rank=args.rank, alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
                            targets=targets),
            train=TrainConfig(steps=None if args.epochs is not None else args.steps,
                              epochs=args.epochs if args.epochs is not None else 1.0, batch_size=args.batch_size,
                              grad_accum=args.grad_accum, lr=args.lr, seed=args.seed),
            strategy=args.strategy, strategy_options=options, eval_batch_size=args.eval_batch_size,
            max_test=args.max_test, seed=args.seed)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    _check_adapter_fits(args.model, config.lora, args.strategy, options)
    extra = {"model": args.model or "default", "tasks_source": source}
    if args.resume:
        _check_resumable(out, [t.name for t in tasks], {**config.to_dict(), **extra})
    log = print
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model, tokenizer, load_s = _load_model(args.model, _device(args.device), log)
    log(f"{args.strategy} over {len(tasks)} tasks: {' -> '.join(t.name for t in tasks)}; "
        f"rank {config.lora.rank} on {','.join(config.lora.targets)}; "
        f"{config.train.total_steps(len(tasks[0].train))} steps per task; writing to {out}")
    args.stage = "running"
    report = run_stream(model, tokenizer, tasks, config, out=out, progress=not args.quiet, log=log,
                        extra_report={**extra, "model_load_s": load_s}, resume=args.resume,
                        base_model_name_or_path=args.model or "HuggingFaceTB/SmolLM2-135M-Instruct")
    args.stage = "done"
    print()
    print(format_report(report))
    print(f"\nreport   {os.path.join(out, 'report.json')}")
    for path in report.get("plots", []):
        print(f"plot     {path}")
    if report.get("adapter"):
        print(f"adapter  {report['adapter']} (PEFT format)")
    print(f"total    {report['timings']['total_s'] + load_s:.0f} s")
    return 0


# what eval and export read from a run's report.json: key path -> (accepted types, what it is)
_REPORT_FIELDS = {
    ("tasks",): (list, "the list of task names"),
    ("config",): (dict, "the run's settings"),
    ("config", "strategy"): (str, "the strategy name"),
    ("config", "model"): (str, "the model spec"),
    ("config", "lora"): (dict, "the adapter settings"),
    ("config", "lora", "rank"): (int, "the adapter rank"),
    ("config", "lora", "alpha"): ((int, float), "LoRA alpha"),
    ("config", "lora", "targets"): (list, "the adapted projections"),
    ("config", "lora", "rslora"): (bool, "rsLoRA on or off"),
}


def _run_report(run_dir: str, need=None) -> dict:
    """The run's report.json, with every field eval/export read checked (or those under
    the top-level keys ``need``); a report that lacks one is named, not a KeyError."""
    path = os.path.join(run_dir, "report.json")
    if not os.path.isfile(path):
        raise UsageError(f"{run_dir} is not a run directory: {path} does not exist")
    try:
        with open(path) as f:
            report = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(report, dict):
        raise UsageError(f"{path} is not a report written by slao run: expected a JSON object, got "
                         f"{type(report).__name__}")
    for keys, (kinds, what) in _REPORT_FIELDS.items():
        if need is not None and keys[0] not in need:
            continue
        value = report
        for k in keys:
            value = value.get(k) if isinstance(value, dict) else None
        if not isinstance(value, kinds) or (kinds is int and isinstance(value, bool)):
            raise UsageError(f"{path} is not a report written by slao run: {'.'.join(keys)} ({what}) "
                             f"is missing or not a {getattr(kinds, '__name__', 'number')}"
                             + ("" if value is None else f", got {value!r}"))
    return report


# strategies whose trained model is the base plus the one adapter held in lora_A/lora_B
_ONE_ADAPTER = tuple(name for name, entry in STRATEGIES.items() if entry.strategy.single_adapter)


def _run_checkpoint(run_dir: str, report: dict, action: str):
    """``(meta, tensors)`` of the run's checkpoint, verified, before any model is loaded."""
    from slao_kernels.continual.checkpoint import load_checkpoint

    strategy = report["config"]["strategy"]
    if strategy not in _ONE_ADAPTER:
        raise UsageError(f"{action} supports runs of --strategy {', '.join(_ONE_ADAPTER)}; the {strategy} run in "
                         f"{run_dir} holds frozen adapters or merged base weights besides the adapter")
    directory = os.path.join(run_dir, "checkpoint")
    if not os.path.isfile(os.path.join(directory, "slao.json")):
        raise UsageError(f"{run_dir} holds no checkpoint (the run finished no task): nothing to {action}")
    return load_checkpoint(directory)


def _model_with_run_adapter(run_dir: str, report: dict, checkpoint, device: str, log):
    """The run's model with the adapter of its last checkpoint loaded by the run's strategy
    (report and checkpoint already checked; the adapter is checked against the model's config
    first, the checkpoint against the model by the strategy, before anything is restored)."""
    from slao_kernels.continual.strategies import make_strategy
    from slao_kernels.patching import LoRAConfig, patch_llama

    meta, _ = checkpoint
    cfg = report["config"]
    model_spec = None if cfg["model"] == "default" else cfg["model"]
    lora = cfg["lora"]
    try:
        lora = LoRAConfig(rank=lora["rank"], alpha=lora["alpha"], targets=tuple(lora["targets"]),
                          rslora=lora["rslora"])
    except (TypeError, ValueError) as e:
        raise UsageError(f"{run_dir}/report.json: config.lora is not a valid adapter ({e})") from None
    options = cfg.get("strategy_options", {})
    if not isinstance(options, dict):
        raise UsageError(f"{run_dir}/report.json: config.strategy_options must be an object, got {options!r}")
    _check_adapter_fits(model_spec, lora)
    model, tokenizer, _ = _load_model(model_spec, device, log)
    patch_llama(model, lora)
    try:
        strategy = make_strategy(cfg["strategy"], model, **options)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{run_dir}/report.json: config.strategy_options do not fit {cfg['strategy']} "
                         f"({e})") from None
    try:
        strategy.load(os.path.join(run_dir, "checkpoint"))
    except ValueError as e:
        raise UsageError(f"the checkpoint in {run_dir} does not fit the model: {e}") from None
    return model, tokenizer, meta


def cmd_eval(args) -> int:
    """``slao eval``: the run's adapter on its tasks (or on --data/--order)."""
    from slao_kernels.continual.evaluate import evaluate_task
    from slao_kernels.continual.prompts import PromptEncoder

    _check_output_file("--json", args.json)
    report = _run_report(args.run)
    source = report["config"].get("tasks_source", {})
    if not isinstance(source, dict):
        source = {}
    if not args.data and source.get("source") == "directory":
        if not isinstance(source.get("data"), str):
            raise UsageError(f"{args.run}/report.json: config.tasks_source.data is missing; pass --data")
        args.data = source["data"]
    if not args.data and source.get("source") == "generated":
        try:
            sizes = {k: int(source[k]) for k in ("train_size", "test_size", "data_seed")}
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"{args.run}/report.json: config.tasks_source lacks the generated suite's "
                             f"train_size, test_size, data_seed") from None
        args.train_size, args.test_size, args.data_seed = sizes["train_size"], sizes["test_size"], sizes["data_seed"]
    same_tasks = not args.data or source.get("data") == os.path.abspath(args.data)
    tasks, _ = _load_tasks(args, default_order=",".join(report["tasks"]) if same_tasks else None)
    checkpoint = _run_checkpoint(args.run, report, "eval")
    model, tokenizer, meta = _model_with_run_adapter(args.run, report, checkpoint, _device(args.device), print)
    encoder = PromptEncoder(tokenizer, report["config"].get("max_prompt_tokens", 256))
    results = {}
    for task in tasks:
        r = evaluate_task(model, encoder, task, args.eval_batch_size, args.max_test)
        results[task.name] = {"accuracy": r["accuracy"], "correct": r["correct"], "total": r["total"]}
        print(f"{task.name:24s} {r['accuracy']:.3f}  ({r['correct']}/{r['total']})")
    mean = sum(v["accuracy"] for v in results.values()) / len(results)
    print(f"{'mean':24s} {mean:.3f}")
    if args.json:
        from slao_kernels._files import write_json_atomic

        write_json_atomic(args.json, {"run": os.path.abspath(args.run), "tasks_trained": meta.get("task_index"),
                                      "results": results, "mean_accuracy": mean})
        print(f"wrote {args.json}")
    return 0


def cmd_export(args) -> int:
    """``slao export``: the run's adapter in PEFT's format."""
    from slao_kernels.peft_format import save_peft_adapter

    if not args.peft:
        raise UsageError("export needs a destination: --peft DIR")
    if os.path.exists(args.peft) and not os.path.isdir(args.peft):
        raise UsageError(f"--peft {args.peft} exists and is not a directory: pass a directory (it is created, or "
                         f"its adapter files replaced)")
    report = _run_report(args.run)
    checkpoint = _run_checkpoint(args.run, report, "export")
    model, _, _ = _model_with_run_adapter(args.run, report, checkpoint, "cpu", print)
    base = report["config"]["model"]
    files = save_peft_adapter(model, args.peft, base_model_name_or_path=None if base == "default" else base)
    for f in files:
        print(f"wrote {f}")
    return 0


_POSITIVE = _int_at_least(1)
_NON_NEGATIVE = _int_at_least(0)


def _add_task_args(p) -> None:
    p.add_argument("--data", default=None, help="task directory in the CL_Benchmark layout "
                   "(<task>/train.json, test.json, labels.json); default: the built-in generated suite")
    p.add_argument("--order", default=None, help="task order: comma-separated names or a named order "
                   "(order1..order4); default: every task")
    p.add_argument("--train-size", type=_POSITIVE, default=256, help="generated suite: training rows per task")
    p.add_argument("--test-size", type=_int_at_least(2), default=100, help="generated suite: test rows per task")
    p.add_argument("--data-seed", type=_NON_NEGATIVE, default=0, help="generated suite: seed of the rows")
    p.add_argument("--max-test", type=_POSITIVE, default=None,
                   help="evaluate on at most this many test rows per task")
    p.add_argument("--eval-batch-size", type=_POSITIVE, default=16)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def build_parser() -> argparse.ArgumentParser:
    """The ``slao`` argument parser: every flag typed and range-checked (bad values exit 2)."""
    parser = _Parser(prog="slao", description="slao_kernels: continual learning with one LoRA (SLAO)")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="continual learning over a task stream (the main job)")
    r.add_argument("--model", default=None, help="a Hugging Face model directory or a .gguf file; "
                   "default: the embedded SmolLM2-135M-Instruct")
    _add_task_args(r)
    r.add_argument("--strategy", default="slao", choices=tuple(STRATEGIES),
                   help="slao (default), seqlora, inclora, olora, multitask, lora_ga or slice")
    r.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a strategy option, repeatable (olora: weight=0.5; slice: c=1 scope=global "
                   "buffer_per_task=32; lora_ga/slice: grad_batches=4 max_gradient_bytes=...)")
    r.add_argument("--lam", default=None, type=_strategy_option("slao", "lam"),
                   help="slao: merge schedule inv_sqrt (default), inv or a constant in (0, 1]")
    r.add_argument("--init", default=None, choices=_strategy_choices("slao", "init"),
                   help="slao: orthogonal (default), last_ft, last_merge or random")
    r.add_argument("--merge", default=None, choices=_strategy_choices("slao", "merge"),
                   help="slao: B (default), A, AB or none")
    r.add_argument("--rank", type=_POSITIVE, default=8, help="adapter rank (at most min(in, out) of every target)")
    r.add_argument("--alpha", type=_positive_float, default=None, help="LoRA alpha (default 2 x rank)")
    r.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated projection names to adapt")
    r.add_argument("--steps", type=_POSITIVE, default=40, help="optimizer steps per task")
    r.add_argument("--epochs", type=_positive_float, default=None, help="epochs per task instead of --steps")
    r.add_argument("--batch-size", type=_POSITIVE, default=8)
    r.add_argument("--grad-accum", type=_POSITIVE, default=1)
    r.add_argument("--lr", type=_positive_float, default=1e-3)
    r.add_argument("--seed", type=_NON_NEGATIVE, default=0)
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
    b.add_argument("--rounds", type=_POSITIVE, default=30, help="interleaved timing rounds per case")
    b.add_argument("--json", default=None, help="also write the results (with device and versions) to this file")
    b.set_defaults(func=cmd_bench)
    t = sub.add_parser("selftest", help="every kernel against its reference, then speed: what a GPU session runs")
    t.add_argument("--json", default=None, help="the report as JSON (rewritten after every check)")
    t.add_argument("--markdown", default=None, help="the report as a markdown table")
    t.add_argument("--quick", action="store_true", help="time only the first shape, with fewer rounds")
    t.set_defaults(func=cmd_selftest)
    i = sub.add_parser("info", help="versions, devices, active kernels")
    i.set_defaults(func=cmd_info)
    return parser


def _interrupted(args) -> str:
    """The one line printed after a plain Ctrl-C (not a :class:`RunInterrupted` of the runner)."""
    if args.command != "run":
        return f"slao {args.command}: interrupted"
    stage = getattr(args, "stage", "checking")
    if stage == "checking":
        return "interrupted before training started; nothing was written"
    if stage == "running" and not os.path.isfile(os.path.join(os.path.abspath(args.out), "report.json")):
        return "interrupted before the run wrote its first report; start it again"
    if stage == "adapter":
        return "interrupted while writing the adapter; continue with --resume"
    return "interrupted; continue with --resume"


def main(argv=None) -> int:
    """Run the ``slao`` command; returns the exit status (0, 1 a failed task, 2 bad input, 130 Ctrl-C)."""
    from slao_kernels.continual.runner import RunInterrupted, TaskFailed

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return e.code if isinstance(e.code, int) else 2
    if getattr(args, "device", None) == "cuda" and not _cuda():
        print(f"slao {args.command}: error: --device cuda requested but no CUDA device is available; "
              f"accepted here: auto, cpu", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except TaskFailed as e:
        print(f"slao run: {_one_line(e)}; fix the cause and continue with --resume", file=sys.stderr)
        return 1
    except RunInterrupted as e:
        where = "during the zero-shot evaluation" if e.task == 0 else f"during task {e.task} of {e.total}"
        print(f"interrupted {where}; continue with --resume", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(_interrupted(args), file=sys.stderr)
        return 130
    except (UsageError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
            ValueError) as e:
        print(f"slao {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

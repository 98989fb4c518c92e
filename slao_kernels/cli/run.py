"""``slao run``: every flag checked (against the model's config too) before the weights load, then
the runner."""

from __future__ import annotations

import json
import os
import time

from slao_kernels.cli._args import UsageError, _strategy_options


def _load_tasks(args, default_order: str | None = None, default_test_size: int = 100):
    """Tasks from --data (CL_Benchmark layout), else built-in ones in --order: the embedded
    real-text tasks (:data:`~slao_kernels.continual.tasks.TEXT_TASKS`) or generated ones (any of
    :data:`~slao_kernels.continual.tasks.ALL_GENERATED_RULES`); without an order, the generated
    suite (:data:`~slao_kernels.continual.tasks.GENERATED_RULES`). --train-size, --test-size and
    --data-seed make the generated tasks' rows; tasks read from files have their own, and those
    flags are refused with them rather than ignored."""
    from slao_kernels.continual import tasks as T

    order = args.order or default_order
    sizes = {"--train-size": args.train_size, "--test-size": args.test_size, "--data-seed": args.data_seed}
    given = [flag for flag, value in sizes.items() if value is not None]

    def no_sizes(what: str) -> None:
        if given:
            raise UsageError(f"{', '.join(given)}: only the generated tasks are drawn to a size; {what} has its own "
                             f"rows (--max-test evaluates on fewer)")

    if args.data:
        no_sizes(f"--data {args.data}")
        return T.load_task_dir(args.data, order), {"source": "directory", "data": os.path.abspath(args.data)}
    names = T.resolve_order(order or list(T.GENERATED_RULES), [*T.ALL_GENERATED_RULES, *T.TEXT_TASKS])
    text = [n for n in names if n in T.TEXT_TASKS]
    if text and len(text) < len(names):
        raise UsageError(f"--order {','.join(names)}: mixes embedded text tasks ({','.join(text)}) with generated "
                         f"ones; choose one kind")
    if text:
        no_sizes(f"the embedded text stream ({','.join(text)})")
        return T.text_stream(names), {"source": "embedded_text"}
    train_size = 256 if args.train_size is None else args.train_size
    test_size = default_test_size if args.test_size is None else args.test_size
    data_seed = 0 if args.data_seed is None else args.data_seed
    try:
        tasks = T.generated_suite(names, train_size=train_size, test_size=test_size, seed=data_seed,
                                  rules=T.ALL_GENERATED_RULES)
    except ValueError as e:
        raise UsageError(f"--train-size {train_size} / --test-size {test_size}: {e}") from None
    return tasks, {"source": "generated", "train_size": train_size, "test_size": test_size, "data_seed": data_seed}


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _load_model(spec, device: str, log, quantize: str | None = None, targets=None):
    from slao_kernels.continual.models import load_quantized_model

    t0 = time.perf_counter()
    log(f"loading model {spec or 'SmolLM2-135M-Instruct (embedded default)'}"
        f"{f' (base quantized: {quantize})' if quantize else ''} ...")
    model, tokenizer = load_quantized_model(spec, quantize, targets=targets)
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
            max_test=args.max_test, max_prompt_tokens=args.max_prompt_tokens, seed=args.seed)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    _check_adapter_fits(args.model, config.lora, args.strategy, options)
    quantize = getattr(args, "quantize", None)
    if quantize is not None:
        from slao_kernels.continual.models import check_quantize
        from slao_kernels.continual.strategies import STRATEGIES

        if STRATEGIES[args.strategy].strategy.writes_base:
            keep = ", ".join(n for n, e in STRATEGIES.items() if not e.strategy.writes_base)
            raise UsageError(f"--quantize {quantize}: --strategy {args.strategy} rewrites the base weights, which a "
                             f"quantized base cannot store; choose {keep}")
        try:
            check_quantize(quantize)
        except (ValueError, ImportError) as e:
            raise UsageError(f"--quantize: {e}") from None
    extra = {"model": args.model or "default", "tasks_source": source}
    if quantize is not None:  # only then: the reports of unquantized runs keep their keys
        extra["quantize"] = quantize
    if args.resume:
        _check_resumable(out, [t.name for t in tasks], {**config.to_dict(), **extra})
    log = print
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model, tokenizer, load_s = _load_model(args.model, _device(args.device), log, quantize, config.lora.targets)
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

"""``slao demo``: SLAO beside SeqLoRA on the same model, stream, budget and seeds, through the
comparison machinery (:mod:`slao_kernels.continual.compare`), ending with one table, the gain in
AA points and one figure.

Output directory::

    comparison.json     strategies.<spec>: aa, bwt, fwt, forgetting (means over the seeds, with _std),
                        accuracy_matrix, zero_shot, adapter_bytes, seconds, run_dirs, every seed's run;
                        gain_aa_points; the settings, the model load and the total time
    comparison.md       the side-by-side table and the gain
    comparison.png      the accuracy matrices next to each other, and the accuracy over the stream
    runs/<spec>/seed<k> each strategy's own run (report, plots, checkpoint, adapter), as slao run writes it
    results.json, results.md, quality.png, memory.png
                        the comparison benchmark's summary of the same runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

from slao_kernels.cli._args import UsageError

DEMO_STRATEGIES = "slao,seqlora"
# the demo's stream without --data/--order: the embedded real-text tasks (tasks.TEXT_ORDER)
DEMO_ORDER = "dbpedia,boolq,mnli"
# generated tasks (--order large,...): test rows per task (slao run: 100)
DEMO_TEST_SIZE = 50
# where the demo's defaults differ from slao run's, so that two strategies fit the quick start's 8 minutes:
# the adapter of SLAO's experiments (q_proj, v_proj), 20 steps per task, prompts cut to 96 tokens and 40
# test rows per task
DEMO_DEFAULTS = {"targets": "q_proj,v_proj", "steps": 20, "max_prompt_tokens": 96, "max_test": 40}
# the files and directories of a demo in --out: what --overwrite replaces
_OUTPUTS = ("comparison.json", "comparison.md", "comparison.png", "results.json", "results.md", "quality.png",
            "memory.png", "runs")
# report["config"] entries a finished run must share with this command to be reused by --resume
_SHARED_SETTINGS = ("lora", "train", "max_test", "eval_batch_size", "max_prompt_tokens", "model", "tasks_source")


def seed_list(text: str) -> list[int]:
    """An argparse ``type``: comma-separated distinct seeds, each an integer >= 0."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated integers >= 0, got {text!r}")
    return seeds


def _specs(text: str) -> list[str]:
    """``--strategies``: comma-separated strategy specs, options after a colon joined by ``+``
    (``slao,seqlora,slice:c=0.5+scope=module``), each checked by the strategy's config."""
    from slao_kernels.continual.compare import parse_spec

    specs = [s.strip().replace("+", ",") for s in text.split(",") if s.strip()]
    if len(specs) < 2 or len(set(specs)) != len(specs):
        raise UsageError(f"--strategies needs at least two distinct strategies to compare, got {text!r}")
    for spec in specs:
        try:
            parse_spec(spec)
        except (KeyError, ValueError) as e:
            raise UsageError(f"--strategies {spec}: {str(e).strip(chr(39))}") from None
    return specs


def _run_config(args):
    """The settings every strategy of the demo shares (the strategy and the seed are the comparison's)."""
    from slao_kernels.continual.runner import RunConfig
    from slao_kernels.continual.train import TrainConfig
    from slao_kernels.patching import LoRAConfig

    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    if not targets:
        raise UsageError(f"--targets must name at least one projection, got {args.targets!r}")
    try:
        return RunConfig(
            lora=LoRAConfig(rank=args.rank, alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
                            targets=targets),
            train=TrainConfig(steps=None if args.epochs is not None else args.steps,
                              epochs=args.epochs if args.epochs is not None else 1.0, batch_size=args.batch_size,
                              grad_accum=args.grad_accum, lr=args.lr),
            eval_batch_size=args.eval_batch_size, max_test=args.max_test, max_prompt_tokens=args.max_prompt_tokens)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None


def _check_out(out: str, args) -> None:
    """--out: a new directory, or with --overwrite / --resume one that holds an earlier demo."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} exists and is not a directory")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the demo in --out, --overwrite replaces it: pass one of them")
    earlier = [name for name in _OUTPUTS if os.path.exists(os.path.join(out, name))]
    if earlier and not (args.overwrite or args.resume):
        raise UsageError(f"{out} already holds a demo ({', '.join(earlier)}); pass --resume to continue it, "
                         f"--overwrite to replace it, or choose another --out")
    if args.resume and not os.path.isdir(os.path.join(out, "runs")):
        raise UsageError(f"--resume: {out} holds no runs/ to continue")


def _check_finished_runs(out: str, specs: list[str], names: list[str], expected: dict) -> None:
    """--resume: every finished run under ``out`` is over the same tasks with the same settings
    (the comparison reuses finished runs as they are; an unfinished one is checked by the runner)."""
    from slao_kernels.continual.compare import run_directory

    for spec in specs:
        runs_dir = os.path.dirname(run_directory(out, spec, 0))
        for seed_dir in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
            path = os.path.join(runs_dir, seed_dir, "report.json")
            if not os.path.isfile(path):
                continue
            with open(path) as f:
                report = json.load(f)
            theirs = {**report.get("config", {})}
            theirs["train"] = {k: v for k, v in (theirs.get("train") or {}).items() if k != "seed"}
            differ = [k for k in _SHARED_SETTINGS if theirs.get(k) != expected.get(k)]
            if report.get("tasks") != names:
                differ.insert(0, "tasks")
            if differ:
                raise UsageError(f"--resume: {path} was run with other settings ({', '.join(differ)}): pass the "
                                 f"flags the demo was started with, or --overwrite to replace it")


def cmd_demo(args) -> int:
    """``slao demo``: every check first (flags, tasks, each strategy against the model's config),
    then the model loads once and every strategy runs with every seed from a fresh copy of it."""
    from slao_kernels._files import write_atomic, write_json_atomic
    from slao_kernels.cli.run import _check_adapter_fits, _device, _load_model, _load_tasks
    from slao_kernels.continual.compare import (
        collect_runs,
        format_side_by_side,
        parse_spec,
        run_comparison,
        side_by_side,
    )
    from slao_kernels.continual.report import plot_comparison

    started = time.perf_counter()
    out = os.path.abspath(args.out)
    _check_out(out, args)
    specs = _specs(args.strategies)
    tasks, source = _load_tasks(args, None if args.data else DEMO_ORDER, DEMO_TEST_SIZE)  # --data: all its tasks
    config = _run_config(args)
    for spec in specs:
        name, options = parse_spec(spec)
        _check_adapter_fits(args.model, config.lora, name, options)
    extra = {"model": args.model or "default", "tasks_source": source}
    names = [t.name for t in tasks]
    if args.resume:
        expected = {**json.loads(json.dumps(config.to_dict())), **extra}  # as report.json reads back
        expected["train"] = {k: v for k, v in expected["train"].items() if k != "seed"}
        _check_finished_runs(out, specs, names, expected)
    if args.overwrite:
        for name in _OUTPUTS:
            path = os.path.join(out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model, tokenizer, load_s = _load_model(args.model, _device(args.device), print)
    print(f"{' vs '.join(specs)} over {len(tasks)} tasks ({' -> '.join(names)}), seed(s) "
          f"{','.join(map(str, args.seeds))}; rank {config.lora.rank} on {','.join(config.lora.targets)}; "
          f"{config.train.total_steps(len(tasks[0].train))} steps per task; writing to {out}")
    args.stage = "running"
    os.makedirs(out, exist_ok=True)
    run_comparison(model, tokenizer, tasks, specs, args.seeds, config, out, progress=not args.quiet, log=print,
                   extra=extra)
    runs = collect_runs(out, order=specs)
    record = side_by_side({spec: [r for r in runs[spec] if r["config"]["seed"] in args.seeds] for spec in specs},
                          out)
    figure = plot_comparison(record, out, log=print)
    table = format_side_by_side(record)
    shared = {k: v for k, v in config.to_dict().items() if k not in ("strategy", "strategy_options", "seed")}
    shared["train"] = {k: v for k, v in shared["train"].items() if k != "seed"}  # the strategies' and seeds' own
    record.update({"seeds": list(args.seeds), "config": shared, **extra, "model_load_s": load_s,
                   "total_s": time.perf_counter() - started, "figure": figure})
    write_json_atomic(os.path.join(out, "comparison.json"), record)
    write_atomic(os.path.join(out, "comparison.md"), lambda f: f.write(table.encode()))
    args.stage = "done"
    print()
    print(table)
    print(f"report   {os.path.join(out, 'comparison.json')}")
    if figure:
        print(f"figure   {figure}")
    for spec in specs:
        print(f"runs     {spec}: {', '.join(record['strategies'][spec]['run_dirs'])}")
    print(f"total    {record['total_s']:.0f} s (model load {load_s:.0f} s)")
    return 0

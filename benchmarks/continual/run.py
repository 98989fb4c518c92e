"""The continual-learning quality benchmark: strategies side by side, several seeds.

    python benchmarks/continual/run.py                                  # cpu.json: ~10 strategies × 3 seeds
    python benchmarks/continual/run.py --config benchmarks/continual/gpu.json --device cuda
    python benchmarks/continual/run.py --strategies slao,seqlora --seeds 0 --out /tmp/q

Writes results.json, results.md, quality.png and memory.png into --out, and every
run's report under --out/runs/ (repeat the command to resume an interrupted one).
See slao_kernels/continual/compare.py for what each file holds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    import torch

    from slao_kernels.continual import RunConfig, TrainConfig, load_task_dir
    from slao_kernels.continual.compare import (
        collect_runs,
        format_summary,
        parse_spec,
        run_comparison,
        summarize,
        write_summary,
    )
    from slao_kernels.continual.models import check_quantize, load_quantized_model
    from slao_kernels.continual.strategies import STRATEGIES
    from slao_kernels.patching import LoRAConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(HERE, "cpu.json"))
    p.add_argument("--strategies", default=None, help="comma-separated specs (overrides the config); "
                   "options after a colon with '+' between them: slice:c=0.5+scope=module")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (overrides the config)")
    p.add_argument("--data", default=None, help="task directory (overrides the config)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "cpu"))
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quantize", choices=("nf4", "fp4", "int8"), default=None,
                   help="keep the frozen base quantized (bitsandbytes; overrides the config's \"quantize\")")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: rebuild the table and plots from every finished run under --out, "
                        "whatever strategies and seeds earlier commands ran")
    args = p.parse_args(argv)
    with open(args.config) as f:
        cfg = json.load(f)
    specs = [s.replace("+", ",") for s in args.strategies.split(",")] if args.strategies else cfg["strategies"]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else cfg["seeds"]
    data = args.data or os.path.normpath(os.path.join(HERE, "..", "..", cfg["data"]))
    quantize = args.quantize or cfg.get("quantize")
    for spec in specs:
        name, _ = parse_spec(spec)  # a typo fails now, not after an hour
        if quantize and STRATEGIES[name].strategy.writes_base:
            p.error(f"--quantize {quantize}: {spec} rewrites the base weights, which a quantized base cannot store")
    if quantize:
        try:
            check_quantize(quantize)
        except (ValueError, ImportError) as e:
            p.error(f"--quantize: {e}")
    if args.collect:
        runs = collect_runs(args.out, order=specs)
        if not runs:
            p.error(f"--collect: no finished run under {args.out}/runs")
        reports = [r for rs in runs.values() for r in rs]
        if len({tuple(r["tasks"]) for r in reports}) > 1:
            p.error(f"--collect: the runs under {args.out} do not share one task order")
        summary = summarize(runs, reports[0]["tasks"], sorted({r["config"]["seed"] for r in reports}))
        summary = write_summary(summary, args.out, extra={"benchmark_config": os.path.basename(args.config)})
        print(format_summary(summary))
        return 0
    tasks = load_task_dir(data, cfg["order"])
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    train = TrainConfig(steps=cfg.get("steps"), epochs=cfg.get("epochs") or 1.0, batch_size=cfg["batch_size"],
                        lr=cfg["lr"])
    config = RunConfig(lora=LoRAConfig(rank=cfg["rank"], alpha=cfg["alpha"], targets=tuple(cfg["targets"])),
                       train=train, max_test=cfg["max_test"], max_prompt_tokens=cfg["max_prompt_tokens"])
    t0 = time.perf_counter()
    model, tokenizer = load_quantized_model(None if cfg["model"] == "default" else cfg["model"], quantize,
                                            targets=cfg["targets"])
    model.to(device)
    from slao_kernels.benchmarking.environment import environment

    env = environment()
    print(f"{len(specs)} strategies × {len(seeds)} seeds over {' → '.join(t.name for t in tasks)} on "
          f"{env.get('gpu', env['cpu'])} ({device}); model loaded in {time.perf_counter() - t0:.0f} s")
    extra = {"environment": env, "benchmark_config": os.path.basename(args.config)}
    if quantize:  # only then: the records of unquantized runs keep their keys
        extra["quantize"] = quantize
    summary = run_comparison(model, tokenizer, tasks, specs, seeds, config, args.out, progress=not args.quiet,
                             extra=extra)
    print()
    print(format_summary(summary))
    for path in summary["plots"]:
        print(f"plot {path}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    sys.exit(main())

"""``slao eval`` and ``slao export``: a finished run's adapter, evaluated or written in PEFT's format."""

from __future__ import annotations

import os

from slao_kernels.cli._args import UsageError, _check_output_file
from slao_kernels.cli.run import _check_adapter_fits, _device, _load_model, _load_tasks, _run_report
from slao_kernels.continual.strategies import STRATEGIES

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
    from slao_kernels.continual.models import check_quantize
    from slao_kernels.continual.strategies import make_strategy
    from slao_kernels.patching import LoRAConfig, patch_llama

    meta, _ = checkpoint
    cfg = report["config"]
    model_spec = None if cfg["model"] == "default" else cfg["model"]
    lora = cfg["lora"]
    try:
        lora = LoRAConfig.from_dict(lora)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{run_dir}/report.json: config.lora is not a valid adapter ({e})") from None
    options = cfg.get("strategy_options", {})
    if not isinstance(options, dict):
        raise UsageError(f"{run_dir}/report.json: config.strategy_options must be an object, got {options!r}")
    _check_adapter_fits(model_spec, lora)
    quantize = cfg.get("quantize")  # the adapter was trained on that base: evaluate and export on the same
    try:
        check_quantize(quantize)
    except (ValueError, ImportError) as e:
        raise UsageError(f"{run_dir}/report.json: config.quantize: {e}") from None
    model, tokenizer, _ = _load_model(model_spec, device, log, quantize, lora.targets)
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

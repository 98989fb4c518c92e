"""The ``slao`` command (also ``python -m slao_kernels``).

    slao run [--model M] [--data DIR] [--order a,b,c] [--strategy slao] [--out DIR] [--resume] ...
                                         continual learning over a task stream: accuracy matrix,
                                         AA/BWT/FWT/forgetting, report.json, plots, checkpoint, adapter
    slao demo [--out DIR] [--seeds 0,1,2] ...
                                         SLAO beside SeqLoRA on the same stream and budget: one table
                                         (AA, BWT, FWT, forgetting, memory, time), the gain, one figure
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
import os
import sys

from slao_kernels.cli._args import (
    _NON_NEGATIVE,
    _POSITIVE,
    UsageError,
    _add_task_args,
    _int_at_least,
    _one_line,
    _Parser,
    _positive_float,
    _strategy_choices,
    _strategy_option,
)
from slao_kernels.cli.demo import DEMO_DEFAULTS, DEMO_STRATEGIES, cmd_demo, seed_list
from slao_kernels.cli.run import cmd_run
from slao_kernels.cli.runs import cmd_eval, cmd_export
from slao_kernels.cli.tools import _cuda, cmd_bench, cmd_info, cmd_selftest
from slao_kernels.continual.strategies import STRATEGIES


def _add_training_args(p) -> None:
    """The adapter and training flags of ``slao run``, shared with ``slao demo``."""
    p.add_argument("--rank", type=_POSITIVE, default=8, help="adapter rank (at most min(in, out) of every target)")
    p.add_argument("--alpha", type=_positive_float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated projection names to adapt")
    p.add_argument("--steps", type=_POSITIVE, default=40, help="optimizer steps per task")
    p.add_argument("--epochs", type=_positive_float, default=None, help="epochs per task instead of --steps")
    p.add_argument("--batch-size", type=_POSITIVE, default=8)
    p.add_argument("--grad-accum", type=_POSITIVE, default=1)
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument("--max-prompt-tokens", type=_int_at_least(32), default=256,
                   help="prompt length cap in tokens (the input text is cut to fit)")


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
    _add_training_args(r)
    r.add_argument("--seed", type=_NON_NEGATIVE, default=0)
    r.add_argument("--out", default="slao-run", help="output directory (report, plots, checkpoint, adapter)")
    r.add_argument("--overwrite", action="store_true", help="replace the report of an earlier run in --out")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (same command "
                   "otherwise) from its last finished task")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--quantize", default=None, choices=("nf4", "fp4", "int8"),
                   help="keep the frozen base quantized (bitsandbytes NF4/FP4 4-bit or int8; QLoRA-style), "
                   "recorded in the report's config; needs slao_kernels[quant]")
    r.set_defaults(func=cmd_run)
    d = sub.add_parser("demo", help="SLAO beside SeqLoRA on the same stream: one table, one figure")
    d.add_argument("--model", default=None, help="a Hugging Face model directory or a .gguf file; "
                   "default: the embedded SmolLM2-135M-Instruct")
    _add_task_args(d)
    d.add_argument("--strategies", default=DEMO_STRATEGIES, help="comma-separated strategies, the first compared "
                   "with each other (default slao,seqlora; add multitask for the upper bound; options after a "
                   "colon joined by +: slao:init=random)")
    _add_training_args(d)
    d.add_argument("--seeds", type=seed_list, default=[0], help="comma-separated seeds, each strategy run with "
                   "every one (default 0)")
    d.add_argument("--out", default="slao-demo", help="output directory (comparison.json, comparison.png, runs/)")
    d.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    d.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out (same command "
                   "otherwise): finished runs are kept, an interrupted one resumes from its last finished task")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo, **DEMO_DEFAULTS)
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
        print(f"slao {args.command}: {_one_line(e)}; fix the cause and continue with --resume", file=sys.stderr)
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

"""``slao bench``, ``slao selftest``, ``slao info``: this machine's kernels, checked and timed."""

from __future__ import annotations

from slao_kernels.cli._args import _check_output_file


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

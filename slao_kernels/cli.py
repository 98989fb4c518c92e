"""The ``slao`` command (also ``python -m slao_kernels``).

    slao bench [--quick] [--json FILE]   kernel throughput on this machine, as ratios to torch
    slao info                            versions, devices and which kernels are active
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


def _write_json_atomic(path: str, payload) -> None:
    """Write ``payload`` to ``path`` through a temp file + rename: never a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def cmd_bench(args) -> int:
    from slao_kernels import bench

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
    if args.json:
        _write_json_atomic(args.json, {"environment": env, "device": device, "results": rows})
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slao", description="slao_kernels: continual learning with one LoRA (SLAO)")
    sub = parser.add_subparsers(dest="command", required=True)
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
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

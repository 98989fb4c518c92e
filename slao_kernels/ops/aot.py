"""Compile every Triton kernel at every launch configuration for NVIDIA GPUs, without a GPU.

    python -m slao_kernels.ops.aot [--targets 90,80] [--jobs N] [--json FILE]

Triton compiles ahead of time for a named target on a CPU-only machine (ptxas
ships in the triton wheel). This catches what the interpreter cannot: illegal
``tl.dot`` shapes, type errors, layouts, and shared memory over the device
limit. Each op module lists its configurations in ``aot_specs()``. Exit code 1
if any configuration fails. Must run with ``TRITON_INTERPRET`` unset (the
interpreter patches Triton's code generator).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

# Shared memory a block may use (bytes): the opt-in maximum per block.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


def all_specs():
    """Every configuration of every kernel, in a fixed order."""
    from slao_kernels.ops import lora_linear, orthonormalize, scaled_merge

    return [*lora_linear.aot_specs(), *scaled_merge.aot_specs(), *orthonormalize.aot_specs()]


def compile_one(index: int, cc: int) -> dict:
    """Compile spec ``index`` for compute capability ``cc``; a result record."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = all_specs()[index]
    record = {"kernel": spec.name, "target": f"sm_{cc}", "ok": False}
    start = time.perf_counter()
    try:
        src = ASTSource(fn=spec.kernel, signature=spec.signature(), constexprs=dict(spec.constexprs))
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        shared = compiled.metadata.shared
        record.update(shared=shared, ok=shared <= SHARED_LIMIT[cc])
        if not record["ok"]:
            record["error"] = f"shared memory {shared} B exceeds the sm_{cc} limit {SHARED_LIMIT[cc]} B"
    except Exception as exc:  # noqa: BLE001 - report every compiler failure, keep going
        record["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def run(targets=(90, 80), jobs=None) -> list[dict]:
    """Compile everything; the list of result records."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("slao_kernels.ops.aot must run with TRITON_INTERPRET unset")
    n = len(all_specs())
    work = [(i, cc) for cc in targets for i in range(n)]
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count()) as pool:
        return list(pool.map(compile_one, *zip(*work, strict=True), chunksize=4))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="90,80", help="compute capabilities, comma separated")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiler processes")
    parser.add_argument("--json", default=None, help="write the records to this file")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    records = run(tuple(int(t) for t in args.targets.split(",")), args.jobs)
    failed = [r for r in records if not r["ok"]]
    for r in failed:
        print(f"FAIL {r['target']} {r['kernel']}: {r['error']}")
    worst = max((r for r in records if "shared" in r), key=lambda r: r["shared"], default=None)
    print(f"compiled {len(records) - len(failed)}/{len(records)} kernel configurations in "
          f"{time.perf_counter() - start:.0f} s" + (f"; most shared memory {worst['shared']} B ({worst['target']} "
                                                    f"{worst['kernel']})" if worst else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The comparisons ``slao bench`` prints: every provider of ``lora_linear`` on every
shape and mode, and SLAO's task-switch ops, as medians and ratios, with their tables."""

from __future__ import annotations

import torch

from slao_kernels.benchmarking.cases import (
    MODES,
    PROVIDERS,
    TASK_SWITCH_SET,
    default_shapes,
    make_case,
    merge_cases,
    orthonormalize_cases,
)
from slao_kernels.benchmarking.timing import time_interleaved


def compare(shapes=None, device: str | None = None, modes=MODES, rounds: int = 30) -> list[dict]:
    """Time every provider on every shape and mode; one row per (shape, mode) with
    medians, slao's ratios to each other provider and, on a GPU, throughput."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for shape in shapes or default_shapes(device):
        for mode in modes:
            cases = {p: make_case(shape, p, mode, device) for p in PROVIDERS}
            t = time_interleaved(cases, device, rounds=rounds)
            row = {"shape": shape.name, "mode": mode, "tokens": shape.tokens, "in": shape.in_features,
                   "out": shape.out_features, "rank": shape.rank, "dtype": str(shape.dtype).replace("torch.", ""),
                   "lora_dtype": str(shape.lora_dtype).replace("torch.", ""),
                   "ms": {p: round(v * 1e3, 4) for p, v in t.items()},
                   "slao_vs": {p: round(t["slao"] / t[p], 3) for p in PROVIDERS if p != "slao"}}
            if device == "cuda":
                row["slao_tflops"] = round(shape.flops(mode) / t["slao"] / 1e12, 1)
                row["slao_gbps"] = round(shape.bytes_moved(mode) / t["slao"] / 1e9, 1)
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of :func:`compare` rows."""
    head = f"{'shape':32s} {'mode':8s} " + " ".join(f"{p + ' ms':>11s}" for p in PROVIDERS) + \
        f" {'slao/eager':>10s} {'slao/comp':>9s} {'slao/base':>9s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r['shape']:32s} {r['mode']:8s} " + " ".join(f"{r['ms'][p]:11.3f}" for p in PROVIDERS)
        line += f" {r['slao_vs']['eager']:10.3f} {r['slao_vs']['composed']:9.3f} {r['slao_vs']['base']:9.3f}"
        if "slao_tflops" in r:
            line += f"  {r['slao_tflops']} TFLOP/s {r['slao_gbps']} GB/s"
        lines.append(line)
    return "\n".join(lines)


def compare_task_switch_ops(device: str, rounds: int = 15, shape: tuple[int, int, int] = TASK_SWITCH_SET) -> list:
    """Rows for ``slao bench``: the merge and the orthonormalization of ``shape``, with ratios."""
    b, r, n = shape
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t = time_interleaved(merge_cases(b, r, n, device, dtype), device, rounds=rounds)
    rows = [{"op": f"scaled_merge_ {b}x{r}x{n} {str(dtype).replace('torch.', '')}",
             "ms": {k: round(v * 1e3, 3) for k, v in t.items()},
             "ratios": {"slao/copy": round(t["slao"] / t["copy"], 3),
                        "slao/foreach_lerp": round(t["slao"] / t["foreach_lerp"], 3)}}]
    t = time_interleaved(orthonormalize_cases(shape, device), device, rounds=rounds)
    rows.append({"op": f"orthonormalize_rows {b}x{r}x{n} float32", "ms": {k: round(v * 1e3, 3) for k, v in t.items()},
                 "ratios": {"linalg_qr/slao": round(t["linalg_qr"] / t["slao"], 2),
                            "linalg_qr/slao_inplace": round(t["linalg_qr"] / t["slao_inplace"], 2)}})
    return rows


def format_task_switch_table(rows: list[dict]) -> str:
    """Text table of :func:`compare_task_switch_ops` rows."""
    lines = []
    for row in rows:
        times = ", ".join(f"{k} {v:.2f} ms" for k, v in row["ms"].items())
        ratios = ", ".join(f"{k} {v}" for k, v in row["ratios"].items())
        lines.append(f"{row['op']:40s} {times}\n{'':40s} {ratios}")
    return "\n".join(lines)

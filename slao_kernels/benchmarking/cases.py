"""Benchmark cases for the ops: providers × modes × real model shapes, and an
interleaved timer for ratios measured in one run.

Providers of ``lora_linear``:
  ``eager``     PEFT-style ``base(x) + B(A(x))·s`` under torch autograd (what users run today)
  ``composed``  the best stock-torch composition: base GEMM + ``addmm_`` update, reference backward
  ``slao``      :func:`slao_kernels.lora_linear`
  ``base``      the frozen base layer alone (forward: ``x·Wᵀ``; backward: ``dy·W``): the floor
Modes: ``forward`` (no autograd graph), ``backward`` (graph built in setup), ``full`` (both).

SLAO's per-task ops (:func:`merge_cases`, :func:`orthonormalize_cases`,
:func:`compare_task_switch_ops`) are timed against stock torch the same way.

Ratios come from :func:`time_interleaved`, which runs the cases round-robin so
that a machine whose speed drifts (shared CPUs, GPU clocks) slows every
provider alike. Used by ``benchmarks/`` (pytest-benchmark) and ``slao bench``.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from slao_kernels import reference
from slao_kernels.ops.lora_linear import lora_linear
from slao_kernels.ops.orthonormalize import orthonormalize_rows, orthonormalize_rows_
from slao_kernels.ops.scaled_merge import scaled_merge_

PROVIDERS = ("eager", "composed", "slao", "base")
MODES = ("forward", "backward", "full")


@dataclass(frozen=True)
class Shape:
    """One ``lora_linear`` problem: ``tokens`` rows of ``in_features`` → ``out_features``, rank ``rank``."""

    name: str
    tokens: int
    in_features: int
    out_features: int
    rank: int
    dtype: torch.dtype
    lora_dtype: torch.dtype

    def flops(self, mode: str) -> int:
        """Multiply-adds × 2 of the base and low-rank products in ``mode``."""
        M, n, m, r = self.tokens, self.in_features, self.out_features, self.rank
        fwd = 2 * M * n * m + 2 * M * r * (n + m)
        bwd = 2 * M * n * m + 4 * M * r * (n + m)  # dx, and the rank-r g, dA, dB, g·A
        return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]

    def bytes_moved(self, mode: str) -> int:
        """Minimum HBM traffic: each operand read once, each result written once."""
        M, n, m = self.tokens, self.in_features, self.out_features
        e = torch.finfo(self.dtype).bits // 8
        fwd = e * (M * n + m * n + M * m)
        bwd = e * (M * m + m * n + 2 * M * n)
        return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


# SmolLM2-135M (hidden 576, intermediate 1536) on CPU; Llama-3-8B (4096 / 14336 / kv 1024) on GPU.
CPU_SHAPES = (
    Shape("smollm2.q_proj", 512, 576, 576, 8, torch.float32, torch.float32),
    Shape("smollm2.up_proj", 512, 576, 1536, 8, torch.float32, torch.float32),
    Shape("smollm2.down_proj", 512, 1536, 576, 8, torch.float32, torch.float32),
)
GPU_SHAPES = (
    Shape("llama3-8b.up_proj", 8192, 4096, 14336, 16, torch.bfloat16, torch.bfloat16),
    Shape("llama3-8b.q_proj", 8192, 4096, 4096, 16, torch.bfloat16, torch.bfloat16),
    Shape("llama3-8b.v_proj", 8192, 4096, 1024, 16, torch.bfloat16, torch.bfloat16),
    Shape("llama3-8b.up_proj.fp32-adapter", 8192, 4096, 14336, 16, torch.bfloat16, torch.float32),
)


def default_shapes(device: str) -> tuple[Shape, ...]:
    return GPU_SHAPES if device == "cuda" else CPU_SHAPES


def make_inputs(shape: Shape, device: str, seed: int = 0):
    """``(x, weight, lora_A, lora_B, scaling, grad_out)``; x and the adapter require grad."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    M, n, m, r = shape.tokens, shape.in_features, shape.out_features, shape.rank

    def randn(*size, dtype, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(device=device, dtype=dtype)

    x = randn(M, n, dtype=shape.dtype).requires_grad_()
    weight = randn(m, n, dtype=shape.dtype, scale=n ** -0.5)
    lora_A = randn(r, n, dtype=shape.lora_dtype, scale=n ** -0.5).requires_grad_()
    lora_B = randn(m, r, dtype=shape.lora_dtype, scale=0.01).requires_grad_()
    grad_out = randn(M, m, dtype=shape.dtype)
    return x, weight, lora_A, lora_B, 16.0 / r, grad_out


class _Composed(torch.autograd.Function):
    """The composed-torch provider with autograd: ``addmm_`` forward, reference backward."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, scaling):
        ctx.save_for_backward(x, weight, lora_A, lora_B)
        ctx.scaling = scaling
        return reference.lora_linear_composed(x, weight, None, lora_A, lora_B, scaling)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B = ctx.saved_tensors
        act = x.to(lora_A.dtype) @ lora_A.t()
        gx, gA, gB = reference.lora_linear_backward_ref(grad_out, None, x, weight, lora_A, lora_B, act,
                                                        ctx.scaling, True)
        return gx, None, gA, gB, None


def _forward_fn(provider: str) -> Callable:
    if provider == "eager":
        return lambda x, w, A, B, s: reference.lora_linear_eager(x, w, None, A, B, s)
    if provider == "composed":
        return lambda x, w, A, B, s: _Composed.apply(x, w, A, B, s)
    if provider == "slao":
        return lambda x, w, A, B, s: lora_linear(x, w, None, A, B, s)
    if provider == "base":
        return lambda x, w, A, B, s: torch.nn.functional.linear(x, w)
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def make_case(shape: Shape, provider: str, mode: str, device: str):
    """``(setup, run)``: ``run(*setup())`` performs one timed unit of work."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    x, weight, A, B, s, dy = make_inputs(shape, device)
    fwd = _forward_fn(provider)

    if mode == "forward":
        def run():
            with torch.no_grad():
                fwd(x, weight, A, B, s)
        return (lambda: ()), run
    if mode == "full":
        def run():
            fwd(x, weight, A, B, s).backward(dy)
        return (lambda: ()), run

    def setup():  # backward: build the graph outside the timed region
        return (fwd(x, weight, A, B, s),)

    def run(y):
        y.backward(dy)
    return setup, run


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def synchronized(run: Callable, device: str) -> Callable:
    """``run`` followed by a device synchronization, so a timer measures the work, not its launch."""

    def timed(*args):
        run(*args)
        _sync(device)

    return timed


def time_interleaved(cases: dict, device: str, rounds: int = 50, warmup: int = 5,
                     min_round_s: float = 0.02) -> dict[str, float]:
    """Median seconds per call of each ``name -> (setup, run)`` case, timed round-robin.

    Each round times every case once; a case that is fast is repeated within
    its round until ``min_round_s`` has passed, for timer resolution.
    """
    names = list(cases)
    reps = {}
    for name in names:  # warm up and size the repetitions
        setup, run = cases[name]
        for _ in range(warmup):
            run(*setup())
        _sync(device)
        t = time.perf_counter()
        run(*setup())
        _sync(device)
        reps[name] = max(1, int(min_round_s / max(time.perf_counter() - t, 1e-7)))
    samples = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            setup, run = cases[name]
            total = 0.0
            for _ in range(reps[name]):
                args = setup()
                _sync(device)
                t = time.perf_counter()
                run(*args)
                _sync(device)
                total += time.perf_counter() - t
            samples[name].append(total / reps[name])
    return {name: statistics.median(v) for name, v in samples.items()}


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


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Device name and versions, for results files."""
    import triton

    from slao_kernels import __version__
    from slao_kernels._ops import NATIVE_CPU

    env = {"slao_kernels": __version__, "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "cpu": _cpu_name(),
           "cpu_threads": torch.get_num_threads(), "native_cpu_kernels": NATIVE_CPU}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


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


# --------------------------------------------------------------------------- SLAO's per-task ops

# A Llama-3-8B adapter at r=16 over all seven projections of 32 layers, as 224
# matrices of 16×4096 (the A set; the B set has the same bytes).
TASK_SWITCH_SET = (224, 16, 4096)


def merge_cases(layers: int, rows: int, cols: int, device: str, dtype: torch.dtype) -> dict:
    """``scaled_merge_`` over ``layers`` tensors of rows×cols against ``torch._foreach_lerp_``
    and a flat ``copy_`` of the same bytes (the floor)."""
    g = torch.Generator().manual_seed(0)
    merged = [torch.randn(rows, cols, generator=g).to(device, dtype) for _ in range(layers)]
    fine = [torch.randn(rows, cols, generator=g).to(device, dtype) for _ in range(layers)]
    dst = torch.empty(layers * rows * cols, device=device, dtype=dtype)
    src = torch.randn(layers * rows * cols, generator=g).to(device, dtype)
    none = lambda: ()  # noqa: E731
    return {
        "slao": (none, lambda: scaled_merge_(merged, fine, 0.5)),
        "slao_checked": (none, lambda: scaled_merge_(merged, fine, 0.5, check_finite=True)),
        "foreach_lerp": (none, lambda: torch._foreach_lerp_(merged, fine, 0.5)),
        "copy": (none, lambda: dst.copy_(src)),
    }


def qr_with_sign_fix(A: torch.Tensor) -> torch.Tensor:
    """What a user would write: ``torch.linalg.qr`` of Aᵀ, signs fixed so diag(R) > 0."""
    Q, R = torch.linalg.qr(A.transpose(1, 2))
    signs = torch.where(torch.diagonal(R, dim1=-2, dim2=-1) < 0, -1.0, 1.0)
    return (Q * signs.unsqueeze(-2)).transpose(1, 2)


def orthonormalize_cases(shape: tuple[int, int, int], device: str) -> dict:
    """``orthonormalize_rows`` on a (b, r, n) batch, ``orthonormalize_rows_`` on the b
    matrices as separate tensors (SLAO's task switch), ``linalg.qr`` + sign fix, and a
    same-size copy into new memory (the floor of any op that returns a new tensor)."""
    A = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device)
    layers = [a.clone() for a in A]
    none = lambda: ()  # noqa: E731

    def restore():  # untimed: the original A again, so every call does the work of the first
        torch._foreach_copy_(layers, list(A.unbind(0)))
        return ()

    return {"slao": (none, lambda: orthonormalize_rows(A)),
            "slao_inplace": (restore, lambda: orthonormalize_rows_(layers)),
            "linalg_qr": (none, lambda: qr_with_sign_fix(A)),
            "copy": (none, lambda: A.clone())}


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

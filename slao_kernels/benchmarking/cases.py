"""What the benchmarks time: the ``lora_linear`` problems (providers × modes × real
model shapes) and SLAO's per-task ops against stock torch.

Providers of ``lora_linear``:
  ``eager``     PEFT-style ``base(x) + B(A(x))·s`` under torch autograd (what users run today)
  ``composed``  the best stock-torch composition: base GEMM + ``addmm_`` update, reference backward
  ``slao``      :func:`slao_kernels.lora_linear`
  ``base``      the frozen base layer alone (forward: ``x·Wᵀ``; backward: ``dy·W``): the floor
Modes: ``forward`` (no autograd graph), ``backward`` (graph built in setup), ``full`` (both).

A case is ``(setup, run)``: ``run(*setup())`` performs one timed unit of work,
``setup`` what must happen before it, untimed. :mod:`slao_kernels.benchmarking.timing`
times them; :mod:`slao_kernels.benchmarking.compare` turns the times into tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from slao_kernels.benchmarking.references import ComposedLoRALinear, lora_linear_eager, qr_with_sign_fix
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
    """The shapes timed on ``device``: Llama-3-8B's on ``"cuda"``, SmolLM2-135M's elsewhere."""
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


def forward_fn(provider: str) -> Callable:
    """``f(x, weight, lora_A, lora_B, scaling) -> out`` of a provider (no bias)."""
    if provider == "eager":
        return lambda x, w, A, B, s: lora_linear_eager(x, w, None, A, B, s)
    if provider == "composed":
        return lambda x, w, A, B, s: ComposedLoRALinear.apply(x, w, A, B, s)
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
    fwd = forward_fn(provider)

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

"""Every op schema of the ``slao`` namespace, its fake (meta) kernel, the
loading of the native CPU kernels, and the one rule that registers each op's
device kernels (:func:`register_kernels`).

Device kernels live elsewhere: CUDA (Triton) in ``slao_kernels/ops/<op>.py``,
CPU (C++) in ``csrc/`` registered with ``TORCH_LIBRARY_IMPL(slao, CPU, m)``.
When the C++ extension is not built, the CPU kernels fall back to
``slao_kernels.reference`` with a single loud warning.

Schemas
-------
``slao::lora_linear(x, weight, bias, lora_A, lora_B, scaling) -> (out, lora_act)``
    ``out = x·weightᵀ + bias + scaling·(x·lora_Aᵀ)·lora_Bᵀ`` in ``x.dtype``;
    ``lora_act = x·lora_Aᵀ`` (shape ``(*x.shape[:-1], r)``, dtype
    :func:`act_dtype`) is returned so autograd saves it instead of recomputing.

``slao::lora_linear_backward(grad_out, grad_act, x, weight, lora_A, lora_B,
lora_act, scaling, input_grad) -> (grad_x, grad_A, grad_B)``
    With ``g = scaling·grad_out·lora_B + grad_act``:
    ``grad_x = grad_out·weight + g·lora_A`` (an empty tensor when
    ``input_grad`` is false), ``grad_A = gᵀ·x``,
    ``grad_B = scaling·grad_outᵀ·lora_act``.

``slao::scaled_merge_(merged, fine_tuned, lam, check_finite) -> ()``
    In place, for every i: ``merged[i] ← merged[i] + lam·(fine_tuned[i] − merged[i])``,
    computed in fp32 (fp64 for fp64) as ``(1 − lam)·merged + lam·fine_tuned``
    (exact at lam = 0 and 1). With ``check_finite`` nothing is written
    when any result would be NaN or ±Inf (a ``ValueError`` names the tensor).
"""

from __future__ import annotations

import importlib
import warnings

import torch

LIB = torch.library.Library("slao", "DEF")

LIB.define(
    "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling)"
    " -> (Tensor, Tensor)"
)
LIB.define(
    "lora_linear_backward(Tensor grad_out, Tensor? grad_act, Tensor x, Tensor weight, Tensor lora_A,"
    " Tensor lora_B, Tensor lora_act, float scaling, bool input_grad) -> (Tensor, Tensor, Tensor)"
)

LIB.define("scaled_merge_(Tensor(a!)[] merged, Tensor[] fine_tuned, float lam, bool check_finite) -> ()")

LIB.define("orthonormalize_rows(Tensor A) -> (Tensor, Tensor)")
LIB.define("orthonormalize_rows_(Tensor(a!)[] A) -> Tensor")


def compute_dtype(x_dtype: torch.dtype, lora_dtype: torch.dtype) -> torch.dtype:
    """dtype the low-rank path is computed in: the promotion of activations and
    adapter (bf16 x with an fp32 adapter computes in fp32, as PEFT does)."""
    return torch.promote_types(x_dtype, lora_dtype)


def act_dtype(x_dtype: torch.dtype, lora_dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved rank-r activation: at least fp32, since it is
    M×r (tiny) and feeds both gradient GEMMs."""
    return torch.promote_types(compute_dtype(x_dtype, lora_dtype), torch.float32)


@torch.library.register_fake("slao::lora_linear")
def _lora_linear_fake(x, weight, bias, lora_A, lora_B, scaling):
    lead = x.shape[:-1]
    out = x.new_empty((*lead, weight.shape[0]))
    act = x.new_empty((*lead, lora_A.shape[0]), dtype=act_dtype(x.dtype, lora_A.dtype))
    return out, act


@torch.library.register_fake("slao::lora_linear_backward")
def _lora_linear_backward_fake(grad_out, grad_act, x, weight, lora_A, lora_B, lora_act, scaling, input_grad):
    grad_x = torch.empty_like(x) if input_grad else x.new_empty((0,))
    return grad_x, torch.empty_like(lora_A), torch.empty_like(lora_B)


@torch.library.register_fake("slao::scaled_merge_")
def _scaled_merge_fake(merged, fine_tuned, lam, check_finite):
    return None


@torch.library.register_fake("slao::orthonormalize_rows")
def _orthonormalize_rows_fake(A):
    return torch.empty_like(A), A.new_empty((A.shape[0],), dtype=torch.bool)


@torch.library.register_fake("slao::orthonormalize_rows_")
def _orthonormalize_rows_inplace_fake(A):
    return torch.empty((len(A),), dtype=torch.bool, device=A[0].device if len(A) else "cpu")


def _load_native() -> bool:
    """Import the C++ extension (it registers the CPU kernels on import).

    Returns False, after one warning, when it is missing; the caller then
    registers the reference as the CPU kernel.
    """
    try:
        importlib.import_module("slao_kernels._C")
        return True
    except ImportError as exc:
        warnings.warn(
            f"slao_kernels: the C++ CPU kernels are not available ({exc}). CPU ops fall back to the "
            "pure-torch reference, which is correct but slower. Rebuild with "
            "`pip install --no-build-isolation -e .` (needs a C++ compiler and torch installed first).",
            RuntimeWarning,
            stacklevel=2,
        )
        return False


NATIVE_CPU: bool = _load_native()
"""True when the C++ CPU kernels are loaded, False when CPU ops use the reference."""


def register_kernels(op: str, cuda_kernel, reference_kernel) -> None:
    """Register the kernels of the ``slao::<op>`` schema by the one rule every op follows:

    * CUDA → ``cuda_kernel`` (the Triton launcher of ``slao_kernels/ops/<op>.py``);
    * CPU → the C++ kernel when the extension is built (it registered itself on
      import, see :data:`NATIVE_CPU`), else ``reference_kernel``;
    * any other device (MPS, XPU, ...) → ``reference_kernel``, registered as
      ``CompositeExplicitAutograd``.
    """
    LIB.impl(op, cuda_kernel, "CUDA")
    LIB.impl(op, reference_kernel, "CompositeExplicitAutograd")
    if not NATIVE_CPU:
        LIB.impl(op, reference_kernel, "CPU")

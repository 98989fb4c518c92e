r"""Full-weight gradients of the adapted layers, and the gradient-based inits built on them.

LoRA-GA (arXiv 2407.05000) and SLICE (arXiv 2605.12752) initialize a task's
adapter from ``G = ∂L/∂W0``, the gradient of the task loss with respect to
each frozen base weight, averaged over a few batches (docs/design.md §1.5). ``W0`` is
frozen, so autograd never forms that gradient; it is accumulated here from the
two factors it is made of: ``∂L/∂W0 = Σ_tokens dyᵀ·x`` with x the layer's
input (a forward hook) and dy the gradient of its output (a tensor hook).

Memory: one fp32 m×n matrix per layer and per gradient kind (SLICE keeps two:
current task and replay). :func:`module_chunks` splits the layers into chunks
that fit ``max_bytes``; the batches are then run once per chunk, and only that
chunk's gradients are alive. Peak extra memory: ``kinds × max(chunk bytes)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from slao_kernels.nn import LoRALinear


def gradient_bytes(module: LoRALinear) -> int:
    """Bytes of one fp32 full-weight gradient of ``module``."""
    return 4 * module.out_features * module.in_features


def module_chunks(modules: dict[str, LoRALinear], max_bytes: int | None, kinds: int = 1) -> list[list[str]]:
    """Module names split so each chunk's ``kinds`` gradients fit ``max_bytes`` (None: one chunk)."""
    names = list(modules)
    if max_bytes is None:
        return [names]
    chunks, current, size = [], [], 0
    for n in names:
        need = kinds * gradient_bytes(modules[n])
        if need > max_bytes:
            raise ValueError(f"max_gradient_bytes={max_bytes} is below what one layer needs ({n}: {need} bytes)")
        if current and size + need > max_bytes:
            chunks.append(current)
            current, size = [], 0
        current.append(n)
        size += need
    return chunks + ([current] if current else [])


@torch.enable_grad()
def full_weight_gradients(model: nn.Module, modules: dict[str, LoRALinear], names: Sequence[str],
                          batches: Iterable, loss_fn: Callable) -> dict[str, torch.Tensor]:
    """Mean over ``batches`` of ``∂loss_fn(model, batch)/∂W0`` for the modules ``names`` (fp32, m×n).

    The adapter parameters' own gradients are computed on the way and discarded.
    """
    grads = {n: torch.zeros(modules[n].out_features, modules[n].in_features, dtype=torch.float32,
                            device=modules[n].weight.device) for n in names}
    handles = []

    def hook(name):
        def forward_hook(module, inputs, output):
            x = inputs[0].detach()
            if output.requires_grad:
                def accumulate(dy):
                    grads[name].addmm_(dy.reshape(-1, dy.shape[-1]).float().t(), x.reshape(-1, x.shape[-1]).float())
                output.register_hook(accumulate)
        return forward_hook

    for n in names:
        handles.append(modules[n].register_forward_hook(hook(n)))
    params = [p for m in modules.values() for p in (m.lora_A, m.lora_B)]
    flags = [p.requires_grad for p in params]
    count = 0
    try:
        for p in params:  # the outputs must require grad for the tensor hooks to fire
            p.requires_grad_(True)
        for batch in batches:
            loss = loss_fn(model, batch)
            torch.autograd.grad(loss, params, allow_unused=True)  # fills the hooks; adapter grads dropped
            count += 1
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
    if count == 0:
        raise ValueError("full_weight_gradients: no batches")
    for g in grads.values():
        g.div_(count)
    return grads


def pcgrad(current: dict[str, torch.Tensor], replay: dict[str, torch.Tensor], strength: float,
           dots: dict[str, tuple[float, float]] | None = None) -> dict[str, torch.Tensor]:
    r"""SLICE's projection ``g_c ← g_c + c·relu(−⟨g_c,g_r⟩)/‖g_r‖²·g_r``.

    Args:
        current, replay: gradients by module name.
        strength: c ∈ [0, 1] (1: full PCGrad, 0: no projection).
        dots: ``{name: (⟨g_c,g_r⟩, ‖g_r‖²)}`` summed however the caller wants
            (:func:`global_dots` for one projection over all modules); None
            projects every module on its own.

    Returns new tensors; a non-conflicting pair (⟨g_c,g_r⟩ ≥ 0) is unchanged.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"PCGrad strength must be in [0, 1], got {strength}")
    out = {}
    for n, g in current.items():
        r = replay[n]
        dot, norm2 = dots[n] if dots is not None else (float((g * r).sum()), float((r * r).sum()))
        coeff = strength * max(0.0, -dot) / norm2 if norm2 > 0 else 0.0
        out[n] = g + coeff * r if coeff else g.clone()
    return out


def global_dots(dot_parts: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """The "global" variant: ⟨g_c,g_r⟩ and ‖g_r‖² summed over all modules, the same for each."""
    total = (sum(d for d, _ in dot_parts.values()), sum(r for _, r in dot_parts.values()))
    return {n: total for n in dot_parts}


def svd_factors(G: torch.Tensor, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U (m×q), S (q), V (n×q)`` of ``G`` by ``torch.svd_lowrank`` with
    ``q = min(4r, min(m, n))`` (randomized; seeded, so deterministic)."""
    q = min(4 * rank, *G.shape)
    if q < 2 * rank and min(G.shape) >= 2 * rank:
        raise ValueError(f"svd_factors: q={q} < 2r={2 * rank}")
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return torch.svd_lowrank(G.float(), q=q, niter=4)
    finally:
        torch.random.set_rng_state(state)


def lora_ga_factors(G: torch.Tensor, rank: int, gamma: float = 16.0, seed: int = 0):
    """LoRA-GA's init from G (m×n): ``A = V[:, :r]ᵀ``, ``B = U[:, r:2r]``, both scaled by
    the "stable" ``m^{1/4}/√γ``."""
    U, _, V = svd_factors(G, rank, seed)
    m = G.shape[0]
    scale = m ** 0.25 / math.sqrt(gamma)
    return (V[:, :rank].t() * scale).contiguous(), (U[:, rank:2 * rank] * scale).contiguous()


def slice_factors(G: torch.Tensor, W: torch.Tensor, rank: int, seed: int = 0):
    """SLICE's init from the projected gradient G (m×n): ``B = U[:, :r]``,
    ``A = V[:, r:2r]ᵀ``, both scaled by ``β = (ρ·Var(W)/Var(B·A))^{1/4}`` with
    ``ρ = log_{min(m,n)} r``, so that ``Var(B·A) = ρ·Var(W)`` after scaling.
    At r = 1, ρ = 0 would zero both factors (and their gradients): β = 1 there."""
    U, _, V = svd_factors(G, rank, seed)
    B, A = U[:, :rank].contiguous(), V[:, rank:2 * rank].t().contiguous()
    rho = math.log(rank) / math.log(min(W.shape))
    var_ba = float((B @ A).var())
    beta = (rho * float(W.float().var()) / var_ba) ** 0.25 if var_ba > 0 and rho > 0 else 1.0
    return A * beta, B * beta

"""The SLAO controller on a tiny Llama: the state machine against a hand-written
step-by-step reference of DESIGN.md §1, the ablation switches, constant memory,
the optimizer pattern, and misuse."""

import math

import pytest
import torch
from conftest import tiny_model

import slao_kernels
from slao_kernels import SLAO, LoRAConfig, patch_llama
from slao_kernels.continual import merge_weight


def patched(**kw):
    model = tiny_model()
    patch_llama(model, LoRAConfig(rank=4, targets=("q_proj", "v_proj")))
    return model, SLAO(model, **kw)


def fake_finetune(slao, task, seed_offset=0):
    """Stand-in for training: move every adapter factor by a task-specific amount."""
    g = torch.Generator().manual_seed(1000 * task + seed_offset)
    with torch.no_grad():
        for p in slao.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def sign_fixed_q_t(A):
    Q, R = torch.linalg.qr(A.double().t())
    return (Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0)).t().float()


def reference_run(A1, B1, tasks, lam, init, merge, finetune_deltas):
    """DESIGN.md §1 written out for one layer, with explicit A_ft/B_ft/A_merge/B_merge."""
    A_ft = B_ft = A_merge = B_merge = None
    history = []
    for i in range(1, tasks + 1):
        if i == 1:
            A, B = A1.clone(), B1.clone()
        elif init == "orthogonal":
            A, B = sign_fixed_q_t(A_ft), B_ft.clone()
        elif init == "last_ft":
            A, B = A_ft.clone(), B_ft.clone()
        elif init == "last_merge":
            A, B = A_merge.clone(), B_merge.clone()
        dA, dB = finetune_deltas[i]
        A_ft, B_ft = A + dA, B + dB
        lam_i = merge_weight(lam, i)
        if i == 1:
            A_merge, B_merge = A_ft.clone(), B_ft.clone()
        else:
            A_merge = A_merge + lam_i * (A_ft - A_merge) if "A" in merge else A_ft.clone()
            B_merge = B_merge + lam_i * (B_ft - B_merge) if "B" in merge else B_ft.clone()
        history.append((A_merge.clone(), B_merge.clone()))
    return history


@pytest.mark.parametrize("init,merge,lam", [
    ("orthogonal", "B", "inv_sqrt"),  # SLAO
    ("orthogonal", "B", "inv"), ("orthogonal", "B", 0.5),
    ("orthogonal", "A", "inv_sqrt"), ("orthogonal", "AB", "inv_sqrt"), ("orthogonal", "none", "inv_sqrt"),
    ("last_ft", "B", "inv_sqrt"), ("last_merge", "B", "inv_sqrt"), ("last_merge", "AB", "inv_sqrt"),
])
def test_state_machine_matches_step_by_step_reference(init, merge, lam):
    model, slao = patched(init=init, merge=merge, lam=lam)
    name, layer = next(iter(slao.modules.items()))
    A1, B1 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    deltas = {}
    for i in range(1, 5):
        assert slao.begin_task() == i and slao.task_index == i
        before = {id(p): p.detach().clone() for p in slao.parameters()}
        fake_finetune(slao, i)
        deltas[i] = tuple(getattr(layer, f).detach() - before[id(getattr(layer, f))] for f in ("lora_A", "lora_B"))
        assert slao.end_task() == pytest.approx(merge_weight(lam, i))
    want = reference_run(A1, B1, 4, lam, init, merge, deltas)
    A_merge, B_merge = want[-1]
    torch.testing.assert_close(layer.lora_A.detach(), A_merge, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_B.detach(), B_merge, rtol=1e-5, atol=1e-6)


def test_task_one_merge_is_exact_and_init_is_orthonormal():
    model, slao = patched()
    slao.begin_task()
    fake_finetune(slao, 1)
    ft = {id(p): p.detach().clone() for p in slao.parameters()}
    slao.end_task()
    assert all(torch.equal(p, ft[id(p)]) for p in slao.parameters())  # λ(1) = 1: B_merge,1 = B_ft,1 exactly
    slao.begin_task()
    for layer in slao.modules.values():
        A = layer.lora_A.detach().double()
        torch.testing.assert_close(A @ A.t(), torch.eye(A.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)


def test_random_init_ablation_resets_the_adapter():
    model, slao = patched(init="random")
    slao.begin_task()
    fake_finetune(slao, 1)
    slao.end_task()
    slao.begin_task()
    for layer in slao.modules.values():
        assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))


def test_model_holds_merged_adapter_and_runs_after_end_task():
    model, slao = patched()
    ids = torch.randint(0, 96, (2, 8))
    for i in range(1, 3):
        slao.begin_task()
        fake_finetune(slao, i)
        slao.end_task()
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()


def test_memory_is_constant_over_twelve_tasks():
    model, slao = patched()
    sizes = []
    for i in range(1, 13):
        slao.begin_task()
        fake_finetune(slao, i)
        slao.end_task()
        sizes.append(slao.state_bytes())
    adapter = sum(p.numel() * p.element_size() for p in slao.parameters())
    b_bytes = sum(m.lora_B.numel() * m.lora_B.element_size() for m in slao.modules.values())
    assert sizes[0] == sizes[-1] == adapter + b_bytes  # the adapter plus one B-sized buffer per layer
    assert len(set(sizes)) == 1


def test_new_optimizer_per_task_pattern():
    """The documented pattern: a fresh optimizer after each begin_task(); parameters keep their identity."""
    model, slao = patched()
    ids = torch.randint(0, 96, (2, 8))
    params_ids = None
    for i in range(1, 4):
        slao.begin_task()
        opt = torch.optim.AdamW(list(slao.parameters()), lr=1e-2)
        assert not opt.state  # nothing carried over from the previous task
        ids_now = [id(p) for p in slao.parameters()]
        assert params_ids is None or ids_now == params_ids
        params_ids = ids_now
        model.train()
        for _ in range(2):
            loss = model(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        slao.end_task()
    assert slao.task_index == 3


def test_misuse_is_refused():
    model, slao = patched()
    with pytest.raises(RuntimeError, match="no task in progress"):
        slao.end_task()
    slao.begin_task()
    with pytest.raises(RuntimeError, match="has not ended"):
        slao.begin_task()
    with pytest.raises(ValueError, match="patch_llama"):
        SLAO(tiny_model())
    with pytest.raises(ValueError, match="init must be"):
        SLAO(model, init="qr")
    with pytest.raises(ValueError, match="merge must be"):
        SLAO(model, merge="C")
    with pytest.raises(ValueError, match="lam must be"):
        SLAO(model, lam=1.5)
    assert "task_index=1" in repr(slao)


def test_merge_weight_schedules():
    assert merge_weight("inv_sqrt", 1) == 1.0 and merge_weight("inv_sqrt", 4) == 0.5
    assert merge_weight("inv", 4) == 0.25 and merge_weight(0.3, 1) == 1.0 and merge_weight(0.3, 7) == 0.3
    assert merge_weight("inv_sqrt", 9) == pytest.approx(1 / math.sqrt(9))
    assert slao_kernels.SLAO is SLAO

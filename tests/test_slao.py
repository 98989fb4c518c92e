"""The SLAO controller on a tiny Llama: the state machine against a hand-written
step-by-step reference of docs/design.md §1.2, the ablation switches, constant memory,
the optimizer pattern, and misuse."""

import math

import pytest
import torch
from conftest import fake_finetune, tiny_model

import slao_kernels
from slao_kernels import SLAO, LoRAConfig, patch_llama
from slao_kernels.continual import merge_weight


def patched(**kw):
    model = tiny_model()
    patch_llama(model, LoRAConfig(rank=4, targets=("q_proj", "v_proj")))
    return model, SLAO(model, **kw)


def sign_fixed_q_t(A):
    Q, R = torch.linalg.qr(A.double().t())
    return (Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0)).t().float()


def reference_run(A1, B1, tasks, lam, init, merge, finetune_deltas):
    """docs/design.md §1.2 written out for one layer, with explicit A_ft/B_ft/A_merge/B_merge."""
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


EXPECTED_LAMBDAS = {"inv_sqrt": [1.0, 0.7071067811865476, 0.5773502691896258, 0.5],  # 1/√i, written out
                    "inv": [1.0, 0.5, 1 / 3, 0.25], 0.5: [1.0, 0.5, 0.5, 0.5]}


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
        assert slao.end_task() == pytest.approx(EXPECTED_LAMBDAS[lam][i - 1])
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


def test_model_holds_merged_adapter_after_end_task():
    """After task 2 the model computes W0 + s·B_merge,2·A_ft,2 with B_merge,2 = B_ft,1 + (B_ft,2 − B_ft,1)/√2,
    checked against the merged weights built by hand in fp64 and put into a reverted copy of the model."""
    model, slao = patched()
    ids = torch.randint(0, 96, (2, 8))
    fts = []
    for i in range(1, 3):
        slao.begin_task()
        fake_finetune(slao, i)
        fts.append({n: (m.lora_A.detach().double().clone(), m.lora_B.detach().double().clone())
                    for n, m in slao.modules.items()})
        slao.end_task()
    with torch.no_grad():
        logits = model(ids).logits.double()
    torch.manual_seed(0)  # the seed patched() built the model under (conftest): the same base weights
    expected_model = tiny_model().double()
    with torch.no_grad():
        for n, m in slao.modules.items():
            (_, B1), (A2, B2) = fts[0][n], fts[1][n]
            B_merge = B1 + (B2 - B1) / math.sqrt(2)
            expected_model.get_submodule(n).weight.add_(m.scaling * B_merge @ A2)
        want = expected_model(ids).logits
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-4)  # fp32 model vs fp64: a few fp32 roundings
    torch.manual_seed(0)
    base_logits = tiny_model().double()(ids).logits
    assert (logits - base_logits).abs().max() > 1e-2  # the adapter does change the output


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
    for _ in range(3):
        slao.begin_task()
        opt = torch.optim.AdamW(list(slao.parameters()), lr=1e-2, weight_decay=0.0)
        ids_now = [id(p) for p in slao.parameters()]
        assert params_ids is None or ids_now == params_ids
        params_ids = ids_now
        model.train()
        for step in range(2):
            before = [p.detach().clone() for p in slao.parameters()]
            loss = model(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            grads = [p.grad.clone() for p in slao.parameters()]
            opt.step()
            if step == 0:
                # a fresh Adam's first step is lr·g/(|g| + eps) per entry: exactly ±lr wherever |g| ≫ eps.
                # Moments carried over from an earlier task would give other step sizes.
                checked = 0
                for p, p0, g in zip(slao.parameters(), before, grads, strict=True):
                    big = g.abs() > 1e-4  # (on task 1, B = 0 gives A no gradient at all)
                    checked += int(big.sum())
                    torch.testing.assert_close((p0 - p.detach())[big], 1e-2 * torch.sign(g[big]),
                                               rtol=1e-3, atol=0)
                assert checked > 100
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


# ----------------------------------------------------------------------------- transactions (issue 12)


def state(slao):
    """Everything the controller and the model's adapters hold, copied."""
    tensors = {}
    for n, m in slao.modules.items():
        tensors[f"{n}.A"], tensors[f"{n}.B"] = m.lora_A.detach().clone(), m.lora_B.detach().clone()
        for key, buffers in (("bufB", slao._b_other), ("bufA", slao._a_other)):
            if n in buffers:
                tensors[f"{n}.{key}"] = buffers[n].clone()
    return {"tensors": tensors, "task_index": slao.task_index, "in_task": slao.in_task}


def assert_same_state(got, want):
    assert (got["task_index"], got["in_task"]) == (want["task_index"], want["in_task"])
    assert sorted(got["tensors"]) == sorted(want["tensors"])
    for k, t in want["tensors"].items():  # bit for bit, NaN where NaN was
        torch.testing.assert_close(got["tensors"][k], t, rtol=0, atol=0, equal_nan=True, msg=lambda m, k=k: f"{k}: {m}")


MODES = [("orthogonal", "B"), ("orthogonal", "A"), ("orthogonal", "AB"), ("orthogonal", "none"),
         ("last_ft", "B"), ("last_merge", "B"), ("last_merge", "AB"), ("random", "B")]


@pytest.mark.parametrize("init,merge", MODES)
@pytest.mark.parametrize("factor", ["lora_A", "lora_B"])
@pytest.mark.parametrize("task", [1, 2])
def test_end_task_refuses_a_non_finite_factor_and_changes_nothing(init, merge, factor, task):
    torch.manual_seed(0)
    model, slao = patched(init=init, merge=merge)
    torch.manual_seed(0)
    clean_model, clean = patched(init=init, merge=merge)  # the same run without the fault
    for i in range(1, task + 1):
        for c in (slao, clean):
            torch.manual_seed(i)  # the random-init ablation draws: the same in both runs
            c.begin_task()
            fake_finetune(c, i)
        if i < task:
            slao.end_task()
            clean.end_task()
    name = "model.layers.1.self_attn.v_proj"
    param = getattr(slao.modules[name], factor)
    good = param.detach().clone()
    with torch.no_grad():
        param[0, 0] = float("nan")
    before = state(slao)
    with pytest.raises(ValueError, match=rf"end_task\(\): not finite .*{name}\.{factor}.*nothing merged"):
        slao.end_task()
    assert_same_state(state(slao), before)  # in the task still, the bad adapter where it was, buffers intact
    with torch.no_grad():
        param.copy_(good)  # the user fixes it: the retry merges as if nothing had happened
    assert slao.end_task() == clean.end_task()
    assert_same_state(state(slao), state(clean))


def finished(init: str, merge: str, tasks: int):
    """``(model, slao)`` after ``tasks`` finished tasks, each begun under seed 7 and fake-fine-tuned."""
    torch.manual_seed(0)
    model, slao = patched(init=init, merge=merge)
    for i in range(1, tasks + 1):
        torch.manual_seed(7)
        slao.begin_task()
        fake_finetune(slao, i)
        slao.end_task()
    return model, slao


@pytest.mark.parametrize("init,merge", MODES)
@pytest.mark.parametrize("task", [1, 3])
def test_abort_task_restores_the_state_before_begin_task_bit_for_bit(init, merge, task):
    model, slao = finished(init, merge, task - 1)
    before = state(slao)
    adapter_bytes = slao.state_bytes()
    torch.manual_seed(7)
    slao.begin_task()
    # during the task: one extra copy of each layer's A and B, whatever the number of tasks
    own = sum(p.numel() * p.element_size() for p in slao.parameters())
    assert slao.state_bytes() == adapter_bytes + own
    fake_finetune(slao, task)
    with torch.no_grad():
        slao.modules["model.layers.0.self_attn.q_proj"].lora_B[1, 2] = float("inf")  # diverged
    with pytest.raises(ValueError, match="not finite"):
        slao.end_task()
    assert slao.abort_task() == task - 1
    assert_same_state(state(slao), before)
    assert slao.state_bytes() == adapter_bytes
    # the retried task gives what a run that never failed gives
    torch.manual_seed(7)
    slao.begin_task()
    fake_finetune(slao, task)
    slao.end_task()
    _, clean = finished(init, merge, task)
    assert_same_state(state(slao), state(clean))


class Crash(Exception):
    pass


@pytest.mark.parametrize("init,merge", MODES)
@pytest.mark.parametrize("task", [1, 2])
@pytest.mark.parametrize("at", ["merge", "allocation"])
def test_end_task_failing_after_its_checks_changes_nothing(init, merge, task, at, monkeypatch):
    """The reported bug: an end_task that failed after its checks (out of memory allocating the buffers,
    the merge raising on its second factor, Ctrl-C) had already swapped some factors: the task was still
    open but the model held part of the merge, and abort_task then restored the wrong adapter. Now every
    allocation and the merge happen on new tensors first and the model changes only after: a failure leaves
    the task open as it was, and abort_task restores the state before begin_task bit for bit."""
    import slao_kernels.continual.slao as slao_module

    model, slao = finished(init, merge, task - 1)
    before_task = state(slao)
    torch.manual_seed(7)
    slao.begin_task()
    fake_finetune(slao, task)
    before_end = state(slao)
    calls = []
    if at == "merge":  # the last merge call of this end_task raises (the second factor's with merge="AB")
        real = slao_module.scaled_merge_
        expected = merge.count("A") + merge.count("B") if task > 1 else 0

        def merge_fn(*args, **kwargs):
            calls.append(1)
            if len(calls) == expected:
                raise Crash
            return real(*args, **kwargs)
        if expected == 0:
            pytest.skip("no merge call in this end_task")
        monkeypatch.setattr(slao_module, "scaled_merge_", merge_fn)
    else:  # the allocation of the last layer's staged tensor raises (out of memory)
        real_empty = torch.empty_like
        last = list(slao.modules.values())[-1]

        def empty_like(t, *args, **kwargs):
            if t is last.lora_A or t is last.lora_B:
                raise Crash
            return real_empty(t, *args, **kwargs)
        monkeypatch.setattr(slao_module.torch, "empty_like", empty_like)
    with pytest.raises(Crash):
        slao.end_task()
    monkeypatch.undo()
    assert_same_state(state(slao), before_end)  # the task open, the fine-tuned adapter in the model
    assert slao.abort_task() == task - 1
    assert_same_state(state(slao), before_task)


def test_abort_task_without_a_task_is_refused():
    _, slao = patched()
    with pytest.raises(RuntimeError, match="no task in progress"):
        slao.abort_task()


@pytest.mark.parametrize("where", ["model", "buffer"])
def test_begin_task_refuses_a_non_finite_adapter_and_changes_nothing(where):
    """NaN put in between tasks (by hand, a bad load) is refused before the init orthonormalizes it."""
    _, slao = patched()
    slao.begin_task()
    fake_finetune(slao, 1)
    slao.end_task()
    name = "model.layers.0.self_attn.v_proj"
    with torch.no_grad():
        target = slao.modules[name].lora_A if where == "model" else slao._b_other[name]
        target[0, 0] = float("nan")
    before = state(slao)
    with pytest.raises(ValueError, match=rf"begin_task\(\): not finite .*{name}.*nothing changed"):
        slao.begin_task()
    assert_same_state(state(slao), before)


def test_a_failing_init_is_undone(monkeypatch):
    """An error inside the init (after the swaps) leaves the controller as before begin_task()."""
    from slao_kernels.continual import slao as slao_module

    _, slao = patched()
    for i in (1, 2):
        slao.begin_task()
        fake_finetune(slao, i)
        slao.end_task()
    before = state(slao)

    def half_then_fail(params):
        with torch.no_grad():
            params[0].zero_()  # a partial write, then the failure
        raise RuntimeError("injected")
    monkeypatch.setattr(slao_module, "orthonormalize_rows_", half_then_fail)
    with pytest.raises(RuntimeError, match="injected"):
        slao.begin_task()
    assert_same_state(state(slao), before)

"""The runner's strategies: SLAO and the baselines of the literature, on a tiny Llama."""

import copy

import pytest
import torch
from conftest import interrupted_at_task, tiny_model, tiny_tokenizer

from slao_kernels import LoRAConfig, patch_llama
from slao_kernels.continual import PromptEncoder, RunConfig, TrainConfig, generated_suite, run_stream
from slao_kernels.continual.gradients import (
    full_weight_gradients,
    global_dots,
    lora_ga_factors,
    module_chunks,
    pcgrad,
    slice_factors,
    svd_factors,
)
from slao_kernels.continual.prompts import collate_answers
from slao_kernels.continual.strategies import STRATEGIES, make_strategy, orthogonality_penalty
from slao_kernels.continual.train import answer_loss
from slao_kernels.patching import lora_modules

LORA = LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _model(tokenizer):
    return tiny_model(vocab_size=len(tokenizer), max_position_embeddings=256, initializer_range=0.2)


def _tasks():
    return generated_suite("large,small,last_big", train_size=16, test_size=8)


def _run(tokenizer, strategy, options=None, out=None):
    config = RunConfig(lora=LORA, train=TrainConfig(steps=3, batch_size=4, lr=1e-2), eval_batch_size=8,
                       strategy=strategy, strategy_options=options or {})
    model = _model(tokenizer)
    report = run_stream(model, tokenizer, _tasks(), config, out=out, progress=False, log=lambda s: None)
    return model, report


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_runs_three_tasks_with_the_memory_it_claims(strategy, tokenizer, tmp_path):
    model, report = _run(tokenizer, strategy, out=str(tmp_path))
    assert report["status"] == "complete" and len(report["accuracy_matrix"]) == 3
    modules = lora_modules(model).values()
    adapter = sum(4 * (m.lora_A.numel() + m.lora_B.numel()) for m in modules)  # fp32
    assert adapter == 2 * 4 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)  # 2 layers of q (64→64) and v (64→32)
    b_buffer = sum(4 * m.lora_B.numel() for m in modules)
    expected = {"inclora": [adapter, 2 * adapter, 3 * adapter],  # O(T): one frozen adapter per past task
                "olora": [adapter, 2 * adapter, 3 * adapter],
                "slao": [adapter + b_buffer] * 3}  # constant: the adapter plus one B-sized buffer per layer
    assert report["adapter_bytes"] == expected.get(strategy, [adapter] * 3)
    for m in modules:
        assert m.lora_A.shape == (4, 64) and m.lora_A.requires_grad and not m.weight.requires_grad
        if strategy in ("inclora", "olora"):
            assert m.frozen_A.shape == (8, 64) and not m.frozen_A.requires_grad


def test_inclora_keeps_earlier_adapters_frozen(tokenizer):
    model = _model(tokenizer)
    patch_llama(model, LORA)
    s = make_strategy("inclora", model)
    m = next(iter(s.modules.values()))
    s.begin_task(None)
    with torch.no_grad():
        m.lora_B.normal_()
    trained = (m.lora_A.detach().clone(), m.lora_B.detach().clone())
    x = torch.randn(3, 64)
    before = m(x)
    s.begin_task(None)  # task 2: task 1's adapter is frozen, a fresh one (B = 0) trains
    torch.testing.assert_close(m(x), before, rtol=1e-5, atol=1e-5)
    assert torch.equal(m.frozen_A, trained[0]) and torch.equal(m.frozen_B, trained[1])
    assert all(p is not m.frozen_A for p in s.parameters()) and not m.lora_B.any()
    m(x).sum().backward()
    assert m.frozen_A.grad is None and not m.frozen_A.requires_grad
    # the trainable adapter's gradients, written out: y = ... + s·(x·Aᵀ)·Bᵀ with B = 0 gives
    # dA = s·Bᵀ·1·x = 0 and dB = s·1ᵀ·(x·Aᵀ)
    ones = torch.ones(3, m.out_features)
    torch.testing.assert_close(m.lora_A.grad, torch.zeros_like(m.lora_A))
    torch.testing.assert_close(m.lora_B.grad, m.scaling * ones.t() @ (x @ m.lora_A.detach().t()),
                               rtol=1e-5, atol=1e-5)


def test_olora_penalty_against_a_direct_computation(tokenizer):
    model = _model(tokenizer)
    patch_llama(model, LORA)
    s = make_strategy("olora", model, weight=0.3)
    s.begin_task(None)
    assert s.extra_loss() is None  # nothing to be orthogonal to on task 1
    s.begin_task(None)
    s.begin_task(None)  # two frozen adapters per layer now
    direct = 0.0
    for m in s.modules.values():
        for old in m.frozen_A.split(4):  # one r×n block per earlier task
            for i in range(4):
                for j in range(4):
                    direct += abs(float(old[i] @ m.lora_A[j].detach()))
    torch.testing.assert_close(s.extra_loss().double(), torch.tensor(0.3 * direct, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    penalty = orthogonality_penalty(list(s.modules.values()))
    penalty.backward()
    for m in s.modules.values():  # d/dA_new Σ |A_old·A_newᵀ| = sign(A_old·A_newᵀ)ᵀ·A_old, summed over old
        A_new = m.lora_A.detach()
        want = sum(torch.sign(old @ A_new.t()).t() @ old for old in m.frozen_A.split(4))
        torch.testing.assert_close(m.lora_A.grad, want, rtol=1e-5, atol=1e-6)


def test_pcgrad_on_hand_made_gradients():
    g_r = {"a": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([[0.0, 2.0]])}
    conflicting = {"a": torch.tensor([[-1.0, 1.0]]), "b": torch.tensor([[3.0, 1.0]])}
    full = pcgrad(conflicting, g_r, 1.0)
    assert torch.equal(full["a"], torch.tensor([[0.0, 1.0]]))  # projected onto the normal plane of g_r
    assert torch.equal(full["b"], conflicting["b"])  # ⟨g_c, g_r⟩ = 2 ≥ 0: unchanged
    half = pcgrad(conflicting, g_r, 0.5)
    assert torch.equal(half["a"], torch.tensor([[-0.5, 1.0]]))
    # global: one inner product over both modules (−1 + 2 = 1 ≥ 0): nothing projected
    glob = pcgrad(conflicting, g_r, 1.0, global_dots({n: (float((conflicting[n] * g_r[n]).sum()),
                                                          float((g_r[n] ** 2).sum())) for n in g_r}))
    assert all(torch.equal(glob[n], conflicting[n]) for n in g_r)
    # globally conflicting: −1 − 3 = −4 over ‖g_r‖² = 1 + 4: both modules move by 4/5·g_r
    worse = {"a": torch.tensor([[-1.0, 1.0]]), "b": torch.tensor([[0.0, -1.5]])}
    glob = pcgrad(worse, g_r, 1.0, global_dots({n: (float((worse[n] * g_r[n]).sum()), float((g_r[n] ** 2).sum()))
                                               for n in g_r}))
    total = sum(float((glob[n] * g_r[n]).sum()) for n in g_r)
    assert abs(total) < 1e-6 and torch.allclose(glob["a"], worse["a"] + 0.8 * g_r["a"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pcgrad(worse, g_r, 1.5)


def test_svd_inits_against_linalg_svd():
    g = torch.Generator().manual_seed(1)
    G = torch.randn(12, 10, generator=g, dtype=torch.float64).float()
    U, S, V = svd_factors(G, rank=3)  # q = min(12, 10) = 10: the whole spectrum, exactly
    U_ref, S_ref, Vh_ref = torch.linalg.svd(G.double(), full_matrices=False)
    torch.testing.assert_close(S.double(), S_ref, rtol=1e-5, atol=1e-5)
    # singular vectors are defined up to sign: compare |⟨u, u_ref⟩| = 1
    torch.testing.assert_close((U.double().T @ U_ref).diagonal().abs(), torch.ones(10, dtype=torch.float64),
                               rtol=0, atol=1e-4)
    torch.testing.assert_close((V.double().T @ Vh_ref.T).diagonal().abs(), torch.ones(10, dtype=torch.float64),
                               rtol=0, atol=1e-4)
    A, B = lora_ga_factors(G, rank=3, gamma=16.0)
    scale = 12 ** 0.25 / 4.0
    torch.testing.assert_close(A, V[:, :3].T * scale)
    torch.testing.assert_close(B, U[:, 3:6] * scale)
    W = torch.randn(12, 10, generator=g)
    A, B = slice_factors(G, W, rank=3)
    rho = torch.log(torch.tensor(3.0)) / torch.log(torch.tensor(10.0))
    torch.testing.assert_close((B @ A).var(), rho * W.var(), rtol=1e-4, atol=0)  # variance matched
    assert torch.allclose(A / A.norm(dim=1, keepdim=True), (V[:, 3:6].T / V[:, 3:6].T.norm(dim=1, keepdim=True)))


def _batch(tokenizer, n=6):
    task = _tasks()[0]
    enc = PromptEncoder(tokenizer)
    return collate_answers([enc.encode(task, r) for r in task.train[:n]], enc.pad_id)


def test_full_weight_gradients_equal_autograd_on_the_weight(tokenizer):
    model = _model(tokenizer)
    plain = copy.deepcopy(model)
    patch_llama(model, LORA)
    batch = _batch(tokenizer)
    modules = lora_modules(model)
    chunks = module_chunks(modules, max_bytes=2 * 4 * 64 * 64)
    assert [len(c) for c in chunks] == [2, 2]  # two 64×64 fp32 gradients per chunk
    grads = {}
    for chunk in chunks:
        grads.update(full_weight_gradients(model, modules, chunk, [batch, batch], answer_loss))
    for p in plain.parameters():
        p.requires_grad_(False)
    for n in modules:
        plain.get_submodule(n).weight.requires_grad_(True)
    answer_loss(plain, batch).backward()  # B = 0: the patched model computes the same function
    for n in modules:
        torch.testing.assert_close(grads[n], plain.get_submodule(n).weight.grad, rtol=1e-4, atol=1e-6)
    assert all(m.lora_A.grad is None for m in modules.values())  # the adapter's own grads are not kept
    with pytest.raises(ValueError, match="below what one layer needs"):
        module_chunks(modules, max_bytes=100)


@pytest.mark.parametrize("strategy", ["lora_ga", "slice"])
def test_gradient_inits_leave_the_output_unchanged_at_step_0(strategy, tokenizer):
    model = _model(tokenizer)
    patch_llama(model, LORA)
    tasks = _tasks()
    s = make_strategy(strategy, model, grad_batches=2)
    s.attach(PromptEncoder(tokenizer), TrainConfig(batch_size=4), tasks)
    batch = _batch(tokenizer)
    with torch.no_grad():
        before = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    s.begin_task(tasks[0])
    assert all(m.lora_B.abs().sum() > 0 for m in s.modules.values())  # a real init, not B = 0
    with torch.no_grad():
        after = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    # W0 − s·B·A, then + s·B·A through the adapter: fp32 rounding of the weight's scale
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_slice_chunked_gradients_give_the_same_init(tokenizer):
    """With the replay buffer non-empty and the global PCGrad, memory-tight chunking
    (two passes over the chunks) reaches exactly the adapters of one chunk."""
    tasks = _tasks()
    results = []
    for max_bytes in (None, 2 * 2 * 4 * 64 * 64):
        torch.manual_seed(0)
        model = _model(tokenizer)
        patch_llama(model, LORA)
        s = make_strategy("slice", model, grad_batches=2, buffer_per_task=4, max_gradient_bytes=max_bytes)
        s.attach(PromptEncoder(tokenizer), TrainConfig(batch_size=4), tasks)
        s.begin_task(tasks[0])
        s.end_task(tasks[0])
        assert len(s.buffer) == 4
        s.begin_task(tasks[1])
        results.append({n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in s.modules.items()})
    for n in results[0]:  # the same gradients, summed in the same order: the same bits
        assert torch.equal(results[1][n][0], results[0][n][0]) and torch.equal(results[1][n][1], results[0][n][1])


def test_multitask_trains_on_the_union_of_seen_tasks(tokenizer):
    model = _model(tokenizer)
    patch_llama(model, LORA)
    s = make_strategy("multitask", model)
    tasks = _tasks()
    assert s.training_tasks(tasks[2], tasks) == tasks
    with torch.no_grad():
        next(iter(s.modules.values())).lora_B.fill_(1.0)
    s.begin_task(tasks[1])  # every stage starts from a fresh adapter
    assert not any(m.lora_B.any() for m in s.modules.values())


@pytest.mark.parametrize("strategy,options", [("olora", {"weight": -1}), ("slice", {"c": 2.0}),
                                              ("slice", {"scope": "layer"}), ("lora_ga", {"grad_batches": 0}),
                                              ("slao", {"init": "svd"}), ("seqlora", {"lam": 0.5})])
def test_bad_strategy_options(strategy, options, tokenizer):
    model = _model(tokenizer)
    patch_llama(model, LORA)
    with pytest.raises(ValueError):
        make_strategy(strategy, model, **options)


@pytest.mark.parametrize("strategy", ["inclora", "slice"])
def test_resume_restores_frozen_adapters_and_replay_buffer(strategy, tokenizer, tmp_path):
    config = RunConfig(lora=LORA, train=TrainConfig(steps=2, batch_size=4, lr=1e-2), eval_batch_size=8,
                       strategy=strategy, strategy_options={"grad_batches": 1, "buffer_per_task": 4}
                       if strategy == "slice" else {})
    quiet = dict(progress=False, log=lambda s: None)
    torch.manual_seed(0)
    whole = run_stream(_model(tokenizer), tokenizer, _tasks(), config, out=str(tmp_path / "a"), **quiet)
    torch.manual_seed(0)  # the same base model in every run
    with interrupted_at_task(3):
        run_stream(_model(tokenizer), tokenizer, _tasks(), config, out=str(tmp_path / "b"), **quiet)
    torch.manual_seed(0)
    resumed = run_stream(_model(tokenizer), tokenizer, _tasks(), config, out=str(tmp_path / "b"), resume=True,
                         **quiet)
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"] and resumed["losses"] == whole["losses"]


@pytest.mark.parametrize("strategy,bad,message", [
    ("inclora", {"tasks_begun": "2"}, "field 'tasks_begun' must be an int >= 0"),
    ("inclora", {"tasks_begun": -1}, "field 'tasks_begun' must be an int >= 0"),
    ("inclora", {"tasks_begun": True}, "field 'tasks_begun' must be an int >= 0"),
    ("inclora", {"frozen_A_rows": 3}, r"frozen_A has shape \(3, 64\); the model needs \(-1, 64\)"),
    ("lora_ga", {"drop": "weight"}, r"only in the model \['model.layers.0.self_attn.q_proj.weight'\]"),
    ("seqlora", {"strategy": "inclora"}, "holds a 'inclora' checkpoint, not 'seqlora'"),
])
def test_a_malformed_strategy_checkpoint_is_refused_before_the_model_changes(strategy, bad, message, tokenizer,
                                                                           tmp_path):
    """Well-formed files (checksums right) whose content does not fit: refused, naming the field."""
    from slao_kernels.continual.checkpoint import save_checkpoint

    model = _model(tokenizer)
    patch_llama(model, LORA)
    s = make_strategy(strategy, model)
    s.attach(None, TrainConfig(), _tasks())
    tensors = {k: v.detach().clone() for k, v in s._state_tensors().items()}
    meta = {"strategy": strategy, **s._state_meta()}
    if "frozen_A_rows" in bad:
        first = next(iter(s.modules))
        tensors[f"{first}.frozen_A"] = torch.zeros(bad["frozen_A_rows"], 64)
        tensors[f"{first}.frozen_B"] = torch.zeros(64, bad["frozen_A_rows"])
    elif "drop" in bad:
        tensors.pop(f"{next(iter(s.modules))}.weight")
    else:
        meta.update(bad)
    save_checkpoint(str(tmp_path), {k: v + 1.0 for k, v in tensors.items()}, meta)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        s.load(str(tmp_path))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("strategy,exported", [("seqlora", True), ("inclora", False)])
def test_the_run_exports_a_peft_adapter_only_when_the_result_is_one_adapter(strategy, exported, tokenizer, tmp_path):
    config = RunConfig(lora=LORA, train=TrainConfig(steps=1, batch_size=4, lr=1e-2), eval_batch_size=8,
                       strategy=strategy)
    report = run_stream(_model(tokenizer), tokenizer, _tasks()[:2], config, out=str(tmp_path), progress=False,
                        log=lambda s: None)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists() == exported
    assert ("adapter" in report) == exported


# --- issue 16: one interface (a Protocol), a registry of (config, strategy) by name, typed configs ---


def test_every_registered_strategy_satisfies_the_protocol(tokenizer):
    import dataclasses

    from slao_kernels.continual.strategies import Strategy, StrategyConfig

    for name, entry in STRATEGIES.items():
        assert entry.strategy.name == name and entry.strategy.config_class is entry.config
        assert issubclass(entry.config, StrategyConfig) and entry.config.__dataclass_params__.frozen
        model = _model(tokenizer)
        patch_llama(model, LORA)
        s = make_strategy(name, model)
        assert isinstance(s, Strategy), name
        assert s.config() == entry.config().report()
        with pytest.raises(dataclasses.FrozenInstanceError):
            entry.config().__setattr__("x", 1)


def test_slao_config_declares_exactly_the_controllers_choices():
    import typing

    from slao_kernels.continual.slao import INITS, LAMBDAS, MERGES
    from slao_kernels.continual.strategies.config import SLAOConfig

    types = SLAOConfig.option_types()
    assert typing.get_args(types["init"]) == INITS and typing.get_args(types["merge"]) == MERGES
    assert typing.get_args(typing.get_args(types["lam"])[0]) == LAMBDAS


def test_configs_check_types_and_ranges_naming_the_field():
    from slao_kernels.continual.strategies.config import LoRAGAConfig, OLoRAConfig, SLAOConfig, SLICEConfig

    assert OLoRAConfig(weight=1).weight == 1.0 and type(OLoRAConfig(weight=1).weight) is float  # an int is a number
    assert SLAOConfig(lam=0.5).lam == 0.5 and SLAOConfig(lam="inv").lam == "inv"
    for cls, options, error, message in [
            (OLoRAConfig, {"weight": "0.5"}, TypeError, "OLoRAConfig.weight must be a number >= 0, got '0.5' (str)"),
            (OLoRAConfig, {"weight": float("nan")}, ValueError, "OLoRAConfig.weight must be a number >= 0"),
            (LoRAGAConfig, {"grad_batches": 2.0}, TypeError, "grad_batches must be an integer >= 1, got 2.0"),
            (LoRAGAConfig, {"grad_batches": True}, TypeError, "grad_batches must be an integer >= 1, got True"),
            (LoRAGAConfig, {"gamma": 0}, ValueError, "gamma must be a number > 0, got 0.0"),
            (SLAOConfig, {"lam": True}, TypeError, "lam must be inv_sqrt, inv or a number in (0, 1], got True"),
            (SLAOConfig, {"lam": 0}, ValueError, "lam must be inv_sqrt, inv or a number in (0, 1], got 0.0"),
            (SLAOConfig, {"init": "svd"}, ValueError, "init must be one of 'orthogonal', 'last_ft', 'last_merge', "
                                                      "'random', got 'svd'"),
            (SLICEConfig, {"max_gradient_bytes": 0}, ValueError, "an integer >= 1 or none, got 0")]:
        with pytest.raises(error) as raised:
            cls(**options)
        assert message in str(raised.value), raised.value
    # the report lists what the run's report listed before: the seed is an option, not a reported one
    assert list(SLICEConfig().report()) == ["grad_batches", "max_gradient_bytes", "c", "scope", "buffer_per_task"]
    assert list(LoRAGAConfig().report()) == ["grad_batches", "max_gradient_bytes", "gamma"]


def test_options_parse_from_text_by_their_declared_type():
    from slao_kernels.continual.strategies.config import LoRAGAConfig, OLoRAConfig, SLAOConfig, SLICEConfig

    assert SLAOConfig.parse_option("lam", "inv") == "inv" and SLAOConfig.parse_option("lam", "1") == 1.0
    assert SLICEConfig.parse_option("max_gradient_bytes", "none") is None
    assert SLICEConfig.parse_option("max_gradient_bytes", "4096") == 4096
    assert SLICEConfig.parse_option("scope", "module") == "module"
    assert type(OLoRAConfig.parse_option("weight", "1")) is float and LoRAGAConfig.parse_option("seed", "-3") == -3
    for cls, key, text, message in [(SLICEConfig, "scope", "none", "one of 'global', 'module', got 'none'"),
                                    (SLICEConfig, "buffer_per_task", "true", "an integer >= 0, got 'true'"),
                                    (SLAOConfig, "init", "Orthogonal", "got 'Orthogonal'"),
                                    (SLAOConfig, "lam", "nan", "a number in (0, 1], got 'nan'")]:
        with pytest.raises(ValueError, match="^" + key + " must be") as raised:
            cls.parse_option(key, text)
        assert message in str(raised.value)
    with pytest.raises(ValueError, match="has no option 'lr'; its options: \\['weight'\\]"):
        OLoRAConfig.parse_option("lr", "1")


def test_make_strategy_takes_a_config_or_options_and_refuses_the_wrong_config(tokenizer):
    from slao_kernels.continual.strategies.config import OLoRAConfig, SLICEConfig

    model = _model(tokenizer)
    patch_llama(model, LORA)
    assert make_strategy("olora", model, OLoRAConfig(weight=0.25)).config() == {"weight": 0.25}
    with pytest.raises(TypeError, match="strategy 'olora' takes a OLoRAConfig, got SLICEConfig"):
        make_strategy("olora", model, SLICEConfig())
    with pytest.raises(TypeError, match="not both"):
        make_strategy("olora", model, OLoRAConfig(), weight=0.5)
    with pytest.raises(ValueError, match=r"strategy 'olora' has no option\(s\) \['wieght'\]; its options: "):
        make_strategy("olora", model, wieght=1)
    with pytest.raises(ValueError, match="unknown strategy 'ewc'; available"):
        make_strategy("ewc", model)


def test_only_the_stacking_strategies_give_their_layers_frozen_adapters(tokenizer):
    from slao_kernels.nn import StackedLoRALinear

    for name in STRATEGIES:
        model = _model(tokenizer)
        patch_llama(model, LORA)
        before = lora_modules(model)
        s = make_strategy(name, model)
        after = lora_modules(model)
        assert all(after[n] is m for n, m in before.items())  # in place: the same modules
        stacked = {type(m) is StackedLoRALinear for m in after.values()}
        assert stacked == {name in ("inclora", "olora")}, name
        assert all(s.modules[n] is m for n, m in after.items())


def test_an_inclora_checkpoint_in_the_format_of_before_restores(tokenizer, tmp_path):
    """The tensors and fields IncLoRA wrote when LoRALinear held the frozen adapters: restored as they were."""
    from slao_kernels.continual.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = _model(tokenizer)
    patch_llama(model, LORA)
    tensors = {}
    for n, m in lora_modules(model).items():
        for f, shape in (("lora_A", m.lora_A.shape), ("lora_B", m.lora_B.shape),
                         ("frozen_A", (8, m.in_features)), ("frozen_B", (m.out_features, 8))):
            tensors[f"{n}.{f}"] = torch.randn(shape)
    save_checkpoint(str(tmp_path), tensors, {"strategy": "inclora", "tasks_begun": 3})
    s = make_strategy("inclora", model)
    s.load(str(tmp_path))
    assert s.tasks_begun == 3
    for n, m in s.modules.items():
        assert m.frozen_adapters == 2 and torch.equal(m.frozen_B, tensors[f"{n}.frozen_B"])
        x = torch.randn(2, m.in_features)
        A = torch.cat([tensors[f"{n}.frozen_A"], tensors[f"{n}.lora_A"]])
        B = torch.cat([tensors[f"{n}.frozen_B"], tensors[f"{n}.lora_B"]], dim=1)
        torch.testing.assert_close(m(x), x @ m.weight.t() + m.scaling * (x @ A.t()) @ B.t(), rtol=1e-4, atol=1e-4)


def test_a_slao_checkpoint_of_another_ablation_is_refused_before_the_model_changes(tokenizer, tmp_path):
    model = _model(tokenizer)
    patch_llama(model, LORA)
    writer = make_strategy("slao", model, init="random")
    writer.begin_task(None)
    with torch.no_grad():
        for p in writer.parameters():
            p.add_(1.0)
    writer.end_task(None)
    writer.save(str(tmp_path))
    fresh = _model(tokenizer)
    patch_llama(fresh, LORA)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="was written by SLAO\\(lam='inv_sqrt', init='random', merge='B'\\)"):
        make_strategy("slao", fresh).load(str(tmp_path))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())
    same = make_strategy("slao", fresh, init="random")
    same.load(str(tmp_path))
    assert same.slao.task_index == 1


def test_gradient_inits_fold_with_the_modules_own_merge(tokenizer):
    """end_task's W ← W + s·B·A is bit for bit LoRALinear.merge's fold."""
    model = _model(tokenizer)
    patch_llama(model, LORA)
    s = make_strategy("lora_ga", model)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in s.modules.values():
            m.lora_B.normal_()
    expected = {n: m.folded_weight(+1) for n, m in s.modules.items()}
    s.end_task(None)
    for n, m in s.modules.items():
        assert torch.equal(m.weight, expected[n]) and not m.lora_B.any()


def test_a_non_finite_gradient_init_fails_the_task_before_anything_is_installed(tokenizer, tmp_path, monkeypatch):
    import json

    from slao_kernels.continual import gradients
    from slao_kernels.continual.runner import TaskFailed

    real = gradients.lora_ga_factors

    def poisoned(*args, **kwargs):
        A, B = real(*args, **kwargs)
        return A * float("nan"), B
    model = _model(tokenizer)
    config = RunConfig(lora=LORA, train=TrainConfig(steps=1, batch_size=4, lr=1e-2), eval_batch_size=8,
                       strategy="lora_ga", strategy_options={"grad_batches": 1})
    monkeypatch.setattr(gradients, "lora_ga_factors", poisoned)
    with pytest.raises(TaskFailed, match=r"task 1 of 2 .* gradient init of .* is not finite"):
        run_stream(model, tokenizer, _tasks()[:2], config, out=str(tmp_path), progress=False, log=lambda s: None)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "failed" and report["failed_task"]["index"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())  # nothing installed


@pytest.mark.parametrize("strategy", ["lora_ga", "slice"])
@pytest.mark.parametrize("stage", ["end_task", "begin_task"])
def test_a_gradient_init_fold_that_overflows_changes_no_module(strategy, stage, tokenizer, monkeypatch):
    """The reported bug: folding module by module, a fold that overflowed at the k-th module had already
    rewritten the base weights of the modules before it (end_task reset their adapters too; begin_task
    installed their init), while the error said the adapters were left as training made them. Now every
    fold is checked before the first weight is written; the failure is the runner's FloatingPointError."""
    model = _model(tokenizer)
    patch_llama(model, LORA)
    tasks = _tasks()
    s = make_strategy(strategy, model, grad_batches=1)
    s.attach(PromptEncoder(tokenizer), TrainConfig(batch_size=4), tasks)
    names = list(s.modules)
    victim = s.modules[names[1]]  # the second module: the first one would be folded before it
    if stage == "end_task":
        s.begin_task(tasks[0])
        with torch.no_grad():  # finite factors whose product overflows fp32: W + s·B·A = inf
            victim.lora_A.fill_(1e30)
            victim.lora_B.fill_(1e30)
    else:  # the second module's gradient init made to overflow its base correction W − s·B·A
        from slao_kernels.continual import gradients

        name = "lora_ga_factors" if strategy == "lora_ga" else "slice_factors"
        real, calls = getattr(gradients, name), []

        def factors(*args, **kwargs):
            A, B = real(*args, **kwargs)
            calls.append(1)
            return (torch.full_like(A, 1e30), torch.full_like(B, 1e30)) if len(calls) == 2 else (A, B)
        monkeypatch.setattr(gradients, name, factors)
    before = {n: (m.weight.clone(), m.lora_A.clone(), m.lora_B.clone()) for n, m in s.modules.items()}
    with pytest.raises(FloatingPointError, match=names[1]):
        s.end_task(tasks[0]) if stage == "end_task" else s.begin_task(tasks[0])
    for n, m in s.modules.items():
        for got, want in zip((m.weight, m.lora_A, m.lora_B), before[n], strict=True):
            assert torch.equal(got, want), n

"""patch_llama / revert on tiny Hugging Face Llama-family models."""

import pytest
import torch
from conftest import tiny_model

from slao_kernels import LoRAConfig, LoRALinear, patch_llama, revert
from slao_kernels.patching import lora_modules


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _randomize_adapters(model):
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(std=0.1)


IDS = torch.randint(0, 96, (2, 12))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_patch_then_revert_is_bit_identical(arch):
    model = tiny_model(arch)
    before = _snapshot(model)
    with torch.no_grad():
        logits0 = model(IDS).logits
    originals = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))}
    names = patch_llama(model, LoRAConfig(rank=4, targets=("q_proj", "v_proj")))
    assert names == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, logits0, rtol=0, atol=1e-5)  # B = 0: same function
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{w}" for n in names for w in ("lora_A", "lora_B")}

    _randomize_adapters(model)
    restored = revert(model)
    assert restored == names
    assert not lora_modules(model)
    assert all(model.get_submodule(n) is m for n, m in originals.items())  # the same objects
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())  # flags from before patching


def test_patched_output_matches_manual_lora():
    model = tiny_model()
    patch_llama(model, LoRAConfig(rank=4, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj")))
    _randomize_adapters(model)
    with torch.no_grad():
        logits = model(IDS).logits
    revert(model, merge=True)  # the same adapters folded into the weights
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, logits, rtol=1e-4, atol=1e-4)


def test_idempotent_and_conflicting_repatch():
    model = tiny_model()
    cfg = LoRAConfig(rank=4)
    names = patch_llama(model, cfg)
    state = _snapshot(model)
    with pytest.warns(UserWarning, match="nothing changed"):
        assert patch_llama(model, cfg) == names
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="already has an adapter"):
        patch_llama(model, LoRAConfig(rank=2))
    # Extending to new targets keeps the old adapters.
    more = patch_llama(model, LoRAConfig(rank=4, targets=("q_proj", "v_proj", "o_proj")))
    assert set(names) < set(more)


def test_filter_fn_and_bad_targets():
    model = tiny_model()
    names = patch_llama(model, LoRAConfig(rank=2), filter_fn=lambda mod, fqn: ".layers.1." in fqn)
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    fresh = tiny_model()
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] match no nn.Linear.*q_proj"):
        patch_llama(fresh, LoRAConfig(targets=("q_proj", "qkv_proj")))
    with pytest.raises(ValueError, match="adapted no module"):
        patch_llama(fresh, LoRAConfig(), filter_fn=lambda mod, fqn: False)
    assert not lora_modules(fresh)
    with pytest.raises(ValueError, match="exceeds min"):
        patch_llama(fresh, LoRAConfig(rank=65))
    with pytest.raises(TypeError, match="must be a LoRAConfig"):
        patch_llama(fresh, {"rank": 4})


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank must be an int >= 1"), (dict(targets=()), "non-empty"),
    (dict(dropout=-0.1), "dropout"), (dict(dtype=torch.int8), "floating torch.dtype"),
])
def test_bad_config(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LoRAConfig(**kwargs)


def test_state_dict_roundtrip_and_to():
    model = tiny_model()
    patch_llama(model, LoRAConfig(rank=4))
    _randomize_adapters(model)
    sd = model.state_dict()
    assert "model.layers.0.self_attn.q_proj.weight" in sd and "model.layers.0.self_attn.q_proj.lora_A" in sd
    other = tiny_model()
    patch_llama(other, LoRAConfig(rank=4))
    other.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(other(IDS).logits, model(IDS).logits)
    other.to(torch.bfloat16)
    q = other.get_submodule("model.layers.0.self_attn.q_proj")
    assert q.weight.dtype == torch.bfloat16 and q.lora_A.dtype == torch.bfloat16
    with torch.no_grad():
        assert other(IDS).logits.dtype == torch.bfloat16
    revert(other)  # the restored nn.Linear holds the converted weight
    assert other.get_submodule("model.layers.0.self_attn.q_proj").weight.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate(dtype):
    model = tiny_model(dtype=dtype)
    patch_llama(model, LoRAConfig(rank=4))
    _randomize_adapters(model)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    out = model.generate(IDS[:1, :4], **kw)
    assert out.shape == (1, 9)
    if dtype == torch.float32:  # the same tokens as the adapter folded into the weights
        revert(model, merge=True)
        assert torch.equal(model.generate(IDS[:1, :4], **kw), out)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing(reentrant):
    def grads(checkpointing):
        torch.manual_seed(1)
        model = tiny_model()
        patch_llama(model, LoRAConfig(rank=4))
        _randomize_adapters(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model(IDS, labels=IDS).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and plain
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k])


def test_training_moves_only_adapters():
    model = tiny_model()
    base = _snapshot(model)
    patch_llama(model, LoRAConfig(rank=4))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    revert(model)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


# --- issue 12: all-or-nothing patch / revert, conflicting re-patch, config checked at construction ---


def _model_state(model):
    """Everything a failed patch or revert must leave as it was: which module object sits at each path,
    which Parameter object each module holds, the values, the requires_grad flags, every module's attributes,
    and the random generator the adapters' initialization draws from."""
    return {
        "modules": dict(model.named_modules(remove_duplicate=False)),
        "params": dict(model.named_parameters()),
        "own_params": {n: dict(m._parameters) for n, m in model.named_modules()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "values": _snapshot(model),
        "attrs": {n: sorted(vars(m)) for n, m in model.named_modules()},
        "merged": {n: m.merged for n, m in lora_modules(model).items()},
        "rng": torch.get_rng_state(),
    }


def _same_bits(a, b):
    """Bit-identical (NaN included, which torch.equal treats as unequal)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


def _assert_unchanged(model, before):
    after = _model_state(model)
    assert after["modules"].keys() == before["modules"].keys()
    changed = [n for n, m in before["modules"].items() if after["modules"][n] is not m]
    assert not changed, f"other module objects at {changed}"
    assert after["own_params"].keys() == before["own_params"].keys()
    for n, own in before["own_params"].items():
        assert after["own_params"][n].keys() == own.keys(), n
        assert all(after["own_params"][n][k] is p for k, p in own.items()), f"{n} holds other Parameters"
    assert after["params"].keys() == before["params"].keys()
    assert all(after["params"][n] is p for n, p in before["params"].items())
    assert after["flags"] == before["flags"]
    assert after["values"].keys() == before["values"].keys()
    assert all(_same_bits(after["values"][k], v) for k, v in before["values"].items())
    assert after["attrs"] == before["attrs"]
    assert after["merged"] == before["merged"]
    assert torch.equal(after["rng"], before["rng"])


def _small_kv_model():
    """hidden 64, 4 heads of 16: one key/value head makes k_proj and v_proj 64 -> 16 (q_proj is 64 -> 64)."""
    model = tiny_model(num_key_value_heads=1)
    model.model.embed_tokens.weight.requires_grad_(False)  # a non-default flag that must survive a failed patch
    return model


def test_patch_refusing_one_target_leaves_the_model_unchanged():
    model = _small_kv_model()
    before = _model_state(model)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj: LoRA rank 20 exceeds min.* = 16"):
        patch_llama(model, LoRAConfig(rank=20, targets=("q_proj", "k_proj")))
    _assert_unchanged(model, before)
    assert not hasattr(model, "_slao_requires_grad")
    # and the same model still patches cleanly afterwards
    assert len(patch_llama(model, LoRAConfig(rank=16, targets=("q_proj", "k_proj")))) == 4


class _InjectedError(RuntimeError):
    pass


@pytest.mark.parametrize("when", ["before_init", "after_init", "install"])
def test_patch_failing_midway_leaves_the_model_unchanged(monkeypatch, when):
    """A failure while building the 3rd adapter (before or after its LoRALinear took the base's Parameters
    over), or while installing the 3rd one, undoes everything done before it."""
    from slao_kernels import patching

    model = _small_kv_model()
    patch_llama(model, LoRAConfig(rank=4, targets=("o_proj",)))  # existing adapters and saved flags stay too
    _randomize_adapters(model)
    before = _model_state(model)
    calls = []

    real_init = LoRALinear.__init__

    def failing_init(self, *args, **kwargs):
        calls.append(1)
        if when == "before_init" and len(calls) == 3:
            raise _InjectedError("injected")
        real_init(self, *args, **kwargs)
        if when == "after_init" and len(calls) == 3:
            raise _InjectedError("injected")

    real_set = patching._set_submodule

    def failing_set(model, name, module):
        calls.append(1)
        if len(calls) == 3:
            raise _InjectedError("injected")
        real_set(model, name, module)

    if when == "install":
        monkeypatch.setattr(patching, "_set_submodule", failing_set)
    else:
        monkeypatch.setattr(LoRALinear, "__init__", failing_init)
    with pytest.raises(_InjectedError):  # raised on the 3rd call: 2 adapters were built or installed before
        patch_llama(model, LoRAConfig(rank=4, targets=("o_proj", "q_proj", "v_proj")))
    _assert_unchanged(model, before)


def test_patch_refuses_a_linear_shared_by_two_paths():
    model = tiny_model()
    layers = model.model.layers
    layers[1].self_attn.q_proj = layers[0].self_attn.q_proj
    before = _model_state(model)
    with pytest.raises(ValueError, match=r"also reachable as \['model\.layers\.1\.self_attn\.q_proj'\]"):
        patch_llama(model, LoRAConfig(rank=4, targets=("q_proj",)))
    _assert_unchanged(model, before)


@pytest.mark.parametrize("change,field,existing,requested", [
    (dict(rank=2), "rank", "4", "2"),
    (dict(alpha=32.0), "alpha", "16.0", "32.0"),
    (dict(dropout=0.1), "dropout", "0.0", "0.1"),
    (dict(rslora=True), "rslora", "False", "True"),
    (dict(dtype=torch.float64), "dtype", "torch.float32", "torch.float64"),
])
def test_repatch_with_a_different_field_raises_naming_it(change, field, existing, requested):
    model = tiny_model()
    patch_llama(model, LoRAConfig(rank=4, alpha=16.0))
    before = _model_state(model)
    cfg = LoRAConfig(**{"rank": 4, "alpha": 16.0, **change})
    with pytest.raises(ValueError) as err:
        patch_llama(model, cfg)
    msg = str(err.value)
    assert "already has an adapter" in msg
    assert f"{field} (existing {existing}, requested {requested})" in msg, msg
    _assert_unchanged(model, before)


def test_repatch_names_every_differing_field_and_accepts_the_same_adapter():
    model = tiny_model()
    patch_llama(model, LoRAConfig(rank=4, dropout=0.1))
    with pytest.raises(ValueError,
                       match=r"rank \(existing 4, requested 2\), dropout \(existing 0\.1, requested 0\.0\)"):
        patch_llama(model, LoRAConfig(rank=2))
    # dtype=None asks for the default adapter dtype of the base (fp32 here): the same adapter as dtype=float32
    with pytest.warns(UserWarning, match="nothing changed"):
        patch_llama(model, LoRAConfig(rank=4, dropout=0.1, dtype=torch.float32))


def test_revert_refusing_a_non_finite_merge_leaves_the_model_unchanged():
    model = tiny_model()
    patch_llama(model, LoRAConfig(rank=4))
    _randomize_adapters(model)
    bad = "model.layers.1.self_attn.v_proj"
    with torch.no_grad():
        model.get_submodule(bad).lora_B[0, 0] = float("nan")
    before = _model_state(model)
    with pytest.raises(ValueError, match=rf"revert\(merge=True\).*\['{bad}'\].*not be finite.*nothing was changed"):
        revert(model, merge=True)
    _assert_unchanged(model, before)
    assert hasattr(model, "_slao_requires_grad")
    # Without merging the adapter is simply dropped: the base weights come back bit-identical.
    assert bad in revert(model)
    assert not lora_modules(model)


@pytest.mark.parametrize("merge", [True, False])
def test_revert_failing_midway_leaves_the_model_unchanged(monkeypatch, merge):
    """merge=True: the 3rd module's s·B·A cannot be computed; merge=False: putting the 3rd linear back fails."""
    from slao_kernels import patching

    model = tiny_model()
    patch_llama(model, LoRAConfig(rank=4))
    _randomize_adapters(model)
    before = _model_state(model)
    calls = []
    if merge:
        real = LoRALinear.delta_weight

        def failing(self, factors=None):
            calls.append(1)
            if len(calls) == 3:
                raise _InjectedError("injected")
            return real(self, factors)

        monkeypatch.setattr(LoRALinear, "delta_weight", failing)
    else:
        real_set = patching._set_submodule

        def failing_set(model, name, module):
            calls.append(1)
            if len(calls) == 3:
                raise _InjectedError("injected")
            real_set(model, name, module)

        monkeypatch.setattr(patching, "_set_submodule", failing_set)
    with pytest.raises(_InjectedError):
        revert(model, merge=merge)
    _assert_unchanged(model, before)
    monkeypatch.undo()
    revert(model, merge=merge)  # and it still reverts afterwards
    assert not lora_modules(model)


@pytest.mark.parametrize("kwargs,exc,field", [
    (dict(alpha=float("nan")), ValueError, "LoRAConfig.alpha"),
    (dict(alpha=float("inf")), ValueError, "LoRAConfig.alpha"),
    (dict(alpha=-float("inf")), ValueError, "LoRAConfig.alpha"),
    (dict(alpha=10 ** 400), ValueError, "LoRAConfig.alpha"),
    (dict(alpha="16"), TypeError, "LoRAConfig.alpha"),
    (dict(alpha=None), TypeError, "LoRAConfig.alpha"),
    (dict(alpha=True), TypeError, "LoRAConfig.alpha"),
    (dict(alpha=1 + 2j), TypeError, "LoRAConfig.alpha"),
    (dict(rank=1, alpha=1e300), ValueError, "scaling"),  # beyond float32, the default adapter dtype
    (dict(rank=1, alpha=1e5, dtype=torch.float16), ValueError, "scaling"),  # beyond float16's 65504
    (dict(rslora="no"), TypeError, "LoRAConfig.rslora"),
    (dict(rslora=1), TypeError, "LoRAConfig.rslora"),
    (dict(rslora=None), TypeError, "LoRAConfig.rslora"),
    (dict(dropout=True), TypeError, "LoRAConfig.dropout"),
    (dict(dropout="0.1"), TypeError, "LoRAConfig.dropout"),
    (dict(dropout=float("nan")), ValueError, "LoRAConfig.dropout"),
    (dict(dropout=1.0), ValueError, "LoRAConfig.dropout"),
    (dict(dtype=torch.complex64), TypeError, "LoRAConfig.dtype"),
    (dict(dtype=torch.float8_e4m3fn), TypeError, "LoRAConfig.dtype"),
    (dict(dtype="float32"), TypeError, "LoRAConfig.dtype"),
    (dict(rank=2.0), TypeError, "LoRAConfig.rank"),
    (dict(rank=True), TypeError, "LoRAConfig.rank"),
    (dict(rank="4"), TypeError, "LoRAConfig.rank"),
    (dict(rank=-1), ValueError, "LoRAConfig.rank"),
    (dict(targets=5), TypeError, "LoRAConfig.targets"),
    (dict(targets=("q_proj", "")), ValueError, "LoRAConfig.targets"),
])
def test_bad_config_value_is_refused_at_construction(kwargs, exc, field):
    with pytest.raises(exc) as err:
        LoRAConfig(**kwargs)
    assert field in str(err.value) and "\n" not in str(err.value)


def test_config_values_are_normalized_and_large_valid_scalings_pass():
    import numpy as np

    cfg = LoRAConfig(rank=np.int64(4), alpha=8, targets=["q_proj"], dropout=np.float32(0.25))
    assert (type(cfg.rank), type(cfg.alpha), cfg.targets, type(cfg.dropout)) == (int, float, ("q_proj",), float)
    assert LoRAConfig(rank=1, alpha=1e300, dtype=torch.float64).alpha == 1e300  # representable in float64
    assert LoRAConfig(rank=1, alpha=65504.0, dtype=torch.float16).alpha == 65504.0  # float16's largest value


def test_patch_refuses_a_scaling_beyond_the_base_dtype():
    model = tiny_model(dtype=torch.float16)
    before = _model_state(model)
    # the fp32 adapter could hold 1e5, the fp16 base weights (max 65504) cannot
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: scaling .* overflows float16"):
        patch_llama(model, LoRAConfig(rank=1, alpha=1e5, dtype=torch.float32))
    _assert_unchanged(model, before)


@pytest.mark.parametrize("cfg", [
    LoRAConfig(),
    LoRAConfig(rank=3, alpha=7.5, targets=("q_proj", "down_proj"), dropout=0.05, rslora=True, dtype=torch.bfloat16),
])
def test_config_dict_roundtrip_through_json(cfg):
    import json

    d = cfg.to_dict()
    assert d["dtype"] == (None if cfg.dtype is None else "bfloat16") and d["targets"] == list(cfg.targets)
    assert LoRAConfig.from_dict(json.loads(json.dumps(d))) == cfg


def test_config_from_dict_defaults_and_dtype_names():
    assert LoRAConfig.from_dict({}) == LoRAConfig()
    assert LoRAConfig.from_dict({"dtype": "torch.float16"}).dtype == torch.float16


@pytest.mark.parametrize("d,named", [
    ([], "dict"),
    ({"ranks": 4}, "'ranks'"),
    ({"rank": 4, "lora_alpha": 8}, "'lora_alpha'"),
    ({"rank": "4"}, "LoRAConfig.rank"),
    ({"rank": 4.0}, "LoRAConfig.rank"),
    ({"alpha": None}, "LoRAConfig.alpha"),
    ({"targets": "q_proj"}, "LoRAConfig.targets"),
    ({"targets": [1]}, "LoRAConfig.targets"),
    ({"rslora": "no"}, "LoRAConfig.rslora"),
    ({"dropout": 1.5}, "LoRAConfig.dropout"),
    ({"dtype": "float8"}, "LoRAConfig.dtype"),
    ({"dtype": 32}, "LoRAConfig.dtype"),
])
def test_config_from_dict_refuses_malformed_input(d, named):
    with pytest.raises(ValueError) as err:
        LoRAConfig.from_dict(d)
    assert named in str(err.value)

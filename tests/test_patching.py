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

"""PEFT-format adapters against the real ``peft`` package, both ways.

``save_peft_adapter`` → ``peft.PeftModel.from_pretrained`` and PEFT's own
``save_pretrained`` → ``load_peft_adapter`` must give the same logits, with
plain and rank-stabilized scaling, dropout in the config, and several target
sets. The model PEFT wraps and the model we patch are separate objects built
from the same seed (PEFT modifies the model it wraps in place).

Tolerance: both sides compute ``x·W0ᵀ + s·(x·Aᵀ)·Bᵀ`` in fp32 with the same
weights, in different summation orders (PEFT: two nn.Linear calls and a scale;
here the fused kernel or its reference). One fp32 dot product of K terms is off
by at most γ_K ≈ K·u times the sum of its terms' magnitudes (u = 2⁻²⁴); for the
tiny model's K ≤ 96 that is ≈ 5.7e-6 at unit scale, and the logits are ~0.5.
Measured against fp64, PEFT's own fp32 logits are off by up to 3.5e-6 here and
ours by up to 5.4e-6 (the q/k adapters' error is amplified by the softmax).
``atol = rtol = 1e-5`` is about 2·γ_K: rounding, nothing more. Every case's
adapter moves the logits by more than 0.5, and a wrong scale (rsLoRA's alpha/√r
against alpha/r) by 0.3 to 0.8, so a semantic mismatch cannot hide in it; the
test asserts the adapter moves the logits by more than 1e-2.
"""

import json

import pytest
import torch
from conftest import tiny_model

peft = pytest.importorskip("peft")

from slao_kernels import LoRAConfig, load_peft_adapter, patch_llama, save_peft_adapter  # noqa: E402
from slao_kernels.patching import lora_modules  # noqa: E402

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CASES = [  # targets, rank, alpha, rslora, dropout
    (("q_proj", "v_proj"), 4, 8.0, False, 0.0),
    (("q_proj", "k_proj", "v_proj", "o_proj"), 8, 16.0, True, 0.1),
    (ALL, 4, 8.0, True, 0.0),
    (("o_proj", "gate_proj", "down_proj"), 2, 6.0, False, 0.05),
]
IDS = [f"{len(t)}targets-r{r}-{'rslora' if rs else 'lora'}-p{p}" for t, r, _, rs, p in CASES]
ATOL = RTOL = 1e-5  # ~2·γ_K for fp32 dot products of K ≤ 96 terms (see the module docstring)
SEED = 7


def base_model():
    """The tiny Llama every test starts from; the same weights on every call."""
    torch.manual_seed(SEED)
    return tiny_model()


def tokens():
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(11))


def logits(model):
    model.eval()  # dropout off on both sides: the configs carry it, inference does not apply it
    with torch.no_grad():
        return model(input_ids=tokens()).logits


def assert_same_logits(ours, theirs, plain):
    """Equal to fp32 rounding, and the adapter really changes the output (so a wrong scale would show)."""
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)
    assert (theirs - plain).abs().max() > 1e-2, "the adapter barely moves the logits: this test could not fail"


@pytest.mark.parametrize("targets,rank,alpha,rslora,dropout", CASES, ids=IDS)
def test_our_adapter_loads_in_peft_with_the_same_logits(tmp_path, targets, rank, alpha, rslora, dropout):
    ours = base_model()
    patch_llama(ours, LoRAConfig(rank=rank, alpha=alpha, targets=targets, rslora=rslora, dropout=dropout))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained-looking adapter: B ≠ 0 (patch_llama starts from B = 0)
        for m in lora_modules(ours).values():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.3)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
    save_peft_adapter(ours, str(tmp_path), base_model_name_or_path="tiny-llama")

    plain = logits(base_model())
    wrapped = peft.PeftModel.from_pretrained(base_model(), str(tmp_path))
    cfg = wrapped.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora, cfg.lora_dropout) == (rank, alpha, rslora, dropout)
    assert set(cfg.target_modules) == set(targets)
    wrapped_layers = {n.removeprefix("base_model.model.") for n, m in wrapped.named_modules()
                      if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped_layers == set(lora_modules(ours))
    assert_same_logits(logits(ours), logits(wrapped), plain)


@pytest.mark.parametrize("targets,rank,alpha,rslora,dropout", CASES, ids=IDS)
def test_peft_save_pretrained_loads_here_with_the_same_logits(tmp_path, targets, rank, alpha, rslora, dropout):
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout,
                             use_rslora=rslora, init_lora_weights=False,  # random A and B: a non-zero adapter
                             task_type="CAUSAL_LM")
    torch.manual_seed(5)
    theirs = peft.get_peft_model(base_model(), config)
    theirs.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"

    plain = logits(base_model())
    ours = base_model()  # unpatched: load_peft_adapter patches it from adapter_config.json
    loaded = load_peft_adapter(ours, str(tmp_path))
    modules = lora_modules(ours)
    assert sorted(modules) == loaded and {n.rpartition(".")[2] for n in modules} == set(targets)
    m = next(iter(modules.values()))
    assert (m.rank, m.alpha, m.rslora, m.dropout.p if hasattr(m.dropout, "p") else 0.0) == (
        rank, alpha, rslora, dropout)
    assert_same_logits(logits(ours), logits(theirs), plain)

    patched = base_model()  # already patched with the same shape: the adapter is loaded into it
    patch_llama(patched, LoRAConfig(rank=rank, alpha=alpha, targets=targets, rslora=rslora, dropout=dropout))
    load_peft_adapter(patched, str(tmp_path))
    torch.testing.assert_close(logits(patched), logits(ours), atol=0, rtol=0)  # same weights, same code path


def test_peft_round_trip_through_both_keeps_the_adapter_bit_for_bit(tmp_path):
    """ours → PEFT → PEFT's save_pretrained → ours: the factors come back unchanged."""
    ours = base_model()
    patch_llama(ours, LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "down_proj"), rslora=True))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for m in lora_modules(ours).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g))
    save_peft_adapter(ours, str(tmp_path / "ours"))
    wrapped = peft.PeftModel.from_pretrained(base_model(), str(tmp_path / "ours"))
    wrapped.save_pretrained(str(tmp_path / "theirs"))
    back = base_model()
    load_peft_adapter(back, str(tmp_path / "theirs"))
    for n, m in lora_modules(ours).items():
        other = lora_modules(back)[n]
        assert torch.equal(other.lora_A, m.lora_A) and torch.equal(other.lora_B, m.lora_B), n
        assert (other.alpha, other.rslora) == (m.alpha, m.rslora)

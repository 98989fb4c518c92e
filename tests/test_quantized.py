"""SLAO on a bitsandbytes-quantized frozen base (QLoRA-style), on CPU with a tiny Llama.

The reference for the base's output is bitsandbytes' own forward in *training* mode: in eval mode
without gradients it repacks 4-bit weights for CPU inference (on CPUs with AVX512-BF16) and runs
8-bit layers through LLM.int8() (quantized activations); the adapter's base follows the training-mode
product (docs/design.md §2.4), which is the one QLoRA training sees.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

from conftest import tiny_model, tiny_tokenizer  # noqa: E402

from slao_kernels import LoRAConfig, LoRALinear, patch_llama, revert  # noqa: E402
from slao_kernels.patching import LLAMA_PROJECTIONS, lora_modules  # noqa: E402
from slao_kernels.quantized import (  # noqa: E402
    QuantizedBaseError,
    QuantizedLoRALinear,
    dequantize_weight,
    quantize_linears,
    quantized_storage,
)

CONFIGS = {  # name -> BitsAndBytesConfig kwargs
    "nf4-fp32-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                            bnb_4bit_use_double_quant=True),
    "nf4-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
    "fp4-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
ALL = LoRAConfig(rank=4, alpha=8, targets=LLAMA_PROJECTIONS)  # every projection: no bitsandbytes forward runs


def load(model_dir, name="nf4-fp32-double"):
    """The tiny Llama of ``model_dir`` as from_pretrained quantizes it, in training mode (module docstring)."""
    config = transformers.BitsAndBytesConfig(**CONFIGS[name])
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config,
                                                              dtype=torch.float32)
    return model.train()


def storage(model):
    """A copy of every tensor of every quantized base (patched or not), by module path."""
    out = {}
    for path, m in model.named_modules():
        base = m._base if isinstance(m, QuantizedLoRALinear) else m
        if isinstance(base, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            out.update({f"{path}.{k}": v.detach().clone() for k, v in quantized_storage(base).items()})
    return out


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def ids(vocab, seed=0):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def randomize_B(model, std=0.05):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_zero_adapter_gives_the_quantized_base_exactly(model_dir, name):
    model = load(model_dir, name)
    x = ids(model.config.vocab_size)
    with torch.no_grad():
        before = model(x).logits
    patch_llama(model, ALL)
    assert all(isinstance(m, QuantizedLoRALinear) for m in lora_modules(model).values())
    with torch.no_grad():
        after = model(x).logits
    # Exact: the same dequantized weight in the same dtype, the same GEMM, and B = 0 adds an exact zero.
    assert torch.equal(after, before), (after - before).abs().max()


@pytest.mark.parametrize("name", ["nf4-fp32-double", "int8"])
def test_gradients_are_those_of_the_dequantized_model(model_dir, name):
    """dx, dA, dB through the quantized base equal those of plain LoRALinear modules on the dequantized weights."""
    quant = load(model_dir, name)
    plain = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    with torch.no_grad():
        for path, m in quant.named_modules():
            if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                plain.get_submodule(path).weight.copy_(dequantize_weight(m, torch.float32))
    patch_llama(quant, ALL)
    patch_llama(plain, ALL)
    for model in (quant, plain):
        randomize_B(model)
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.lora_A.copy_(torch.linspace(-0.2, 0.2, m.lora_A.numel()).reshape(m.lora_A.shape))
    x = ids(quant.config.vocab_size)
    grads = []
    for model in (quant, plain):
        model(x).logits.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 2
    for n in grads[0]:
        # Exact: the same fp32 tensors go through the same op (the dequantized W equals the plain model's copy).
        assert torch.equal(grads[0][n], grads[1][n]), n


def test_the_backward_keeps_no_dequantized_weight(model_dir):
    """Autograd saves nothing of the base's size: the backward dequantizes again."""
    model = load(model_dir)
    patch_llama(model, ALL)
    shapes = {(m.out_features, m.in_features) for m in lora_modules(model).values()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        loss = model(ids(model.config.vocab_size)).logits.square().mean()
    assert saved and not shapes & set(saved)
    loss.backward()  # and the backward still works, with no weight saved
    assert all(m.lora_A.grad is not None for m in lora_modules(model).values())
    # The check can fail: an fp32 model's plain LoRALinear does save its weight (out×in) for dx.
    plain = tiny_model(vocab_size=model.config.vocab_size, max_position_embeddings=256).train()
    patch_llama(plain, ALL)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        plain(ids(model.config.vocab_size)).logits.sum()
    assert shapes & set(saved)


def test_slao_tasks_train_and_leave_the_base_bit_identical(model_dir):
    from slao_kernels.continual import RunConfig, TrainConfig, generated_suite, run_stream

    tokenizer = tiny_tokenizer()
    model = load(model_dir)
    bases = {p: m for p, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    before = storage(model)
    config = RunConfig(lora=ALL, train=TrainConfig(steps=8, batch_size=4, lr=2e-2), eval_batch_size=8)
    tasks = generated_suite("large,small", train_size=32, test_size=8)
    report = run_stream(model, tokenizer, tasks, config, progress=False, log=lambda s: None)
    assert report["status"] == "complete"
    for losses in report["losses"]:  # each task's loss goes down over its steps
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert same(storage(model), before)  # the quantized storage was never written
    revert(model)
    for path, m in bases.items():  # the very module objects come back, with the same bytes
        assert model.get_submodule(path) is m
    assert same(storage(model), before)
    assert not lora_modules(model)


def test_revert_restores_the_modules_and_the_state_dict_round_trips(model_dir):
    model = load(model_dir, "fp4-fp32")
    sd0 = snapshot(model)
    mods = {p: m for p, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    patch_llama(model, ALL)
    randomize_B(model)
    sd = snapshot(model)
    lora_keys = {k for k in sd if k.endswith((".lora_A", ".lora_B"))}
    assert sd.keys() - lora_keys == sd0.keys() and all(torch.equal(sd[k], sd0[k]) for k in sd0)
    x = ids(model.config.vocab_size)
    with torch.no_grad():
        trained = model(x).logits
    # into a fresh copy: the same quantized base, the adapter written from the state dict
    fresh = load(model_dir, "fp4-fp32")
    patch_llama(fresh, ALL)
    fresh.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, trained)
    # a state dict whose base differs is refused (the quantized base is never overwritten)
    bad = dict(sd)
    key = "model.layers.0.self_attn.q_proj.weight.absmax"
    bad[key] = bad[key] * 2
    with pytest.raises(RuntimeError, match="never overwritten"):
        fresh.load_state_dict(bad)
    revert(model)
    assert {p: m for p, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)} == mods
    assert all(model.get_submodule(p) is m for p, m in mods.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    after = snapshot(model)
    assert after.keys() == sd0.keys() and all(torch.equal(after[k], sd0[k]) for k in sd0)


def test_merging_into_a_quantized_base_is_refused_and_changes_nothing(model_dir):
    model = load(model_dir)
    patch_llama(model, ALL)
    randomize_B(model)
    snap, kinds = snapshot(model), {p: type(m) for p, m in model.named_modules()}
    with pytest.raises(QuantizedBaseError,
                       match=r"model\.layers\.0\.self_attn\.q_proj and 13 more.*nf4.*revert\(model\)"):
        revert(model, merge=True)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    for call in (q.merge, q.unmerge, lambda: q.folded_weight(1)):
        with pytest.raises(QuantizedBaseError, match="bitsandbytes nf4 layer.*save_peft_adapter"):
            call()
    assert {p: type(m) for p, m in model.named_modules()} == kinds and not q.merged
    sd = snapshot(model)
    assert sd.keys() == snap.keys() and all(torch.equal(sd[k], snap[k]) for k in snap)


@pytest.mark.parametrize("strategy", ["lora_ga", "slice"])
def test_strategies_that_rewrite_the_base_refuse_it(model_dir, strategy):
    from slao_kernels.continual.strategies import make_strategy

    model = load(model_dir)
    patch_llama(model, ALL)
    randomize_B(model)
    snap = snapshot(model)
    with pytest.raises(QuantizedBaseError, match=r"rewrites the base weights.*model\.layers\.0.*quantized base"):
        make_strategy(strategy, model)
    sd = snapshot(model)
    assert all(torch.equal(sd[k], snap[k]) for k in snap)
    assert all(isinstance(m, QuantizedLoRALinear) for m in lora_modules(model).values())


def test_inclora_stacks_frozen_adapters_on_a_quantized_base(model_dir):
    from slao_kernels.nn import StackedLoRALinear

    model = load(model_dir)
    patch_llama(model, ALL)
    randomize_B(model)
    x = ids(model.config.vocab_size)
    with torch.no_grad():
        before = model(x).logits
    for m in lora_modules(model).values():
        StackedLoRALinear.install(m).freeze_adapter()
    m = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(m, StackedLoRALinear) and isinstance(m, QuantizedLoRALinear) and m.frozen_adapters == 1
    with torch.no_grad():
        after = model(x).logits
    # The frozen adapter is now added as one rank-2r product instead of rank r (B of the fresh one is 0):
    # the same terms in another summation order, so fp32 rounding (a few ulps of the logits' scale) only.
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    with pytest.raises(QuantizedBaseError):
        m.merge()


def test_a_repacked_4bit_layer_is_refused_before_anything_changes(model_dir):
    model = load(model_dir)
    layer = model.get_submodule("model.layers.1.self_attn.v_proj")
    # What bitsandbytes' eval forward without gradients does on AVX512-BF16 CPUs (it fails on this tiny
    # model's shapes, so the flag it sets is set here): the weight is then in its CPU inference layout.
    layer.weight.quant_state.packing_format_for_cpu = True
    before, modules = storage(model), dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.v_proj.*repacked.*load the model again"):
        patch_llama(model, ALL)
    assert dict(model.named_modules()) == modules  # the same module objects everywhere
    assert same(storage(model), before) and {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_quantize_linears_matches_from_pretrained_and_validates_first(model_dir):
    plain = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    snap = snapshot(plain)
    with pytest.raises(ValueError, match=r"quantization must be one of \['nf4', 'fp4', 'int8'\], got 'nf3'"):
        quantize_linears(plain, "nf3")
    with pytest.raises(TypeError, match="compute_dtype"):
        quantize_linears(plain, "nf4", compute_dtype=torch.int8)
    assert all(type(m) is not bnb.nn.Linear4bit for m in plain.modules()) and same(snapshot(plain), snap)
    paths = quantize_linears(plain, "nf4", compute_dtype=torch.float32, double_quant=True)
    assert len(paths) == 2 * 7
    reference = load(model_dir, "nf4-fp32-double")
    assert same(storage(plain), storage(reference))  # bitsandbytes' quantization, the same bytes as from_pretrained
    x = ids(plain.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(plain(x).logits, reference(x).logits)


def test_peft_loads_our_adapter_on_the_same_quantized_base(model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from slao_kernels import save_peft_adapter

    ours = load(model_dir)
    patch_llama(ours, ALL)
    randomize_B(ours)
    x = ids(ours.config.vocab_size)
    with torch.no_grad():
        mine = ours(x).logits
    save_peft_adapter(ours, str(tmp_path / "adapter"))
    theirs = peft.PeftModel.from_pretrained(load(model_dir), str(tmp_path / "adapter")).train()
    with torch.no_grad():
        other = theirs(x).logits
    # PEFT adds base(x) and the adapter's product as two fp32 tensors, our op in one fused pass:
    # summation order only, a few fp32 ulps of the logits' scale (~1e-7 relative; 1e-5 leaves room).
    torch.testing.assert_close(other, mine, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mine, load(model_dir)(x).logits, atol=1e-3)  # the adapter does change the logits


def test_we_load_peft_qlora_adapters(model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from slao_kernels import load_peft_adapter

    base = load(model_dir)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    theirs = peft.get_peft_model(base, config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    theirs.save_pretrained(str(tmp_path / "qlora"))
    x = ids(base.config.vocab_size)
    with torch.no_grad():
        expected = theirs.train()(x).logits
    ours = load(model_dir)
    loaded = load_peft_adapter(ours, str(tmp_path / "qlora"))
    assert len(loaded) == 2 * 3 and all(isinstance(m, QuantizedLoRALinear) for m in lora_modules(ours).values())
    with torch.no_grad():
        got = ours(x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # summation order only (as above)


def test_the_library_works_without_bitsandbytes():
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"  # any import of it fails
        "import slao_kernels, torch, transformers\n"
        "from slao_kernels.quantized import is_quantized_linear, quantize_linears\n"
        "m = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(vocab_size=32, hidden_size=16, "
        "intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))\n"
        "assert slao_kernels.patch_llama(m) and not is_quantized_linear(m.model.layers[0].mlp.up_proj)\n"
        "try:\n    quantize_linears(m, 'nf4')\nexcept ImportError as e:\n    assert 'slao_kernels[quant]' in str(e)\n"
        "else:\n    raise SystemExit('no ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-c", "import slao_kernels, sys; print('bitsandbytes' in sys.modules)"],
                         check=True, capture_output=True, text=True).stdout
    assert out.strip() == "False"  # import slao_kernels does not load it


def test_adapter_dtype_and_repatching(model_dir):
    model = load(model_dir, "nf4-bf16")
    patch_llama(model, ALL)
    m = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert m.lora_A.dtype == torch.float32 and isinstance(m, LoRALinear)
    with pytest.warns(UserWarning, match="already carry this adapter"):
        patch_llama(model, ALL)  # idempotent: the default fp32 adapter is the one requested
    with pytest.raises(ValueError, match="rank"):
        patch_llama(model, LoRAConfig(rank=2, alpha=8, targets=LLAMA_PROJECTIONS))


TINY_RUN = ["--order", "large,small", "--train-size", "16", "--test-size", "8", "--steps", "3", "--batch-size", "4",
            "--rank", "4", "--targets", ",".join(LLAMA_PROJECTIONS), "--quiet"]


def test_slao_run_quantize_records_it_in_the_report(model_dir, tmp_path):
    import json

    from slao_kernels.cli import main

    out = tmp_path / "run"
    assert main(["run", "--model", model_dir, "--out", str(out), *TINY_RUN, "--quantize", "nf4"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete" and report["config"]["quantize"] == "nf4"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # eval and export rebuild the run's model on the same quantized base, so eval gives the run's last row again
    from slao_kernels.cli.run import _run_report
    from slao_kernels.cli.runs import _model_with_run_adapter, _run_checkpoint
    from slao_kernels.patching import lora_modules
    from slao_kernels.quantized import QuantizedLoRALinear

    checkpoint = _run_checkpoint(str(out), _run_report(str(out)), "eval")
    rebuilt, _, _ = _model_with_run_adapter(str(out), report, checkpoint, "cpu", lambda line: None)
    modules = lora_modules(rebuilt)
    assert len(modules) == 2 * 7 and all(isinstance(m, QuantizedLoRALinear) for m in modules.values())
    result = tmp_path / "eval.json"
    assert main(["eval", str(out), "--json", str(result)]) == 0
    accuracies = json.loads(result.read_text())["results"]
    assert [accuracies[n]["accuracy"] for n in report["tasks"]] == report["accuracy_matrix"][-1]


def test_slao_run_quantize_refusals_come_before_the_model_loads(model_dir, tmp_path, capsys, monkeypatch):
    from slao_kernels.cli import main
    from slao_kernels.continual import models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", no_loading)
    out = tmp_path / "run"
    assert main(["run", "--model", model_dir, "--out", str(out), *TINY_RUN, "--quantize", "nf3"]) == 2
    assert "argument --quantize: invalid choice: 'nf3'" in capsys.readouterr().err
    assert main(["run", "--model", model_dir, "--out", str(out), *TINY_RUN, "--quantize", "int8",
                 "--strategy", "slice"]) == 2
    assert "--strategy slice rewrites the base weights" in capsys.readouterr().err
    assert not out.exists()


def test_at_most_one_dequantized_weight_is_alive_in_a_training_step(model_dir, monkeypatch):
    """The peak extra memory: one layer's dequantized weight, whatever the number of layers."""
    import weakref

    import slao_kernels.quantized as quantized

    alive, most, calls = [], [0], [0]
    real = quantized.dequantize_weight

    def counting(module, dtype):
        weight = real(module, dtype)
        alive.append(weakref.ref(weight))
        calls[0] += 1
        most[0] = max(most[0], sum(r() is not None for r in alive))
        return weight

    monkeypatch.setattr(quantized, "dequantize_weight", counting)
    model = load(model_dir)
    patch_llama(model, ALL)
    model(ids(model.config.vocab_size)).logits.square().mean().backward()
    # once per layer in the forward, once more in the backward for each dx: all but layer 0's q/k/v,
    # whose input (the frozen embeddings, normed) needs no gradient
    assert calls[0] == 14 + 11
    assert most[0] == 1


def test_slao_run_quantizes_only_the_adapted_projections(model_dir, tmp_path):
    """A 4-bit layer that bitsandbytes runs itself in eval mode without gradients (every evaluation)
    is repacked in place for CPU inference: quantizing a projection that has no adapter would change
    the base during the run (on the tiny model's shapes bitsandbytes' repacking even fails)."""
    import json

    import bitsandbytes as bnb

    from slao_kernels.cli import main
    from slao_kernels.continual.models import load_quantized_model

    model, _ = load_quantized_model(model_dir, "nf4", targets=("q_proj", "v_proj"))
    quantized = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)})
    plain = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if type(m) is torch.nn.Linear})
    assert quantized == ["q_proj", "v_proj"] and plain == ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj",
                                                           "up_proj"]
    out = tmp_path / "run"
    argv = [*TINY_RUN[:-2], "q_proj,v_proj", "--quiet"]
    assert main(["run", "--model", model_dir, "--out", str(out), *argv, "--quantize", "nf4"]) == 0
    assert json.loads((out / "report.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("name", ["nf4-fp32-double", "int8"])
def test_autocast_runs_the_quantized_base_in_the_autocast_dtype(model_dir, name):
    """Under autocast the base product runs in bf16 (as F.linear's and lora_linear's do), the backward
    too, and the fp32 adapter gets fp32 gradients; the logits equal the fp32 run's to bf16 rounding.
    (Before, the op's own autocast cast behind the saved tensors and the backward raised.)"""
    model = load(model_dir, name)
    patch_llama(model, ALL)
    randomize_B(model)
    tokens = ids(model.config.vocab_size)
    reference = model(tokens).logits.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens).logits
    logits.float().square().mean().backward()
    grads = [m.lora_A.grad for m in lora_modules(model).values()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert logits.dtype == torch.bfloat16 and not torch.equal(logits.float(), reference)  # it did run in bf16
    # each bf16 product rounds its inputs and its output at 2⁻⁸ relative, and a token's path runs through
    # 19 of them (per layer 7 projections and the attention's 2 matmuls, 2 layers, then the head): at most
    # 19 such steps at the logits' scale (measured 0.15-0.20 at a scale of 6-7, with 1 or 2 threads)
    bound = 19 * 2.0**-8 * reference.abs().max().item()
    assert (logits.float() - reference).abs().max().item() <= bound

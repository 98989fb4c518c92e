"""A whole SmolLM2-135M training step, the figure users feel: our adapter against PEFT's and
against the frozen model alone.

One step = forward with Hugging Face's loss, backward, AdamW step (the training loop's own,
``slao_kernels.continual.train.adamw``: fused, for both adapters), zero_grad; batch 4 × 128
tokens, r=8 (alpha 16) on all seven projections of every layer, fp32, on the CPU. Variants:

* ``frozen``: no adapter, every weight frozen, backward through every layer
  (``enable_input_require_grads``): the floor, what any adapter's step costs at least;
* ``slao``: ``patch_llama`` (our fused op);
* ``peft``: PEFT's LoRA (``get_peft_model``), the eager composition most users run.

The model is SmolLM2-135M's architecture with random weights (the speed does not depend on
their values; no model file is needed). The target (``-m target``): our step within 1.05× the
frozen model's, timed round-robin in one run so a drifting machine slows every variant alike.
"""

import pytest
import torch

from slao_kernels import benchmarking as bench
from slao_kernels.continual.train import adamw

BATCH, TOKENS, RANK = 4, 128, 8
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STEP_TARGET = 1.05  # slao step / frozen step


def smollm2(seed: int = 0):
    """SmolLM2-135M's architecture (30 layers, 576 / 1536, 9 heads, 3 kv heads) with random weights."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                      max_position_embeddings=2048, tie_word_embeddings=True,
                                      attn_implementation="sdpa")
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()  # eval: no dropout, as in the adapter's own training


def training_step(variant: str, seed: int = 0):
    """``(setup, step)`` of one variant, as :func:`slao_kernels.benchmarking.time_interleaved` takes them."""
    model = smollm2(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    if variant == "frozen":
        model.enable_input_require_grads()
    elif variant == "slao":
        from slao_kernels import LoRAConfig, patch_llama

        patch_llama(model, LoRAConfig(rank=RANK, alpha=2 * RANK, targets=TARGETS))
    elif variant == "peft":
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(TARGETS),
                                                           lora_dropout=0.0))
    else:
        raise ValueError(f"variant must be frozen, slao or peft, got {variant!r}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(trainable, lr=1e-4) if trainable else None
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, TOKENS), generator=generator)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return (lambda: ()), step


@pytest.mark.parametrize("variant", ("frozen", "slao", "peft"))
def test_training_step(benchmark, variant):
    setup, step = training_step(variant)
    benchmark.group = f"SmolLM2-135M training step, {BATCH}x{TOKENS} tokens, r={RANK} on 7 projections"
    benchmark.pedantic(step, setup=lambda: (setup(), {}), rounds=5, warmup_rounds=1)


@pytest.mark.target
def test_cpu_target_training_step_vs_frozen_model(benchmark):
    """Our step ≤ 1.05× the frozen model's (and reported against PEFT's), medians of interleaved rounds."""
    if torch.cuda.is_available():
        pytest.skip("CPU target")
    cases = {v: training_step(v) for v in ("frozen", "slao", "peft")}
    t = bench.time_interleaved(cases, "cpu", rounds=8, warmup=2, min_round_s=0.0)
    ratios = {"slao/frozen": t["slao"] / t["frozen"], "peft/frozen": t["peft"] / t["frozen"],
              "slao/peft": t["slao"] / t["peft"]}
    benchmark.extra_info.update({k: round(v, 3) for k, v in ratios.items()})
    benchmark.extra_info.update({f"{k}_s": round(v, 3) for k, v in t.items()})
    benchmark.pedantic(cases["slao"][1], rounds=1)
    assert ratios["slao/frozen"] <= STEP_TARGET, f"slao step / frozen step = {ratios['slao/frozen']:.3f} (s: {t})"

"""pytest-benchmark of one training step on a quantized base: NF4 (ours) vs fp32 (ours) vs PEFT + bitsandbytes.

    pytest benchmarks/test_quantized.py                  the smoke size (2 layers of SmolLM2-135M's shapes)
    SLAO_QUANT_BENCH_LAYERS=30 pytest benchmarks/test_quantized.py    the whole SmolLM2-135M geometry

A Llama of SmolLM2-135M's layer shapes (hidden 576, MLP 1536, 9 heads, 3 KV heads; a 512-token
vocabulary, so the head does not dominate), adapters of rank 8 on the seven projections, one batch of
2×64 tokens, a forward, a backward and an SGD step. Three cases on the same weights and batch:

* ``nf4``: our adapters on the NF4 base (double quantization, fp32 compute), dequantized per layer;
* ``fp32``: our adapters on the fp32 base;
* ``peft``: PEFT's LoRA on the same NF4 bitsandbytes layers (QLoRA).

Targets (ratios measured in the same run, interleaved round-robin): the quantized base's storage
≤ 0.3× the fp32 projections' bytes, and the NF4 step ≤ 1.0× PEFT's QLoRA step (a 10% allowance for
the shared machine's noise). The peak extra memory of a step (peak RSS over the RSS after building
the model, in a fresh process per case) is reported, not asserted: RSS includes the allocator's caching.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest
import torch

LAYERS = int(os.environ.get("SLAO_QUANT_BENCH_LAYERS", "2"))
TOKENS = (2, 64)
CASES = ("nf4", "fp32", "peft")


def build(case: str):
    """``(model, trainable parameters, batch)`` of a case (module docstring), deterministic."""
    import transformers

    from slao_kernels import LoRAConfig, patch_llama
    from slao_kernels.patching import LLAMA_PROJECTIONS
    from slao_kernels.quantized import quantize_linears

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=576, intermediate_size=1536,
                                      num_hidden_layers=LAYERS, num_attention_heads=9, num_key_value_heads=3,
                                      max_position_embeddings=256, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).train()
    if case in ("nf4", "peft"):
        quantize_linears(model, "nf4", compute_dtype=torch.float32, double_quant=True)
    if case == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(LLAMA_PROJECTIONS),
                                                           lora_dropout=0.0))
    else:
        patch_llama(model, LoRAConfig(rank=8, alpha=16, targets=LLAMA_PROJECTIONS))
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, 512, TOKENS, generator=torch.Generator().manual_seed(1))
    return model, params, ids


def step(model, params, ids):
    """One training step: forward, loss, backward, SGD update."""
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    with torch.no_grad():
        for p in params:
            p.sub_(1e-3 * p.grad)
            p.grad = None


def base_bytes(model) -> int:
    """Bytes of the projections' frozen base weights (quantized storage included) in ``model``."""
    from slao_kernels.patching import LLAMA_PROJECTIONS, lora_modules
    from slao_kernels.quantized import QuantizedLoRALinear, quantized_storage

    total = 0
    for m in lora_modules(model).values():
        if isinstance(m, QuantizedLoRALinear):
            total += sum(t.numel() * t.element_size() for k, t in quantized_storage(m._base).items() if k != "bias")
        else:
            total += m.weight.numel() * m.weight.element_size()
    assert len(lora_modules(model)) == LAYERS * len(LLAMA_PROJECTIONS)
    return total


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def peak_extra_kib(case: str) -> int:
    """In a fresh process: peak RSS during 3 steps minus the RSS after building the model (KiB)."""
    out = subprocess.run([sys.executable, __file__, case], check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_kib"]


@pytest.mark.target
def test_nf4_step_memory_and_speed_vs_fp32_and_peft_qlora(benchmark):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    from slao_kernels import benchmarking as bench

    built = {c: build(c) for c in CASES}
    fp32_bytes, nf4_bytes = base_bytes(built["fp32"][0]), base_bytes(built["nf4"][0])
    cases = {c: ((lambda b=b: b), step) for c, b in built.items()}
    t = bench.time_interleaved(cases, "cpu", rounds=int(os.environ.get("SLAO_QUANT_BENCH_ROUNDS", "10")), warmup=2)
    peaks = {c: peak_extra_kib(c) for c in CASES}
    one_layer = 1536 * 576 * 4 // 1024  # the largest projection dequantized to fp32, KiB
    info = {"layers": LAYERS, "tokens": TOKENS[0] * TOKENS[1], "base_bytes_fp32": fp32_bytes,
            "base_bytes_nf4": nf4_bytes, "base_ratio": round(nf4_bytes / fp32_bytes, 4),
            **{f"{c}_step_ms": round(v * 1e3, 2) for c, v in t.items()},
            "nf4/peft": round(t["nf4"] / t["peft"], 3), "nf4/fp32": round(t["nf4"] / t["fp32"], 3),
            **{f"{c}_peak_extra_kib": v for c, v in peaks.items()}, "one_layer_dequantized_kib": one_layer}
    benchmark.extra_info.update(info)
    print(json.dumps(info))
    benchmark.pedantic(step, setup=lambda: (built["nf4"], {}), rounds=3)
    assert nf4_bytes <= 0.3 * fp32_bytes, info
    assert t["nf4"] <= 1.10 * t["peft"], info


if __name__ == "__main__":  # one case's peak memory, in this fresh process (peak_extra_kib)
    model, params, ids = build(sys.argv[1])
    before = _rss_kib()
    for _ in range(3):
        step(model, params, ids)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, over the whole process
    print(json.dumps({"peak_extra_kib": max(0, peak - before)}))

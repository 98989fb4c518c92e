"""pytest-benchmark suite of slao::lora_linear, and its speed targets.

    pytest benchmarks/                         every provider × mode × shape, plus the targets
    pytest benchmarks/ -m target               the targets only
    pytest benchmarks/ --benchmark-json F      keep the numbers

Shapes: SmolLM2-135M on CPU, Llama-3-8B on a GPU (``slao_kernels.benchmarking``).
Targets are ratios measured in the same run, interleaved round-robin
(``bench.time_interleaved``) so a drifting machine slows every provider alike.
"""

import pytest
import torch

from slao_kernels import benchmarking as bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = bench.default_shapes(DEVICE)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU target: needs a CUDA device")


@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("provider", bench.PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_lora_linear(benchmark, shape, provider, mode):
    setup, run = bench.make_case(shape, provider, mode, DEVICE)
    benchmark.group = f"lora_linear {shape.name} {mode}"
    benchmark.extra_info.update(device=DEVICE, tokens=shape.tokens, in_features=shape.in_features,
                                out_features=shape.out_features, rank=shape.rank, dtype=str(shape.dtype))
    benchmark.pedantic(bench.synchronized(run, DEVICE), setup=lambda: (setup(), {}), rounds=20, warmup_rounds=3)


def _ratios(shape, mode, device, rounds=60):
    cases = {p: bench.make_case(shape, p, mode, device) for p in bench.PROVIDERS}
    t = bench.time_interleaved(cases, device, rounds=rounds)
    return {p: t["slao"] / t[p] for p in bench.PROVIDERS}, t


@pytest.mark.target
def test_cpu_target_full_step_vs_peft_eager(benchmark):
    """CPU, SmolLM2 q_proj (576→576, 512 tokens, r=8, fp32): forward+backward ≤ 0.90× PEFT-style eager."""
    shape = bench.CPU_SHAPES[0]
    ratio, t = _ratios(shape, "full", "cpu")
    benchmark.extra_info.update({f"slao/{p}": round(r, 3) for p, r in ratio.items()})
    benchmark.extra_info.update({f"{p}_ms": round(v * 1e3, 3) for p, v in t.items()})
    setup, run = bench.make_case(shape, "slao", "full", "cpu")
    benchmark.pedantic(run, setup=lambda: (setup(), {}), rounds=10)
    assert ratio["eager"] <= 0.90, f"slao/eager = {ratio['eager']:.3f} (medians, ms: {t})"


@needs_cuda
@pytest.mark.target
def test_gpu_targets_llama3_8b_up_proj(benchmark):
    """H100, bf16, 8192 tokens, 4096→14336, r=16: forward ≤ 1.05× the base GEMM alone;
    forward+backward ≤ 1.10× (base forward + dX) and ≥ 1.3× faster than PEFT-style eager."""
    shape = bench.GPU_SHAPES[0]
    fwd, t_fwd = _ratios(shape, "forward", "cuda")
    full, t_full = _ratios(shape, "full", "cuda")
    benchmark.extra_info.update(gpu=torch.cuda.get_device_name(), fwd_vs_base=round(fwd["base"], 3),
                                full_vs_base=round(full["base"], 3), full_vs_eager=round(full["eager"], 3))
    setup, run = bench.make_case(shape, "slao", "full", "cuda")
    benchmark.pedantic(bench.synchronized(run, "cuda"), rounds=10)
    assert fwd["base"] <= 1.05, f"forward slao/base = {fwd['base']:.3f} ({t_fwd})"
    assert full["base"] <= 1.10, f"full slao/base = {full['base']:.3f} ({t_full})"
    assert full["eager"] <= 1 / 1.3, f"full slao/eager = {full['eager']:.3f} ({t_full})"

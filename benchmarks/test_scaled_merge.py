"""pytest-benchmark suite of slao::scaled_merge_, and its speed targets.

The layer set: a Llama-3-8B adapter's B factors at r=16 over all seven
projections of 32 layers (224 tensors of 16×4096 here, the issue's size;
fp32 on CPU, bf16 on a GPU). Providers: ``slao``; ``foreach_lerp``
(``torch._foreach_lerp_``, the stock multi-tensor op); ``copy`` (a flat copy_
of the same bytes, the floor).
"""

import pytest
import torch

from slao_kernels import benchmarking as bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
LAYERS, ROWS, COLS = 224, 16, 4096


def cases():
    return bench.merge_cases(LAYERS, ROWS, COLS, DEVICE, DTYPE)


@pytest.mark.parametrize("provider", ["slao", "slao_checked", "foreach_lerp", "copy"])
def test_scaled_merge(benchmark, provider):
    _, run = cases()[provider]
    benchmark.group = f"scaled_merge {LAYERS}x{ROWS}x{COLS} {DTYPE}"
    benchmark.pedantic(bench.synchronized(run, DEVICE), rounds=20, warmup_rounds=3)


@pytest.mark.target
@pytest.mark.skipif(DEVICE != "cpu", reason="CPU target")
def test_cpu_target_merge_vs_copy(benchmark):
    """CPU: the merge of 224 × 16×4096 fp32 takes ≤ 1.15× a same-size copy_."""
    t = bench.time_interleaved(cases(), "cpu", rounds=30)
    ratio = t["slao"] / t["copy"]
    benchmark.extra_info.update({f"{k}_ms": round(v * 1e3, 3) for k, v in t.items()}, slao_vs_copy=round(ratio, 3))
    benchmark.pedantic(cases()["slao"][1], rounds=5)
    assert ratio <= 1.15, f"merge/copy = {ratio:.3f} ({t})"


@pytest.mark.target
@pytest.mark.skipif(DEVICE != "cuda", reason="GPU target: needs a CUDA device")
def test_gpu_target_merge_bandwidth(benchmark):
    """GPU: the merge reaches ≥ 85% of the bandwidth of a device copy measured in the same run
    (the merge moves 3 streams: read both sets, write one; the copy 2)."""
    t = bench.time_interleaved(cases(), "cuda", rounds=30)
    bytes_moved = 3 * LAYERS * ROWS * COLS * torch.finfo(DTYPE).bits // 8
    copy_gbps = 2 * LAYERS * ROWS * COLS * torch.finfo(DTYPE).bits // 8 / t["copy"] / 1e9
    gbps = bytes_moved / t["slao"] / 1e9
    benchmark.extra_info.update(gpu=torch.cuda.get_device_name(), slao_gbps=round(gbps, 1),
                                copy_gbps=round(copy_gbps, 1))
    benchmark.pedantic(cases()["slao"][1], rounds=5)
    assert gbps >= 0.85 * copy_gbps, f"{gbps:.0f} GB/s < 85% of the copy's {copy_gbps:.0f} GB/s"

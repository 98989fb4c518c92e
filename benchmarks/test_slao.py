"""A whole SLAO task switch (end_task + begin_task: merge, buffer swaps, batched
orthonormalization) over all seven projections of every layer.

CPU: SmolLM2-135M shapes (30 layers; 576 / 1536 / kv 192), r=8, fp32.
GPU: Llama-3-8B shapes (32 layers; 4096 / 14336 / kv 1024), r=16, bf16 base with
fp32 adapters; target: at most SWITCH_COPIES copies of the adapter state, timed in the
same run (about 1 ms on an H100/H200, whose copy of the 168 MB state takes ~80 µs).
"""

import pytest
import torch
from torch import nn

from slao_kernels import SLAO, LoRALinear
from slao_kernels import benchmarking as bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SWITCH_COPIES = 12  # end_task + begin_task read and write A, B and the buffers a few times each
if DEVICE == "cuda":
    LAYERS, HIDDEN, INTER, KV, RANK, BASE_DTYPE = 32, 4096, 14336, 1024, 16, torch.bfloat16
else:
    LAYERS, HIDDEN, INTER, KV, RANK, BASE_DTYPE = 30, 576, 1536, 192, 8, torch.float32


def adapted_layers() -> nn.Module:
    """The seven projections of every layer, each a LoRALinear (the base weights are
    allocated uninitialized: the task switch never reads them)."""
    shapes = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV), "o_proj": (HIDDEN, HIDDEN),
              "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER), "down_proj": (INTER, HIDDEN)}
    model = nn.ModuleDict()
    for i in range(LAYERS):
        layer = nn.ModuleDict()
        for name, (n_in, n_out) in shapes.items():
            base = nn.Linear(n_in, n_out, bias=False, device="meta").to_empty(device=DEVICE).to(BASE_DTYPE)
            layer[name] = LoRALinear(base, RANK, 2 * RANK)
        model[str(i)] = layer
    return model


def switching_slao():
    slao = SLAO(adapted_layers())
    slao.begin_task()
    with torch.no_grad():
        for p in slao.parameters():
            p.normal_(std=0.02)
    return slao


def test_task_switch(benchmark):
    slao = switching_slao()

    def switch():
        slao.end_task()
        slao.begin_task()

    benchmark.group = f"SLAO task switch, {LAYERS} layers × 7 projections, r={RANK}"
    benchmark.extra_info.update(device=DEVICE, layers=LAYERS, rank=RANK)
    benchmark.pedantic(bench.synchronized(switch, DEVICE), rounds=10, warmup_rounds=2)


@pytest.mark.target
@pytest.mark.skipif(DEVICE != "cuda", reason="GPU target: needs a CUDA device")
def test_gpu_target_task_switch_within_copies_of_the_state(benchmark):
    slao = switching_slao()

    def switch():
        slao.end_task()
        slao.begin_task()

    switch()  # from the second task on the controller holds its buffers: all of the state exists
    state = torch.cat([p.detach().flatten() for p in slao.parameters()]
                      + [b.flatten() for b in slao._b_other.values()])
    copy = torch.empty_like(state)
    t = bench.time_interleaved({"switch": (lambda: (), switch), "copy": (lambda: (), lambda: copy.copy_(state))},
                               "cuda", rounds=20)
    ratio = t["switch"] / t["copy"]
    benchmark.extra_info.update(gpu=torch.cuda.get_device_name(), switch_ms=round(t["switch"] * 1e3, 3),
                                copy_ms=round(t["copy"] * 1e3, 3), switch_per_copy=round(ratio, 2))
    benchmark.pedantic(bench.synchronized(switch, "cuda"), rounds=5)
    assert ratio <= SWITCH_COPIES, f"task switch {t['switch'] * 1e3:.2f} ms = {ratio:.1f} copies of the state"

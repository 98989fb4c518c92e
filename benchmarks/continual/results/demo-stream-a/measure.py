"""The measurement behind benchmarks/continual/README.md (slao demo: the built-in stream): SLAO vs SeqLoRA
on a generated stream, several seeds, through run_comparison."""
import argparse
import time

import torch

from slao_kernels.continual import RunConfig, TrainConfig
from slao_kernels.continual import tasks as T
from slao_kernels.continual.compare import format_summary, run_comparison
from slao_kernels.continual.models import load_model
from slao_kernels.patching import LoRAConfig

p = argparse.ArgumentParser()
p.add_argument("--stream", default="default", choices=("default", "distinct"))
p.add_argument("--order", default=None)
p.add_argument("--seeds", default="0,1,2")
p.add_argument("--specs", default="slao,seqlora")
p.add_argument("--steps", type=int, default=30)
p.add_argument("--train-size", type=int, default=256)
p.add_argument("--test-size", type=int, default=60)
p.add_argument("--data-seed", type=int, default=0)
p.add_argument("--rank", type=int, default=8)
p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--batch-size", type=int, default=8)
p.add_argument("--out", required=True)
p.add_argument("--threads", type=int, default=None)
a = p.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)
rules = T.GENERATED_RULES if a.stream == "default" else T.DISTINCT_ANSWER_RULES
tasks = T.generated_suite(a.order, train_size=a.train_size, test_size=a.test_size, seed=a.data_seed, rules=rules)
t0 = time.perf_counter()
model, tok = load_model(None)
print(f"model loaded in {time.perf_counter() - t0:.1f} s; threads {torch.get_num_threads()}", flush=True)
cfg = RunConfig(lora=LoRAConfig(rank=a.rank, alpha=2.0 * a.rank, targets=tuple(a.targets.split(","))),
                train=TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr))
s = run_comparison(model, tok, tasks, a.specs.split(","), [int(x) for x in a.seeds.split(",")], cfg, a.out,
                   progress=False, log=lambda m: print(m, flush=True), extra={"measure_args": vars(a)})
print(format_summary(s), flush=True)
print(f"total {time.perf_counter() - t0:.0f} s", flush=True)

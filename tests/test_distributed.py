"""SLAO under torchrun (DDP, FSDP2) and accelerate launch, on CPU with gloo: two processes.

Every run is ``slao_kernels.continual.scale_out`` (three short tasks on a tiny
Llama), so a distributed run and the one-process reference see the same
batches in the same order; only the split of each batch over the ranks differs.

Tolerance. The runs differ only in the order of the fp32 sums that make each gradient (each rank
sums its half of the batch, then the halves are averaged), so the equivalence runs train with plain
SGD: its update ``θ ← θ − lr·g`` is linear in the gradient, and a rounding difference in ``g`` stays
a rounding difference in ``θ``. (AdamW is not usable here: ``g/√v`` turns a gradient entry near zero
whose sign depends on the summation order into a full ±lr step; that broke a 1e-4 tolerance on an AMD
EPYC.) Each gradient entry is a sum over the ``batch·seq_len`` = 128 token positions; reordering such a
sum changes it by at most γ = 128·u (u = 2⁻²⁴, fp32's unit roundoff) relative to its magnitude, and with
SGD the per-step differences add up over the ``tasks·steps`` = 30 steps. The tolerance is that worst-case
bound at the scale of each tensor: ``30·128·u·max|ref|`` (≈ 2.3e-4 relative; measured on an Intel Xeon,
DDP against one process at rank 8: 7.5e-8 absolute, 4.7e-7 relative). The task switch's QR is backward
stable on the near-orthonormal A's and adds no growth of its own. The bound needs a step size inside the
stable range, where the training iteration does not amplify differences: at rank 1 with the default
alpha (scaling 16) and lr 0.5 the one- and two-process trajectories separated tenfold per step (1.4e-7,
1.5e-6, 1.1e-4 after 1, 2, 3 steps); so every run here has scaling 2 (alpha = 2·rank) and lr 0.5, where
they stay within 4e-7 relative at rank 1 as at rank 8. A real fault (rows written to the wrong rank, a
merge lost, a shard left stale) moves entries by the size of a task's update (B by more than 1e-3 here:
checked below).
"""

import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import time
import weakref

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_model
from safetensors.torch import load_file
from torch import nn

import slao_kernels
from slao_kernels import SLAO, LoRAConfig, patch_llama
from slao_kernels import distributed as dist_utils
from slao_kernels.continual import scale_out

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is needed")

LR = 0.5  # plain SGD at the adapter scaling 2 (alpha = 2·rank): stable, and B moves by ~1e-3 per task
TASKS, STEPS, BATCH, SEQ_LEN = 3, 10, 8, 16  # scale_out's defaults: what the tolerance is derived from
ROUNDING_BOUND = TASKS * STEPS * BATCH * SEQ_LEN * 2.0**-24  # relative; see the module docstring


def _run_args(out, rank=8, *extra):
    return ["--out", str(out), "--rank", str(rank), "--alpha", str(2.0 * rank), "--optimizer", "sgd",
            "--lr", str(LR), "--tasks", str(TASKS),
            "--steps", str(STEPS), "--batch-size", str(BATCH), "--seq-len", str(SEQ_LEN), "--quiet", *extra]


def assert_equivalent(got: torch.Tensor, want: torch.Tensor, key: str) -> None:
    """``got`` within the summation-order rounding bound of ``want`` (module docstring)."""
    atol = ROUNDING_BOUND * want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=lambda m: f"{key}: {m}")


LAUNCH_TIMEOUT = 300  # one launch takes ~10 s alone on the 2-core CI machine


def _worker_pids(marker: str) -> list[int]:
    """Processes whose command line contains ``marker`` (a test's unique tmp path). The launchers
    start every worker in a session of its own, so killing a launcher leaves its workers running."""
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read() and int(entry) != os.getpid():
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


def _launch(launcher: list[str], args: list[str], marker: str) -> None:
    """Run ``python -m <launcher> ...`` and fail with its output if it fails or hangs. On a hang
    every process is sent SIGABRT first, so faulthandler prints where each one is stuck."""
    # the workers import the slao_kernels this process imported, installed or not
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(slao_kernels.__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONFAULTHANDLER": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", *launcher, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        stuck = _worker_pids(marker)
        for sig, pause in ((signal.SIGABRT, 1.0), (signal.SIGKILL, 0.0)):
            for pid in stuck:  # one at a time: their dumps share one pipe
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                time.sleep(pause)
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(launcher)} hung for {LAUNCH_TIMEOUT} s; the stacks of its processes:\n{out[-12000:]}")
    assert proc.returncode == 0, f"{' '.join(launcher)} failed:\n{out[-8000:]}"


def _run_script(launcher: list[str], args: list[str]) -> None:
    _launch(launcher, ["-m", "slao_kernels.continual.scale_out", *args], marker=args[args.index("--out") + 1])


TORCHRUN = ["torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def torchrun(args):
    _run_script(TORCHRUN, args)


def checkpoint_tensors(out) -> dict[str, torch.Tensor]:
    """Everything SLAO saved after the last task: A, B and the B_ft buffer of every layer."""
    with open(os.path.join(out, "checkpoint", "slao.json")) as f:
        meta = json.load(f)
    return load_file(os.path.join(out, "checkpoint", meta["tensor_file"]))


def assert_same_run(out, ref):
    got, want = checkpoint_tensors(out), checkpoint_tensors(ref)
    assert sorted(got) == sorted(want) and any(k.endswith("buffer_B") for k in want)
    for key in want:
        assert_equivalent(got[key], want[key], key)
    peft, peft_ref = (load_file(os.path.join(d, "adapter", "adapter_model.safetensors")) for d in (out, ref))
    assert sorted(peft) == sorted(peft_ref)
    for key in peft_ref:
        assert_equivalent(peft[key], peft_ref[key], key)


def progress(out) -> list[dict]:
    with open(os.path.join(out, "progress.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One-process runs (in this process) at ranks 8 and 1: the results every engine must reproduce."""
    runs = {}
    for rank in (8, 1):
        out = tmp_path_factory.mktemp(f"one_rank{rank}")
        scale_out.main(_run_args(out / "run", rank))
        runs[rank] = out / "run"
    return runs


def test_reference_run_learns_and_merges(reference):
    tasks = progress(reference[8])
    assert [t["task"] for t in tasks] == [1, 2, 3] and all(t["world_size"] == 1 for t in tasks)
    assert all(t["last_loss"] < t["first_loss"] for t in tasks)
    saved = checkpoint_tensors(reference[8])
    # after task 3 the model holds B_merge,3 and the buffer B_ft,3: they differ unless the merge did nothing
    b, b_ft = saved["model.layers.0.self_attn.q_proj.lora_B"], saved["model.layers.0.self_attn.q_proj.buffer_B"]
    assert (b - b_ft).abs().max() > 1e-3
    # a lost merge (B = B_ft) would be far outside the equivalence tolerance
    assert (b - b_ft).abs().max() > 100 * ROUNDING_BOUND * b.abs().max()


def test_ddp_matches_one_process_and_replicas_stay_identical(reference, tmp_path):
    torchrun(["--engine", "ddp", *_run_args(tmp_path / "ddp")])
    tasks = progress(tmp_path / "ddp")
    assert [t["world_size"] for t in tasks] == [2, 2, 2]
    assert [t["replica_max_difference"] for t in tasks] == [0.0, 0.0, 0.0]  # bit-identical on both ranks
    assert_same_run(tmp_path / "ddp", reference[8])


def test_fsdp2_matches_one_process_and_resumes_sharded(reference, tmp_path):
    out = tmp_path / "fsdp2"
    torchrun(["--engine", "fsdp2", *_run_args(out, 8, "--stop-after", "1")])
    assert [t["task"] for t in progress(out)] == [1]
    assert not os.path.exists(out / "adapter")  # stopped early: no final adapter yet
    torchrun(["--engine", "fsdp2", *_run_args(out, 8, "--resume")])  # SLAO.load on sharded parameters
    assert [t["world_size"] for t in progress(out)] == [2, 2, 2]
    assert_same_run(out, reference[8])


def test_fsdp2_checkpoint_resumes_at_world_size_1_with_rank_below_world_size(reference, tmp_path):
    # r = 1 < 2 ranks: rank 1 holds none of each A's rows
    out = tmp_path / "fsdp2_r1"
    torchrun(["--engine", "fsdp2", *_run_args(out, 1, "--stop-after", "2")])
    scale_out.main(_run_args(out, 1, "--resume"))  # here, one process
    assert [t["world_size"] for t in progress(out)] == [2, 2, 1]
    assert_same_run(out, reference[1])


def test_accelerate_launch_matches_one_process(reference, tmp_path):
    pytest.importorskip("accelerate")
    out = tmp_path / "accelerate"
    # --multi_gpu picks accelerate's multi-process launcher; without GPUs the processes run on CPU with gloo
    _run_script(["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no"], ["--engine", "accelerate", *_run_args(out)])
    assert [t["replica_max_difference"] for t in progress(out)] == [0.0, 0.0, 0.0]
    assert_same_run(out, reference[8])


def test_a_hung_launch_fails_with_stacks_and_leaves_no_process_behind(tmp_path, monkeypatch):
    script = tmp_path / "sleeps.py"
    script.write_text("import time\ntime.sleep(600)\n")
    monkeypatch.setattr(sys.modules[__name__], "LAUNCH_TIMEOUT", 15)
    with pytest.raises(pytest.fail.Exception, match="hung for 15 s") as failure:
        _launch(TORCHRUN, [str(script)], marker=str(script))
    assert f'File "{script}", line 2' in str(failure.value)  # faulthandler's dump of a stuck worker
    assert _worker_pids(str(script)) == []


def test_script_rejects_bad_arguments(tmp_path, reference):
    with pytest.raises(SystemExit, match="multiple of the world size"):
        args = scale_out.build_parser().parse_args(["--out", "x", "--engine", "ddp", "--batch-size", "3"])
        scale_out.check_args(args, world=2)
    with pytest.raises(SystemExit, match="pick ddp, fsdp2 or accelerate"):
        scale_out.check_args(scale_out.build_parser().parse_args(["--out", "x"]), world=2)
    with pytest.raises(SystemExit, match="not Llama projections"):
        scale_out.check_args(scale_out.build_parser().parse_args(["--out", "x", "--targets", "qkv"]), world=1)
    with pytest.raises(SystemExit, match="holds a run already"):
        scale_out.main(_run_args(reference[8]))
    with pytest.raises(SystemExit, match="arguments differ"):
        scale_out.main(_run_args(reference[8], 8, "--resume", "--steps", "3"))
    with pytest.raises(SystemExit, match="no checkpoint.*start it again without --resume"):
        scale_out.main(_run_args(tmp_path / "empty", 8, "--resume"))
    with pytest.raises(SystemExit, match="runs under torchrun"):
        scale_out.main(["--engine", "fsdp2", *_run_args(tmp_path / "no_torchrun")])


# ----------------------------------------------------------------------------- helpers, one process


def test_helpers_are_the_identity_without_a_process_group():
    assert not dist_utils.initialized() and dist_utils.rank() == 0 and dist_utils.world_size() == 1
    assert dist_utils.is_main_process()
    dist_utils.barrier()  # a no-op, must not raise
    t = torch.randn(3, 4)
    assert dist_utils.local(t).data_ptr() == t.data_ptr() and dist_utils.gather(t).data_ptr() == t.data_ptr()
    full = torch.randn(3, 4)
    dist_utils.write_full_(t, full)
    assert torch.equal(t, full)
    with pytest.raises(ValueError, match=r"expected a tensor of shape \(3, 4\), got \(4, 3\)"):
        dist_utils.write_full_(t, full.T)


def test_unwrap_model_and_slao_names_without_wrapper_prefixes(tmp_path):
    model = tiny_model()
    patch_llama(model, LoRAConfig(rank=4, targets=("q_proj",)))
    wrapped = torch.compile(nn.DataParallel(model))  # neither runs here: wrapping alone
    assert dist_utils.unwrap_model(wrapped) is model
    slao = SLAO(wrapped)
    assert all(not n.startswith(("module.", "_orig_mod.")) for n in slao.modules)
    slao.begin_task()
    slao.end_task()
    slao.save(str(tmp_path / "ck"))
    assert SLAO.load(model, str(tmp_path / "ck")).task_index == 1  # loads into the unwrapped model


@pytest.fixture
def gloo_group():
    """A one-process gloo group in this process, destroyed afterwards whatever the test did."""
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _trained_ddp():
    ddp = nn.parallel.DistributedDataParallel(nn.Linear(4, 4))
    ddp(torch.randn(2, 4)).sum().backward()
    dist.all_reduce(torch.ones(1))  # a collective whose tensor's Python object is gone at once
    return ddp


def test_shutdown_frees_the_ddp_reducer_while_the_process_group_still_exists(gloo_group, monkeypatch):
    """The order that avoids gloo's exit deadlock (see ``distributed.shutdown``): the reducer is
    gone before ``destroy_process_group`` runs, so the group's last reference is not the reducer's."""
    ddp = _trained_ddp()
    reducer = weakref.ref(ddp.reducer)
    destroy, seen = dist.destroy_process_group, []
    monkeypatch.setattr(dist, "destroy_process_group",
                        lambda *a: (seen.append((reducer() is None, dist.is_initialized())), destroy(*a)))
    dist_utils.shutdown(ddp)
    assert seen == [(True, True)] and not dist.is_initialized()
    assert not hasattr(ddp, "reducer") and not hasattr(ddp, "logger")
    dist_utils.shutdown(ddp)  # no process group any more: a no-op


def test_shutdown_keeps_the_group_referenced_while_someone_else_holds_the_reducer(gloo_group):
    ddp = _trained_ddp()
    compiled = torch.compile(ddp)  # never runs: wrapping alone copies the DDP's attributes
    reducer, group = weakref.ref(ddp.reducer), weakref.ref(ddp.process_group)
    held = ddp.reducer  # like the copies torch.compile made, or a user's own reference
    dist_utils.shutdown(compiled)  # the DDP inside is found through the wrapper
    assert not dist.is_initialized() and not hasattr(ddp, "reducer")
    del ddp, compiled
    gc.collect()
    # the reducer is alive: the group's Python object must be too, or the reducer's destructor would
    # drop the group's last reference with the GIL held
    assert reducer() is not None and group() is not None
    del held
    gc.collect()
    assert reducer() is None and group() is None  # released from Python once the reducer is gone


def _random_init_adapters(seed: int) -> list[torch.Tensor]:
    """A and B of every layer after SLAO's random-init ablation starts task 2."""
    model = tiny_model()
    patch_llama(model, LoRAConfig(rank=4, targets=("q_proj", "v_proj")))
    slao = SLAO(model, init="random")
    slao.begin_task()
    with torch.no_grad():
        for p in slao.parameters():
            p.add_(1.0)  # "training": B is no longer zero
    slao.end_task()
    torch.manual_seed(seed)
    slao.begin_task()
    return [t.detach().clone() for m in slao.modules.values() for t in (m.lora_A, m.lora_B)]


def test_random_init_is_the_same_with_and_without_a_process_group():
    one_process = _random_init_adapters(seed=3)
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        distributed = _random_init_adapters(seed=3)  # the broadcast path
    finally:
        dist.destroy_process_group()
    assert any(t.abs().sum() > 0 for t in one_process[0::2])
    assert all(torch.count_nonzero(b) == 0 for b in one_process[1::2])  # a fresh adapter: B = 0
    for got, want in zip(distributed, one_process, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_shard_llama_rejects_a_model_without_decoder_layers():
    with pytest.raises(ValueError, match="no decoder layers"):
        dist_utils.shard_llama(nn.Sequential(nn.Linear(4, 4)))


NAN_ON_ONE_RANK = r'''
import os, sys
import torch, torch.distributed as dist
from slao_kernels import SLAO, LoRAConfig, patch_llama
from slao_kernels.continual.scale_out import tiny_llama
from slao_kernels.distributed import local, shard_llama, shutdown

dist.init_process_group("gloo")
model = tiny_llama(vocab=64, seed=0)
patch_llama(model, LoRAConfig(rank=8))
slao = SLAO(shard_llama(model))
slao.begin_task()
B = slao.modules["model.layers.1.self_attn.v_proj"].lora_B
if dist.get_rank() == 1:
    with torch.no_grad():
        local(B)[0, 0] = float("nan")
try:
    slao.end_task()
    outcome = "merged"
except ValueError as exc:
    outcome = f"raised: {exc}"
with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.txt"), "w") as f:  # one file per rank: no interleaving
    f.write(outcome)
shutdown(model)
# FSDP2 keeps the gloo group alive after destroy_process_group (torch 2.13), so gloo's threads outlive the
# script; one still freeing any_rank's tensor when the interpreter finalizes aborts the process ("terminate
# called without an active exception", 4 times in about 150 runs; a core dump shows the gloo thread in
# take_gil during Py_FinalizeEx). Everything this test checks is written: leave without finalizing.
os._exit(0)
'''


def test_fsdp2_non_finite_shard_raises_on_every_rank(tmp_path):
    script = tmp_path / "nan_on_one_rank.py"
    script.write_text(NAN_ON_ONE_RANK)
    _launch(TORCHRUN, [str(script), str(tmp_path)], marker=str(script))
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text() for r in (0, 1))
    assert rank0.startswith("raised") and "another rank" in rank0
    assert rank1.startswith("raised") and "['model.layers.1.self_attn.v_proj.lora_B'] on this rank" in rank1


FAILED_WRITE_ON_RANK_0 = r'''
import os, sys
import torch.distributed as dist
import slao_kernels.continual.checkpoint as checkpoint
from slao_kernels import SLAO, LoRAConfig, patch_llama, save_peft_adapter
from slao_kernels.continual.scale_out import tiny_llama

dist.init_process_group("gloo")
model = tiny_llama(vocab=64, seed=0)
patch_llama(model, LoRAConfig(rank=4))
slao = SLAO(model)
slao.begin_task()
slao.end_task()

def disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")

checkpoint.save_checkpoint = disk_full  # rank 0 writes; rank 1 never calls it
import slao_kernels.peft_format as peft_format
peft_format._replace_directory = disk_full
outcomes = []
for name, save in (("checkpoint", lambda: slao.save(os.path.join(sys.argv[1], "ckpt"))),
                   ("adapter", lambda: save_peft_adapter(model, os.path.join(sys.argv[1], "adapter")))):
    try:
        save()
        outcomes.append(f"{name}: saved")
    except Exception as exc:
        outcomes.append(f"{name}: {type(exc).__name__}: {exc}")
with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.txt"), "w") as f:
    f.write("\n".join(outcomes))
dist.destroy_process_group()
'''


def test_a_failed_write_on_rank_0_raises_on_every_rank_instead_of_hanging(tmp_path):
    script = tmp_path / "failed_write.py"
    script.write_text(FAILED_WRITE_ON_RANK_0)
    _launch(TORCHRUN, [str(script), str(tmp_path)], marker=str(script))
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text().splitlines() for r in (0, 1))
    assert rank0 == ["checkpoint: OSError: [Errno 28] No space left on device",
                     "adapter: OSError: [Errno 28] No space left on device"]
    assert rank1 == ["checkpoint: RuntimeError: SLAO.save: rank 0 failed to write (its error says why); nothing "
                     "else was written",
                     "adapter: RuntimeError: save_peft_adapter: rank 0 failed to write (its error says why); "
                     "nothing else was written"]
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "adapter").exists()

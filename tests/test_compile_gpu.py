"""Every Triton kernel, at every launch configuration, compiles for H100 (sm_90)
and A100 (sm_80) and fits their shared memory — checked on a machine without a GPU."""

import json
import os
import subprocess
import sys

from slao_kernels.ops import aot


def test_every_kernel_config_compiles_for_sm90_and_sm80(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the compiler needs it unset
    report = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "slao_kernels.ops.aot", "--json", str(report)],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    records = json.loads(report.read_text())
    specs = aot.all_specs()
    assert len(records) == 2 * len(specs) > 0
    assert {r["target"] for r in records} == {"sm_90", "sm_80"}
    assert all(r["ok"] and 0 <= r["shared"] <= aot.SHARED_LIMIT[int(r["target"][3:])] for r in records)
    # Every kernel of every op file is in the sweep.
    assert {s.kernel.fn.__name__ for s in specs} == {"_project_kernel", "_gemm_lowrank_kernel", "_rank_outer_kernel",
                                                     "_lowrank_update_kernel", "_scaled_merge_kernel",
                                                     "_cholesky_qr2_kernel"}


def test_compile_check_rejects_an_illegal_dot():
    """The check has teeth: a rank-8 tile in the GEMM epilogue (the rank is the
    K of that bf16 tl.dot, which must be >= 16) is refused."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import dataclasses, torch, slao_kernels.ops.aot as aot\n"
        "spec = next(s for s in aot.all_specs() if s.kernel.fn.__name__ == '_gemm_lowrank_kernel'"
        " and dict(s.ptr_dtypes)['x_ptr'] == torch.bfloat16)\n"
        "bad = dataclasses.replace(spec, constexprs=tuple((k, 8 if k == 'BLOCK_R' else v)"
        " for k, v in spec.constexprs))\n"
        "aot.all_specs = lambda: [bad]\n"
        "r = aot.compile_one(0, 90)\n"
        "print('OK' if not r['ok'] and 'CompilationError' in r['error'] else 'UNEXPECTED', r)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.stdout.startswith("OK"), proc.stdout + proc.stderr[-2000:]

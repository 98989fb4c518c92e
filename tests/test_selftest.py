"""``slao selftest``: the command a GPU session runs, run here on CPU (C++ kernels, Triton in the
interpreter), its report, and a failing check turning into exit status 1."""

import json
import subprocess
import sys

import torch

from slao_kernels.benchmarking import selftest


def test_selftest_on_cpu_checks_every_op_and_writes_its_report(tmp_path):
    out, md = tmp_path / "selftest.json", tmp_path / "selftest.md"
    proc = subprocess.run([sys.executable, "-m", "slao_kernels", "selftest", "--quick", "--json", str(out),
                           "--markdown", str(md)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["complete"] and data["passed"]
    assert {"torch", "triton", "cpu"} <= set(data["environment"])
    checks = [e for e in data["entries"] if e["passed"] is not None]
    assert all(e["passed"] for e in checks)
    ops = {e["op"] for e in checks}
    assert {"lora_linear", "orthonormalize", "merge"} <= ops
    names = " ".join(e["check"] for e in checks)
    # the C++ op at a SmolLM2 shape, the Triton kernels in the interpreter, and every candidate
    assert "op 512x576->576 r=8" in names and "triton (interpreter)" in names
    assert all(f"candidate {c}" in names for c in ("fused:64x64x64", "cublas+update", "torch"))
    speed = [e for e in data["entries"] if e["check"].startswith("speed ")]
    assert speed and all(v > 0 for e in speed for v in e["ms"].values())
    table = md.read_text()
    assert table.startswith("# slao selftest on ") and "| lora_linear |" in table and "**FAIL**" not in table


def test_a_failing_check_fails_the_selftest(tmp_path, monkeypatch):
    """A kernel that drops the rank-r update is caught, and the report and exit status say so."""
    from slao_kernels.ops import lora_linear_candidates as cand

    monkeypatch.setattr(cand, "lowrank_update", lambda out, p, lt, scale: out)
    report = selftest.Report(str(tmp_path / "r.json"), log=lambda s: None)
    selftest.check_candidates(report, "cpu")
    failed = [e["check"] for e in report.data["entries"] if e["passed"] is False]
    assert failed and all("cublas+update" in c for c in failed) and not report.data["passed"]
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is False  # written as it goes

    monkeypatch.setattr(selftest, "check_task_switch", lambda report, device, shape: report.add(
        "merge", "injected", False))
    monkeypatch.setattr(selftest, "check_op_through_autograd", lambda *a: None)
    monkeypatch.setattr(selftest, "_interpreter_subprocess", lambda report: None)
    monkeypatch.setattr(selftest, "speed", lambda *a: None)
    assert selftest.main(["--quiet", "--json", str(tmp_path / "s.json")]) == 1


def test_three_way_rule():
    ref = torch.tensor([1.0, 2.0], dtype=torch.float64)
    pt = torch.tensor([1.0, 2.01])
    assert selftest.three_way(torch.tensor([1.0, 2.02]), pt, ref)[0] <= selftest.three_way(
        torch.tensor([1.0, 2.02]), pt, ref)[1]
    err, bound = selftest.three_way(torch.tensor([1.0, 2.05]), pt, ref)
    assert err > bound

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


def test_the_gpu_speed_section_computes_every_target_from_same_run_ratios(monkeypatch):
    """The CUDA branch of the speed section, fed with made-up timings (no GPU here): every target is
    computed from ratios of this run's figures, and a missed target does not fail the self-test."""
    import importlib

    from slao_kernels.benchmarking import cases
    from slao_kernels.ops import tuning

    compare = importlib.import_module("slao_kernels.benchmarking.compare")  # the package re-exports a function

    shape = cases.default_shapes("cuda")[0]
    rows = [{"shape": shape.name, "mode": m, "ms": {"eager": 3.0, "composed": 2.5, "slao": 2.0, "base": 1.9},
             "slao_vs": {"eager": 2.0 / 3.0, "composed": 0.8, "base": 2.0 / 1.9}, "slao_tflops": 500.0}
            for m in ("forward", "backward", "full")]
    switch = [{"op": "scaled_merge_ 224x16x4096 bfloat16", "ms": {"slao": 0.05, "copy": 0.03, "foreach_lerp": 0.06},
               "ratios": {}},
              {"op": "orthonormalize_rows 224x16x4096 float32", "ms": {"slao": 0.5, "slao_inplace": 0.6,
                                                                        "linalg_qr": 30.0},
               "ratios": {"linalg_qr/slao_inplace": 50.0}}]
    monkeypatch.setattr(selftest, "ceilings", lambda device: {"mm_tflops": 790.0, "copy_gbps": 4300.0})
    monkeypatch.setattr(compare, "compare", lambda *a, **k: rows)
    monkeypatch.setattr(compare, "compare_task_switch_ops", lambda *a, **k: switch)
    monkeypatch.setattr(tuning, "tuner", lambda device: tuning.Tuner("fake", directory="/nonexistent"))
    report = selftest.Report(None, log=lambda s: None)
    selftest.speed(report, "cuda", quick=True)
    targets = {e["check"]: (e["ratio"], e["target_met"]) for e in report.data["entries"] if "target_met" in e}
    assert targets["target forward / base <= 1.05"] == (round(2.0 / 1.9, 3), False)
    assert targets["target eager / slao (full) >= 1.3"] == (1.5, True)
    assert targets["target linalg_qr / orthonormalize in place >= 20.0"] == (50.0, True)
    assert targets["target merge bandwidth / copy bandwidth >= 0.85"] == (0.9, True)
    assert targets["target task switch ms (merge + orthonormalize in place) <= 1.0"] == (0.65, True)
    assert report.data["passed"] and report.data["targets_met"] is False
    assert any(e["check"] == "runtime selection picked" for e in report.data["entries"])

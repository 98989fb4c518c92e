"""Runtime selection (slao_kernels.ops.tuning) with injected timings, and the candidates of
lora_linear's big products against the reference (Triton in the interpreter on CPU)."""

import json
import os

import pytest
import torch
from conftest import KERNEL_DEVICE, assert_close_to_ref

from slao_kernels.ops import tuning
from slao_kernels.ops.lora_linear_candidates import base_then_update, composed, lowrank_update
from slao_kernels.ops.tuning import Candidate, Tuner, m_bucket, problem_key

KEY = problem_key("op", (torch.bfloat16, torch.float32), 4096, 4096, 16, 8192)


class Clock:
    """An injected timer: each candidate takes the seconds given for its name; records who was timed."""

    def __init__(self, seconds):
        self.seconds, self.timed = seconds, []

    def __call__(self, run):
        name = run()
        self.timed.append(name)
        return self.seconds[name]


def options(*names, fail=()):
    def run(name):
        def f():
            if name in fail:
                raise RuntimeError(f"{name} does not compile here")
            return name
        return f
    return [Candidate(n, run(n)) for n in names]


@pytest.fixture
def tune_mode(monkeypatch):
    def set_mode(value):
        monkeypatch.setenv(tuning.ENV_MODE, value)
    set_mode("on")
    return set_mode


def test_keys_bucket_m_by_powers_of_two():
    assert [m_bucket(m) for m in (0, 1, 2, 3, 8, 9, 8192, 8193)] == [1, 1, 2, 4, 8, 16, 8192, 16384]
    assert KEY == "op|bfloat16,float32|N=4096|K=4096|R=16|M<=8192"
    assert problem_key("op", (torch.bfloat16, torch.float32), 4096, 4096, 16, 5000) == KEY


def test_the_fastest_candidate_wins_and_is_remembered_on_disk(tmp_path, tune_mode):
    clock = Clock({"fused": 3.0, "cublas+update": 1.0, "torch": 2.0})
    t = Tuner("NVIDIA H200", timer=clock, directory=str(tmp_path))
    assert t.choose(KEY, options("fused", "cublas+update", "torch")).name == "cublas+update"
    assert sorted(clock.timed) == ["cublas+update", "fused", "torch"]
    assert t.choose(KEY, options("fused", "cublas+update", "torch")).name == "cublas+update"
    assert len(clock.timed) == 3  # timed once per key
    saved = json.loads((tmp_path / "NVIDIA_H200.json").read_text())
    assert saved == {"format": tuning.FILE_FORMAT, "device": "NVIDIA H200", "choices": {KEY: "cublas+update"}}
    never = Tuner("NVIDIA H200", timer=lambda run: pytest.fail("timed again"), directory=str(tmp_path))
    assert never.choose(KEY, options("fused", "cublas+update", "torch")).name == "cublas+update"


def test_a_failing_candidate_is_dropped_with_one_warning(tmp_path, tune_mode):
    clock = Clock({"fused": 0.5, "torch": 2.0})
    t = Tuner("gpu", timer=clock, directory=str(tmp_path))
    with pytest.warns(RuntimeWarning, match="candidate 'fused' of op failed on gpu and is skipped"):
        assert t.choose(KEY, options("fused", "torch", fail=("fused",))).name == "torch"
    other = problem_key("op", (torch.float16,), 1, 1, 1, 1)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same candidate of the same op failing again: no second warning
        assert t.choose(other, options("fused", "torch", fail=("fused",))).name == "torch"
    with pytest.raises(RuntimeError, match="every candidate"), pytest.warns(RuntimeWarning):
        Tuner("gpu2", timer=clock, directory=str(tmp_path)).choose(KEY, options("fused", fail=("fused",)))


def test_off_uses_the_heuristic_without_timing_or_files(tmp_path, tune_mode):
    tune_mode("off")
    t = Tuner("gpu", timer=lambda run: pytest.fail("timed"), directory=str(tmp_path))
    assert t.choose(KEY, options("fused", "torch")).name == "fused"
    assert os.listdir(tmp_path) == []


def test_cached_uses_only_the_file_and_never_times(tmp_path, tune_mode):
    Tuner("gpu", timer=Clock({"fused": 2.0, "torch": 1.0}), directory=str(tmp_path)).choose(
        KEY, options("fused", "torch"))
    tune_mode("cached")
    t = Tuner("gpu", timer=lambda run: pytest.fail("timed"), directory=str(tmp_path))
    assert t.choose(KEY, options("fused", "torch")).name == "torch"  # from the file
    other = problem_key("op", (torch.float16,), 8, 8, 8, 8)
    assert t.choose(other, options("fused", "torch")).name == "fused"  # not on disk: the heuristic
    assert t.choose(KEY, options("fused", "torch"), allow_timing=True).name == "torch"
    tune_mode("on")  # capture (allow_timing=False) acts as cached
    assert t.choose(other, options("fused", "torch"), allow_timing=False).name == "fused"


def test_a_corrupt_or_foreign_file_is_ignored_and_rewritten(tmp_path, tune_mode):
    (tmp_path / "gpu.json").write_text("{not json")
    t = Tuner("gpu", timer=Clock({"fused": 1.0, "torch": 2.0}), directory=str(tmp_path))
    assert t.choose(KEY, options("fused", "torch")).name == "fused"
    assert json.loads((tmp_path / "gpu.json").read_text())["choices"] == {KEY: "fused"}


def test_two_processes_keep_each_others_choices(tmp_path, tune_mode):
    a = Tuner("gpu", timer=Clock({"x": 1.0, "torch": 2.0}), directory=str(tmp_path))
    b = Tuner("gpu", timer=Clock({"x": 2.0, "torch": 1.0}), directory=str(tmp_path))
    a.choices(), b.choices()  # both read the (empty) file first
    other = problem_key("op2", (torch.float16,), 8, 8, 8, 8)
    a.choose(KEY, options("x", "torch"))
    b.choose(other, options("x", "torch"))
    assert json.loads((tmp_path / "gpu.json").read_text())["choices"] == {KEY: "x", other: "torch"}


def test_a_stale_choice_no_longer_offered_is_timed_again(tmp_path, tune_mode):
    (tmp_path / "gpu.json").write_text(json.dumps({"format": tuning.FILE_FORMAT, "choices": {KEY: "fused:gone"}}))
    clock = Clock({"fused": 1.0, "torch": 2.0})
    assert Tuner("gpu", timer=clock, directory=str(tmp_path)).choose(KEY, options("fused", "torch")).name == "fused"
    assert sorted(clock.timed) == ["fused", "torch"]


def test_a_bad_mode_is_refused_naming_the_variable(tune_mode):
    tune_mode("sometimes")
    with pytest.raises(ValueError, match=r"SLAO_KERNELS_TUNE must be one of \('on', 'off', 'cached'\)"):
        tuning.mode()


def test_an_unwritable_cache_warns_and_keeps_the_choice_in_memory(tmp_path, tune_mode):
    blocked = tmp_path / "file"
    blocked.write_text("")
    t = Tuner("gpu", timer=Clock({"fused": 1.0, "torch": 2.0}), directory=str(blocked / "sub"))
    with pytest.warns(RuntimeWarning, match="could not write the tuning cache"):
        assert t.choose(KEY, options("fused", "torch")).name == "fused"
    assert t.choose(KEY, options("fused", "torch")).name == "fused"


def test_the_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(tuning.ENV_CACHE_DIR, str(tmp_path / "mine"))
    assert tuning.cache_dir() == str(tmp_path / "mine")
    monkeypatch.delenv(tuning.ENV_CACHE_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning.cache_dir() == str(tmp_path / "xdg" / "slao_kernels" / "tuning")


# --------------------------------------------------------------------------- the candidates themselves


def _product(M, N, K, R, dt, lora_dt, bias, dev=KERNEL_DEVICE):
    x = torch.randn(M, K, device=dev).to(dt)
    w = (torch.randn(N, K, device=dev) / K**0.5).to(dt)
    p = torch.randn(M, R, device=dev)  # fp32, as the down-product kernel writes it
    lt = (torch.randn(N, R, device=dev) / R**0.5).to(lora_dt)
    b = torch.randn(N, device=dev).to(dt) if bias else None
    return x, w, p, lt, 0.75, b


def _want(x, w, p, lt, scale, b, dt):
    """(torch in the input dtype with the rank-r factors as the kernels round them, fp64)."""
    def f(d, pd):
        out = x.to(d) @ w.to(d).t() + scale * (p.to(pd) @ lt.to(pd).t()).to(d)
        return out + b.to(d) if b is not None else out
    return f(dt, dt), f(torch.float64, torch.float64)


@pytest.mark.parametrize("dt,lora_dt", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                        (torch.float16, torch.float16)])
@pytest.mark.parametrize("R", [1, 16, 40])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("candidate", [base_then_update, composed], ids=["cublas+update", "torch"])
def test_every_candidate_matches_the_reference(dt, lora_dt, R, bias, candidate):
    x, w, p, lt, s, b = _product(37, 70, 48, R, dt, lora_dt, bias)
    out = torch.empty(37, 70, dtype=dt, device=x.device)
    candidate(x, w, p, lt, s, b, out)
    pt, ref = _want(x, w, p, lt, s, b, dt)
    assert_close_to_ref(out, pt, ref, candidate.__name__)


def test_the_update_kernel_reads_and_writes_through_strides():
    out = torch.randn(70, 37).t()  # a transposed (non-contiguous) output view
    before = out.clone()
    p, lt = torch.randn(37, 8), torch.randn(70, 8).t().contiguous().t()
    lowrank_update(out, p, lt, 0.5)
    torch.testing.assert_close(out, before + 0.5 * p @ lt.t(), rtol=1e-5, atol=1e-5)  # fp32 sums of 8 terms
    assert torch.equal(lowrank_update(torch.empty(0, 5), torch.empty(0, 3), torch.empty(5, 3), 1.0),
                       torch.empty(0, 5))


@pytest.mark.parametrize("dt,lora_dt", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_the_fused_candidate_matches_the_reference_at_every_tile(dt, lora_dt):
    """Each tile configuration the tuner may pick (the heuristic picks one per shape; tuning times all)."""
    from slao_kernels.ops import lora_linear as op

    x, w, p, lt, s, b = _product(37, 70, 48, 8, dt, lora_dt, True)
    pt, ref = _want(x, w, p, lt, s, b, dt)
    configs = op.gemm_configs(37, 70, dt, sms=op.INTERPRETER_SMS)
    assert sorted(configs, key=str) == sorted(op.GEMM_CONFIGS[32 if dt == torch.float32 else 16], key=str)
    for cfg in configs:
        out = torch.empty(37, 70, dtype=dt, device=x.device)
        op.gemm_lowrank(x, w, p, lt, s, b, out, cfg)
        assert_close_to_ref(out, pt, ref, f"fused {cfg}")


def test_the_heuristic_tile_follows_the_device_sm_count():
    from slao_kernels.ops import lora_linear as op

    big, small = op.GEMM_CONFIGS[16][0], op.GEMM_CONFIGS[16][-1]
    tiles = (8192 // big.block_m) * (14336 // big.block_n)  # programs of the largest tile
    assert op.gemm_configs(8192, 14336, torch.bfloat16, sms=tiles)[0] == big
    assert op.gemm_configs(8192, 14336, torch.bfloat16, sms=tiles + 1)[0] != big
    assert op.gemm_configs(16, 16, torch.bfloat16, sms=132)[0] == small
    assert op.outer_splits(128 * op.ROWS_PER_SPLIT, programs=4, sms=132) == 66  # 2 per SM
    assert op.outer_splits(128 * op.ROWS_PER_SPLIT, programs=4, sms=16) == 8


# --------------------------------------------------------------------------- orthonormalize and merge candidates


@pytest.mark.parametrize("candidate", ["cholesky_qr2_torch", "householder_torch"])
def test_orthonormalize_candidates_match_the_reference_and_complete_deficient_rows_alike(candidate):
    from slao_kernels import reference
    from slao_kernels.benchmarking.references import qr_with_sign_fix
    from slao_kernels.ops import orthonormalize as ortho

    fn = getattr(ortho, candidate)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 8, 96, generator=g)
    A[1, 3] = A[1, 2]  # a duplicated row: rank-deficient
    A[4] = 0.0  # no direction at all
    Q, deficient = fn(A)
    want, want_deficient = reference.orthonormalize_rows_ref(A)
    assert deficient.tolist() == want_deficient.tolist() == [False, True, False, False, True, False]
    assert torch.equal(Q[1], want[1]) and torch.equal(Q[4], want[4])  # the same completion as every other path
    good = [0, 2, 3, 5]
    assert_close_to_ref(Q[good], qr_with_sign_fix(A[good]), qr_with_sign_fix(A[good].double()), candidate)


@pytest.mark.parametrize("check_finite", [False, True])
def test_the_lerp_merge_candidate_matches_the_reference(check_finite):
    from slao_kernels.ops.scaled_merge import lerp_merge

    g = torch.Generator().manual_seed(1)
    merged = [torch.randn(5, 3, generator=g), torch.randn(7, 3, generator=g).bfloat16()]
    fine = [torch.randn(5, 3, generator=g), torch.randn(7, 3, generator=g).bfloat16()]
    want = [m.double() + 0.3 * (f.double() - m.double()) for m, f in zip(merged, fine, strict=True)]
    pt = [m + 0.3 * (f - m) for m, f in zip(merged, fine, strict=True)]
    lerp_merge(merged, fine, 0.3, check_finite)
    for got, p, w in zip(merged, pt, want, strict=True):
        assert_close_to_ref(got, p, w, "lerp_merge")
    exact = [torch.randn(4, 2, generator=g)]
    target = [torch.randn(4, 2, generator=g)]
    lerp_merge(exact, target, 1.0, check_finite)
    assert torch.equal(exact[0], target[0])  # λ = 1 is exact (SLAO's first task)


def test_the_lerp_merge_candidate_refuses_a_non_finite_result_writing_nothing():
    from slao_kernels.ops.scaled_merge import lerp_merge

    merged, fine = [torch.ones(3), torch.ones(2)], [torch.ones(3), torch.tensor([1.0, float("inf")])]
    with pytest.raises(ValueError, match="non-finite values into tensor 1"):
        lerp_merge(merged, fine, 0.5, True)
    assert torch.equal(merged[0], torch.ones(3)) and torch.equal(merged[1], torch.ones(2))


# --------------------------------------------------------------------------- the CUDA entry points' selection


@pytest.fixture
def fake_device_tuner(tmp_path, monkeypatch, tune_mode):
    """The CUDA entry points run here on CPU tensors (Triton in the interpreter), timed by a clock that
    makes ``fastest`` win; returns the list of candidate names timed."""
    timed, state = [], {"fastest": None}

    def timer(run):
        run()
        name = timed[-1] if timed else None
        return 1.0 if name == state["fastest"] else 2.0

    class Recording(Tuner):
        def choose(self, key, candidates, allow_timing=True):
            wrapped = [Candidate(c.name, (lambda c=c: (timed.append(c.name), c.run())[1])) for c in candidates]
            chosen = super().choose(key, wrapped, allow_timing)
            return next(c for c in candidates if c.name == chosen.name)
    t = Recording("fake", timer=timer, directory=str(tmp_path))
    monkeypatch.setattr(tuning, "tuner", lambda device: t)
    for module in ("slao_kernels.ops.scaled_merge", "slao_kernels.ops.orthonormalize",
                   "slao_kernels.ops.lora_linear_candidates"):
        monkeypatch.setattr(f"{module}.tuner", lambda device: t)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    return state, timed


@pytest.mark.parametrize("fastest", ["triton", "foreach_lerp"])
def test_the_cuda_merge_tunes_on_scratch_and_merges_once(fake_device_tuner, fastest):
    from slao_kernels.ops import scaled_merge as sm

    state, timed = fake_device_tuner
    state["fastest"] = fastest
    merged = [torch.randn(6, 4), torch.randn(9, 4)]
    fine = [torch.randn(6, 4), torch.randn(9, 4)]
    before = [m.clone() for m in merged]
    sm._cuda(merged, fine, 0.25, False)
    assert set(timed) == {"triton", "foreach_lerp"}  # both timed, on scratch tensors
    for got, m, f in zip(merged, before, fine, strict=True):  # merged exactly once
        torch.testing.assert_close(got, m + 0.25 * (f - m), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fastest", ["triton", "torch-cholesky-qr2", "linalg_qr"])
def test_the_cuda_orthonormalize_picks_a_candidate_with_the_reference_result(fake_device_tuner, fastest):
    from slao_kernels.benchmarking.references import qr_with_sign_fix
    from slao_kernels.ops import orthonormalize as ortho

    state, timed = fake_device_tuner
    state["fastest"] = fastest
    A = torch.randn(4, 8, 80)
    Q, deficient = ortho._cuda(A)
    assert set(timed) == {"triton", "torch-cholesky-qr2", "linalg_qr"} and not deficient.any()
    assert_close_to_ref(Q, qr_with_sign_fix(A), qr_with_sign_fix(A.double()), fastest)


def test_the_big_product_selection_runs_the_chosen_candidate(fake_device_tuner):
    from slao_kernels.ops import lora_linear as op
    from slao_kernels.ops import lora_linear_candidates as cand

    state, timed = fake_device_tuner
    state["fastest"] = "cublas+update"
    x, w, p, lt, s, b = _product(37, 70, 48, 8, torch.float32, torch.float32, True)
    out = torch.empty(37, 70)
    configs = op.gemm_configs(37, 70, torch.float32, op.INTERPRETER_SMS)
    chosen = cand.select("lora_linear.forward", x, w, p, lt, s, b, out, op.gemm_lowrank, configs)
    assert chosen.name == "cublas+update" and "torch" in timed and any(n.startswith("fused:") for n in timed)
    chosen.run()
    pt, ref = _want(x, w, p, lt, s, b, torch.float32)
    assert_close_to_ref(out, pt, ref, chosen.name)


@pytest.mark.parametrize("dt,lora_dt", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                        (torch.bfloat16, torch.bfloat16)])
def test_the_small_product_candidates_match_the_reference(dt, lora_dt):
    """The down product and the weight gradient: Triton kernel and torch product, against fp64."""
    from slao_kernels._ops import compute_dtype
    from slao_kernels.ops import lora_linear as op
    from slao_kernels.ops.lora_linear_candidates import project_torch, rank_outer_torch

    cdt = compute_dtype(dt, lora_dt)
    x2, lt, add = torch.randn(37, 48).to(dt), torch.randn(8, 48).to(lora_dt), torch.randn(37, 8)
    want_pt = (x2.to(cdt) @ lt.to(cdt).t()).float() * 0.5 + add
    want = (x2.double() @ lt.double().t()) * 0.5 + add.double()
    for fn in (op.project_triton, project_torch):
        assert_close_to_ref(fn(x2, lt, 0.5, add, compute=cdt), want_pt, want, fn.__name__)
    p, y = torch.randn(37, 8), torch.randn(37, 30).to(dt)
    want_pt = (p.to(cdt).t() @ y.to(cdt)).float() * 0.75
    want = (p.double().t() @ y.double()) * 0.75
    for fn in (op.rank_outer_triton, rank_outer_torch):
        out = torch.empty(30, 8, dtype=lora_dt).t()  # written through a transposed view, as for dB
        assert_close_to_ref(fn(p, y, 0.75, out, compute=cdt), want_pt, want, fn.__name__)


def test_the_small_products_choose_between_kernel_and_torch(fake_device_tuner):
    from slao_kernels.ops.lora_linear_candidates import choose_small

    state, timed = fake_device_tuner
    state["fastest"] = "torch"
    ran = []
    chosen = choose_small("k", torch.device("cpu"), lambda: ran.append("triton"), lambda: ran.append("torch"))
    assert chosen.name == "torch" and sorted(set(timed)) == ["torch", "triton"]

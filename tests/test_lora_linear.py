"""slao::lora_linear: Triton kernels and C++ kernels against the reference,
autograd, opcheck, gradcheck, torch.compile, autocast, and bad input."""

import pytest
import torch
from conftest import KERNEL_DEVICE, assert_close_to_ref

import slao_kernels
from slao_kernels import reference
from slao_kernels.benchmarking.references import lora_linear_eager
from slao_kernels.ops import lora_linear as op
from slao_kernels.ops._triton import rank_block

DTYPE_PAIRS = [  # (activations/base, adapter)
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
]
RANKS = [1, 8, 16, 64]


def make_inputs(M, n, m, r, dt, lora_dt, device="cpu", bias=True, lead=()):
    x = torch.randn(*lead, M, n, device=device).to(dt)
    weight = (torch.randn(m, n, device=device) / n**0.5).to(dt)
    b = torch.randn(m, device=device).to(dt) if bias else None
    A = (torch.randn(r, n, device=device) / n**0.5).to(lora_dt)
    B = (torch.randn(m, r, device=device) / r**0.5).to(lora_dt)
    return x, weight, b, A, B, 0.75


def reference_pair(fn, *tensors_and_scalars, dt, keep=()):
    """(out_pt, out_ref): ``fn`` run by torch in the inputs' own precision and in fp64.

    ``out_pt`` casts the activation-side tensors (x, weight, bias, grad_out) to
    ``dt`` but leaves the tensors at the positions in ``keep`` in their own
    dtype: the adapter A and B, the saved rank-r activation and its gradient
    (fp32 by design). So an fp32 adapter on a 16-bit model is computed in fp32
    here, as the kernels must compute it, and a kernel that rounds the adapter
    to 16 bits is outside the tolerance (test_checks_catch_a_kernel_that_downcasts_the_adapter).
    """
    def cast(d, keep):
        return [t.to(d) if isinstance(t, torch.Tensor) and i not in keep else t
                for i, t in enumerate(tensors_and_scalars)]
    return fn(*cast(dt, set(keep))), fn(*cast(torch.float64, set()))


FORWARD_ADAPTER = (3, 4)  # A, B in (x, weight, bias, A, B, scaling)
BACKWARD_ADAPTER = (1, 4, 5, 6)  # grad_act, A, B, lora_act in (grad_out, grad_act, x, weight, A, B, lora_act, ...)


def check_forward(out, act, x, weight, b, A, B, s):
    pt, ref = reference_pair(reference.lora_linear_ref, x, weight, b, A, B, s, dt=x.dtype, keep=FORWARD_ADAPTER)
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], weight.shape[0])
    assert act.dtype == torch.promote_types(torch.promote_types(x.dtype, A.dtype), torch.float32)
    assert_close_to_ref(out, pt[0], ref[0], "out")
    assert_close_to_ref(act, pt[1], ref[1], "lora_act")


def check_backward(grads, dy, ga, x, weight, A, B, act, s):
    pt, ref = reference_pair(reference.lora_linear_backward_ref, dy, ga, x, weight, A, B, act, s, True, dt=x.dtype,
                             keep=BACKWARD_ADAPTER)
    for name, g, g_pt, g_ref, like in zip(("grad_x", "grad_A", "grad_B"), grads, pt, ref, (x, A, B), strict=True):
        assert g.dtype == like.dtype and g.shape == like.shape, name
        assert_close_to_ref(g, g_pt, g_ref, name)


# --------------------------------------------------------------------------- Triton kernels


@pytest.mark.parametrize("dt,lora_dt", DTYPE_PAIRS)
@pytest.mark.parametrize("r", RANKS)
def test_triton_forward_backward(dt, lora_dt, r):
    x, weight, b, A, B, s = make_inputs(37, 70, 90, r, dt, lora_dt, KERNEL_DEVICE)
    out, act = op.lora_linear_triton(x, weight, b, A, B, s)
    check_forward(out, act, x, weight, b, A, B, s)
    dy = torch.randn_like(out)
    ga = torch.randn_like(act)
    grads = op.lora_linear_backward_triton(dy, ga, x, weight, A, B, act, s, True)
    check_backward(grads, dy, ga, x, weight, A, B, act, s)


def test_triton_no_bias_leading_dims_noncontiguous():
    x, weight, _, A, B, s = make_inputs(6, 70, 40, 8, torch.float32, torch.float32, KERNEL_DEVICE, bias=False,
                                        lead=(3,))
    x = x.transpose(0, 1)  # (6, 3, 70), non-contiguous
    assert not x.is_contiguous()
    out, act = op.lora_linear_triton(x, weight, None, A, B, s)
    check_forward(out, act, x, weight, None, A, B, s)
    dy = torch.randn_like(out)
    grads = op.lora_linear_backward_triton(dy, None, x, weight, A, B, act, s, True)
    check_backward(grads, dy, None, x, weight, A, B, act, s)


def test_triton_weight_grad_split_over_rows():
    """More rows than one program reduces: the fp32 workspace path of _rank_outer_kernel."""
    M = 3 * op.ROWS_PER_SPLIT + 5
    assert op.outer_splits(M, programs=2) > 1
    x, weight, b, A, B, s = make_inputs(M, 40, 30, 4, torch.float32, torch.float32, KERNEL_DEVICE)
    out, act = op.lora_linear_triton(x, weight, b, A, B, s)
    dy = torch.randn_like(out)
    grads = op.lora_linear_backward_triton(dy, None, x, weight, A, B, act, s, False)
    assert grads[0].numel() == 0
    pt, ref = reference_pair(reference.lora_linear_backward_ref, dy, None, x, weight, A, B, act, s, False,
                             dt=torch.float32, keep=BACKWARD_ADAPTER)
    assert_close_to_ref(grads[1], pt[1], ref[1], "grad_A")
    assert_close_to_ref(grads[2], pt[2], ref[2], "grad_B")


def test_triton_zero_tokens():
    x, weight, b, A, B, s = make_inputs(0, 70, 40, 8, torch.float32, torch.float32, KERNEL_DEVICE)
    out, act = op.lora_linear_triton(x, weight, b, A, B, s)
    assert out.shape == (0, 40) and act.shape == (0, 8)
    grads = op.lora_linear_backward_triton(out, None, x, weight, A, B, act, s, True)
    assert grads[0].shape == (0, 70)
    assert torch.equal(grads[1], torch.zeros_like(A)) and torch.equal(grads[2], torch.zeros_like(B))


@pytest.mark.parametrize("r", list(range(1, 70)))
def test_rank_tile_is_legal_for_compiled_dot(r):
    """Compiled tl.dot needs K ≥ 16 for 16-bit operands; tiles are powers of two."""
    tile = rank_block(r)
    assert tile >= 16 and tile & (tile - 1) == 0 and (tile >= r or tile == 64)
    assert op.LOWRANK_BLOCK >= 16


# --------------------------------------------------------------------------- the op (C++ on CPU, Triton on CUDA)

OP_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", OP_DEVICES)
@pytest.mark.parametrize("dt,lora_dt", DTYPE_PAIRS)
@pytest.mark.parametrize("r", RANKS)
def test_op_matches_reference(device, dt, lora_dt, r):
    x, weight, b, A, B, s = make_inputs(37, 70, 90, r, dt, lora_dt, device, lead=(2,))
    out, act = torch.ops.slao.lora_linear(x, weight, b, A, B, s)
    check_forward(out, act, x, weight, b, A, B, s)
    dy, ga = torch.randn_like(out), torch.randn_like(act)
    grads = torch.ops.slao.lora_linear_backward(dy, ga, x, weight, A, B, act, s, True)
    check_backward(grads, dy, ga, x, weight, A, B, act, s)


@pytest.mark.parametrize("dt,lora_dt", DTYPE_PAIRS + [(torch.float64, torch.float64), (torch.float32, torch.float64),
                                                    (torch.bfloat16, torch.float64), (torch.float64, torch.float32)])
@pytest.mark.parametrize("r", [3, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_small_rank_kernels_over_many_rows(dt, lora_dt, r, bias):
    """The C++ rank-tile path (r ≤ 8, the adapter zero-padded to 8): 602 rows make five accumulator chunks
    of the backward with remainders of the 4-row blocks; 33 and 47 features leave tails after the vectors;
    the adapter, the saved activation and its gradient are passed as strided views."""
    x, weight, b, A, B, s = make_inputs(301, 33, 47, r, dt, lora_dt, lead=(2,), bias=bias)
    A, B = A.t().contiguous().t(), B.t().contiguous().t()  # same values, column-major
    assert not A.is_contiguous() and not B.is_contiguous()
    out, act = torch.ops.slao.lora_linear(x, weight, b, A, B, s)
    check_forward(out, act, x, weight, b, A, B, s)
    act = act.transpose(-1, -2).contiguous().transpose(-1, -2)
    dy, ga = torch.randn_like(out), torch.randn_like(act).transpose(-1, -2).contiguous().transpose(-1, -2)
    for grad_act in (ga, None):
        grads = torch.ops.slao.lora_linear_backward(dy, grad_act, x, weight, A, B, act, s, True)
        check_backward(grads, dy, torch.zeros_like(act) if grad_act is None else ga, x, weight, A, B, act, s)
        grad_x, grad_A, grad_B = torch.ops.slao.lora_linear_backward(dy, grad_act, x, weight, A, B, act, s, False)
        assert grad_x.numel() == 0 and torch.equal(grad_A, grads[1]) and torch.equal(grad_B, grads[2])


def test_cpu_small_rank_results_do_not_depend_on_the_thread_count():
    """The rank-tile kernels sum in an order fixed by the shapes alone: lora_act, grad_A and grad_B come out
    bit for bit the same on one thread and on two (the base GEMMs are BLAS's, not covered by this)."""
    x, weight, b, A, B, s = make_inputs(601, 579, 581, 8, torch.float32, torch.float32)  # tails everywhere
    dy = torch.randn(601, 581)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            _, act = torch.ops.slao.lora_linear(x, weight, b, A, B, s)
            _, grad_A, grad_B = torch.ops.slao.lora_linear_backward(dy, None, x, weight, A, B, act, s, False)
            results.append((act, grad_A, grad_B))
    finally:
        torch.set_num_threads(threads)
    for name, one, two in zip(("lora_act", "grad_A", "grad_B"), *results, strict=True):
        assert torch.equal(one, two), name


@pytest.mark.parametrize("bias,match", [(torch.zeros(1), "bias must have shape"),
                                        (torch.zeros(2, 90), "bias must have shape"),
                                        (torch.zeros(90, dtype=torch.float64), "bias dtype")])
def test_cpu_op_refuses_a_bias_that_does_not_fit(bias, match):
    """Called directly (not through slao_kernels.lora_linear's checks), the op refuses a bias that would
    broadcast or be cast: the rank-tile path writes b + u·(s·B)ᵀ itself and reads exactly m elements."""
    x, weight, _, A, B, s = make_inputs(37, 70, 90, 8, torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.slao.lora_linear(x, weight, bias, A, B, s)


def _downcasting(forward, backward):
    """A deliberately wrong kernel pair: the adapter is rounded to bf16 on the way in and its gradients on
    the way out, what a kernel computing an fp32 adapter in 16 bits would give."""
    def r16(t):
        return t.to(torch.bfloat16).to(t.dtype)

    def fwd(x, weight, bias, A, B, s):
        return forward(x, weight, bias, r16(A), r16(B), s)

    def bwd(dy, ga, x, weight, A, B, act, s, input_grad):
        gx, gA, gB = backward(dy, ga, x, weight, r16(A), r16(B), act, s, input_grad)
        return gx, r16(gA), r16(gB)

    return fwd, bwd


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["op", "triton"])
def test_checks_catch_a_kernel_that_downcasts_the_adapter(monkeypatch, path, dt):
    """Mutation test: with the kernel entry replaced by one that rounds the fp32 adapter to bf16, the checks
    above fail: on lora_act (the forward's rank-r product), grad_A and grad_B. With a baseline that cast the
    adapter to the activations' dtype too, this kernel passed all five checks."""
    if path == "op":
        real = (torch.ops.slao.lora_linear, torch.ops.slao.lora_linear_backward)
        device = "cpu"
    else:
        real = (op.lora_linear_triton, op.lora_linear_backward_triton)
        device = KERNEL_DEVICE
    bad = _downcasting(*real)
    if path == "triton":  # the launchers' entry points replaced, as a broken kernel would be
        monkeypatch.setattr(op, "lora_linear_triton", bad[0])
        monkeypatch.setattr(op, "lora_linear_backward_triton", bad[1])
    x, weight, b, A, B, s = make_inputs(37, 70, 90, 8, dt, torch.float32, device)
    out, act = real[0](x, weight, b, A, B, s)
    check_forward(out, act, x, weight, b, A, B, s)  # the real kernel passes
    out_bad, act_bad = (op.lora_linear_triton if path == "triton" else bad[0])(x, weight, b, A, B, s)
    with pytest.raises(AssertionError, match="lora_act"):
        check_forward(out, act_bad, x, weight, b, A, B, s)
    with pytest.raises(AssertionError):
        check_forward(out_bad, act_bad, x, weight, b, A, B, s)
    dy, ga = torch.randn_like(out), torch.randn_like(act)
    grads = real[1](dy, ga, x, weight, A, B, act, s, True)
    check_backward(grads, dy, ga, x, weight, A, B, act, s)
    grads_bad = (op.lora_linear_backward_triton if path == "triton" else bad[1])(dy, ga, x, weight, A, B, act, s,
                                                                                  True)
    with pytest.raises(AssertionError, match="grad_A"):
        check_backward((grads[0], grads_bad[1], grads[2]), dy, ga, x, weight, A, B, act, s)
    with pytest.raises(AssertionError, match="grad_B"):
        check_backward((grads[0], grads[1], grads_bad[2]), dy, ga, x, weight, A, B, act, s)


def test_cpu_kernel_is_native():
    """CI builds the C++ extension; a silent fallback to the reference would hide a broken build."""
    assert slao_kernels.NATIVE_CPU


@pytest.mark.parametrize("device", OP_DEVICES)
def test_autograd_matches_eager(device):
    x, weight, b, A, B, s = make_inputs(37, 70, 50, 8, torch.float64, torch.float64, device, lead=(3,))
    x.requires_grad_(True)
    A.requires_grad_(True)
    B.requires_grad_(True)
    y = slao_kernels.lora_linear(x, weight, b, A, B, s)
    (gx, gA, gB) = torch.autograd.grad(y.square().sum(), (x, A, B))
    y_e = lora_linear_eager(x, weight, b, A, B, s)
    (ex, eA, eB) = torch.autograd.grad(y_e.square().sum(), (x, A, B))
    torch.testing.assert_close(y, y_e)
    for got, want in ((gx, ex), (gA, eA), (gB, eB)):
        torch.testing.assert_close(got, want)


def test_autograd_skips_input_grad_when_not_needed():
    x, weight, b, A, B, s = make_inputs(5, 16, 12, 2, torch.float32, torch.float32)
    A.requires_grad_(True)
    y = slao_kernels.lora_linear(x, weight, b, A, B, s)
    y.sum().backward()
    assert x.grad is None and A.grad is not None and B.grad is None


def _eager_node(y) -> bool:
    """Whether ``y`` came from an eager autograd (the C++ one on the CPU, the lean Python one elsewhere)."""
    name = y.grad_fn.name()
    return name == "_EagerLoRALinearBackward" or "LoRALinearEager" in name


@pytest.mark.parametrize("python_autograd", [False, True], ids=["native", "python"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("needs", ["x,A,B", "A,B", "A", "x"])
@pytest.mark.parametrize("device", OP_DEVICES)
def test_eager_calls_take_the_lean_autograd_with_the_registered_ops_results(device, needs, with_bias,
                                                                            python_autograd, monkeypatch):
    """A plain eager call runs the op's two kernels under a lean autograd (C++ on the CPU, a Python
    autograd.Function elsewhere: no torch.library dispatch around them); the registered op's own
    autograd, what compile, autocast and tensor subclasses see, gives the same bits: same kernels,
    same saved tensors, same gradient wiring, whichever inputs need a gradient, with or without bias.
    ``python``: the Python autograd (what CUDA and a CPU without the C++ build run), on the CPU."""
    if python_autograd:
        monkeypatch.setattr(op, "NATIVE_CPU", False)
    x, weight, b, A, B, s = make_inputs(37, 70, 50, 8, torch.float32, torch.float32, device, lead=(3,))
    b = b if with_bias else None
    wanted = [t for name, t in (("x", x), ("A", A), ("B", B)) if name in needs.split(",")]
    for t in wanted:
        t.requires_grad_(True)
    y = slao_kernels.lora_linear(x, weight, b, A, B, s)
    assert _eager_node(y)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, wanted, dy)
    y_op = torch.ops.slao.lora_linear(x, weight, b, A, B, s)[0]
    assert not _eager_node(y_op)
    grads_op = torch.autograd.grad(y_op, wanted, dy)
    assert torch.equal(y, y_op) and all(torch.equal(g, h) for g, h in zip(grads, grads_op, strict=True))
    if device == "cpu":  # under autocast the cast runs in the dispatcher, before autograd: the registered op
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not _eager_node(slao_kernels.lora_linear(x, weight, b, A, B, s))


def test_meta_tensors_trace_with_gradients_enabled():
    """Shape tracing on the meta device (no autocast there) takes the registered op and its fake."""
    x = torch.empty(2, 5, 16, device="meta", requires_grad=True)
    weight, A, B = (torch.empty(s, device="meta") for s in ((12, 16), (4, 16), (12, 4)))
    y = slao_kernels.lora_linear(x, weight, None, A.requires_grad_(), B.requires_grad_(), 2.0)
    assert y.shape == (2, 5, 12) and y.device.type == "meta" and y.requires_grad


def test_gradcheck_op_fp64():
    x, weight, b, A, B, s = make_inputs(7, 11, 9, 3, torch.float64, torch.float64, lead=(2,))
    for t in (x, A, B):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, A, B: slao_kernels.lora_linear(x, weight, b, A, B, s), (x, A, B))


def test_gradcheck_reference_fp64():
    """The reference backward is the exact gradient of the reference forward,
    including the gradient flowing into the lora_act output."""

    class RefFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, A, B):
            out, act = reference.lora_linear_ref(x, weight, b, A, B, s)
            ctx.save_for_backward(x, A, B, act)
            return out, act

        @staticmethod
        def backward(ctx, g_out, g_act):
            x, A, B, act = ctx.saved_tensors
            return reference.lora_linear_backward_ref(g_out, g_act, x, weight, A, B, act, s, True)

    x, weight, b, A, B, s = make_inputs(6, 10, 8, 3, torch.float64, torch.float64)
    for t in (x, A, B):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(RefFn.apply, (x, A, B))


def test_opcheck():
    for dt, lora_dt in [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)]:
        x, weight, b, A, B, s = make_inputs(9, 24, 20, 4, dt, lora_dt, lead=(2,))
        A.requires_grad_(True)
        B.requires_grad_(True)
        torch.library.opcheck(torch.ops.slao.lora_linear.default, (x, weight, b, A, B, s))
        out, act = torch.ops.slao.lora_linear(x, weight, b, A, B, s)
        dy = torch.randn_like(out)
        torch.library.opcheck(torch.ops.slao.lora_linear_backward.default,
                              (dy, None, x, weight, A.detach(), B.detach(), act.detach(), s, True))


def test_torch_compile_fullgraph():
    x, weight, b, A, B, s = make_inputs(9, 24, 20, 4, torch.float32, torch.float32)
    A.requires_grad_(True)
    B.requires_grad_(True)

    def step(x, A, B):
        return torch.nn.functional.silu(slao_kernels.lora_linear(x, weight, b, A, B, s)).sum()

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(x, A, B)
    gA, gB = torch.autograd.grad(loss, (A, B))
    loss_e = step(x, A, B)
    eA, eB = torch.autograd.grad(loss_e, (A, B))
    torch.testing.assert_close(loss, loss_e)
    torch.testing.assert_close(gA, eA)
    torch.testing.assert_close(gB, eB)


def test_autocast_cpu_bf16():
    """Under autocast the base runs in bf16 (like F.linear) and the fp32 adapter keeps its dtype."""
    x, weight, b, A, B, s = make_inputs(9, 24, 20, 4, torch.float32, torch.float32)
    A.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = slao_kernels.lora_linear(x, weight, b, A, B, s)
        base = torch.nn.functional.linear(x, weight, b)
    assert y.dtype == base.dtype == torch.bfloat16
    pt, ref = reference_pair(reference.lora_linear_ref, x, weight, b, A, B, s, dt=torch.bfloat16,
                             keep=FORWARD_ADAPTER)
    assert_close_to_ref(y, pt[0], ref[0], "autocast out")
    y.float().sum().backward()
    assert A.grad.dtype == torch.float32 and torch.isfinite(A.grad).all()


def test_autocast_leaves_fp64_in_fp64():
    """torch's autocast does not downcast fp64 (F.linear stays fp64); nor does lora_linear: the result and the
    gradients are fp64 and equal the fp64 reference to fp64 rounding (1e-12 ≫ the ~1e-15 of a different
    summation order on these magnitudes, ≪ the 4e-3 of a bf16 base)."""
    x, weight, b, A, B, s = make_inputs(9, 24, 20, 4, torch.float64, torch.float64, lead=(2,))
    A.requires_grad_(True)
    B.requires_grad_(True)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            y = slao_kernels.lora_linear(x, weight, b, A, B, s)
            base = torch.nn.functional.linear(x, weight, b)
        assert y.dtype == base.dtype == torch.float64
        torch.testing.assert_close(y, reference.lora_linear_ref(x, weight, b, A, B, s)[0], rtol=0, atol=1e-12)
        gA, gB = torch.autograd.grad(y.square().sum(), (A, B))
        y_e = lora_linear_eager(x, weight, b, A, B, s)
        eA, eB = torch.autograd.grad(y_e.square().sum(), (A, B))
        assert gA.dtype == gB.dtype == torch.float64
        torch.testing.assert_close(gA, eA, rtol=0, atol=1e-12)
        torch.testing.assert_close(gB, eB, rtol=0, atol=1e-12)


def test_autocast_refuses_fp64_x_with_an_fp32_weight():
    """Autocast keeps the fp64 x and casts the fp32 weight to bf16; the base GEMM cannot mix them
    (F.linear raises too): a TypeError naming both, not a kernel crash or a silent cast."""
    x, weight, b, A, B, s = make_inputs(4, 16, 12, 2, torch.float32, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="x is torch.float64 and weight is torch.float32"):
            slao_kernels.lora_linear(x.double(), weight, b, A, B, s)


def test_zero_tokens_op():
    x, weight, b, A, B, s = make_inputs(0, 16, 12, 2, torch.float32, torch.float32, lead=(4,))
    A.requires_grad_(True)
    y = slao_kernels.lora_linear(x, weight, b, A, B, s)
    assert y.shape == (4, 0, 12)
    y.sum().backward()
    assert torch.equal(A.grad, torch.zeros_like(A))


# --------------------------------------------------------------------------- bad input


def _args(**override):
    x, weight, b, A, B, s = make_inputs(4, 16, 12, 2, torch.float32, torch.float32)
    args = dict(x=x, weight=weight, bias=b, lora_A=A, lora_B=B, scaling=s)
    args.update(override)
    return args


@pytest.mark.parametrize("override,exc,match", [
    (dict(x=torch.randn(4, 15)), ValueError, "x has 15 input features"),
    (dict(lora_A=torch.randn(2, 15)), ValueError, r"lora_A must have shape \(rank, 16\)"),
    (dict(lora_B=torch.randn(11, 2)), ValueError, r"lora_B must have shape \(12, 2\)"),
    (dict(lora_B=torch.randn(12, 3)), ValueError, r"lora_B must have shape \(12, 2\)"),
    (dict(lora_A=torch.randn(0, 16), lora_B=torch.randn(12, 0)), ValueError, "rank must be >= 1"),
    (dict(lora_A=torch.randn(13, 16), lora_B=torch.randn(12, 13)), ValueError, "exceeds min"),
    (dict(bias=torch.randn(11)), ValueError, r"bias must have shape \(12,\)"),
    (dict(x=torch.randint(0, 3, (4, 16))), TypeError, "x must be a floating-point tensor"),
    (dict(lora_A=torch.randint(0, 3, (2, 16))), TypeError, "lora_A must be a floating-point"),
    (dict(x=[[1.0] * 16]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.randn(4, 16, dtype=torch.float64)), TypeError, "weight dtype torch.float32 differs from x"),
    (dict(lora_B=torch.randn(12, 2, dtype=torch.bfloat16)), TypeError, "lora_B dtype"),
    (dict(x=torch.randn(4, 16, device="meta")), ValueError, "weight is on cpu but x is on meta"),
    (dict(weight=torch.randn(12, 16, requires_grad=True)), ValueError, "weight requires grad"),
    (dict(scaling=float("nan")), TypeError, "scaling must be a finite float"),
    (dict(weight=torch.randn(12, 16, 1)), ValueError, "weight must be 2-D"),
])
def test_bad_input(override, exc, match):
    with pytest.raises(exc, match=match):
        slao_kernels.lora_linear(**_args(**override))

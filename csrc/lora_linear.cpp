// CPU kernels of slao::lora_linear and slao::lora_linear_backward.
//
//   forward   out = x·W0ᵀ + b + s·u·Bᵀ,  u = x·Aᵀ          (x: M×n, W0: m×n, A: r×n, B: m×r)
//   backward  g = s·dy·B + ∂L/∂u;  dx = dy·W0 + g·A;  dA = gᵀ·x;  dB = s·dyᵀ·u
//
// The big products (x·W0ᵀ, dy·W0) and the rank-r reductions over rows go to
// BLAS, each written straight into its destination. The reductions are issued
// in the orientation MKL runs fastest: with r = 8 at 512×576, `A·xᵀ` takes
// 31 µs against 61 µs for `x·Aᵀ`, and `uᵀ·dy` 32 µs against 123 µs for `dyᵀ·u`.
// The rank-r updates of the M×m output and of dx (K = r, memory-bound) are
// accumulated in place: by BLAS (`addmm_`, beta = 1, one rounding) when the
// output has the accumulation dtype, by our loop `add_lowrank_rows` when the
// output is 16-bit (summed in fp32 and rounded once, rather than rounding u
// and B to 16 bits for a 16-bit GEMM). For fp32 the two measured alike on
// 2 threads at that shape (fwd+bwd 1.21× vs 1.23× the frozen layer's time).
//
// Compared with the composed eager version (PEFT's `base(x) + B(A(x))·s`) this
// removes the M×m temporaries, the elementwise scale and add passes, and their
// autograd nodes. The rank-r path runs in the promotion of x's and the
// adapter's dtype (fp32 for a bf16 model with an fp32 adapter).
//
// Schemas and fake kernels: slao_kernels/_ops.py. Reference: slao_kernels/reference.py.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "simd.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace slao {
namespace {

using at::Tensor;

// out[i, :] += Σ_k coef[i, k]·rows[k, :]     out: M×N (unit column stride), coef: M×r (any strides),
// rows: r×N contiguous, all in acc_t except out. Per chunk of columns the r
// terms are summed in a register and added to the output once (one rounding).
template <typename scalar_t, typename acc_t>
void add_lowrank_rows(Tensor& out, const Tensor& coef, const Tensor& rows) {
  using vec = typename Simd<acc_t>::type;
  constexpr int64_t L = Simd<acc_t>::lanes;
  const int64_t M = out.size(0), N = out.size(1), r = rows.size(0);
  const int64_t ldo = out.stride(0), cs0 = coef.stride(0), cs1 = coef.stride(1);
  scalar_t* op = out.data_ptr<scalar_t>();
  const acc_t* cp = coef.data_ptr<acc_t>();
  const acc_t* rp = rows.data_ptr<acc_t>();
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(N * r, 1));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> c(r);
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t k = 0; k < r; ++k) c[k] = cp[i * cs0 + k * cs1];
      scalar_t* o = op + i * ldo;
      int64_t j = 0;
      // Four independent accumulators per step: one would chain r dependent
      // FMAs (4-cycle latency each); four keep the FMA units busy.
      for (; j + 4 * L <= N; j += 4 * L) {
        vec acc[4] = {};
        for (int64_t k = 0; k < r; ++k) {
          const acc_t* rk = rp + k * N + j;
          for (int u = 0; u < 4; ++u) acc[u] += c[k] * load<vec>(rk + u * L);
        }
        for (int u = 0; u < 4; ++u) add_to(o + j + u * L, acc[u]);
      }
      for (; j + L <= N; j += L) {
        vec acc = {};
        for (int64_t k = 0; k < r; ++k) acc += c[k] * load<vec>(rp + k * N + j);
        add_to(o + j, acc);
      }
      for (; j < N; ++j) {  // tail columns
        acc_t sum = 0;
        for (int64_t k = 0; k < r; ++k) sum += c[k] * rp[k * N + j];
        o[j] = static_cast<scalar_t>(static_cast<acc_t>(o[j]) + sum);
      }
    }
  });
}

// out += coef·rows. When out has the accumulation dtype, BLAS does it in place
// (addmm_ with beta = 1 also rounds once); a 16-bit out takes our loop, which
// sums in fp32 and rounds once instead of rounding coef and rows to 16 bits.
void add_lowrank(Tensor& out, const Tensor& coef, const Tensor& rows) {
  TORCH_INTERNAL_ASSERT(out.stride(1) == 1 && rows.is_contiguous() && coef.scalar_type() == rows.scalar_type());
  if (out.scalar_type() == rows.scalar_type()) {
    out.addmm_(coef, rows);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "slao::add_lowrank", [&] {
    if (rows.scalar_type() == at::kDouble) {
      add_lowrank_rows<scalar_t, double>(out, coef, rows);
    } else {
      add_lowrank_rows<scalar_t, float>(out, coef, rows);
    }
  });
}

at::ScalarType acc_dtype(const Tensor& x, const Tensor& lora_A) {
  return at::promote_types(at::promote_types(x.scalar_type(), lora_A.scalar_type()), at::kFloat);
}

void check_args(const Tensor& x, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && lora_A.dim() == 2 && lora_B.dim() == 2,
              "slao::lora_linear: expected x (..., in), weight (out, in), lora_A (r, in), lora_B (out, r)");
  TORCH_CHECK(x.size(-1) == weight.size(1) && lora_A.size(1) == weight.size(1), "slao::lora_linear: x has ",
              x.size(-1), " features, weight ", weight.sizes(), ", lora_A ", lora_A.sizes());
  TORCH_CHECK(lora_B.size(0) == weight.size(0) && lora_B.size(1) == lora_A.size(0),
              "slao::lora_linear: lora_B ", lora_B.sizes(), " does not match weight ", weight.sizes(), " and lora_A ",
              lora_A.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "slao::lora_linear: x dtype ", x.scalar_type(),
              " differs from weight dtype ", weight.scalar_type());
}

std::vector<int64_t> with_last(const Tensor& t, int64_t last) {
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end() - 1);
  shape.push_back(last);
  return shape;
}

std::tuple<Tensor, Tensor> lora_linear_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                           const Tensor& lora_A, const Tensor& lora_B, double scaling) {
  check_args(x, weight, lora_A, lora_B);
  const int64_t n = weight.size(1), m = weight.size(0), r = lora_A.size(0);
  const auto acc = acc_dtype(x, lora_A);
  Tensor x2 = x.reshape({-1, n});
  const int64_t M = x2.size(0);
  Tensor out = at::empty({M, m}, x.options());
  Tensor act = at::empty({M, r}, x.options().dtype(acc));
  if (M > 0) {
    if (bias.has_value()) {
      at::addmm_out(out, *bias, x2, weight.t());
    } else {
      at::mm_out(out, x2, weight.t());
    }
    act.copy_(at::mm(lora_A.to(acc), x2.t().to(acc)).t());  // uᵀ = A·xᵀ (r×M), the fast orientation
    // out += u·(s·B)ᵀ, in place
    add_lowrank(out, act, lora_B.t().to(acc).mul(scaling).contiguous());
  }
  return {out.view(with_last(x, m)), act.view(with_last(x, r))};
}

std::tuple<Tensor, Tensor, Tensor> lora_linear_backward_cpu(const Tensor& grad_out, const std::optional<Tensor>& grad_act,
                                                            const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                                                            const Tensor& lora_B, const Tensor& lora_act, double scaling,
                                                            bool input_grad) {
  check_args(x, weight, lora_A, lora_B);
  const int64_t n = weight.size(1), m = weight.size(0), r = lora_A.size(0);
  const auto acc = acc_dtype(x, lora_A);
  Tensor dy = grad_out.reshape({-1, m});
  Tensor x2 = x.reshape({-1, n});
  const int64_t M = x2.size(0);
  Tensor act = lora_act.reshape({M, r}).to(acc);
  Tensor dy_acc = dy.to(acc);  // no-op unless the adapter is wider than the activations
  // gᵀ = s·Bᵀ·dyᵀ + (∂L/∂u)ᵀ   (r×M)
  Tensor gT = at::mm(lora_B.t().to(acc), dy_acc.t()).mul_(scaling);
  if (grad_act.has_value()) gT.add_(grad_act->reshape({M, r}).t().to(acc));
  // dA = gᵀ·x,  dBᵀ = s·uᵀ·dy: computed in acc, stored in the adapter's dtype.
  Tensor grad_A = at::mm(gT, x2.to(acc)).to(lora_A.scalar_type());
  Tensor grad_B = at::mm(act.t(), dy_acc).mul_(scaling).t().to(lora_B.scalar_type()).contiguous();
  Tensor grad_x;
  if (input_grad) {
    grad_x = at::empty({M, n}, x.options());
    at::mm_out(grad_x, dy, weight);
    add_lowrank(grad_x, gT.t(), lora_A.to(acc).contiguous());  // dx += g·A, in place
    grad_x = grad_x.view(x.sizes());
  } else {
    grad_x = at::empty({0}, x.options());
  }
  return {grad_x, grad_A, grad_B};
}

// The eager autograd of the CPU op, in C++: what slao_kernels.lora_linear runs for a plain eager
// call on the CPU. The same two kernels and the same saved tensors as the registered op's
// autograd (slao_kernels/ops/lora_linear.py), so the same results bit for bit, without a Python
// frame in the forward or the backward (measured ~0.25 ms per call fwd+bwd at SmolLM2's q_proj
// on the 2-vCPU Xeon: the Python autograd.Function's cost). torch.compile, autocast and tensor
// subclasses keep taking the registered op.
struct LoRALinearEager : public torch::autograd::Function<LoRALinearEager> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                        const std::optional<Tensor>& bias, const Tensor& lora_A, const Tensor& lora_B,
                        double scaling) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, act] = lora_linear_cpu(x, weight, bias, lora_A, lora_B, scaling);
    ctx->save_for_backward({x, weight, lora_A, lora_B, act});
    ctx->saved_data["scaling"] = scaling;
    // needs_input_grad counts tensor inputs only, and an absent bias is none
    ctx->saved_data["lora_edge"] = static_cast<int64_t>(bias.has_value() && bias->defined() ? 3 : 2);
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool need_x = ctx->needs_input_grad(0);
    auto [grad_x, grad_A, grad_B] = lora_linear_backward_cpu(grads[0], std::nullopt, saved[0], saved[1], saved[2],
                                                             saved[3], saved[4],
                                                             ctx->saved_data["scaling"].toDouble(), need_x);
    const auto edge = static_cast<size_t>(ctx->saved_data["lora_edge"].toInt());
    return {need_x ? grad_x : Tensor(), Tensor(), Tensor(), ctx->needs_input_grad(edge) ? grad_A : Tensor(),
            ctx->needs_input_grad(edge + 1) ? grad_B : Tensor(), Tensor()};
  }
};

Tensor lora_linear_eager_autograd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                  const Tensor& lora_A, const Tensor& lora_B, double scaling) {
  return LoRALinearEager::apply(x, weight, bias, lora_A, lora_B, scaling);
}

Tensor lora_linear_eager_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                             const Tensor& lora_A, const Tensor& lora_B, double scaling) {
  return std::get<0>(lora_linear_cpu(x, weight, bias, lora_A, lora_B, scaling));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(slao, m) {
  m.def("lora_linear_eager(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(slao, CPU, m) {
  m.impl("lora_linear", &lora_linear_cpu);
  m.impl("lora_linear_backward", &lora_linear_backward_cpu);
  m.impl("lora_linear_eager", &lora_linear_eager_cpu);
}

TORCH_LIBRARY_IMPL(slao, AutogradCPU, m) { m.impl("lora_linear_eager", &lora_linear_eager_autograd); }

}  // namespace slao

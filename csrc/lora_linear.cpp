// CPU kernels of slao::lora_linear and slao::lora_linear_backward.
//
//   forward   out = x·W0ᵀ + b + s·u·Bᵀ,  u = x·Aᵀ          (x: M×n, W0: m×n, A: r×n, B: m×r)
//   backward  g = s·dy·B + ∂L/∂u;  dx = dy·W0 + g·A;  dA = gᵀ·x;  dB = s·dyᵀ·u
//
// The base products (x·W0ᵀ, dy·W0) go to the BLAS GEMM, written straight into
// the output tensor. Everything rank-r is done in ONE pass over the rows: each
// row of x / dy is read once, its r dot products and r axpys run on data in L1,
// and the result is accumulated in place into the GEMM's output row. That
// replaces the 4 (forward) / 8 (backward) passes over M×n and M×m tensors of
// the composed torch version, and its temporaries. Accumulation is in the
// promoted dtype (fp32 for 16-bit inputs, fp64 for fp64). The weight gradients
// are summed per thread chunk, then reduced in chunk order.
//
// Schemas and fake kernels: slao_kernels/_ops.py. Reference: slao_kernels/reference.py.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace slao {
namespace {

using at::Tensor;

template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

// y += alpha·x
template <typename acc_t>
inline void axpy(acc_t alpha, const acc_t* x, acc_t* y, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] += alpha * x[j];
}

// A row of `src` as acc_t: the row itself when the types agree, else a converted copy in `buf`.
template <typename scalar_t, typename acc_t>
inline const acc_t* row_as(const scalar_t* src, int64_t n, std::vector<acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<acc_t>(src[j]);
    return buf.data();
  }
}

// dst_row += Σ_k coef[k]·rows[k]   (rows: r×n, contiguous). The sum is formed
// in `buf` first and added once, so the output is rounded once, not r times.
template <typename scalar_t, typename acc_t>
inline void add_combination(scalar_t* dst, const acc_t* coef, const acc_t* rows, int64_t r, int64_t n,
                            std::vector<acc_t>& buf) {
  acc_t* d = buf.data();
  std::fill(d, d + n, acc_t(0));
  for (int64_t k = 0; k < r; ++k) axpy(coef[k], rows + k * n, d, n);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(static_cast<acc_t>(dst[j]) + d[j]);
}

at::ScalarType acc_dtype(const Tensor& x, const Tensor& lora_A) {
  return at::promote_types(at::promote_types(x.scalar_type(), lora_A.scalar_type()), at::kFloat);
}

// Rows of `t` as an (M, features) matrix whose rows are contiguous.
Tensor rows(const Tensor& t, int64_t features) {
  Tensor t2 = t.reshape({-1, features});
  return t2.stride(1) == 1 ? t2 : t2.contiguous();
}

int64_t row_grain(int64_t row_cost) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(row_cost, 1)); }

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

template <typename scalar_t, typename acc_t>
void forward_rows(const Tensor& x2, const Tensor& A, const Tensor& Bt_scaled, Tensor& act, Tensor& out) {
  const int64_t M = x2.size(0), n = x2.size(1), m = out.size(1), r = A.size(0);
  const int64_t ldx = x2.stride(0), ldo = out.stride(0);
  const scalar_t* xp = x2.data_ptr<scalar_t>();
  const acc_t* ap = A.data_ptr<acc_t>();
  const acc_t* bp = Bt_scaled.data_ptr<acc_t>();
  acc_t* up = act.data_ptr<acc_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, M, row_grain(r * (n + m)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf(std::is_same_v<scalar_t, acc_t> ? 0 : n), obuf(m);
    for (int64_t i = begin; i < end; ++i) {
      const acc_t* xi = row_as(xp + i * ldx, n, xbuf);
      acc_t* ui = up + i * r;
      for (int64_t k = 0; k < r; ++k) ui[k] = dot(xi, ap + k * n, n);
      add_combination(op + i * ldo, ui, bp, r, m, obuf);
    }
  });
}

std::tuple<Tensor, Tensor> lora_linear_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                           const Tensor& lora_A, const Tensor& lora_B, double scaling) {
  check_args(x, weight, lora_A, lora_B);
  const int64_t n = weight.size(1), m = weight.size(0), r = lora_A.size(0);
  const auto acc = acc_dtype(x, lora_A);
  Tensor x2 = rows(x, n);
  const int64_t M = x2.size(0);
  Tensor out = at::empty({M, m}, x.options());
  Tensor act = at::empty({M, r}, x.options().dtype(acc));
  if (M > 0) {
    if (bias.has_value()) {
      at::addmm_out(out, *bias, x2, weight.t());
    } else {
      at::mm_out(out, x2, weight.t());
    }
    // The adapter, converted once (r×n and r×m: tiny next to the activations),
    // with s folded into Bᵀ so the row loop does no extra multiply.
    Tensor A = lora_A.to(acc).contiguous();
    Tensor Bt = lora_B.t().to(acc).mul(scaling).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "slao::lora_linear", [&] {
      if (acc == at::kDouble) {
        forward_rows<scalar_t, double>(x2, A, Bt, act, out);
      } else {
        forward_rows<scalar_t, float>(x2, A, Bt, act, out);
      }
    });
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1), act_shape = out_shape;
  out_shape.push_back(m);
  act_shape.push_back(r);
  return {out.view(out_shape), act.view(act_shape)};
}

template <typename scalar_t, typename acc_t>
void backward_rows(const Tensor& dy, const Tensor& x2, const Tensor& act, const std::optional<Tensor>& grad_act,
                   const Tensor& A, const Tensor& Bt, double scaling, Tensor& grad_x, Tensor& dA_parts,
                   Tensor& dBt_parts) {
  const int64_t M = dy.size(0), m = dy.size(1), n = x2.size(1), r = A.size(0);
  const int64_t chunks = dA_parts.size(0);
  const bool input_grad = grad_x.numel() > 0;
  const scalar_t* dyp = dy.data_ptr<scalar_t>();
  const scalar_t* xp = x2.data_ptr<scalar_t>();
  const acc_t* up = act.data_ptr<acc_t>();
  const acc_t* gap = grad_act.has_value() ? grad_act->data_ptr<acc_t>() : nullptr;
  const acc_t* ap = A.data_ptr<acc_t>();
  const acc_t* bp = Bt.data_ptr<acc_t>();
  scalar_t* dxp = input_grad ? grad_x.data_ptr<scalar_t>() : nullptr;
  const int64_t lddy = dy.stride(0), ldx = x2.stride(0), lddx = input_grad ? grad_x.stride(0) : 0;
  const acc_t s = static_cast<acc_t>(scaling);
  at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    std::vector<acc_t> dybuf(std::is_same_v<scalar_t, acc_t> ? 0 : m), xbuf(std::is_same_v<scalar_t, acc_t> ? 0 : n),
        dxbuf(n), g(r), su(r);
    for (int64_t c = c_begin; c < c_end; ++c) {
      acc_t* dA = dA_parts[c].data_ptr<acc_t>();
      acc_t* dBt = dBt_parts[c].data_ptr<acc_t>();
      for (int64_t i = M * c / chunks; i < M * (c + 1) / chunks; ++i) {
        const acc_t* dyi = row_as(dyp + i * lddy, m, dybuf);
        const acc_t* xi = row_as(xp + i * ldx, n, xbuf);
        for (int64_t k = 0; k < r; ++k) {
          g[k] = s * dot(dyi, bp + k * m, m) + (gap ? gap[i * r + k] : acc_t(0));
          su[k] = s * up[i * r + k];
        }
        if (input_grad) add_combination(dxp + i * lddx, g.data(), ap, r, n, dxbuf);
        for (int64_t k = 0; k < r; ++k) {
          axpy(g[k], xi, dA + k * n, n);
          axpy(su[k], dyi, dBt + k * m, m);
        }
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> lora_linear_backward_cpu(const Tensor& grad_out, const std::optional<Tensor>& grad_act,
                                                            const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                                                            const Tensor& lora_B, const Tensor& lora_act, double scaling,
                                                            bool input_grad) {
  check_args(x, weight, lora_A, lora_B);
  const int64_t n = weight.size(1), m = weight.size(0), r = lora_A.size(0);
  const auto acc = acc_dtype(x, lora_A);
  Tensor dy = rows(grad_out.to(x.scalar_type()), m);
  Tensor x2 = rows(x, n);
  const int64_t M = x2.size(0);
  Tensor act = lora_act.reshape({M, r}).to(acc).contiguous();
  std::optional<Tensor> ga;
  if (grad_act.has_value()) ga = grad_act->reshape({M, r}).to(acc).contiguous();
  Tensor A = lora_A.to(acc).contiguous();
  Tensor Bt = lora_B.t().to(acc).contiguous();
  Tensor grad_x = input_grad ? at::mm(dy, weight) : at::empty({0}, x.options());
  // One weight-gradient accumulator per thread chunk: chunks·r·(n+m) values.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), M));
  Tensor dA_parts = at::zeros({chunks, r, n}, x.options().dtype(acc));
  Tensor dBt_parts = at::zeros({chunks, r, m}, x.options().dtype(acc));
  if (M > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "slao::lora_linear_backward", [&] {
      if (acc == at::kDouble) {
        backward_rows<scalar_t, double>(dy, x2, act, ga, A, Bt, scaling, grad_x, dA_parts, dBt_parts);
      } else {
        backward_rows<scalar_t, float>(dy, x2, act, ga, A, Bt, scaling, grad_x, dA_parts, dBt_parts);
      }
    });
  }
  Tensor grad_A = dA_parts.sum(0).to(lora_A.scalar_type());
  Tensor grad_B = dBt_parts.sum(0).t().to(lora_B.scalar_type()).contiguous();
  if (input_grad) grad_x = grad_x.view(x.sizes());
  return {grad_x, grad_A, grad_B};
}

}  // namespace

TORCH_LIBRARY_IMPL(slao, CPU, m) {
  m.impl("lora_linear", &lora_linear_cpu);
  m.impl("lora_linear_backward", &lora_linear_backward_cpu);
}

}  // namespace slao

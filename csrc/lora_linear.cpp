// CPU kernels of slao::lora_linear and slao::lora_linear_backward.
//
//   forward   out = x·W0ᵀ + b + s·u·Bᵀ,  u = x·Aᵀ          (x: M×n, W0: m×n, A: r×n, B: m×r)
//   backward  g = s·dy·B + ∂L/∂u;  dx = dy·W0 + g·A;  dA = gᵀ·x;  dB = s·dyᵀ·u
//
// The base products (x·W0ᵀ, dy·W0) go to BLAS. The rank-r products take one of two paths:
//
// * r ≤ kRankTile (8, the usual rank on a CPU): the register-tiled kernels of rank_tile.h, one pass
//   over the rows each way (below). With fp32/fp64 activations the pass writes its rank-r term into
//   the output first and BLAS adds the base product to it (beta = 1), so the M×m output and dx are
//   written by the pass and read once by BLAS, never read back by a separate update.
// * larger ranks: BLAS, each product written straight into its destination, the reductions in the
//   orientation MKL runs fastest (measured at r = 8, 512×576: `A·xᵀ` 31 µs against 61 µs for `x·Aᵀ`, `uᵀ·dy`
//   32 µs against 123 µs for `dyᵀ·u`), the rank-r updates of out and dx accumulated in place.
//
// Either way a 16-bit output takes its rank-r update summed in fp32 and rounded once, rather than
// rounding u and B to 16 bits for a 16-bit GEMM, and the rank-r path runs in the promotion of x's and
// the adapter's dtype (fp32 for a bf16 model with an fp32 adapter). Compared with the composed eager
// version (PEFT's `base(x) + B(A(x))·s`) this removes the M×m temporaries, the elementwise scale and
// add passes, and their autograd nodes.
//
// Schemas and fake kernels: slao_kernels/_ops.py. Reference: slao_kernels/reference.py.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "rank_tile.h"
#include "simd.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace slao {
namespace {

using at::Tensor;

// o[0:N] += Σ_k c[k]·rows[k, 0:N]   (rows: r×N contiguous, in acc_t; o in scalar_t). Per chunk of
// columns the r terms are summed in registers and added to o once (one rounding).
template <typename scalar_t, typename acc_t>
inline void add_lowrank_row(scalar_t* o, const acc_t* c, const acc_t* rows, int64_t r, int64_t N) {
  using vec = typename Simd<acc_t>::type;
  constexpr int64_t L = Simd<acc_t>::lanes;
  int64_t j = 0;
  // Four independent accumulators per step: one would chain r dependent
  // FMAs (4-cycle latency each); four keep the FMA units busy.
  for (; j + 4 * L <= N; j += 4 * L) {
    vec acc[4] = {};
    for (int64_t k = 0; k < r; ++k) {
      const acc_t* rk = rows + k * N + j;
      for (int u = 0; u < 4; ++u) acc[u] += c[k] * load<vec>(rk + u * L);
    }
    for (int u = 0; u < 4; ++u) add_to(o + j + u * L, acc[u]);
  }
  for (; j + L <= N; j += L) {
    vec acc = {};
    for (int64_t k = 0; k < r; ++k) acc += c[k] * load<vec>(rows + k * N + j);
    add_to(o + j, acc);
  }
  for (; j < N; ++j) {  // tail columns
    acc_t sum = 0;
    for (int64_t k = 0; k < r; ++k) sum += c[k] * rows[k * N + j];
    o[j] = static_cast<scalar_t>(static_cast<acc_t>(o[j]) + sum);
  }
}

// out[i, :] += Σ_k coef[i, k]·rows[k, :]     out: M×N (unit column stride), coef: M×r (any strides),
// rows: r×N contiguous, all in acc_t except out.
template <typename scalar_t, typename acc_t>
void add_lowrank_rows(Tensor& out, const Tensor& coef, const Tensor& rows) {
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
      add_lowrank_row(op + i * ldo, c.data(), rp, r, N);
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

// ------------------------------------------------------------------ small ranks (rank_tile.h)
//
// For r ≤ kRankTile the operands are zero-padded to the tile, on cache-line-aligned rows, and
//   forward   per block of rows: u_i = A·x_i, then out_i (+)= u_i·(s·B)ᵀ while the rows are in L1;
//   backward  per block of 4 rows: g_i = s·Bᵀ·dy_i + ∂L/∂u_i, dx_i (+)= g_i·A, and the rank-1 terms
//             g_iᵀ·x_i and u_iᵀ·dy_i added to the accumulators of the rows' chunk (dA, dBᵀ; a chunk's
//             accumulators stay in L1/L2 while its rows stream by once); the chunks summed in order.
// The chunks depend on M alone and every sum has a fixed order, so u, dA and dB do not depend on the
// number of threads (the BLAS path's do).

// T (or Tᵀ) times scale as a kRankTile×N block of acc_t with rows padded_stride(N) apart, rows from r on zero.
template <typename acc_t>
aligned_vector<acc_t> padded_rows(const Tensor& T, bool transpose, double scale) {
  const int64_t r = T.size(transpose ? 1 : 0), N = T.size(transpose ? 0 : 1), ld = padded_stride<acc_t>(N);
  aligned_vector<acc_t> out(kRankTile * ld, acc_t(0));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, T.scalar_type(), "slao::lora_linear", [&] {
    const auto t = T.accessor<scalar_t, 2>();
    const auto sc = static_cast<acc_t>(scale);
    for (int64_t k = 0; k < r; ++k)
      for (int64_t j = 0; j < N; ++j) out[k * ld + j] = static_cast<acc_t>(transpose ? t[j][k] : t[k][j]) * sc;
  });
  return out;
}

// The rows of an M×r acc_t tensor as M rows of kRankTile, columns from r on zero.
template <typename acc_t>
aligned_vector<acc_t> padded_coefficients(const Tensor& c) {
  const int64_t M = c.size(0), r = c.size(1);
  aligned_vector<acc_t> out(M * kRankTile, acc_t(0));
  const auto a = c.accessor<acc_t, 2>();
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < r; ++k) out[i * kRankTile + k] = a[i][k];
  return out;
}

// Rows per step of the forward pass: u for these rows, then their update, while x's and out's rows are in L1.
constexpr int64_t kForwardRows = 16;

// Rows per unit of parallel work for a pass of `per_row` multiply-adds a row.
int64_t row_grain(int64_t per_row) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(per_row, 1)); }

// out (M×m, contiguous, scalar_t) += u·(s·B)ᵀ with u = x·Aᵀ written to act (M×r, acc_t); xa: M×n contiguous
// acc_t. With Store, out = init + u·(s·B)ᵀ instead (init: m elements or null; see rank_update).
template <bool Store, typename scalar_t, typename acc_t>
void rank_tile_forward(Tensor& out, Tensor& act, const Tensor& xa, const Tensor& lora_A, const Tensor& lora_B,
                       double scaling, const acc_t* init) {
  const int64_t M = xa.size(0), n = xa.size(1), m = out.size(1), r = lora_A.size(0);
  const aligned_vector<acc_t> A = padded_rows<acc_t>(lora_A, false, 1.0), sBt = padded_rows<acc_t>(lora_B, true, scaling);
  const int64_t lda = padded_stride<acc_t>(n), ldb = padded_stride<acc_t>(m);
  aligned_vector<acc_t> U(M * kRankTile);
  const acc_t* xp = xa.data_ptr<acc_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, M, row_grain(kRankTile * (n + m)), [&](int64_t begin, int64_t end) {
    for (int64_t i0 = begin; i0 < end; i0 += kForwardRows) {
      const int64_t i1 = std::min(end, i0 + kForwardRows);
      for (int64_t i = i0; i < i1; ++i) {
        acc_t* u = U.data() + i * kRankTile;
        rank_dots(u, A.data(), lda, xp + i * n, n);
        std::fill(u + r, u + kRankTile, acc_t(0));
      }
      rank_update<Store>(op, m, U.data(), sBt.data(), ldb, init, i0, i1, m);
    }
  });
  auto a = act.accessor<acc_t, 2>();
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < r; ++k) a[i][k] = U[i * kRankTile + k];
}

// out = scale·Σ_c part_c[:r] (or its transpose), summed in chunk order and rounded once to out's dtype.
// parts: chunks blocks of kRankTile rows of N, ld apart, block_stride apart; out: r×N (or N×r) contiguous.
template <typename acc_t>
void store_sum(Tensor& out, const acc_t* parts, int64_t chunks, int64_t block_stride, int64_t ld, int64_t N,
               bool transpose, acc_t scale) {
  const int64_t r = out.size(transpose ? 1 : 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "slao::lora_linear_backward", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    std::vector<acc_t> row(N);
    for (int64_t k = 0; k < r; ++k) {
      std::copy_n(parts + k * ld, N, row.begin());
      for (int64_t c = 1; c < chunks; ++c) {
        const acc_t* p = parts + c * block_stride + k * ld;
        for (int64_t j = 0; j < N; ++j) row[j] += p[j];
      }
      for (int64_t j = 0; j < N; ++j) o[transpose ? j * r + k : k * N + j] = static_cast<scalar_t>(row[j] * scale);
    }
  });
}

// The backward's accumulator chunks: ceil(M / kChunkRows) of them, at most kMaxChunks, of near-equal
// row counts. A function of M alone, so the sums, and the results, do not depend on the number of
// threads; it also bounds the rank-r work's parallelism (one thread up to kChunkRows rows, where that
// work is a few tens of µs).
constexpr int64_t kChunkRows = 128, kMaxChunks = 16;
constexpr int64_t kRowBlock = 4;  // rows per load and store of the accumulators

// The rank-r part of the backward in one pass over the rows of dy, x and u: g_i = s·Bᵀ·dy_i + ga_i,
// dx_i += g_i·A (with Store, dx_i = g_i·A; dx may be null), and, per chunk of rows, dA += g_iᵀ·x_i and
// dBᵀ += u_iᵀ·dy_i into the chunk's own accumulators, summed in chunk order at the end. Returns (dA, dB)
// in the adapter's dtypes. dya (M×m), xa (M×n) contiguous acc_t; act, ga (M×r) acc_t.
template <bool Store, typename x_t, typename acc_t>
std::tuple<Tensor, Tensor> rank_tile_backward(const Tensor& dya, const Tensor& xa, const Tensor& act,
                                              const std::optional<Tensor>& ga, const Tensor& lora_A,
                                              const Tensor& lora_B, double scaling, x_t* dx) {
  const int64_t M = xa.size(0), n = xa.size(1), m = dya.size(1), r = lora_A.size(0);
  const aligned_vector<acc_t> A = padded_rows<acc_t>(lora_A, false, 1.0), Bt = padded_rows<acc_t>(lora_B, true, 1.0);
  const int64_t lda = padded_stride<acc_t>(n), ldb = padded_stride<acc_t>(m);
  const aligned_vector<acc_t> U = padded_coefficients<acc_t>(act);
  aligned_vector<acc_t> G = ga.has_value() ? padded_coefficients<acc_t>(*ga) : aligned_vector<acc_t>(M * kRankTile, acc_t(0));
  const int64_t chunks = std::clamp<int64_t>((M + kChunkRows - 1) / kChunkRows, 1, kMaxChunks);
  const int64_t block = kRankTile * (lda + ldb);  // one chunk's dA block, then its dBᵀ block
  aligned_vector<acc_t> parts(chunks * block, acc_t(0));
  const acc_t* dyp = dya.data_ptr<acc_t>();
  const acc_t* xp = xa.data_ptr<acc_t>();
  const auto s = static_cast<acc_t>(scaling);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      acc_t* pA = parts.data() + c * block;
      acc_t* pB = pA + kRankTile * lda;
      const int64_t end = M * (c + 1) / chunks;
      for (int64_t i0 = M * c / chunks; i0 < end; i0 += kRowBlock) {
        const int64_t nb = std::min(kRowBlock, end - i0);
        const acc_t* xr[kRowBlock];
        const acc_t* dyr[kRowBlock];
        for (int64_t t = 0; t < nb; ++t) {
          const int64_t i = i0 + t;
          xr[t] = xp + i * n;
          dyr[t] = dyp + i * m;
          acc_t g[kRankTile];
          rank_dots(g, Bt.data(), ldb, dyr[t], m);
          for (int64_t k = 0; k < r; ++k) G[i * kRankTile + k] += s * g[k];
        }
        if (dx) rank_update<Store>(dx, n, G.data(), A.data(), lda, static_cast<const acc_t*>(nullptr), i0, i0 + nb, n);
        if (nb == kRowBlock) {
          add_outer_rows<kRowBlock>(pA, lda, G.data() + i0 * kRankTile, xr, n);
          add_outer_rows<kRowBlock>(pB, ldb, U.data() + i0 * kRankTile, dyr, m);
        } else {
          for (int64_t t = 0; t < nb; ++t) {
            add_outer_rows<1>(pA, lda, G.data() + (i0 + t) * kRankTile, xr + t, n);
            add_outer_rows<1>(pB, ldb, U.data() + (i0 + t) * kRankTile, dyr + t, m);
          }
        }
      }
    }
  });
  Tensor grad_A = at::empty({r, n}, lora_A.options()), grad_B = at::empty({m, r}, lora_B.options());
  store_sum<acc_t>(grad_A, parts.data(), chunks, block, lda, n, false, acc_t(1));
  store_sum<acc_t>(grad_B, parts.data() + kRankTile * lda, chunks, block, ldb, m, true, s);
  return {grad_A, grad_B};
}

// fn(scalar_t{}, acc_t{}) for the activations' dtype and the accumulation dtype (fp32 or fp64).
template <typename Fn>
void with_acc_types(at::ScalarType scalar, at::ScalarType acc, const Fn& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, scalar, "slao::lora_linear", [&] {
    if (acc == at::kDouble) {
      fn(scalar_t{}, double{});
    } else if constexpr (!std::is_same_v<scalar_t, double>) {
      fn(scalar_t{}, float{});
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

void check_bias(const std::optional<Tensor>& bias, const Tensor& x, const Tensor& weight) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "slao::lora_linear: bias must have shape (",
              weight.size(0), ",), got ", bias->sizes());
  TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "slao::lora_linear: bias dtype ", bias->scalar_type(),
              " differs from x dtype ", x.scalar_type());
}

std::vector<int64_t> with_last(const Tensor& t, int64_t last) {
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end() - 1);
  shape.push_back(last);
  return shape;
}

std::tuple<Tensor, Tensor> lora_linear_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                           const Tensor& lora_A, const Tensor& lora_B, double scaling) {
  check_args(x, weight, lora_A, lora_B);
  check_bias(bias, x, weight);
  const int64_t n = weight.size(1), m = weight.size(0), r = lora_A.size(0);
  const auto acc = acc_dtype(x, lora_A);
  Tensor x2 = x.reshape({-1, n});
  const int64_t M = x2.size(0);
  Tensor out = at::empty({M, m}, x.options());
  Tensor act = at::empty({M, r}, x.options().dtype(acc));
  if (M > 0) {
    if (r <= kRankTile && x.scalar_type() == acc) {
      // fp32/fp64: the rank-r pass writes out = b + u·(s·B)ᵀ first, and BLAS adds x·W0ᵀ to it (beta = 1)
      const Tensor xa = x2.contiguous();
      const Tensor b = bias.has_value() ? bias->to(acc).contiguous() : Tensor();
      with_acc_types(x.scalar_type(), acc, [&](auto scalar, auto accum) {
        using x_t = decltype(scalar);
        using acc_t = decltype(accum);
        if constexpr (std::is_same_v<x_t, acc_t>) {
          rank_tile_forward<true, x_t, acc_t>(out, act, xa, lora_A, lora_B, scaling,
                                              b.defined() ? b.data_ptr<acc_t>() : nullptr);
        }
      });
      out.addmm_(x2, weight.t());
    } else {
      if (bias.has_value()) {
        at::addmm_out(out, *bias, x2, weight.t());
      } else {
        at::mm_out(out, x2, weight.t());
      }
      if (r <= kRankTile) {  // 16-bit activations: the rank-r update summed in acc_t, rounded once into out
        const Tensor xa = x2.to(acc).contiguous();
        with_acc_types(x.scalar_type(), acc, [&](auto scalar, auto accum) {
          using acc_t = decltype(accum);
          rank_tile_forward<false, decltype(scalar), acc_t>(out, act, xa, lora_A, lora_B, scaling, nullptr);
        });
      } else {
        act.copy_(at::mm(lora_A.to(acc), x2.t().to(acc)).t());  // uᵀ = A·xᵀ (r×M), the fast orientation
        add_lowrank(out, act, lora_B.t().to(acc).mul(scaling).contiguous());  // out += u·(s·B)ᵀ, in place
      }
    }
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
  if (r <= kRankTile && dy.scalar_type() == x.scalar_type()) {
    // fp32/fp64: the rank-r pass writes dx = g·A first and BLAS adds dy·W0 to it (beta = 1); 16-bit: the
    // other way round, the rank-r update summed in acc_t and rounded once into dx
    const bool store = x.scalar_type() == acc;
    Tensor grad_x = input_grad ? at::empty({M, n}, x.options()) : at::empty({0}, x.options());
    if (input_grad && M > 0 && !store) at::mm_out(grad_x, dy, weight);
    const Tensor dya = dy.to(acc).contiguous(), xa = x2.to(acc).contiguous();
    std::optional<Tensor> ga;
    if (grad_act.has_value()) ga = grad_act->reshape({M, r}).to(acc);
    Tensor grad_A, grad_B;
    with_acc_types(x.scalar_type(), acc, [&](auto scalar, auto accum) {
      using x_t = decltype(scalar);
      using acc_t = decltype(accum);
      x_t* dx = input_grad ? grad_x.data_ptr<x_t>() : nullptr;
      if constexpr (std::is_same_v<x_t, acc_t>) {
        std::tie(grad_A, grad_B) = rank_tile_backward<true, x_t, acc_t>(dya, xa, act, ga, lora_A, lora_B, scaling, dx);
      } else {
        std::tie(grad_A, grad_B) = rank_tile_backward<false, x_t, acc_t>(dya, xa, act, ga, lora_A, lora_B, scaling, dx);
      }
    });
    if (input_grad && M > 0 && store) grad_x.addmm_(dy, weight);
    return {input_grad ? grad_x.view(x.sizes()) : grad_x, grad_A, grad_B};
  }
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

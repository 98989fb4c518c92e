// CPU kernel of slao::orthonormalize_rows: for each A (r×n, r ≤ n) of a batch,
// Qᵀ where Aᵀ = Q·R with diag(R) > 0. SLAO's init for task i ≥ 2: A ← Qᵀ of
// the previous fine-tuned A.
//
// Fast path, CholeskyQR2: twice, G = X·Xᵀ (r×r), L = chol(G), X ← L⁻¹·X.
// Since Aᵀ = QR gives A·Aᵀ = RᵀR, L = Rᵀ has a positive diagonal, so the
// result is already the sign-fixed factor (R = R₂R₁ keeps a positive diagonal).
// Each matrix is done whole by one thread, in its slot of the output and one
// per-thread scratch buffer (256 KB each at r=16, n=4096: they stay in L2
// through both passes and the check): the Gram matrices and X ← L⁻¹·X as
// GEMMs into those buffers (single-threaded inside the parallel region), the
// r×r Cholesky and triangular inverse in fp64 by hand. Batched BLAS on whole tensors spent its time
// allocating and first-touching 58 MB temporaries (a fresh copy of the
// 224×16×4096 set takes 20 ms on this VM, a copy into existing memory 5 ms).
//
// CholeskyQR2 is exact to rounding for cond(A) up to ~u^(-1/2) (~3e3 in fp32)
// and silently loses orthogonality beyond, so every result is checked,
// max|QQᵀ − I| ≤ kOrthoTol and min diag(Q·Aᵀ) > n·eps·max (full numerical rank,
// signs right); a failed Cholesky or check sends the matrix to
// the stable path: Householder QR (LAPACK) in fp64, signs fixed. It also
// completes a rank-deficient A with a deterministic orthonormal complement
// (SLAO must go on) and reports which matrices were; Python warns.
//
// Schema and fake kernel: slao_kernels/_ops.py. Reference: slao_kernels/reference.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace slao {
namespace {

using at::Tensor;

// Largest accepted max|QQᵀ − I| (the library's orthonormality contract).
constexpr double kOrthoTol = 1e-5;

// G (r×r, row-major) ← its lower Cholesky factor. False if G is not positive definite.
bool cholesky_inplace(double* G, int64_t r) {
  for (int64_t j = 0; j < r; ++j) {
    double d = G[j * r + j];
    for (int64_t k = 0; k < j; ++k) d -= G[j * r + k] * G[j * r + k];
    if (!(d > 0.0)) return false;  // also catches NaN
    d = std::sqrt(d);
    G[j * r + j] = d;
    for (int64_t i = j + 1; i < r; ++i) {
      double v = G[i * r + j];
      for (int64_t k = 0; k < j; ++k) v -= G[i * r + k] * G[j * r + k];
      G[i * r + j] = v / d;
    }
  }
  return true;
}

// Linv ← L⁻¹ for lower-triangular L (both r×r, row-major; Linv's upper part zeroed).
void invert_lower(const double* L, double* Linv, int64_t r) {
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t j = 0; j < r; ++j) Linv[i * r + j] = 0.0;
    Linv[i * r + i] = 1.0 / L[i * r + i];
    for (int64_t j = 0; j < i; ++j) {
      double v = 0.0;
      for (int64_t k = j; k < i; ++k) v += L[i * r + k] * Linv[k * r + j];
      Linv[i * r + j] = -v / L[i * r + i];
    }
  }
}

// G ← X·Xᵀ (r×r, fp64) for X (r×n): one GEMM into the thread's r×r buffer.
void gram(const Tensor& X, Tensor& G_acc, std::vector<double>& G) {
  at::mm_out(G_acc, X, X.t());
  const Tensor G64 = G_acc.to(at::kDouble);
  std::copy(G64.const_data_ptr<double>(), G64.const_data_ptr<double>() + G64.numel(), G.begin());
}

// One matrix: CholeskyQR2 from X (a copy of A) into X (through `tmp`), and its
// checks. False if it needs the stable path. All buffers are the calling thread's.
bool cholesky_qr2(const Tensor& A, Tensor& X, Tensor& tmp, Tensor& small, std::vector<double>& G,
                  std::vector<double>& Linv, double rank_tol) {
  const int64_t r = X.size(0);
  Tensor src = X, dst = tmp;
  for (int pass = 0; pass < 2; ++pass) {  // X → tmp → X
    gram(src, small, G);
    if (!cholesky_inplace(G.data(), r)) return false;
    invert_lower(G.data(), Linv.data(), r);
    small.copy_(at::from_blob(Linv.data(), {r, r}, at::kDouble));
    at::mm_out(dst, small, src);
    std::swap(src, dst);
  }
  gram(X, small, G);
  for (int64_t j = 0; j < r; ++j) {
    for (int64_t k = 0; k < r; ++k) {
      if (!(std::abs(G[j * r + k] - (j == k ? 1.0 : 0.0)) <= kOrthoTol)) return false;
    }
  }
  // diag(R) = diag(Q·Aᵀ), accurate to ~u·‖A‖ (the Gram squares the condition
  // number and cannot resolve it): all of it must be clearly positive, else the
  // matrix is numerically rank-deficient, or its signs are noise.
  tmp.copy_(A);
  at::mm_out(small, X, tmp.t());
  const Tensor d = small.diagonal().to(at::kDouble);
  const double hi = d.abs().max().item<double>();
  return d.min().item<double>() > rank_tol * hi;
}

// A: (k, r, n) → (sign-fixed Qᵀ in fp64, which matrices were rank-deficient:
// |R_jj| ≤ rank_tol·max|R|).
std::tuple<Tensor, Tensor> householder_rows(const Tensor& A, double rank_tol) {
  auto [Q, R] = at::linalg_qr(A.to(at::kDouble).transpose(1, 2));  // (k, n, r), (k, r, r)
  Tensor d = R.diagonal(0, -2, -1);
  Tensor scale = R.abs().amax({1, 2}).clamp_min(1e-300).unsqueeze(1);
  Tensor deficient = d.abs().le(rank_tol * scale).any(1);
  Tensor signs = at::where(d < 0, -1.0, 1.0).to(Q.scalar_type());
  return {(Q * signs.unsqueeze(1)).transpose(1, 2), deficient};
}

std::tuple<Tensor, Tensor> orthonormalize_rows_cpu(const Tensor& A) {
  TORCH_CHECK_VALUE(A.dim() == 3, "orthonormalize_rows: expected A of shape (batch, r, n), got ", A.sizes());
  const int64_t b = A.size(0), r = A.size(1), n = A.size(2);
  TORCH_CHECK_VALUE(r <= n, "orthonormalize_rows: rows must not outnumber columns (r=", r, ", n=", n, ")");
  const auto acc = at::promote_types(A.scalar_type(), at::kFloat);
  const Tensor A_c = A.contiguous();
  Tensor Q = at::empty({b, r, n}, A.options().dtype(acc));
  Tensor deficient = at::zeros({b}, A.options().dtype(at::kBool));
  if (Q.numel() == 0) return {Q.to(A.scalar_type()), deficient};
  // Numerical rank at the precision we compute in (numpy's matrix_rank rule).
  const double rank_tol = static_cast<double>(n) * (acc == at::kDouble ? 2.220446049250313e-16 : 1.1920928955078125e-7);
  std::vector<uint8_t> ok(b, 0);
  at::parallel_for(0, b, 1, [&](int64_t i0, int64_t i1) {
    std::vector<double> G(r * r), Linv(r * r);
    Tensor tmp = at::empty({r, n}, Q.options()), small = at::empty({r, r}, Q.options());
    for (int64_t i = i0; i < i1; ++i) {
      // Converted here, by the thread that works on it: the first touch of
      // this part of the output, and the matrix is in cache for pass 1.
      Tensor X = Q.select(0, i);
      X.copy_(A_c.select(0, i));
      ok[i] = cholesky_qr2(A_c.select(0, i), X, tmp, small, G, Linv, rank_tol);
    }
  });
  std::vector<int64_t> bad;
  for (int64_t i = 0; i < b; ++i) {
    if (!ok[i]) bad.push_back(i);
  }
  if (!bad.empty()) {
    Tensor idx = at::tensor(bad, A.options().dtype(at::kLong));
    auto [Qh, rank_deficient] = householder_rows(A_c.index_select(0, idx), rank_tol);
    Q.index_copy_(0, idx, Qh.to(acc));
    deficient.index_copy_(0, idx, rank_deficient);
  }
  return {Q.to(A.scalar_type()), deficient};
}

}  // namespace

TORCH_LIBRARY_IMPL(slao, CPU, m) { m.impl("orthonormalize_rows", &orthonormalize_rows_cpu); }

}  // namespace slao

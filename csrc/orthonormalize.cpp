// CPU kernel of slao::orthonormalize_rows: for each A (r×n, r ≤ n) of a batch,
// Qᵀ where Aᵀ = Q·R with diag(R) > 0. SLAO's init for task i ≥ 2: A ← Qᵀ of
// the previous fine-tuned A.
//
// Fast path, CholeskyQR(2): G = X·Xᵀ (r×r), L = chol(G), X ← L⁻¹·X, repeated
// once more unless the Gram matrix of the result is I to fp32 rounding
// (min(kOrthoTol, √n·eps): √n·eps up to n ≈ 7000; that Gram doubles as the next
// pass's input, see cholesky_qr). Since
// Aᵀ = QR gives A·Aᵀ = RᵀR, L = Rᵀ has a positive diagonal, so the result is
// already the sign-fixed factor (R = R₂R₁ keeps a positive diagonal).
// Each matrix is done whole by one thread, in its slot of the output and one
// per-thread scratch buffer (256 KB each at r=16, n=4096: they stay in L2
// through the passes and the checks): the Gram matrices and X ← L⁻¹·X by
// register-tiled loops over raw fp32 rows (gram, apply_inverse; no tensor op
// per matrix), the r×r Cholesky and triangular inverse in fp64 by hand.
// Batched BLAS on whole tensors spent its time allocating and first-touching
// 58 MB temporaries (a fresh copy of the 224×16×4096 set takes 20 ms on this
// VM, a copy into existing memory 5 ms); BLAS per matrix ran these shapes far
// below its GEMM rate (see gram).
//
// CholeskyQR2 is exact to rounding for cond(A) up to ~u^(-1/2) (~3e3 in fp32)
// and silently loses orthogonality beyond, so every result is checked:
// max|QQᵀ − I| ≤ kOrthoTol, and min diag(Q·Aᵀ) > max(n·eps, √eps)·max_j ‖a_j‖
// (every row of R clearly above what rounding can produce, signs right). A
// row that depends on the others has a diagonal of pure rounding noise; its
// direction is noise too and would differ from path to path, so the √eps
// floor keeps such matrices off the fast path (a noise row passes the
// orthogonality check with |diag| ≤ √r·kOrthoTol·‖a_j‖ ≪ √eps·‖a_j‖).
// A failed Cholesky or check sends the matrix to the stable path (stable_rows):
// Householder QR (LAPACK) in fp64 of a fresh copy of that one matrix, signs
// fixed, rows at the fp64 noise level replaced by a deterministic completion.
// It reports which matrices were numerically rank-deficient; Python warns.
// fp64 input always takes the stable path: CholeskyQR's fp64 result is only
// orthonormal to ~u·cond² after one pass, Householder's to ~u.
//
// Non-finite input is refused (ValueError naming the matrix) by a read-only
// pass over all matrices before anything is written (check_and_first_grams,
// which computes the fp32 matrices' first Gram on the way).
// The work runs below autograd on every thread (at::parallel_for's workers do
// not inherit the caller's dispatch state): A may be an nn.Parameter.
//
// Schema and fake kernel: slao_kernels/_ops.py. Reference: slao_kernels/reference.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "rank_tile.h"
#include "simd.h"

namespace slao {
namespace {

using at::Tensor;

// Largest accepted max|QQᵀ − I| (the library's orthonormality contract).
constexpr double kOrthoTol = 1e-5;
constexpr double kEpsF32 = 1.1920928955078125e-7;  // 2^-23

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

// ---- the fast path's products, register-tiled (fp32; any r ≤ n) ----
//
// At r = 16, n = 4096 BLAS runs X·Xᵀ (N = M = r) at ~40 GFLOP/s and L⁻¹·X (K = r) at ~75 on this
// project's Xeon VM, one core: 54 µs and 28 µs for 2 MFLOP each, most of the whole op. Both are streams
// over X's rows with an r-sized side that fits in registers, like the rank-r products of lora_linear
// (rank_tile.h, whose vector types and loads these share).

// A Gram tile: TI rows × TJ rows of accumulators (TI·TJ independent FMA chains, TI + TJ loads per TI·TJ
// FMAs); 4×4 takes 24 of AVX-512's 32 vector registers, 2×4 14 of AVX2's 16.
constexpr int kGramRows = kNativeBytes == 64 ? 4 : 2;
constexpr int kGramCols = 4;

using fvec = Native<float>::type;
constexpr int64_t kFloatLanes = Native<float>::lanes;

// acc_tile[a·ld + b] += the lane products of rows i0 + a and j0 + b over columns [c0, c1) (a whole number
// of vectors), a < TI, b < TJ: the tile's accumulators, in memory between column blocks, loaded once and
// stored once per call.
template <int TI, int TJ>
void gram_tile(const float* __restrict__ X, int64_t n, int64_t i0, int64_t j0, int64_t c0, int64_t c1,
               fvec* __restrict__ acc_tile, int64_t ld) {
  constexpr int64_t L = kFloatLanes;
  fvec acc[TI][TJ];
  const float* xi[TI];
  const float* xj[TJ];
  for (int a = 0; a < TI; ++a) xi[a] = X + (i0 + a) * n;
  for (int b = 0; b < TJ; ++b) xj[b] = X + (j0 + b) * n;
  for (int a = 0; a < TI; ++a)
    for (int b = 0; b < TJ; ++b) acc[a][b] = acc_tile[a * ld + b];
  for (int64_t c = c0; c < c1; c += L) {
    fvec vi[TI], vj[TJ];
    for (int a = 0; a < TI; ++a) vi[a] = load<fvec>(xi[a] + c);
    for (int b = 0; b < TJ; ++b) vj[b] = load<fvec>(xj[b] + c);
    for (int a = 0; a < TI; ++a)
      for (int b = 0; b < TJ; ++b) acc[a][b] += vi[a] * vj[b];
  }
  for (int a = 0; a < TI; ++a)
    for (int b = 0; b < TJ; ++b) acc_tile[a * ld + b] = acc[a][b];
}

template <int TI>
void gram_tile_cols(int tj, const float* X, int64_t n, int64_t i0, int64_t j0, int64_t c0, int64_t c1,
                    fvec* acc, int64_t ld) {
  static_assert(kGramCols == 4, "one case per column count");
  switch (tj) {
    case 4: return gram_tile<TI, 4>(X, n, i0, j0, c0, c1, acc, ld);
    case 3: return gram_tile<TI, 3>(X, n, i0, j0, c0, c1, acc, ld);
    case 2: return gram_tile<TI, 2>(X, n, i0, j0, c0, c1, acc, ld);
    default: return gram_tile<TI, 1>(X, n, i0, j0, c0, c1, acc, ld);
  }
}

void gram_tile_any(int ti, int tj, const float* X, int64_t n, int64_t i0, int64_t j0, int64_t c0, int64_t c1,
                   fvec* acc, int64_t ld) {
  static_assert(kGramRows <= 4, "one case per row count");
  switch (ti) {
    case 4: return gram_tile_cols<4>(tj, X, n, i0, j0, c0, c1, acc, ld);
    case 3: return gram_tile_cols<3>(tj, X, n, i0, j0, c0, c1, acc, ld);
    case 2: return gram_tile_cols<2>(tj, X, n, i0, j0, c0, c1, acc, ld);
    default: return gram_tile_cols<1>(tj, X, n, i0, j0, c0, c1, acc, ld);
  }
}

// Σ of an accumulator's lanes in fp64 plus the tail columns [body, n) of rows i and j in fp64.
double finish_dot(const fvec& acc, const float* X, int64_t n, int64_t body, int64_t i, int64_t j) {
  double d = 0.0;
  for (int64_t l = 0; l < kFloatLanes; ++l) d += static_cast<double>(acc[l]);
  for (int64_t t = body; t < n; ++t) d += static_cast<double>(X[i * n + t]) * static_cast<double>(X[j * n + t]);
  return d;
}

// Ranks up to this keep all the Gram's accumulators (r·r vectors, 64 KB at 32) between column blocks.
// Measured at n = 4096 on the Xeon VM: at r = 48–64 a column block is down to 3–5 vectors, and loading
// and storing 16 accumulators from L2 per tile and block cost more than the per-tile sweep (r = 64: 17–18
// ms against 9–13 ms for 8 matrices); at r = 16 the blocks are a few percent faster (85 against 88–90 µs
// per matrix, one thread). Where the two cross between 16 and 48 was not measured. Either order gives
// the same bits.
constexpr int64_t kBlockedGramRank = 32;

// G ← X·Xᵀ (r×r, fp64, both triangles) for X (r×n, row-major, fp32), over the tiles of the lower triangle
// (a tile across the diagonal computes its few upper entries too: the same values). Up to
// kBlockedGramRank, column blocks of ~16 KB of X (all r rows) stay in L1 while every tile takes its share
// of them, so X is read from L2 or memory once, not once per tile; above it each tile runs over all the
// columns at once. Each entry either way: fp32 lanes over the columns in order, the lanes summed in fp64,
// then the tail columns in fp64, a fixed order. `acc_buf`: the caller's buffer for the accumulators.
void gram(const float* X, int64_t r, int64_t n, aligned_vector<float>& acc_buf, std::vector<double>& G) {
  constexpr int64_t L = kFloatLanes;
  const int64_t body = n / L * L;
  const auto tiles = [&](const auto& each) {  // each(i0, j0, ti, tj) over the lower triangle's tiles
    for (int64_t i0 = 0; i0 < r; i0 += kGramRows) {
      const int ti = static_cast<int>(std::min<int64_t>(kGramRows, r - i0));
      for (int64_t j0 = 0; j0 < i0 + ti; j0 += kGramCols)
        each(i0, j0, ti, static_cast<int>(std::min<int64_t>({kGramCols, r - j0, i0 + ti - j0})));
    }
  };
  if (r <= kBlockedGramRank) {
    acc_buf.assign(r * r * L, 0.f);
    fvec* acc = reinterpret_cast<fvec*>(acc_buf.data());
    const int64_t block = std::clamp<int64_t>(4096 / r / L * L, L, 1024);
    for (int64_t c0 = 0; c0 < body; c0 += block) {
      const int64_t c1 = std::min(body, c0 + block);
      tiles([&](int64_t i0, int64_t j0, int ti, int tj) { gram_tile_any(ti, tj, X, n, i0, j0, c0, c1, acc + i0 * r + j0, r); });
    }
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j <= i; ++j) G[i * r + j] = G[j * r + i] = finish_dot(acc[i * r + j], X, n, body, i, j);
    return;
  }
  acc_buf.assign(kGramRows * kGramCols * L, 0.f);
  fvec* acc = reinterpret_cast<fvec*>(acc_buf.data());
  tiles([&](int64_t i0, int64_t j0, int ti, int tj) {
    std::fill(acc_buf.begin(), acc_buf.end(), 0.f);
    gram_tile_any(ti, tj, X, n, i0, j0, 0, body, acc, kGramCols);
    for (int a = 0; a < ti; ++a)
      for (int b = 0; b < tj; ++b)
        G[(i0 + a) * r + j0 + b] = G[(j0 + b) * r + i0 + a] = finish_dot(acc[a * kGramCols + b], X, n, body, i0 + a, j0 + b);
  });
}

// dst ← Linv·src (row-major r×n, fp32; Linv r×r lower triangular in fp32, its upper part zero). Per
// block of kColumnVectors vectors of columns, four output rows at a time share each load of a source
// row: 4·kColumnVectors independent FMA chains; the zeros above the diagonal of a 4-row group are
// multiplied in (exact while src is finite: A is checked before anything runs, and a pass-1 result with
// an overflow fails the Gram check after it), so the row groups need no triangular bounds inside.
void apply_inverse(const float* __restrict__ Linv, const float* __restrict__ src, float* __restrict__ dst,
                   int64_t r, int64_t n) {
  using vec = Native<float>::type;
  constexpr int64_t L = Native<float>::lanes;
  constexpr int64_t CV = kColumnVectors;
  constexpr int64_t RG = 4;
  int64_t c = 0;
  for (; c + CV * L <= n; c += CV * L) {
    for (int64_t i0 = 0; i0 < r; i0 += RG) {
      const int64_t rows = std::min<int64_t>(RG, r - i0);
      vec acc[RG][CV] = {};
      for (int64_t k = 0; k < i0 + rows; ++k) {
        vec s[CV];
        for (int64_t v = 0; v < CV; ++v) s[v] = load<vec>(src + k * n + c + v * L);
        for (int64_t a = 0; a < RG; ++a) {
          const float l = a < rows ? Linv[(i0 + a) * r + k] : 0.f;
          for (int64_t v = 0; v < CV; ++v) acc[a][v] += l * s[v];
        }
      }
      for (int64_t a = 0; a < rows; ++a)
        for (int64_t v = 0; v < CV; ++v) std::memcpy(dst + (i0 + a) * n + c + v * L, &acc[a][v], sizeof(vec));
    }
  }
  for (; c < n; ++c) {  // tail columns, one at a time, the same order over k
    for (int64_t i = 0; i < r; ++i) {
      float sum = 0.f;
      for (int64_t k = 0; k <= i; ++k) sum += Linv[i * r + k] * src[k * n + c];
      dst[i * n + c] = sum;
    }
  }
}

bool near_identity(const std::vector<double>& G, int64_t r, double tol) {
  for (int64_t j = 0; j < r; ++j) {
    for (int64_t k = 0; k < r; ++k) {
      if (!(std::abs(G[j * r + k] - (j == k ? 1.0 : 0.0)) <= tol)) return false;  // NaN fails too
    }
  }
  return true;
}

// min of diag(X·Aᵀ) = the row dot products ⟨x_j, a_j⟩, in SIMD lanes of
// scalar_t, summed in fp64 (r·n multiply-adds instead of the r²·n of a GEMM).
template <typename scalar_t>
double diag_min(const scalar_t* X, const scalar_t* A, int64_t r, int64_t n) {
  using vec = typename Simd<scalar_t>::type;
  constexpr int64_t lanes = Simd<scalar_t>::lanes;
  double lo = INFINITY;
  for (int64_t j = 0; j < r; ++j) {
    const scalar_t* x = X + j * n;
    const scalar_t* a = A + j * n;
    vec acc0 = {}, acc1 = {};  // two chains: the FMA latency is hidden
    int64_t k = 0;
    for (; k + 2 * lanes <= n; k += 2 * lanes) {
      acc0 += load<vec>(x + k) * load<vec>(a + k);
      acc1 += load<vec>(x + k + lanes) * load<vec>(a + k + lanes);
    }
    double d = 0.0;
    for (int64_t l = 0; l < lanes; ++l) d += static_cast<double>(acc0[l]) + static_cast<double>(acc1[l]);
    for (; k < n; ++k) d += static_cast<double>(x[k]) * static_cast<double>(a[k]);
    lo = std::min(lo, d);
  }
  return lo;
}

// One matrix into X: CholeskyQR passes from A (`src`, in the compute dtype:
// A itself or its conversion in `tmp`) until the Gram matrix of the result is
// I to min(kOrthoTol, √n·eps) after the first pass, to kOrthoTol after the
// second. That Gram is at once the check of this pass and the input of the
// next, so a well-conditioned A (a random or a fine-tuned LoRA A: cond ≈ 1–10)
// is done after one pass: two Grams and one apply_inverse; cond up to
// ~eps^(-1/2) takes the second pass (CholeskyQR2): three Grams, two applies.
// On entry G holds src's Gram, and `tmp_holds_a` says whether tmp holds A's
// fp32 conversion (src is then tmp). False if it needs the stable path. All
// buffers are the calling thread's.
bool cholesky_qr(const Tensor& A, const float* src, float* X, float* tmp, std::vector<double>& G,
                 std::vector<double>& Linv, std::vector<float>& Lf, aligned_vector<float>& acc, double accept_tol,
                 bool tmp_holds_a) {
  const int64_t r = A.size(0), n = A.size(1);
  double row_norm2 = 0.0;  // max_j ‖a_j‖², the scale of the acceptance floor
  for (int64_t j = 0; j < r; ++j) row_norm2 = std::max(row_norm2, G[j * r + j]);
  for (int pass = 0;; ++pass) {
    if (!cholesky_inplace(G.data(), r)) return false;
    invert_lower(G.data(), Linv.data(), r);
    std::copy(Linv.begin(), Linv.end(), Lf.begin());
    apply_inverse(Lf.data(), src, pass == 0 ? X : tmp, r, n);
    if (pass == 1) {
      std::copy(tmp, tmp + r * n, X);
      tmp_holds_a = false;
    }
    gram(X, r, n, acc, G);
    // A first pass is final only when it is orthonormal to fp32 rounding (√n·eps: the Gram's own error, and
    // what a second pass would reach): a pass-1 result at 1e-5 spans A's rows only to ~1e-5·‖A‖, far
    // above rounding when n is small. The second pass is accepted at the contract's kOrthoTol.
    if (near_identity(G, r, pass == 0 ? std::min(kOrthoTol, std::sqrt(static_cast<double>(n)) * kEpsF32) : kOrthoTol))
      break;
    if (pass == 1) return false;
    src = X;
  }
  // diag(R) = diag(Q·Aᵀ), accurate to ~u·‖A‖ (the Gram squares the condition
  // number and cannot resolve it): all of it must be clearly positive, else the
  // matrix is numerically rank-deficient, or its signs (or directions) are noise.
  const bool direct = A.scalar_type() == at::kFloat && A.is_contiguous();
  if (!direct && !tmp_holds_a) {  // the fp32 copy again: pass 2 overwrote it
    at::from_blob(tmp, {r, n}, at::TensorOptions().dtype(at::kFloat)).copy_(A);
  }
  return diag_min(X, direct ? A.const_data_ptr<float>() : tmp, r, n) > accept_tol * std::sqrt(row_norm2);
}

// The fast path's buffers of one thread (its compute dtype is fp32 for every input it takes: fp32, bf16,
// fp16): the r×r factorization in fp64 and L⁻¹ in fp32, two r×n matrices (the result; A's conversion or
// pass 2's result), reallocated when the shape changes.
struct Scratch {
  std::vector<double> G, Linv;
  std::vector<float> Lf;
  aligned_vector<float> X, tmp, acc;  // acc: the Gram's r·r vector accumulators
  int64_t r = -1, n = -1;

  void fit(int64_t r_, int64_t n_) {
    if (r_ == r && n_ == n) return;
    r = r_, n = n_;
    G.assign(r * r, 0.0), Linv.assign(r * r, 0.0), Lf.assign(r * r, 0.f);
    tmp.assign(r * n, 0.f);
  }

  // One matrix into `out` (r×n fp32; when null, into X, allocated on first use): A read in place when it
  // is contiguous fp32 (with its first Gram already computed, `first_gram`), else converted into tmp
  // first. False if it needs the stable path.
  bool orthonormalize(const Tensor& A, float* out, double accept_tol, const std::vector<double>& first_gram) {
    fit(A.size(0), A.size(1));
    if (!out) {
      X.resize(r * n);
      out = X.data();
    }
    const bool direct = A.scalar_type() == at::kFloat && A.is_contiguous();
    if (!direct) at::from_blob(tmp.data(), A.sizes(), at::TensorOptions().dtype(at::kFloat)).copy_(A);
    if (direct && !first_gram.empty()) {
      G = first_gram;
    } else {
      gram(direct ? A.const_data_ptr<float>() : tmp.data(), r, n, acc, G);
    }
    return cholesky_qr(A, direct ? A.const_data_ptr<float>() : tmp.data(), out, tmp.data(), G, Linv, Lf, acc,
                       accept_tol, !direct);
  }
};

// The stable path for one (r, n) matrix of any dtype: (sign-fixed Qᵀ in fp64,
// rank-deficient: |R_jj| ≤ rank_tol·max|R| for some j). Householder QR of Aᵀ in
// fp64 on a fresh copy (the same memory layout whichever path called it, so
// every path gets the same bits). Row j whose |R_jj| ≤ n·eps64·max|R| (the fp64
// rounding level: its direction would be noise) is replaced by the canonical
// vector e_m with the largest residual against rows 0..j−1 (first m on ties),
// scaled to max|R| (1 for a zero matrix), and the QR redone; so a zero matrix
// gives the identity rows. The same sequence of ops as
// slao_kernels.reference.orthonormalize_rows_ref.
std::pair<Tensor, bool> stable_rows(const Tensor& A, double rank_tol) {
  const int64_t r = A.size(0), n = A.size(1);
  Tensor M = at::empty({r, n}, A.options().dtype(at::kDouble));
  M.copy_(A);
  auto [Q, R] = at::linalg_qr(M.t());  // (n, r), (r, r)
  const double scale = R.abs().max().item<double>();
  const bool deficient = R.diagonal().abs().le(rank_tol * std::max(scale, 1e-300)).any().item<bool>();
  for (int64_t j0 = 0;;) {
    const Tensor d = R.diagonal().abs().contiguous();
    const double* dp = d.const_data_ptr<double>();
    const double lim = static_cast<double>(n) * 2.220446049250313e-16 * R.abs().max().item<double>();
    int64_t j = j0;
    while (j < r && dp[j] > lim) ++j;
    if (j == r) break;
    const int64_t m = (1.0 - Q.narrow(1, 0, j).square().sum(1)).argmax().item<int64_t>();
    M.select(0, j).zero_();
    M.select(0, j).select(0, m).fill_(scale > 0.0 ? scale : 1.0);
    std::tie(Q, R) = at::linalg_qr(M.t());
    j0 = j + 1;
  }
  const Tensor signs = at::where(R.diagonal() < 0, -1.0, 1.0).to(at::kDouble);
  return {(Q * signs).t(), deficient};
}

// Numerical rank at the precision we compute in (numpy's matrix_rank rule).
double rank_tol_of(at::ScalarType acc, int64_t n) {
  return static_cast<double>(n) * (acc == at::kDouble ? 2.220446049250313e-16 : kEpsF32);
}

// The fast path's acceptance floor (see the top): max(n·eps, √eps) of the compute dtype.
double accept_tol_of(at::ScalarType acc, int64_t n) {
  return std::max(rank_tol_of(acc, n), std::sqrt(acc == at::kDouble ? 2.220446049250313e-16 : kEpsF32));
}

// True when no element of p[0:n] is NaN or ±Inf.
template <typename scalar_t>
bool all_finite(const scalar_t* p, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    using vec = typename Simd<scalar_t>::type;
    constexpr int64_t lanes = Simd<scalar_t>::lanes;
    vec acc = {};  // x·0 is 0 for finite x and NaN otherwise; the sum keeps a NaN
    int64_t k = 0;
    for (; k + lanes <= n; k += lanes) acc += load<vec>(p + k) * scalar_t(0);
    scalar_t s = 0;
    for (int64_t l = 0; l < lanes; ++l) s += acc[l];
    for (; k < n; ++k) s += p[k] * scalar_t(0);
    return s == scalar_t(0);
  } else {  // bf16 / fp16: non-finite ⇔ every exponent bit set
    const uint16_t exp = std::is_same_v<scalar_t, at::BFloat16> ? 0x7F80 : 0x7C00;
    uint16_t bad = 0;
    const auto* bits = reinterpret_cast<const uint16_t*>(p);
    for (int64_t k = 0; k < n; ++k) bad |= static_cast<uint16_t>((bits[k] & exp) == exp);
    return bad == 0;
  }
}

// The read-only pass over every matrix (each contiguous) before anything is written: whether it is
// finite, and for the fp32 ones the fast path's first Gram A·Aᵀ, computed in the same pass, so that A is
// read from memory twice in all (here and by L⁻¹·A), not three times. A finite diagonal of A·Aᵀ means a
// finite A: an Inf or a NaN element makes its row's sum of squares Inf or NaN in IEEE arithmetic (the
// build has no fast-math); a finite A whose Gram overflowed is told apart by the exact check (its
// Cholesky then fails, and the stable path takes it).
struct Checked {
  std::vector<std::vector<double>> grams;  // per matrix: its first Gram (fp32 matrices), else empty
  int64_t first_bad = -1;                  // index of the first matrix holding NaN or ±Inf
};

Checked check_and_first_grams(const std::vector<Tensor>& mats) {
  const int64_t k = static_cast<int64_t>(mats.size());
  Checked c;
  c.grams.resize(k);
  std::vector<uint8_t> finite(k, 1);
  at::parallel_for(0, k, 1, [&](int64_t i0, int64_t i1) {
    aligned_vector<float> acc;
    for (int64_t i = i0; i < i1; ++i) {
      const Tensor& M = mats[i];
      if (M.scalar_type() == at::kFloat && M.numel() > 0) {
        const int64_t r = M.size(0), n = M.size(1);
        std::vector<double>& G = c.grams[i];
        G.resize(r * r);
        gram(M.const_data_ptr<float>(), r, n, acc, G);
        bool diag_finite = true;
        for (int64_t j = 0; j < r; ++j) diag_finite = diag_finite && std::isfinite(G[j * r + j]);
        finite[i] = diag_finite || all_finite(M.const_data_ptr<float>(), M.numel());
        continue;
      }
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, M.scalar_type(), "orthonormalize_rows_finite",
                                      [&] { finite[i] = all_finite(M.const_data_ptr<scalar_t>(), M.numel()); });
    }
  });
  for (int64_t i = 0; i < k; ++i) {
    if (!finite[i]) {
      c.first_bad = i;
      break;
    }
  }
  return c;
}

std::tuple<Tensor, Tensor> orthonormalize_rows_cpu(const Tensor& A) {
  TORCH_CHECK_VALUE(A.dim() == 3, "orthonormalize_rows: expected A of shape (batch, r, n), got ", A.sizes());
  const int64_t b = A.size(0), r = A.size(1), n = A.size(2);
  TORCH_CHECK_VALUE(r <= n, "orthonormalize_rows: rows must not outnumber columns (r=", r, ", n=", n, ")");
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // internal copies and QR: A may require grad
  const auto acc = at::promote_types(A.scalar_type(), at::kFloat);
  const Tensor A_c = A.contiguous();
  Tensor Q = at::empty({b, r, n}, A.options().dtype(acc));
  Tensor deficient = at::zeros({b}, A.options().dtype(at::kBool));
  if (Q.numel() == 0) return {Q.to(A.scalar_type()), deficient};
  std::vector<Tensor> mats;
  for (int64_t i = 0; i < b; ++i) mats.push_back(A_c.select(0, i));
  const Checked checked = check_and_first_grams(mats);
  TORCH_CHECK_VALUE(checked.first_bad < 0, "orthonormalize_rows: A[", checked.first_bad, "] holds NaN or Inf "
                    "values; it has no orthonormal row basis");
  const double rank_tol = rank_tol_of(acc, n), accept_tol = accept_tol_of(acc, n);
  std::vector<uint8_t> ok(b, 0);
  if (acc != at::kDouble) {  // fp64: the stable path only (see the top); else fp32 (see Scratch)
    at::parallel_for(0, b, 1, [&](int64_t i0, int64_t i1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd_here;  // the workers' own thread-local state
      Scratch s;
      // Pass 1 writes its result into this matrix's slot of the output: the
      // thread that works on a matrix first-touches its memory.
      for (int64_t i = i0; i < i1; ++i) {
        ok[i] = s.orthonormalize(mats[i], Q.data_ptr<float>() + i * r * n, accept_tol, checked.grams[i]);
      }
    });
  }
  for (int64_t i = 0; i < b; ++i) {
    if (ok[i]) continue;
    auto [Qh, rank_deficient] = stable_rows(A_c.select(0, i), rank_tol);
    Q.select(0, i).copy_(Qh);
    deficient[i] = rank_deficient;
  }
  return {Q.to(A.scalar_type()), deficient};
}

// In place over a list of (r, n) matrices of any shapes and dtypes (SLAO's
// A parameters, one per layer): no output allocation, no stacking. Each
// matrix is computed into its thread's buffer from the intact original (which
// the rank check and the stable path still need) and copied back on success.
// Returns which matrices were rank-deficient.
Tensor orthonormalize_rows_inplace_cpu(at::TensorList As) {
  const int64_t k = static_cast<int64_t>(As.size());
  for (int64_t i = 0; i < k; ++i) {
    const Tensor& M = As[i];
    TORCH_CHECK_VALUE(M.dim() == 2, "orthonormalize_rows_: A[", i, "] must be (r, n), got ", M.sizes());
    TORCH_CHECK_VALUE(M.size(0) <= M.size(1), "orthonormalize_rows_: A[", i, "] has more rows than columns (",
                      M.sizes(), ")");
    TORCH_CHECK_VALUE(M.is_contiguous(), "orthonormalize_rows_: A[", i, "] must be contiguous");
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // A may be nn.Parameters (written under no_grad)
  const Checked checked = check_and_first_grams(As.vec());
  TORCH_CHECK_VALUE(checked.first_bad < 0, "orthonormalize_rows_: A[", checked.first_bad, "] holds NaN or Inf "
                    "values; it has no orthonormal row basis (nothing was written)");
  std::vector<uint8_t> ok(k, 0);
  at::parallel_for(0, k, 1, [&](int64_t i0, int64_t i1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd_here;  // the workers' own thread-local state
    Scratch s;
    for (int64_t i = i0; i < i1; ++i) {
      const Tensor& M = As[i];
      if (M.numel() == 0) {
        ok[i] = 1;
        continue;
      }
      if (at::promote_types(M.scalar_type(), at::kFloat) == at::kDouble) continue;  // the stable path only
      // built in the thread's buffer from the intact original (which the rank check and the stable path
      // still need), written over it on success
      ok[i] = s.orthonormalize(M, nullptr, accept_tol_of(at::kFloat, M.size(1)), checked.grams[i]);
      if (!ok[i]) continue;
      if (M.scalar_type() == at::kFloat) {
        std::copy(s.X.begin(), s.X.end(), M.data_ptr<float>());
      } else {  // rounded to M's dtype
        M.copy_(at::from_blob(s.X.data(), M.sizes(), at::TensorOptions().dtype(at::kFloat)));
      }
    }
  });
  Tensor deficient = at::zeros({k}, at::TensorOptions().dtype(at::kBool));
  for (int64_t i = 0; i < k; ++i) {
    if (ok[i]) continue;
    const Tensor& M = As[i];
    auto [Qh, rank_deficient] = stable_rows(M, rank_tol_of(at::promote_types(M.scalar_type(), at::kFloat), M.size(1)));
    M.copy_(Qh.to(at::promote_types(M.scalar_type(), at::kFloat)));  // rounded as orthonormalize_rows rounds it
    deficient[i] = rank_deficient;
  }
  return deficient;
}

}  // namespace

TORCH_LIBRARY_IMPL(slao, CPU, m) {
  m.impl("orthonormalize_rows", &orthonormalize_rows_cpu);
  m.impl("orthonormalize_rows_", &orthonormalize_rows_inplace_cpu);
}

}  // namespace slao

// Register-tiled kernels of the rank-r products of slao::lora_linear on the CPU, for r ≤ kRankTile.
//
// At a small rank every low-rank product has one dimension r: BLAS runs them far below its GEMM rate
// (K = r, N = r or M = r), and each is a separate pass with its own call overhead. Here the rank is a
// compile-time tile of kRankTile (operands zero-padded to it), so the r-sized side lives in registers
// and each kernel streams the long side once:
//
//   rank_dots        u = R·v for one row v (R: kRankTile×N), eight dot products sharing each load of v
//   rank_update      out[i, :] (+)= Σ_k c[i, k]·R[k, :] over rows i, R's column block held in registers
//   add_outer_rows   P[k, :] += Σ_t c[t, k]·v_t[:] for a few rows v_t, P's rows loaded and stored once per call
//
// Pure loops over raw pointers (no ATen), in acc_t (float or double), in vectors of the build
// target's native width: 512-bit with AVX-512, else 256-bit (AVX2), else 128-bit. Sums run in a fixed
// order, independent of the thread count: lanes by a halving tree, rows in order. The callers keep the
// padding exact: padded rows of R are zero and padded coefficients are set to zero, never computed
// (a dot with a zero row is NaN where the data has an Inf).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include "simd.h"

namespace slao {

constexpr int64_t kRankTile = 8;

#if defined(__AVX512F__)
constexpr int kNativeBytes = 64;
constexpr int kColumnVectors = 2;  // 32 vector registers: a 2-vector column block of 8 rows fits
#elif defined(__AVX__)
constexpr int kNativeBytes = 32;
constexpr int kColumnVectors = 1;  // 16 vector registers
#else
constexpr int kNativeBytes = 16;
constexpr int kColumnVectors = 1;
#endif

// std::vector storage on 64-byte boundaries: a vector load that straddles two cache lines costs two.
template <typename T>
struct CacheAligned {
  using value_type = T;
  CacheAligned() = default;
  template <typename U>
  CacheAligned(const CacheAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const CacheAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheAligned<U>&) const { return false; }
};
template <typename T>
using aligned_vector = std::vector<T, CacheAligned<T>>;

// Row stride of a kRankTile×N block: N rounded up to whole cache lines, so every row starts on one.
template <typename T>
constexpr int64_t padded_stride(int64_t N) {
  constexpr int64_t per_line = 64 / sizeof(T);
  return (N + per_line - 1) / per_line * per_line;
}

template <typename T>
struct Native {
  typedef T type __attribute__((vector_size(kNativeBytes)));
  static constexpr int64_t lanes = kNativeBytes / sizeof(T);
};

// Σ of the lanes of v by halving: a fixed order, log2(lanes) shuffle-adds. With __builtin_shufflevector
// (GCC 12+, clang) the halves stay in registers; older compilers take them through memory, same order.
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define SLAO_HAS_SHUFFLEVECTOR 1
#endif
#endif

template <typename vec, size_t... I>
inline auto low_half(const vec& v, std::index_sequence<I...>) {
#ifdef SLAO_HAS_SHUFFLEVECTOR
  return __builtin_shufflevector(v, v, I...);
#else
  typedef std::remove_cv_t<std::remove_reference_t<decltype(v[0])>> T;
  typedef T half __attribute__((vector_size(sizeof...(I) * sizeof(T))));
  half h;
  std::memcpy(&h, &v, sizeof(half));
  return h;
#endif
}
template <typename vec, size_t... I>
inline auto high_half(const vec& v, std::index_sequence<I...>) {
#ifdef SLAO_HAS_SHUFFLEVECTOR
  return __builtin_shufflevector(v, v, (I + sizeof...(I))...);
#else
  typedef std::remove_cv_t<std::remove_reference_t<decltype(v[0])>> T;
  typedef T half __attribute__((vector_size(sizeof...(I) * sizeof(T))));
  half h;
  std::memcpy(&h, reinterpret_cast<const char*>(&v) + sizeof(half), sizeof(half));
  return h;
#endif
}
template <typename vec>
inline auto tree_sum(const vec& v) {
  constexpr size_t lanes = sizeof(vec) / sizeof(v[0]);
  if constexpr (lanes == 1) {
    return v[0];
  } else {
    constexpr auto half = std::make_index_sequence<lanes / 2>{};
    return tree_sum(low_half(v, half) + high_half(v, half));
  }
}

// out[k] = Σ_j R[k, j]·v[j] for k < kRankTile (R: kRankTile rows of N, ldr apart).
template <typename acc_t>
inline void rank_dots(acc_t* __restrict__ out, const acc_t* __restrict__ R, int64_t ldr, const acc_t* __restrict__ v,
                      int64_t N) {
  using vec = typename Native<acc_t>::type;
  constexpr int64_t L = Native<acc_t>::lanes;
  vec part[kRankTile] = {};
  int64_t j = 0;
  for (; j + L <= N; j += L) {
    const vec vj = load<vec>(v + j);
    for (int64_t k = 0; k < kRankTile; ++k) part[k] += load<vec>(R + k * ldr + j) * vj;
  }
  for (int64_t k = 0; k < kRankTile; ++k) {
    acc_t sum = tree_sum(part[k]);
    for (int64_t t = j; t < N; ++t) sum += R[k * ldr + t] * v[t];
    out[k] = sum;
  }
}

// out[i, :] += Σ_k c[i, k]·R[k, :] for rows i0 ≤ i < i1 (out: rows of ldo elements in scalar_t; c: rows of
// kRankTile; R: kRankTile rows of N, ldr apart). Per output vector the kRankTile terms are summed in a register and
// added once (one rounding to scalar_t). With Store the rows are written instead, out[i, :] = init + Σ_k …
// (init: N elements of acc_t, or null for zero; needs scalar_t = acc_t): a first write for BLAS to add its
// product to (beta = 1), so the output is read and written once in all.
template <bool Store, typename scalar_t, typename acc_t>
void rank_update(scalar_t* __restrict__ out, int64_t ldo, const acc_t* __restrict__ c, const acc_t* __restrict__ R,
                 int64_t ldr, const acc_t* __restrict__ init, int64_t i0, int64_t i1, int64_t N) {
  static_assert(!Store || std::is_same_v<scalar_t, acc_t>, "a stored row keeps the accumulation dtype");
  using vec = typename Native<acc_t>::type;
  constexpr int64_t L = Native<acc_t>::lanes;
  constexpr int64_t CV = kColumnVectors;
  const auto put = [&](scalar_t* o, const acc_t* b, const vec& acc) {
    if constexpr (Store) {
      const vec v = b ? load<vec>(b) + acc : acc;
      std::memcpy(o, &v, sizeof(vec));
    } else {
      add_to(o, acc);
    }
  };
  int64_t j = 0;
  for (; j + CV * L <= N; j += CV * L) {
    vec rk[kRankTile][CV];
    for (int64_t k = 0; k < kRankTile; ++k)
      for (int64_t v = 0; v < CV; ++v) rk[k][v] = load<vec>(R + k * ldr + j + v * L);
    for (int64_t i = i0; i < i1; ++i) {
      const acc_t* ci = c + i * kRankTile;
      vec acc[CV];
      for (int64_t v = 0; v < CV; ++v) acc[v] = ci[0] * rk[0][v];
      for (int64_t k = 1; k < kRankTile; ++k)
        for (int64_t v = 0; v < CV; ++v) acc[v] += ci[k] * rk[k][v];
      for (int64_t v = 0; v < CV; ++v) put(out + i * ldo + j + v * L, init ? init + j + v * L : nullptr, acc[v]);
    }
  }
  for (; j + L <= N; j += L) {
    vec rk[kRankTile];
    for (int64_t k = 0; k < kRankTile; ++k) rk[k] = load<vec>(R + k * ldr + j);
    for (int64_t i = i0; i < i1; ++i) {
      const acc_t* ci = c + i * kRankTile;
      vec acc = ci[0] * rk[0];
      for (int64_t k = 1; k < kRankTile; ++k) acc += ci[k] * rk[k];
      put(out + i * ldo + j, init ? init + j : nullptr, acc);
    }
  }
  for (; j < N; ++j) {  // tail columns
    for (int64_t i = i0; i < i1; ++i) {
      const acc_t* ci = c + i * kRankTile;
      acc_t sum = ci[0] * R[j];
      for (int64_t k = 1; k < kRankTile; ++k) sum += ci[k] * R[k * ldr + j];
      scalar_t& o = out[i * ldo + j];
      if constexpr (Store) {
        o = init ? init[j] + sum : sum;
      } else {
        o = static_cast<scalar_t>(static_cast<acc_t>(o) + sum);
      }
    }
  }
}

// P[k, :] += Σ_{t<NB} c[t, k]·v[t][:] for k < kRankTile (P: kRankTile rows of N, ldp apart; c: NB rows
// of kRankTile): NB rows' rank-1 updates of an accumulator block, each accumulator vector loaded and
// stored once for all NB. Every element takes the rows' terms one by one, in order, so a sum over many
// calls equals the sum row after row whatever NB is.
template <int NB, typename acc_t>
inline void add_outer_rows(acc_t* __restrict__ P, int64_t ldp, const acc_t* __restrict__ c, const acc_t* const* v,
                           int64_t N) {
  using vec = typename Native<acc_t>::type;
  constexpr int64_t L = Native<acc_t>::lanes;
  const acc_t* __restrict__ rows[NB];
  for (int t = 0; t < NB; ++t) rows[t] = v[t];
  for (int64_t k = 0; k < kRankTile; ++k) {
    acc_t ck[NB];
    for (int t = 0; t < NB; ++t) ck[t] = c[t * kRankTile + k];
    acc_t* __restrict__ pk = P + k * ldp;
    int64_t j = 0;
    for (; j + L <= N; j += L) {
      vec a = load<vec>(pk + j);
      for (int t = 0; t < NB; ++t) a += ck[t] * load<vec>(rows[t] + j);
      std::memcpy(pk + j, &a, sizeof(vec));
    }
    for (; j < N; ++j) {
      acc_t a = pk[j];
      for (int t = 0; t < NB; ++t) a += ck[t] * rows[t][j];
      pk[j] = a;
    }
  }
}

}  // namespace slao

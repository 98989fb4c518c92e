// SIMD helpers shared by the CPU kernels: GCC/Clang vector extensions, lowered
// to whatever vector width the build target has (-march=native in setup.py).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace slao {

// A SIMD register of acc_t (GCC/Clang vector extension; lowered to whatever
// width the target has). The accumulator of add_lowrank_rows lives in these.
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float type __attribute__((vector_size(64)));
  static constexpr int64_t lanes = 16;
};
template <>
struct Simd<double> {
  typedef double type __attribute__((vector_size(64)));
  static constexpr int64_t lanes = 8;
};

template <typename vec, typename T>
inline vec load(const T* p) {
  vec v;
  std::memcpy(&v, p, sizeof(vec));  // unaligned vector load
  return v;
}

// o[0:lanes] += acc, rounding once to o's dtype.
template <typename scalar_t, typename vec>
inline void add_to(scalar_t* o, const vec& acc) {
  constexpr int64_t lanes = sizeof(vec) / sizeof(acc[0]);
  using acc_t = std::remove_cv_t<std::remove_reference_t<decltype(acc[0])>>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    vec sum = load<vec>(o) + acc;
    std::memcpy(o, &sum, sizeof(vec));
  } else {
    for (int64_t l = 0; l < lanes; ++l) o[l] = static_cast<scalar_t>(static_cast<acc_t>(o[l]) + acc[l]);
  }
}

// Σ a[j]·b[j]: four vector accumulators (independent FMA chains), lanes summed in double.
template <typename acc_t>
inline double dot(const acc_t* a, const acc_t* b, int64_t n) {
  using vec = typename Simd<acc_t>::type;
  constexpr int64_t L = Simd<acc_t>::lanes;
  vec s[4] = {};
  int64_t j = 0;
  for (; j + 4 * L <= n; j += 4 * L) {
    for (int u = 0; u < 4; ++u) s[u] += load<vec>(a + j + u * L) * load<vec>(b + j + u * L);
  }
  for (; j + L <= n; j += L) s[0] += load<vec>(a + j) * load<vec>(b + j);
  double total = 0;
  for (int u = 0; u < 4; ++u) {
    for (int64_t l = 0; l < L; ++l) total += static_cast<double>(s[u][l]);
  }
  for (; j < n; ++j) total += static_cast<double>(a[j]) * static_cast<double>(b[j]);
  return total;
}

// dst[0:n] = Σ_{k<count} coef[k]·rows[k·n : k·n + n]   (dst may not alias rows).
template <typename acc_t>
inline void combine_rows(acc_t* dst, const acc_t* coef, const acc_t* rows, int64_t count, int64_t n) {
  using vec = typename Simd<acc_t>::type;
  constexpr int64_t L = Simd<acc_t>::lanes;
  int64_t j = 0;
  for (; j + 4 * L <= n; j += 4 * L) {
    vec acc[4] = {};
    for (int64_t k = 0; k < count; ++k) {
      for (int u = 0; u < 4; ++u) acc[u] += coef[k] * load<vec>(rows + k * n + j + u * L);
    }
    std::memcpy(dst + j, acc, sizeof(acc));
  }
  for (; j < n; ++j) {
    acc_t sum = 0;
    for (int64_t k = 0; k < count; ++k) sum += coef[k] * rows[k * n + j];
    dst[j] = sum;
  }
}

}  // namespace slao

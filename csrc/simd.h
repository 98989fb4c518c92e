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

}  // namespace slao

// Runtime choice of vector width for the hand-written CPU loops. The kernels
// are written once as always-inline templates; thin wrappers compile them for
// AVX-512, AVX2+FMA and the baseline, and the widest one the processor runs is
// called. (Building the whole extension with -march=native would make a .so
// that crashes on an older processor.)
#pragma once

namespace spectral_ext {

enum class Isa { kBaseline, kAvx2, kAvx512 };

inline Isa cpu_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kBaseline;
  }();
  return isa;
#else
  return Isa::kBaseline;
#endif
}

// A 64-byte GCC vector: one AVX-512 register, two AVX2 or four SSE registers,
// whichever the enclosing function is compiled for. Written explicitly because
// GCC's auto-vectoriser scalarised the register blocks of these kernels.
template <typename T>
struct Vec64;
template <>
struct Vec64<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct Vec64<double> {
  typedef double type __attribute__((vector_size(64)));
};

template <typename T>
inline __attribute__((always_inline)) typename Vec64<T>::type load64(const T* p) {
  typename Vec64<T>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline __attribute__((always_inline)) void store64(T* p, typename Vec64<T>::type v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// Sum of p[0:n] with 64-byte partial sums (vectorised, and better conditioned
// than one running sum).
template <typename T>
inline __attribute__((always_inline)) T sum_contiguous(const T* p, int64_t n) {
  using V = typename Vec64<T>::type;
  constexpr int64_t lanes = 64 / sizeof(T);
  V part = {};
  int64_t k = 0;
  for (; k + lanes <= n; k += lanes) part += load64(p + k);
  T total = 0;
  for (int64_t l = 0; l < lanes; ++l) total += part[l];
  for (; k < n; ++k) total += p[k];
  return total;
}

// Sum of p[k] * q[k] for k < n, vectorised like sum_contiguous.
template <typename T>
inline __attribute__((always_inline)) T dot_contiguous(const T* p, const T* q, int64_t n) {
  using V = typename Vec64<T>::type;
  constexpr int64_t lanes = 64 / sizeof(T);
  V part = {};
  int64_t k = 0;
  for (; k + lanes <= n; k += lanes) part += load64(p + k) * load64(q + k);
  T total = 0;
  for (int64_t l = 0; l < lanes; ++l) total += part[l];
  for (; k < n; ++k) total += p[k] * q[k];
  return total;
}

}  // namespace spectral_ext

#if defined(__x86_64__) && defined(__GNUC__)
#define SPECTRAL_EXT_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx2,fma")))
#define SPECTRAL_EXT_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define SPECTRAL_EXT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define SPECTRAL_EXT_TARGET_AVX512
#define SPECTRAL_EXT_TARGET_AVX2
#define SPECTRAL_EXT_ALWAYS_INLINE inline
#endif

// Calls impl<T>(args...) compiled for the widest instruction set the processor
// runs. `name` must be a template declared with SPECTRAL_EXT_ISA_CLONES.
#define SPECTRAL_EXT_ISA_CLONES(name, impl)                                                \
  template <typename T, typename... Args>                                                 \
  SPECTRAL_EXT_TARGET_AVX512 void name##_avx512(Args... args) { impl<T>(args...); }       \
  template <typename T, typename... Args>                                                 \
  SPECTRAL_EXT_TARGET_AVX2 void name##_avx2(Args... args) { impl<T>(args...); }           \
  template <typename T, typename... Args>                                                 \
  void name##_baseline(Args... args) { impl<T>(args...); }                                \
  template <typename T, typename... Args>                                                 \
  void name(Args... args) {                                                               \
    switch (::spectral_ext::cpu_isa()) {                                                  \
      case ::spectral_ext::Isa::kAvx512: return name##_avx512<T>(args...);               \
      case ::spectral_ext::Isa::kAvx2: return name##_avx2<T>(args...);                   \
      default: return name##_baseline<T>(args...);                                        \
    }                                                                                     \
  }

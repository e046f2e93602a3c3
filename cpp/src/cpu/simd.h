#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>

namespace syncbn::cpu {
namespace {  // private to batch_norm_kernels.cpp, which alone includes this header

// ---------------------------------------------------------------------------
// SIMD.
//
// at::vec::Vectorized is real SIMD only where ATen compiles a kernel once per
// CPU capability (CPU_CAPABILITY_AVX2/AVX512, with -mavx2/-mavx512f) and picks
// one at run time. This file is compiled once, at the baseline ISA, where
// Vectorized is the generic scalar-array fallback and GCC keeps its values on
// the stack (accumulators stored and reloaded every iteration): measured 2-3x
// slower than the same loops on GCC/Clang vector types, which stay in
// registers (SSE2 at the x86-64 baseline, NEON on aarch64, wider when the
// build enables AVX). Other compilers use Vectorized.
#if defined(__GNUC__)
#if defined(__AVX512F__)
constexpr int kSimdBytes = 64;
#elif defined(__AVX__)
constexpr int kSimdBytes = 32;
#else
constexpr int kSimdBytes = 16;
#endif
template <typename T>
struct GnuRaw;
template <>
struct GnuRaw<float> {
  typedef float type __attribute__((vector_size(kSimdBytes)));
};
template <>
struct GnuRaw<double> {
  typedef double type __attribute__((vector_size(kSimdBytes)));
};

// The subset of the Vectorized interface used here.
template <typename T>
struct GnuVec {
  using Raw = typename GnuRaw<T>::type;
  Raw raw;

  static constexpr int64_t size() { return kSimdBytes / sizeof(T); }
  GnuVec() : raw{} {}
  GnuVec(T value) : raw(Raw{} + value) {}
  static C10_ALWAYS_INLINE GnuVec loadu(const T* ptr) {
    GnuVec v;
    std::memcpy(&v.raw, ptr, sizeof(Raw));
    return v;
  }
  C10_ALWAYS_INLINE void store(T* ptr) const { std::memcpy(ptr, &raw, sizeof(Raw)); }
  static C10_ALWAYS_INLINE GnuVec of(Raw raw) {
    GnuVec v;
    v.raw = raw;
    return v;
  }
  friend C10_ALWAYS_INLINE GnuVec operator+(const GnuVec& a, const GnuVec& b) { return of(a.raw + b.raw); }
  friend C10_ALWAYS_INLINE GnuVec operator-(const GnuVec& a, const GnuVec& b) { return of(a.raw - b.raw); }
  friend C10_ALWAYS_INLINE GnuVec operator*(const GnuVec& a, const GnuVec& b) { return of(a.raw * b.raw); }
};
template <typename T>
using Simd = GnuVec<T>;
#else
template <typename T>
using Simd = at::vec::Vectorized<T>;
#endif

// kWidth values of type T as four SIMD vectors: four independent dependency
// chains per accumulator (a single chain is bound by the add latency).
template <typename T>
struct Quad {
  using V = Simd<T>;
  static constexpr int64_t kPart = V::size();
  static constexpr int64_t kWidth = 4 * kPart;
  V a, b, c, d;

  Quad() : a(T(0)), b(T(0)), c(T(0)), d(T(0)) {}
  explicit Quad(T value) : a(value), b(value), c(value), d(value) {}
  Quad(const V& a_, const V& b_, const V& c_, const V& d_) : a(a_), b(b_), c(c_), d(d_) {}

  static C10_ALWAYS_INLINE Quad load(const T* p) {
    return {V::loadu(p), V::loadu(p + kPart), V::loadu(p + 2 * kPart), V::loadu(p + 3 * kPart)};
  }
  C10_ALWAYS_INLINE void store(T* p) const {
    a.store(p);
    b.store(p + kPart);
    c.store(p + 2 * kPart);
    d.store(p + 3 * kPart);
  }
  // The first `count` values from p (count < kWidth); the other lanes are zero.
  static Quad load_partial(const T* p, int64_t count) {
    return {load_part(p, count), load_part(p + kPart, count - kPart), load_part(p + 2 * kPart, count - 2 * kPart),
            load_part(p + 3 * kPart, count - 3 * kPart)};
  }
  void store_partial(T* p, int64_t count) const {
    store_part(a, p, count);
    store_part(b, p + kPart, count - kPart);
    store_part(c, p + 2 * kPart, count - 2 * kPart);
    store_part(d, p + 3 * kPart, count - 3 * kPart);
  }
  // These values with the lanes past `count` set to zero (a multiply by a 0/1
  // mask: exact for finite values, and no trip through memory).
  Quad first(int64_t count) const {
    static constexpr auto kMasks = [] {
      std::array<T, 2 * kWidth> masks{};
      for (int64_t i = 0; i < kWidth; ++i) masks[i] = T(1);
      return masks;
    }();
    return *this * load(kMasks.data() + kWidth - count);
  }

 private:
  // One vector of a partial load or store: `count` may be <= 0 or >= kPart.
  static C10_ALWAYS_INLINE V load_part(const T* p, int64_t count) {
    if (count >= kPart) return V::loadu(p);
    T buffer[kPart] = {};
    if (count > 0) std::memcpy(buffer, p, count * sizeof(T));
    return V::loadu(buffer);
  }
  static C10_ALWAYS_INLINE void store_part(const V& v, T* p, int64_t count) {
    if (count >= kPart) {
      v.store(p);
    } else if (count > 0) {
      T buffer[kPart];
      v.store(buffer);
      std::memcpy(p, buffer, count * sizeof(T));
    }
  }

 public:
  T sum() const {
    T buffer[kPart];
    ((a + b) + (c + d)).store(buffer);
    T total = 0;
    for (int64_t i = 0; i < kPart; ++i) total += buffer[i];
    return total;
  }

  friend C10_ALWAYS_INLINE Quad operator+(const Quad& x, const Quad& y) {
    return {x.a + y.a, x.b + y.b, x.c + y.c, x.d + y.d};
  }
  friend C10_ALWAYS_INLINE Quad operator-(const Quad& x, const Quad& y) {
    return {x.a - y.a, x.b - y.b, x.c - y.c, x.d - y.d};
  }
  friend C10_ALWAYS_INLINE Quad operator*(const Quad& x, const Quad& y) {
    return {x.a * y.a, x.b * y.b, x.c * y.c, x.d * y.d};
  }
};

// x * y + z
template <typename T>
C10_ALWAYS_INLINE Quad<T> madd(const Quad<T>& x, const Quad<T>& y, const Quad<T>& z) {
  return x * y + z;
}

// Float16 and bfloat16 <-> float a vector at a time, bit for bit as c10's
// scalar conversions (c10::detail::fp16_ieee_to_fp32_value,
// fp16_ieee_from_fp32_value, BFloat16's round_to_nearest_even, all
// branch-free). c10's per-value float16 conversions (no F16C at the baseline
// ISA) made float16 kernels ~8x slower than float32.
#if defined(__GNUC__) && defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector) && __has_builtin(__builtin_convertvector)
#define SYNCBN_VECTOR_CONVERT 1
#endif
#endif
#if defined(SYNCBN_VECTOR_CONVERT)
typedef uint32_t U32Raw __attribute__((vector_size(kSimdBytes)));
typedef uint16_t U16Raw __attribute__((vector_size(kSimdBytes)));
using F32Raw = GnuRaw<float>::type;
constexpr int kLanes = kSimdBytes / 4;

// `mask` lanes are all ones or all zeros (a vector comparison's result).
C10_ALWAYS_INLINE U32Raw select(U32Raw mask, U32Raw if_true, U32Raw if_false) {
  return (if_true & mask) | (if_false & ~mask);
}
// The 16-bit values kFirst, kFirst + 1, ... of `packed` into the high halves of
// 32-bit lanes (an interleave with zeros: one unpack instruction on SSE2).
template <int kFirst, size_t... K>
C10_ALWAYS_INLINE U32Raw to_high_halves(U16Raw packed, std::index_sequence<K...>) {
  return (U32Raw)__builtin_shufflevector(U16Raw{}, packed,
                                         ((K % 2) ? int(2 * kLanes + kFirst + K / 2) : int(kFirst + K / 2))...);
}
// The low (kHalf = 0) or high (kHalf = 1) halves of the 32-bit lanes of lo, then hi.
template <int kHalf, size_t... K>
C10_ALWAYS_INLINE U16Raw pick_halves(U32Raw lo, U32Raw hi, std::index_sequence<K...>) {
  return __builtin_shufflevector((U16Raw)lo, (U16Raw)hi, int(2 * K + kHalf)...);
}

// A 16-bit float in the high half of each lane -> float.
template <typename T>
C10_ALWAYS_INLINE Simd<float> widen(U32Raw w) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    return Simd<float>::of((F32Raw)w);
  } else {
    const U32Raw sign = w & 0x80000000u;
    const U32Raw two_w = w + w;
    const F32Raw normalized = (F32Raw)((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const F32Raw denormalized = (F32Raw)((two_w >> 17) | (126u << 23)) - 0.5f;
    const U32Raw is_denormal = (U32Raw)(two_w < (1u << 27));
    return Simd<float>::of((F32Raw)(sign | select(is_denormal, (U32Raw)denormalized, (U32Raw)normalized)));
  }
}
// float -> a 16-bit float: bfloat16 in the high half of each lane, float16 in the low half.
template <typename T>
C10_ALWAYS_INLINE U32Raw narrow(const Simd<float>& value) {
  const F32Raw f = value.raw;
  const U32Raw w = (U32Raw)f;
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    return select((U32Raw)(f != f), U32Raw{} + 0x7FC00000u, w + (((w >> 16) & 1u) + 0x7FFFu));
  } else {
    F32Raw base = ((F32Raw)(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
    const U32Raw shl1_w = w + w;
    const U32Raw sign = w & 0x80000000u;
    U32Raw bias = shl1_w & 0xFF000000u;
    bias = select((U32Raw)(bias < 0x71000000u), U32Raw{} + 0x71000000u, bias);
    base = (F32Raw)((bias >> 1) + 0x07800000u) + base;
    const U32Raw bits = (U32Raw)base;
    const U32Raw nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (sign >> 16) | select((U32Raw)(shl1_w > 0xFF000000u), U32Raw{} + 0x7E00u, nonsign);
  }
}
// Quad<float>::kWidth 16-bit floats from p.
template <typename T>
C10_ALWAYS_INLINE Quad<float> widen_quad(const void* p) {
  U16Raw first, second;
  std::memcpy(&first, p, sizeof(U16Raw));
  std::memcpy(&second, static_cast<const char*>(p) + sizeof(U16Raw), sizeof(U16Raw));
  constexpr auto kAll = std::make_index_sequence<2 * kLanes>{};
  return {widen<T>(to_high_halves<0>(first, kAll)), widen<T>(to_high_halves<kLanes>(first, kAll)),
          widen<T>(to_high_halves<0>(second, kAll)), widen<T>(to_high_halves<kLanes>(second, kAll))};
}
template <typename T>
C10_ALWAYS_INLINE void narrow_quad(const Quad<float>& values, void* p) {
  constexpr int kHalf = std::is_same_v<T, at::BFloat16> ? 1 : 0;
  constexpr auto kAll = std::make_index_sequence<2 * kLanes>{};
  const U16Raw first = pick_halves<kHalf>(narrow<T>(values.a), narrow<T>(values.b), kAll);
  const U16Raw second = pick_halves<kHalf>(narrow<T>(values.c), narrow<T>(values.d), kAll);
  std::memcpy(p, &first, sizeof(U16Raw));
  std::memcpy(static_cast<char*>(p) + sizeof(U16Raw), &second, sizeof(U16Raw));
}
#endif

// Loads and stores of the input's dtype as acc values.
template <typename scalar_t>
struct Io {
  using acc_t = at::opmath_type<scalar_t>;
  using Q = Quad<acc_t>;
  static constexpr int64_t kWidth = Q::kWidth;

  // kWidth values from p, or the first `count` (the other lanes zero).
  template <bool kFull, typename T>
  static C10_ALWAYS_INLINE Q load(const T* p, int64_t count) {
    if constexpr (!std::is_same_v<T, acc_t>) {
#if defined(SYNCBN_VECTOR_CONVERT)
      if constexpr (kFull) {
        return widen_quad<T>(p);
      } else {
        uint16_t buffer[kWidth] = {};
        std::memcpy(buffer, p, count * sizeof(T));
        return widen_quad<T>(buffer);
      }
#else
      acc_t buffer[kWidth] = {};
      const int64_t n = kFull ? kWidth : count;
      for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<acc_t>(p[i]);
      return Q::load(buffer);
#endif
    } else if constexpr (kFull) {
      return Q::load(p);
    } else {
      return Q::load_partial(p, count);
    }
  }
  template <bool kFull, typename T>
  static C10_ALWAYS_INLINE void store(T* p, int64_t count, const Q& values) {
    if constexpr (!std::is_same_v<T, acc_t>) {
#if defined(SYNCBN_VECTOR_CONVERT)
      if constexpr (kFull) {
        narrow_quad<T>(values, p);
      } else {
        uint16_t buffer[kWidth];
        narrow_quad<T>(values, buffer);
        std::memcpy(p, buffer, count * sizeof(T));
      }
#else
      acc_t buffer[kWidth];
      values.store(buffer);
      const int64_t n = kFull ? kWidth : count;
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(buffer[i]);
#endif
    } else if constexpr (kFull) {
      values.store(p);
    } else {
      values.store_partial(p, count);
    }
  }
  // Values with the lanes past `count` zeroed: a partial load's zero lanes
  // after a shift has moved them.
  template <bool kFull>
  static C10_ALWAYS_INLINE Q first(const Q& values, int64_t count) {
    if constexpr (kFull) {
      return values;
    } else {
      return values.first(count);
    }
  }
};

// Calls body(std::true_type, offset, kWidth) for each full vector of [0, length)
// and body(std::false_type, offset, count) for the rest.
template <typename scalar_t, class Body>
C10_ALWAYS_INLINE void for_each_vector(int64_t length, const Body& body) {
  constexpr int64_t kWidth = Io<scalar_t>::kWidth;
  int64_t i = 0;
  for (; i + kWidth <= length; i += kWidth) body(std::true_type{}, i, kWidth);
  if (i < length) body(std::false_type{}, i, length - i);
}

}  // namespace
}  // namespace syncbn::cpu

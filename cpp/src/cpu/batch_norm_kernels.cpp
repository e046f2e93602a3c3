#include "batch_norm_kernels.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <exception>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/csrc/stable/c/shim.h>

// Layouts (see Layout). A "planar" input is contiguous (N, C, S...): channel c
// is N segments of prod(S) values, and the kernels vectorize along a segment. A
// "rows" input has the channel as its fastest dim (channels_last, 2-d (N, C)):
// rows of C values, and the kernels vectorize across channels.
//
// Numerics. Values are accumulated in the acc type (float, or double for
// double) only within blocks, so that a lane of a vector accumulator (or a
// channel's accumulator in a rows block) adds at most a few hundred values;
// block results are merged in double. The local statistics use a shifted
// two-pass per block (the second pass reads the block from cache) and Chan's
// formula across blocks: sum and sum of squares are never formed.
//
// Determinism. The work is cut into tasks by the input's sizes only, never by
// the thread count, and partial results are merged in task order: results are
// bitwise the same for any number of threads.
namespace syncbn::cpu {
namespace {

// Planar: values of one channel accumulated in the acc type before a merge in
// double (4096 / 16 float lanes = 256 values per lane).
constexpr int64_t kBlockValues = 4096;
// Rows: a block is kRowBlockValues / row width rows, clamped to
// [kMinBlockRows, kMaxBlockRows]: small enough to stay in L2 for the second
// pass (64 KiB of float), and at most 256 values per channel accumulator.
constexpr int64_t kRowBlockValues = 16384;
constexpr int64_t kMinBlockRows = 16;
constexpr int64_t kMaxBlockRows = 256;
// Input values per parallel task: large enough to amortize a task, small
// enough to balance tens of tasks over the threads.
constexpr int64_t kTaskValues = 1 << 18;
// Below this many values in all, the kernels run on the calling thread.
constexpr int64_t kSerialValues = 1 << 15;

int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------
// Threads.

// at::parallel_for is header-inline: compiled without -fopenmp (our build, like
// torch's cpp_extension and CMake targets, adds none) it silently runs serially.
// torch_parallel_for (torch's stable C shim, torch >= 2.10) runs at::parallel_for
// inside libtorch_cpu, on torch's own intra-op thread pool.
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& body) {
  if (begin >= end) return;
#if defined(INTRA_OP_PARALLEL)
  at::parallel_for(begin, end, grain, body);
#else
  if (end - begin <= grain || at::get_num_threads() == 1 || at::in_parallel_region()) {
    body(begin, end);
    return;
  }
  // Exceptions must not cross the C shim: keep the first, rethrow it here.
  struct Context {
    const F* body = nullptr;
    std::atomic_flag failed = ATOMIC_FLAG_INIT;
    std::exception_ptr error;
  } context;
  context.body = &body;
  auto trampoline = [](int64_t chunk_begin, int64_t chunk_end, void* opaque) {
    auto* ctx = static_cast<Context*>(opaque);
    try {
      (*ctx->body)(chunk_begin, chunk_end);
    } catch (...) {
      if (!ctx->failed.test_and_set()) ctx->error = std::current_exception();
    }
  };
  const AOTITorchError status = torch_parallel_for(begin, end, grain, trampoline, &context);
  if (context.error) std::rethrow_exception(context.error);
  TORCH_CHECK(status == AOTI_TORCH_SUCCESS, "syncbn: torch_parallel_for failed");
#endif
}

// Grain (in items) so that a thread gets at least kSerialValues values.
int64_t grain_for(int64_t values_per_item) {
  return std::max<int64_t>(1, kSerialValues / std::max<int64_t>(1, values_per_item));
}

// ---------------------------------------------------------------------------
// Layout.

// Below this many values per segment, a planar input is read as rows (see Layout).
constexpr int64_t kMinPlanarRun = 16;

struct Layout {
  at::Tensor input;  // the tensor the kernels read
  at::MemoryFormat format = at::MemoryFormat::Contiguous;  // the memory order grad_out must have
  bool rows = false;
  int64_t channels = 0;
  // Planar: channel c is `batch` segments of `inner` values.
  int64_t batch = 0;
  int64_t inner = 0;
  // Rows: `num_rows` rows of channels * fold values; channel c owns the `fold`
  // consecutive positions [c * fold, (c + 1) * fold) of each row. fold is 1
  // for channels_last and (N, C); a contiguous (N, C, S) input with a short
  // segment S is read as N rows with fold = S, which keeps its loops vectorized.
  int64_t num_rows = 0;
  int64_t fold = 1;

  int64_t values_per_channel() const { return rows ? num_rows * fold : batch * inner; }
  int64_t row_width() const { return channels * fold; }
};

Layout layout_of(const at::Tensor& input) {
  Layout layout;
  const int64_t dim = input.dim();
  if (input.is_contiguous()) {
    layout.input = input;
  } else if (dim == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    layout.input = input;
    layout.format = at::MemoryFormat::ChannelsLast;
  } else if (dim == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    layout.input = input;
    layout.format = at::MemoryFormat::ChannelsLast3d;
  } else {
    layout.input = input.contiguous();
  }
  const int64_t batch = input.size(0), channels = input.size(1);
  const int64_t inner = batch * channels == 0 ? 0 : input.numel() / (batch * channels);
  layout.channels = channels;
  if (channels == 1) {
    // One channel: its values are one contiguous run in any of the formats.
    layout.batch = 1;
    layout.inner = batch * inner;
  } else if (layout.format != at::MemoryFormat::Contiguous) {
    layout.rows = true;
    layout.num_rows = batch * inner;
  } else if (inner < kMinPlanarRun) {
    layout.rows = true;
    layout.num_rows = batch;
    layout.fold = inner;
  } else {
    layout.batch = batch;
    layout.inner = inner;
  }
  return layout;
}

// ---------------------------------------------------------------------------
// Argument checks.

void check_input(const at::Tensor& input, const char* name) {
  TORCH_CHECK(input.defined(), "syncbn: ", name, " is undefined");
  TORCH_CHECK(input.device().is_cpu(), "syncbn: ", name, " must be on the CPU, got ", input.device());
  TORCH_CHECK(input.dim() >= 2, "syncbn: ", name, " must be (N, C, *) with at least 2 dims, got shape ",
              input.sizes());
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "syncbn: ", name, " must be float32, float64, float16 or bfloat16, got ", dtype);
}

at::ScalarType acc_dtype_of(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A per-channel tensor as a contiguous 1-d acc-dtype tensor of C values.
at::Tensor per_channel(const at::Tensor& values, const char* name, int64_t channels, at::ScalarType acc_dtype) {
  TORCH_CHECK(values.defined(), "syncbn: ", name, " is undefined");
  TORCH_CHECK(values.device().is_cpu(), "syncbn: ", name, " must be on the CPU, got ", values.device());
  TORCH_CHECK(values.dim() == 1 && values.size(0) == channels, "syncbn: ", name,
              " must be 1-d with one value per channel (", channels, "), got shape ", values.sizes());
  return values.to(acc_dtype).contiguous();
}

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

// Count, mean and M2 of a set of values, merged with Chan's formula.
struct MeanM2 {
  double count = 0;
  double mean = 0;
  double m2 = 0;

  void merge(double count_b, double mean_b, double m2_b) {
    if (count_b == 0) return;
    const double total = count + count_b;
    const double delta = mean_b - mean;
    mean += delta * (count_b / total);
    m2 += m2_b + delta * delta * (count * count_b / total);
    count = total;
  }
};

// Mean and M2 of a block of n values from a shift and the sums of d = x - shift.
// The mean's correction stays in double: a float block mean would round at the
// scale of the mean, and that error would enter M2 through Chan's delta^2.
C10_ALWAYS_INLINE double shifted_mean(double shift, double sum_d, double n) { return shift + sum_d / n; }
C10_ALWAYS_INLINE double shifted_m2(double sum_d, double sum_dd, double n) {
  return std::max(0.0, sum_dd - sum_d * sum_d / n);
}

// ---------------------------------------------------------------------------
// Planar kernels. Channel c's values are indexed k in [0, batch * inner):
// segment k / inner, offset k % inner.

// Calls run(segment, offset, length) for the runs that make up [k_begin, k_end).
template <class F>
C10_ALWAYS_INLINE void for_each_run(int64_t k_begin, int64_t k_end, int64_t inner, const F& run) {
  while (k_begin < k_end) {
    const int64_t segment = k_begin / inner;
    const int64_t offset = k_begin - segment * inner;
    const int64_t length = std::min(inner - offset, k_end - k_begin);
    run(segment, offset, length);
    k_begin += length;
  }
}

// A channel's runs are segments far apart in memory, each a few KiB: the
// hardware prefetchers stop at each segment's end, so a reduction fetches the
// next segment of the channel while it reads this one (measured on
// 64x64x32x32 float32, one thread: backward_reduce 2.6 -> 1.1 ms, local_stats
// 1.1 -> 0.8 ms).
C10_ALWAYS_INLINE void prefetch(const void* address) {
#if defined(__GNUC__)
  __builtin_prefetch(address);
#else
  (void)address;
#endif
}
// Where to prefetch while reading the run at x: the same offset in the
// channel's next segment, when runs are whole segments; else x itself (a no-op).
template <typename scalar_t>
C10_ALWAYS_INLINE const scalar_t* prefetch_target(const scalar_t* x, int64_t segment, const Layout& layout) {
  const bool next_is_needed_next = layout.inner <= kBlockValues && segment + 1 < layout.batch;
  return next_is_needed_next ? x + layout.channels * layout.inner : x;
}

// Planar reductions are split into tasks (channel, part), a part being a run of
// whole blocks of the channel's values.
struct PlanarTasks {
  int64_t parts_per_channel;
  int64_t values_per_part;  // a multiple of kBlockValues

  explicit PlanarTasks(int64_t values_per_channel) {
    const int64_t wanted = std::max<int64_t>(1, divup(values_per_channel, kTaskValues));
    values_per_part = divup(divup(values_per_channel, wanted), kBlockValues) * kBlockValues;
    parts_per_channel = std::max<int64_t>(1, divup(values_per_channel, values_per_part));
  }
};

template <typename scalar_t>
void planar_stats(const Layout& layout, at::opmath_type<scalar_t>* mean_out, at::opmath_type<scalar_t>* m2_out) {
  using IoT = Io<scalar_t>;
  using acc_t = typename IoT::acc_t;
  using Q = typename IoT::Q;
  const auto* data = layout.input.const_data_ptr<scalar_t>();
  const int64_t channels = layout.channels, inner = layout.inner;
  const int64_t count = layout.values_per_channel();
  const PlanarTasks tasks(count);
  std::vector<MeanM2> partial(channels * tasks.parts_per_channel);

  const int64_t num_tasks = channels * tasks.parts_per_channel;
  parallel_for(0, num_tasks, grain_for(tasks.values_per_part), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t channel = task / tasks.parts_per_channel;
      const int64_t part = task % tasks.parts_per_channel;
      const auto run_ptr = [&](int64_t segment, int64_t offset) {
        return data + (segment * channels + channel) * inner + offset;
      };
      MeanM2 stats;
      const int64_t part_end = std::min(count, (part + 1) * tasks.values_per_part);
      for (int64_t block = part * tasks.values_per_part; block < part_end; block += kBlockValues) {
        const int64_t block_end = std::min(part_end, block + kBlockValues);
        const int64_t n = block_end - block;
        // Pass 1: a provisional mean, used only as a shift.
        Q sum;
        for_each_run(block, block_end, inner, [&](int64_t segment, int64_t offset, int64_t length) {
          const scalar_t* x = run_ptr(segment, offset);
          const scalar_t* ahead = prefetch_target(x, segment, layout);
          for_each_vector<scalar_t>(length, [&](auto full, int64_t i, int64_t width) {
            prefetch(ahead + i);
            sum = sum + IoT::template load<decltype(full)::value>(x + i, width);
          });
        });
        const acc_t shift = sum.sum() / static_cast<acc_t>(n);
        // Pass 2 (the block is in cache): sums of d = x - shift and d^2.
        const Q shift_v(shift);
        Q sum_d, sum_dd;
        for_each_run(block, block_end, inner, [&](int64_t segment, int64_t offset, int64_t length) {
          const scalar_t* x = run_ptr(segment, offset);
          for_each_vector<scalar_t>(length, [&](auto full, int64_t i, int64_t width) {
            constexpr bool kFull = decltype(full)::value;
            const Q d = IoT::template first<kFull>(IoT::template load<kFull>(x + i, width) - shift_v, width);
            sum_d = sum_d + d;
            sum_dd = madd(d, d, sum_dd);
          });
        });
        const double d1 = sum_d.sum(), d2 = sum_dd.sum();
        stats.merge(n, shifted_mean(shift, d1, n), shifted_m2(d1, d2, n));
      }
      partial[task] = stats;
    }
  });

  for (int64_t channel = 0; channel < channels; ++channel) {
    MeanM2 total;
    for (int64_t part = 0; part < tasks.parts_per_channel; ++part) {
      const MeanM2& p = partial[channel * tasks.parts_per_channel + part];
      total.merge(p.count, p.mean, p.m2);
    }
    mean_out[channel] = static_cast<acc_t>(total.mean);
    m2_out[channel] = static_cast<acc_t>(total.m2);
  }
}

template <typename scalar_t>
void planar_grad_sums(const Layout& layout, const scalar_t* grad, const at::opmath_type<scalar_t>* mean,
                      at::opmath_type<scalar_t>* sum_dy_out, at::opmath_type<scalar_t>* sum_dy_xmu_out) {
  using IoT = Io<scalar_t>;
  using acc_t = typename IoT::acc_t;
  using Q = typename IoT::Q;
  const auto* data = layout.input.const_data_ptr<scalar_t>();
  const int64_t channels = layout.channels, inner = layout.inner;
  const int64_t count = layout.values_per_channel();
  const PlanarTasks tasks(count);
  std::vector<std::pair<double, double>> partial(channels * tasks.parts_per_channel);

  const int64_t num_tasks = channels * tasks.parts_per_channel;
  parallel_for(0, num_tasks, grain_for(tasks.values_per_part), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t channel = task / tasks.parts_per_channel;
      const int64_t part = task % tasks.parts_per_channel;
      const Q mean_v(mean[channel]);
      double sum_dy = 0, sum_dy_xmu = 0;
      const int64_t part_end = std::min(count, (part + 1) * tasks.values_per_part);
      for (int64_t block = part * tasks.values_per_part; block < part_end; block += kBlockValues) {
        const int64_t block_end = std::min(part_end, block + kBlockValues);
        Q block_dy, block_dy_xmu;
        for_each_run(block, block_end, inner, [&](int64_t segment, int64_t offset, int64_t length) {
          const int64_t start = (segment * channels + channel) * inner + offset;
          const int64_t ahead = prefetch_target(data + start, segment, layout) - data;
          for_each_vector<scalar_t>(length, [&](auto full, int64_t i, int64_t width) {
            constexpr bool kFull = decltype(full)::value;
            prefetch(data + ahead + i);
            prefetch(grad + ahead + i);
            // Lanes past `width` hold dy = 0: they add nothing to either sum.
            const Q dy = IoT::template load<kFull>(grad + start + i, width);
            const Q x = IoT::template load<kFull>(data + start + i, width);
            block_dy = block_dy + dy;
            block_dy_xmu = madd(dy, x - mean_v, block_dy_xmu);
          });
        });
        sum_dy += block_dy.sum();
        sum_dy_xmu += block_dy_xmu.sum();
      }
      partial[task] = {sum_dy, sum_dy_xmu};
    }
  });

  for (int64_t channel = 0; channel < channels; ++channel) {
    double sum_dy = 0, sum_dy_xmu = 0;
    for (int64_t part = 0; part < tasks.parts_per_channel; ++part) {
      sum_dy += partial[channel * tasks.parts_per_channel + part].first;
      sum_dy_xmu += partial[channel * tasks.parts_per_channel + part].second;
    }
    sum_dy_out[channel] = static_cast<acc_t>(sum_dy);
    sum_dy_xmu_out[channel] = static_cast<acc_t>(sum_dy_xmu);
  }
}

// out = (x - mean[c]) * scale[c] + shift[c], a segment at a time.
template <typename scalar_t>
void planar_affine(const Layout& layout, scalar_t* out, const at::opmath_type<scalar_t>* mean,
                   const at::opmath_type<scalar_t>* scale, const at::opmath_type<scalar_t>* shift) {
  using IoT = Io<scalar_t>;
  using Q = typename IoT::Q;
  const auto* x = layout.input.const_data_ptr<scalar_t>();
  const int64_t channels = layout.channels, inner = layout.inner;
  parallel_for(0, layout.batch * channels, grain_for(inner), [&](int64_t begin, int64_t end) {
    for (int64_t segment = begin; segment < end; ++segment) {
      const int64_t channel = segment % channels;
      const Q m(mean[channel]), a(scale[channel]), b(shift[channel]);
      const int64_t start = segment * inner;
      for_each_vector<scalar_t>(inner, [&](auto full, int64_t i, int64_t width) {
        constexpr bool kFull = decltype(full)::value;
        const Q xv = IoT::template load<kFull>(x + start + i, width);
        IoT::template store<kFull>(out + start + i, width, madd(xv - m, a, b));
      });
    }
  });
}

// out = dy * dy_scale[c] + (x - mean[c]) * x_scale[c] + shift[c], a segment at a time.
template <typename scalar_t>
void planar_grad_input(const Layout& layout, const scalar_t* grad, scalar_t* out,
                       const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* dy_scale,
                       const at::opmath_type<scalar_t>* x_scale, const at::opmath_type<scalar_t>* shift) {
  using IoT = Io<scalar_t>;
  using Q = typename IoT::Q;
  const auto* x = layout.input.const_data_ptr<scalar_t>();
  const int64_t channels = layout.channels, inner = layout.inner;
  parallel_for(0, layout.batch * channels, grain_for(inner), [&](int64_t begin, int64_t end) {
    for (int64_t segment = begin; segment < end; ++segment) {
      const int64_t channel = segment % channels;
      const Q m(mean[channel]), g(dy_scale[channel]), a(x_scale[channel]), b(shift[channel]);
      const int64_t start = segment * inner;
      for_each_vector<scalar_t>(inner, [&](auto full, int64_t i, int64_t width) {
        constexpr bool kFull = decltype(full)::value;
        const Q xv = IoT::template load<kFull>(x + start + i, width);
        const Q dy = IoT::template load<kFull>(grad + start + i, width);
        IoT::template store<kFull>(out + start + i, width, madd(dy, g, madd(xv - m, a, b)));
      });
    }
  });
}

// ---------------------------------------------------------------------------
// Rows kernels: `num_rows` rows of `width` values, vectorized across a row.
// They work per position p of a row; RowsPlan maps positions to channels.

// Rows of a layout as the kernels read them. A short row that is not a
// multiple of kWidth values (C = 3, 24, ...) would leave a partial vector in
// every row (measured 25x slower for C = 3): `group` consecutive rows are then
// read as one row of lcm(row, kWidth) values, and the last num_rows % group
// rows as a second region of ungrouped rows.
template <typename scalar_t>
struct RowsPlan {
  struct Region {
    int64_t offset;  // of its first value
    int64_t num_rows;
    int64_t width;
  };
  static constexpr int64_t kWidth = Io<scalar_t>::kWidth;
  // Rows at least this wide keep their partial vector (it is a small share).
  static constexpr int64_t kGroupBelowWidth = 16 * kWidth;

  int64_t channels;
  int64_t fold;
  std::vector<Region> regions;

  explicit RowsPlan(const Layout& layout) : channels(layout.channels), fold(layout.fold) {
    const int64_t row = layout.row_width();
    int64_t group = 1;
    if (row % kWidth != 0 && row < kGroupBelowWidth) group = kWidth / std::gcd(row, kWidth);
    const int64_t grouped_rows = layout.num_rows / group;
    const int64_t rest = layout.num_rows - grouped_rows * group;
    if (grouped_rows > 0) regions.push_back({0, grouped_rows, group * row});
    if (rest > 0) regions.push_back({grouped_rows * group * row, rest, row});
  }
  int64_t channel_of(int64_t position) const { return (position / fold) % channels; }
  // A per-channel acc array as one value per position of `region`.
  std::vector<at::opmath_type<scalar_t>> per_position(const at::Tensor& per_channel_values,
                                                      const Region& region) const {
    const auto* values = per_channel_values.const_data_ptr<at::opmath_type<scalar_t>>();
    std::vector<at::opmath_type<scalar_t>> out(region.width);
    for (int64_t p = 0; p < region.width; ++p) out[p] = values[channel_of(p)];
    return out;
  }
};

// Rows reductions are split into tasks of whole blocks of rows.
struct RowTasks {
  int64_t rows_per_block;
  int64_t rows_per_task;  // a multiple of rows_per_block
  int64_t num_tasks;

  RowTasks(int64_t num_rows, int64_t width) {
    rows_per_block = std::clamp(kRowBlockValues / std::max<int64_t>(1, width), kMinBlockRows, kMaxBlockRows);
    const int64_t wanted = std::max<int64_t>(1, divup(num_rows * width, kTaskValues));
    rows_per_task = divup(divup(num_rows, wanted), rows_per_block) * rows_per_block;
    num_tasks = std::max<int64_t>(1, divup(num_rows, rows_per_task));
  }
  int64_t task_rows(int64_t task, int64_t num_rows) const {
    return std::min(num_rows, (task + 1) * rows_per_task) - task * rows_per_task;
  }
};

// Adds the rows [0, rows) of a block into per-position acc arrays with
// accumulate(full, row, position, count, acc...). From memory, rows are read in
// memory order, one row at a time, the arrays staying in L1 (reading a vector
// of positions down the rows instead was up to 3x slower for two inputs read
// from memory). A block in cache (kInCache), or a row of a single vector, is
// read a vector of positions at a time, down the rows, the accumulators in
// registers. Partial vectors load zeros past `count`: the accumulate functions
// below add zero for those lanes.
template <typename scalar_t, int kArrays, bool kInCache, class Accumulate>
C10_ALWAYS_INLINE void accumulate_rows(int64_t rows, int64_t width, typename Io<scalar_t>::acc_t* acc_a,
                                       typename Io<scalar_t>::acc_t* acc_b, const Accumulate& accumulate) {
  static_assert(kArrays == 1 || kArrays == 2);
  using IoT = Io<scalar_t>;
  using Q = typename IoT::Q;
  if (kInCache || width <= IoT::kWidth) {
    for_each_vector<scalar_t>(width, [&](auto full, int64_t p, int64_t count) {
      constexpr bool kFull = decltype(full)::value;
      Q a, b;
      for (int64_t r = 0; r < rows; ++r) accumulate(full, r, p, count, a, b);
      IoT::template store<kFull>(acc_a + p, count, a);
      if constexpr (kArrays == 2) IoT::template store<kFull>(acc_b + p, count, b);
    });
    return;
  }
  std::fill(acc_a, acc_a + width, 0);
  if constexpr (kArrays == 2) std::fill(acc_b, acc_b + width, 0);
  for (int64_t r = 0; r < rows; ++r) {
    for_each_vector<scalar_t>(width, [&](auto full, int64_t p, int64_t count) {
      constexpr bool kFull = decltype(full)::value;
      Q a = IoT::template load<kFull>(acc_a + p, count);
      Q b;
      if constexpr (kArrays == 2) b = IoT::template load<kFull>(acc_b + p, count);
      accumulate(full, r, p, count, a, b);
      IoT::template store<kFull>(acc_a + p, count, a);
      if constexpr (kArrays == 2) IoT::template store<kFull>(acc_b + p, count, b);
    });
  }
}

// Mean and M2 of each position of `num_rows` rows of `width` values.
template <typename scalar_t>
std::vector<MeanM2> rows_stats(const scalar_t* data, int64_t num_rows, int64_t width) {
  using IoT = Io<scalar_t>;
  using acc_t = typename IoT::acc_t;
  using Q = typename IoT::Q;
  const RowTasks tasks(num_rows, width);
  // Per task: the means of its positions, then their M2s.
  std::vector<double> partial(tasks.num_tasks * 2 * width);

  parallel_for(0, tasks.num_tasks, grain_for(tasks.rows_per_task * width), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> block_shift(width), block_d(width), block_dd(width);
    for (int64_t task = begin; task < end; ++task) {
      double* mean = partial.data() + task * 2 * width;
      double* m2 = mean + width;
      std::fill(mean, mean + 2 * width, 0.0);
      double count = 0;
      const int64_t first_row = task * tasks.rows_per_task;
      const int64_t end_row = first_row + tasks.task_rows(task, num_rows);
      for (int64_t row_begin = first_row; row_begin < end_row; row_begin += tasks.rows_per_block) {
        const int64_t rows = std::min(end_row, row_begin + tasks.rows_per_block) - row_begin;
        const scalar_t* block = data + row_begin * width;
        // Pass 1: provisional means, used only as shifts.
        const auto add_x = [&](auto full, int64_t r, int64_t p, int64_t n, Q& sum, Q&) {
          sum = sum + IoT::template load<decltype(full)::value>(block + r * width + p, n);
        };
        accumulate_rows<scalar_t, 1, false>(rows, width, block_shift.data(), nullptr, add_x);
        const acc_t inv_rows = acc_t(1) / static_cast<acc_t>(rows);
        for (int64_t p = 0; p < width; ++p) block_shift[p] *= inv_rows;
        // Pass 2 (the block is in cache): sums of d = x - shift and d^2. Past a
        // partial vector, x = 0 and shift = 0: d = 0.
        const auto add_moments = [&](auto full, int64_t r, int64_t p, int64_t n, Q& sum_d, Q& sum_dd) {
          constexpr bool kFull = decltype(full)::value;
          const Q d = IoT::template load<kFull>(block + r * width + p, n) -
                      IoT::template load<kFull>(block_shift.data() + p, n);
          sum_d = sum_d + d;
          sum_dd = madd(d, d, sum_dd);
        };
        accumulate_rows<scalar_t, 2, true>(rows, width, block_d.data(), block_dd.data(), add_moments);
        // Chan's merge; all positions have the same counts, so the weights are shared.
        const double n_b = static_cast<double>(rows);
        const double total = count + n_b;
        const double weight_b = n_b / total, weight_cross = count * n_b / total;
        for (int64_t p = 0; p < width; ++p) {
          const double sum_d = block_d[p];
          const double delta = shifted_mean(block_shift[p], sum_d, n_b) - mean[p];
          mean[p] += delta * weight_b;
          m2[p] += shifted_m2(sum_d, block_dd[p], n_b) + delta * delta * weight_cross;
        }
        count = total;
      }
    }
  });

  std::vector<MeanM2> position(width);
  for (int64_t task = 0; task < tasks.num_tasks; ++task) {
    const double rows = static_cast<double>(tasks.task_rows(task, num_rows));
    const double* mean = partial.data() + task * 2 * width;
    for (int64_t p = 0; p < width; ++p) position[p].merge(rows, mean[p], mean[width + p]);
  }
  return position;
}

// sum(dy) and sum(dy * (x - mean[p])) of each position p, in double, added
// into sum_dy and sum_dy_xmu.
template <typename scalar_t>
void rows_grad_sums(const scalar_t* data, const scalar_t* grad, int64_t num_rows, int64_t width,
                    const at::opmath_type<scalar_t>* mean, double* sum_dy_out, double* sum_dy_xmu_out) {
  using IoT = Io<scalar_t>;
  using acc_t = typename IoT::acc_t;
  using Q = typename IoT::Q;
  const RowTasks tasks(num_rows, width);
  std::vector<double> partial(tasks.num_tasks * 2 * width);

  parallel_for(0, tasks.num_tasks, grain_for(tasks.rows_per_task * width), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> block_dy(width), block_dy_xmu(width);
    for (int64_t task = begin; task < end; ++task) {
      double* sum_dy = partial.data() + task * 2 * width;
      double* sum_dy_xmu = sum_dy + width;
      std::fill(sum_dy, sum_dy + 2 * width, 0.0);
      const int64_t first_row = task * tasks.rows_per_task;
      const int64_t end_row = first_row + tasks.task_rows(task, num_rows);
      for (int64_t row_begin = first_row; row_begin < end_row; row_begin += tasks.rows_per_block) {
        const int64_t rows = std::min(end_row, row_begin + tasks.rows_per_block) - row_begin;
        const int64_t start = row_begin * width;
        // Past a partial vector dy = 0: it adds nothing to either sum.
        const auto add_grads = [&](auto full, int64_t r, int64_t p, int64_t n, Q& s_dy, Q& s_dy_xmu) {
          constexpr bool kFull = decltype(full)::value;
          const int64_t at_row = start + r * width + p;
          const Q dy = IoT::template load<kFull>(grad + at_row, n);
          const Q x = IoT::template load<kFull>(data + at_row, n);
          s_dy = s_dy + dy;
          s_dy_xmu = madd(dy, x - IoT::template load<kFull>(mean + p, n), s_dy_xmu);
        };
        accumulate_rows<scalar_t, 2, false>(rows, width, block_dy.data(), block_dy_xmu.data(), add_grads);
        for (int64_t p = 0; p < width; ++p) {
          sum_dy[p] += block_dy[p];
          sum_dy_xmu[p] += block_dy_xmu[p];
        }
      }
    }
  });

  for (int64_t task = 0; task < tasks.num_tasks; ++task) {
    const double* part = partial.data() + task * 2 * width;
    for (int64_t p = 0; p < width; ++p) {
      sum_dy_out[p] += part[p];
      sum_dy_xmu_out[p] += part[width + p];
    }
  }
}

// out = (x - mean[p]) * scale[p] + shift[p], per-position parameters. One row
// at a time (tiles of rows, loading the parameters once per tile, were up to
// 3x slower: several streams into the same pages).
template <typename scalar_t>
void rows_affine(const scalar_t* x, scalar_t* out, int64_t num_rows, int64_t width,
                 const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* scale,
                 const at::opmath_type<scalar_t>* shift) {
  using IoT = Io<scalar_t>;
  using Q = typename IoT::Q;
  parallel_for(0, num_rows, grain_for(width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t start = r * width;
      for_each_vector<scalar_t>(width, [&](auto full, int64_t p, int64_t count) {
        constexpr bool kFull = decltype(full)::value;
        const Q xv = IoT::template load<kFull>(x + start + p, count);
        const Q m = IoT::template load<kFull>(mean + p, count);
        const Q a = IoT::template load<kFull>(scale + p, count);
        const Q b = IoT::template load<kFull>(shift + p, count);
        IoT::template store<kFull>(out + start + p, count, madd(xv - m, a, b));
      });
    }
  });
}

// out = dy * dy_scale[p] + (x - mean[p]) * x_scale[p] + shift[p], per-position parameters.
template <typename scalar_t>
void rows_grad_input(const scalar_t* x, const scalar_t* grad, scalar_t* out, int64_t num_rows, int64_t width,
                     const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* dy_scale,
                     const at::opmath_type<scalar_t>* x_scale, const at::opmath_type<scalar_t>* shift) {
  using IoT = Io<scalar_t>;
  using Q = typename IoT::Q;
  parallel_for(0, num_rows, grain_for(width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t start = r * width;
      for_each_vector<scalar_t>(width, [&](auto full, int64_t p, int64_t count) {
        constexpr bool kFull = decltype(full)::value;
        const Q xv = IoT::template load<kFull>(x + start + p, count);
        const Q dy = IoT::template load<kFull>(grad + start + p, count);
        const Q m = IoT::template load<kFull>(mean + p, count);
        const Q g = IoT::template load<kFull>(dy_scale + p, count);
        const Q a = IoT::template load<kFull>(x_scale + p, count);
        const Q b = IoT::template load<kFull>(shift + p, count);
        IoT::template store<kFull>(out + start + p, count, madd(dy, g, madd(xv - m, a, b)));
      });
    }
  });
}

// The four operations on a rows layout: each region in turn, then positions
// folded into channels (in region and position order).
template <typename scalar_t>
void rows_local_stats(const Layout& layout, at::opmath_type<scalar_t>* mean_out, at::opmath_type<scalar_t>* m2_out) {
  const RowsPlan<scalar_t> plan(layout);
  const auto* data = layout.input.const_data_ptr<scalar_t>();
  std::vector<MeanM2> channel(layout.channels);
  for (const auto& region : plan.regions) {
    const std::vector<MeanM2> position = rows_stats<scalar_t>(data + region.offset, region.num_rows, region.width);
    for (int64_t p = 0; p < region.width; ++p) {
      channel[plan.channel_of(p)].merge(position[p].count, position[p].mean, position[p].m2);
    }
  }
  for (int64_t c = 0; c < layout.channels; ++c) {
    mean_out[c] = static_cast<at::opmath_type<scalar_t>>(channel[c].mean);
    m2_out[c] = static_cast<at::opmath_type<scalar_t>>(channel[c].m2);
  }
}

template <typename scalar_t>
void rows_backward_reduce(const Layout& layout, const scalar_t* grad, const at::Tensor& mean,
                          at::opmath_type<scalar_t>* sum_dy_out, at::opmath_type<scalar_t>* sum_dy_xmu_out) {
  const RowsPlan<scalar_t> plan(layout);
  const auto* data = layout.input.const_data_ptr<scalar_t>();
  std::vector<double> sum_dy(layout.channels, 0.0), sum_dy_xmu(layout.channels, 0.0);
  for (const auto& region : plan.regions) {
    const auto mean_p = plan.per_position(mean, region);
    std::vector<double> position_dy(region.width, 0.0), position_dy_xmu(region.width, 0.0);
    rows_grad_sums<scalar_t>(data + region.offset, grad + region.offset, region.num_rows, region.width,
                             mean_p.data(), position_dy.data(), position_dy_xmu.data());
    for (int64_t p = 0; p < region.width; ++p) {
      sum_dy[plan.channel_of(p)] += position_dy[p];
      sum_dy_xmu[plan.channel_of(p)] += position_dy_xmu[p];
    }
  }
  for (int64_t c = 0; c < layout.channels; ++c) {
    sum_dy_out[c] = static_cast<at::opmath_type<scalar_t>>(sum_dy[c]);
    sum_dy_xmu_out[c] = static_cast<at::opmath_type<scalar_t>>(sum_dy_xmu[c]);
  }
}

template <typename scalar_t>
void rows_normalize(const Layout& layout, scalar_t* out, const at::Tensor& mean, const at::Tensor& scale,
                    const at::Tensor& shift) {
  const RowsPlan<scalar_t> plan(layout);
  const auto* data = layout.input.const_data_ptr<scalar_t>();
  for (const auto& region : plan.regions) {
    const auto m = plan.per_position(mean, region), a = plan.per_position(scale, region),
               b = plan.per_position(shift, region);
    rows_affine<scalar_t>(data + region.offset, out + region.offset, region.num_rows, region.width, m.data(),
                          a.data(), b.data());
  }
}

template <typename scalar_t>
void rows_backward_elemt(const Layout& layout, const scalar_t* grad, scalar_t* out, const at::Tensor& mean,
                         const at::Tensor& dy_scale, const at::Tensor& x_scale, const at::Tensor& shift) {
  const RowsPlan<scalar_t> plan(layout);
  const auto* data = layout.input.const_data_ptr<scalar_t>();
  for (const auto& region : plan.regions) {
    const auto m = plan.per_position(mean, region), g = plan.per_position(dy_scale, region),
               a = plan.per_position(x_scale, region), b = plan.per_position(shift, region);
    rows_grad_input<scalar_t>(data + region.offset, grad + region.offset, out + region.offset, region.num_rows,
                              region.width, m.data(), g.data(), a.data(), b.data());
  }
}

// grad_out checked against the input, in the input's dtype and memory order
// (as the ATen fallback of the ops accepts it; a copy only when either differs).
at::Tensor grad_in_layout_of(const at::Tensor& grad_out, const at::Tensor& input, const Layout& layout) {
  check_input(grad_out, "grad_out");
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "syncbn: grad_out must have the input's shape ", input.sizes(),
              ", got ", grad_out.sizes());
  return grad_out.to(input.scalar_type()).contiguous(layout.format);
}

}  // namespace

// ---------------------------------------------------------------------------
// The kernels of batch_norm_kernels.h.

std::tuple<at::Tensor, at::Tensor> local_stats(const at::Tensor& input) {
  check_input(input, "input");
  const Layout layout = layout_of(input);
  const auto acc_options = input.options().dtype(acc_dtype_of(input));
  at::Tensor mean = at::zeros({layout.channels}, acc_options);
  at::Tensor m2 = at::zeros({layout.channels}, acc_options);
  if (layout.channels == 0 || layout.values_per_channel() == 0) return {mean, m2};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "syncbn_local_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (layout.rows) {
      rows_local_stats<scalar_t>(layout, mean.data_ptr<acc_t>(), m2.data_ptr<acc_t>());
    } else {
      planar_stats<scalar_t>(layout, mean.data_ptr<acc_t>(), m2.data_ptr<acc_t>());
    }
  });
  return {mean, m2};
}

at::Tensor normalize(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& scale,
                     const at::Tensor& shift) {
  check_input(input, "input");
  const Layout layout = layout_of(input);
  const auto acc_dtype = acc_dtype_of(input);
  const at::Tensor mean_acc = per_channel(mean, "mean", layout.channels, acc_dtype);
  const at::Tensor scale_acc = per_channel(scale, "scale", layout.channels, acc_dtype);
  const at::Tensor shift_acc = per_channel(shift, "shift", layout.channels, acc_dtype);
  at::Tensor output = at::empty_like(layout.input);
  if (output.numel() == 0) return output;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "syncbn_normalize", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto* out = output.data_ptr<scalar_t>();
    if (layout.rows) {
      rows_normalize<scalar_t>(layout, out, mean_acc, scale_acc, shift_acc);
    } else {
      planar_affine<scalar_t>(layout, out, mean_acc.const_data_ptr<acc_t>(), scale_acc.const_data_ptr<acc_t>(),
                              shift_acc.const_data_ptr<acc_t>());
    }
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& grad_out, const at::Tensor& input,
                                                   const at::Tensor& mean) {
  check_input(input, "input");
  const Layout layout = layout_of(input);
  const at::Tensor grad = grad_in_layout_of(grad_out, input, layout);
  const auto acc_dtype = acc_dtype_of(input);
  const at::Tensor mean_acc = per_channel(mean, "mean", layout.channels, acc_dtype);
  const auto acc_options = input.options().dtype(acc_dtype);
  at::Tensor sum_dy = at::zeros({layout.channels}, acc_options);
  at::Tensor sum_dy_xmu = at::zeros({layout.channels}, acc_options);
  if (layout.channels == 0 || layout.values_per_channel() == 0) return {sum_dy, sum_dy_xmu};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "syncbn_backward_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto* dy = grad.const_data_ptr<scalar_t>();
    if (layout.rows) {
      rows_backward_reduce<scalar_t>(layout, dy, mean_acc, sum_dy.data_ptr<acc_t>(), sum_dy_xmu.data_ptr<acc_t>());
    } else {
      planar_grad_sums<scalar_t>(layout, dy, mean_acc.const_data_ptr<acc_t>(), sum_dy.data_ptr<acc_t>(),
                                 sum_dy_xmu.data_ptr<acc_t>());
    }
  });
  return {sum_dy, sum_dy_xmu};
}

at::Tensor backward_elemt(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                          const at::Tensor& dy_scale, const at::Tensor& x_scale, const at::Tensor& shift) {
  check_input(input, "input");
  const Layout layout = layout_of(input);
  const at::Tensor grad = grad_in_layout_of(grad_out, input, layout);
  const auto acc_dtype = acc_dtype_of(input);
  const at::Tensor mean_acc = per_channel(mean, "mean", layout.channels, acc_dtype);
  const at::Tensor dy_scale_acc = per_channel(dy_scale, "dy_scale", layout.channels, acc_dtype);
  const at::Tensor x_scale_acc = per_channel(x_scale, "x_scale", layout.channels, acc_dtype);
  const at::Tensor shift_acc = per_channel(shift, "shift", layout.channels, acc_dtype);
  at::Tensor grad_in = at::empty_like(layout.input);
  if (grad_in.numel() == 0) return grad_in;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "syncbn_backward_elemt", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto* dy = grad.const_data_ptr<scalar_t>();
    auto* out = grad_in.data_ptr<scalar_t>();
    if (layout.rows) {
      rows_backward_elemt<scalar_t>(layout, dy, out, mean_acc, dy_scale_acc, x_scale_acc, shift_acc);
    } else {
      planar_grad_input<scalar_t>(layout, dy, out, mean_acc.const_data_ptr<acc_t>(),
                                  dy_scale_acc.const_data_ptr<acc_t>(), x_scale_acc.const_data_ptr<acc_t>(),
                                  shift_acc.const_data_ptr<acc_t>());
    }
  });
  return grad_in;
}

}  // namespace syncbn::cpu

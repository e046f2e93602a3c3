#pragma once

// Shared by the CPU BatchNorm kernels (batch_norm_kernels.cpp): sizes of blocks and tasks, threads, the
// input's layout, and merging (count, mean, M2).
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

namespace syncbn::cpu {
namespace {  // private to batch_norm_kernels.cpp, which alone includes this header

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
    // Neither (a slice with a step): made dense in the format its strides suggest, as nn.BatchNorm keeps it.
    const at::MemoryFormat suggested = input.suggest_memory_format();
    layout.input = input.contiguous(suggested);
    layout.format = suggested;
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

// The terms of the elementwise pass, per channel (planar) or per position
// (rows): out = (x - mean) * x_scale + shift [+ dy * dy_scale in backward].
template <typename acc_t>
struct ElementwiseTerms {
  const acc_t* mean;
  const acc_t* x_scale;
  const acc_t* shift;
  const acc_t* dy_scale;  // backward_elemt only; unread by normalize
};

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

}  // namespace
}  // namespace syncbn::cpu

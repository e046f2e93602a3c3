// The inputs of the CPU kernel tests (test_kernels.cpp): every layout the
// kernels read, sized to reach their parallel tasks and block loops (checked
// against a mirror of the kernels' work split), and the tolerances per dtype.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include <ATen/Parallel.h>
#include <torch/torch.h>

namespace syncbn_test {

// Under a sanitizer (SYNCBN_SANITIZE builds, or SYNCBN_SANITIZED=1 set by hand)
// the inputs are smaller, but still several tasks per channel.
inline bool sanitized() {
#if defined(SYNCBN_TESTS_SANITIZED)
  return true;
#else
  const char* flag = std::getenv("SYNCBN_SANITIZED");
  return flag != nullptr && *flag != '\0' && std::string(flag) != "0";
#endif
}

// ThreadSanitizer cannot see libgomp's fork/join (torch's OpenMP pool is not
// instrumented): under TSan the kernels run on the calling thread only (as with
// OMP_NUM_THREADS=1); ASan and the plain build run both paths.
inline bool thread_sanitized() {
#if defined(__SANITIZE_THREAD__)
  return true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
  return true;
#else
  return false;
#endif
#else
  return false;
#endif
}

inline std::vector<int> thread_counts() { return thread_sanitized() ? std::vector<int>{1} : std::vector<int>{1, 2}; }

// Sets torch's intra-op thread count for a scope.
class IntraOpThreads {
 public:
  explicit IntraOpThreads(int threads) : saved_(at::get_num_threads()) { at::set_num_threads(threads); }
  ~IntraOpThreads() { at::set_num_threads(saved_); }
  IntraOpThreads(const IntraOpThreads&) = delete;
  IntraOpThreads& operator=(const IntraOpThreads&) = delete;

 private:
  int saved_;
};

// ---- The kernels' work split, mirrored to check that the sizes below reach it ----
// (constants of cpp/src/cpu/kernel_support.h and its kernels)
constexpr int64_t kBlockValues = 4096;      // planar: values of a channel per block
constexpr int64_t kTaskValues = 1 << 18;    // input values per parallel task
constexpr int64_t kRowBlockValues = 16384;  // rows: values per block, in [16, 256] rows
constexpr int64_t kMinBlockRows = 16;
constexpr int64_t kMaxBlockRows = 256;
constexpr int64_t kMinPlanarRun = 16;  // shorter contiguous segments are read as rows

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Split {
  int64_t tasks;            // per channel (planar) or per input (rows)
  int64_t blocks_per_task;  // of the first task
};

inline Split planar_split(int64_t values_per_channel) {
  const int64_t wanted = std::max<int64_t>(1, divup(values_per_channel, kTaskValues));
  const int64_t per_part = divup(divup(values_per_channel, wanted), kBlockValues) * kBlockValues;
  return {std::max<int64_t>(1, divup(values_per_channel, per_part)), per_part / kBlockValues};
}

inline Split rows_split(int64_t num_rows, int64_t width) {
  const int64_t block_rows = std::clamp(kRowBlockValues / std::max<int64_t>(1, width), kMinBlockRows, kMaxBlockRows);
  const int64_t wanted = std::max<int64_t>(1, divup(num_rows * width, kTaskValues));
  const int64_t rows_per_task = divup(divup(num_rows, wanted), block_rows) * block_rows;
  return {std::max<int64_t>(1, divup(num_rows, rows_per_task)), rows_per_task / block_rows};
}

// ---- Inputs ----------------------------------------------------------------------

enum class Layout {
  kContiguous,      // (N, C, H, W), segments of 1073 values: planar, blocks across segments
  kShortSegments,   // (N, C, 3, 3): segments < kMinPlanarRun, read as rows of C * 9 values
  kChannelsLast,    // (N, 3, H, W) channels_last: rows of 3 values (grouped into wider rows)
  kChannelsLast3d,  // (N, 5, D, H, W) channels_last_3d
  kRows,            // (N, 300): rows wider than the vector width, with a partial vector each
  kOneChannel,      // (N, 1, H, W): one run of N * H * W values
  kStrided,         // every other column of (N, C, 64, 160): copied, then planar with 5120-value segments
};

inline std::string layout_name(Layout layout) {
  switch (layout) {
    case Layout::kContiguous: return "Contiguous";
    case Layout::kShortSegments: return "ShortSegments";
    case Layout::kChannelsLast: return "ChannelsLast";
    case Layout::kChannelsLast3d: return "ChannelsLast3d";
    case Layout::kRows: return "Rows";
    case Layout::kOneChannel: return "OneChannel";
    case Layout::kStrided: return "Strided";
  }
  return "?";
}

inline std::vector<int64_t> shape_of(Layout layout) {
  const bool small = sanitized();
  switch (layout) {
    case Layout::kContiguous: return {small ? 250 : 560, 3, 37, 29};
    case Layout::kShortSegments: return {small ? 8000 : 17000, 4, 3, 3};
    case Layout::kChannelsLast: return {small ? 130 : 300, 3, 27, 25};
    case Layout::kChannelsLast3d: return {small ? 150 : 330, 5, 6, 7, 9};
    case Layout::kRows: return {small ? 1000 : 2100, 300};
    case Layout::kOneChannel: return {70, 1, 61, 67};
    case Layout::kStrided: return {small ? 52 : 60, 2, 64, 80};
  }
  return {};
}

// How the kernels split `shape`'s work (rows: before the grouping of short rows,
// which keeps the values per task).
inline Split split_of(Layout layout, const std::vector<int64_t>& shape) {
  int64_t inner = 1;
  for (size_t d = 2; d < shape.size(); ++d) inner *= shape[d];
  const int64_t batch = shape[0], channels = shape[1];
  switch (layout) {
    case Layout::kContiguous:
    case Layout::kStrided:
      return planar_split(batch * inner);
    case Layout::kOneChannel:
      return planar_split(batch * inner);
    case Layout::kShortSegments:
      EXPECT_LT(inner, kMinPlanarRun);
      return rows_split(batch, channels * inner);
    case Layout::kChannelsLast:
    case Layout::kChannelsLast3d:
      return rows_split(batch * inner, channels);
    case Layout::kRows:
      return rows_split(batch, channels);
  }
  return {0, 0};
}

// Channel c's values: mean and standard deviation that differ between channels
// (a few with a variance below the clamp-mode eps below).
inline double channel_mean(int64_t c) { return static_cast<double>((c * 37) % 11 - 5) * 0.7 + 0.3; }
inline double channel_std(int64_t c) { return 0.1 + static_cast<double>(c % 7) * 0.45; }

inline at::Tensor per_channel_view(const at::Tensor& values, int64_t dim) {
  std::vector<int64_t> shape(dim, 1);
  shape[1] = values.size(0);
  return values.view(shape);
}

// Random (N, C, *) values in `layout` and `dtype`, channel c ~ N(mean_c, std_c).
inline at::Tensor make_input(Layout layout, at::ScalarType dtype) {
  std::vector<int64_t> shape = shape_of(layout);
  if (layout == Layout::kStrided) shape.back() *= 2;
  const int64_t channels = shape[1];
  std::vector<double> means, stds;
  for (int64_t c = 0; c < channels; ++c) {
    means.push_back(channel_mean(c));
    stds.push_back(channel_std(c));
  }
  const auto dims = static_cast<int64_t>(shape.size());
  at::Tensor values = torch::randn(shape, torch::kDouble) * per_channel_view(torch::tensor(stds), dims) +
                      per_channel_view(torch::tensor(means), dims);
  at::Tensor x = values.to(dtype);
  switch (layout) {
    case Layout::kChannelsLast: return x.contiguous(at::MemoryFormat::ChannelsLast);
    case Layout::kChannelsLast3d: return x.contiguous(at::MemoryFormat::ChannelsLast3d);
    case Layout::kStrided: return x.slice(-1, 0, x.size(-1), 2);
    default: return x;
  }
}

// A gradient for `input`: random, in the input's layout.
inline at::Tensor make_grad(const at::Tensor& input, Layout layout) {
  std::vector<int64_t> shape = input.sizes().vec();
  if (layout == Layout::kStrided) shape.back() *= 2;
  at::Tensor dy = torch::randn(shape, torch::kDouble).to(input.scalar_type());
  switch (layout) {
    case Layout::kChannelsLast: return dy.contiguous(at::MemoryFormat::ChannelsLast);
    case Layout::kChannelsLast3d: return dy.contiguous(at::MemoryFormat::ChannelsLast3d);
    case Layout::kStrided: return dy.slice(-1, 1, dy.size(-1), 2);
    default: return dy;
  }
}

inline void expect_layout(const at::Tensor& input, Layout layout) {
  switch (layout) {
    case Layout::kChannelsLast:
      EXPECT_TRUE(input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous());
      break;
    case Layout::kChannelsLast3d:
      EXPECT_TRUE(input.is_contiguous(at::MemoryFormat::ChannelsLast3d) && !input.is_contiguous());
      break;
    case Layout::kStrided:
      EXPECT_FALSE(input.is_contiguous() || input.is_contiguous(at::MemoryFormat::ChannelsLast));
      break;
    default:
      EXPECT_TRUE(input.is_contiguous());
  }
}

// The same values in another memory order: channels_last <-> contiguous, else
// the first two dims swapped in memory.
inline at::Tensor in_other_order(const at::Tensor& t) {
  if (t.dim() == 4) {
    return t.is_contiguous(at::MemoryFormat::ChannelsLast) ? t.contiguous()
                                                           : t.contiguous(at::MemoryFormat::ChannelsLast);
  }
  if (t.dim() == 5) {
    return t.is_contiguous(at::MemoryFormat::ChannelsLast3d) ? t.contiguous()
                                                             : t.contiguous(at::MemoryFormat::ChannelsLast3d);
  }
  return t.transpose(0, 1).contiguous().transpose(0, 1);
}

inline std::vector<int64_t> reduced_dims(const at::Tensor& input) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < input.dim(); ++d) dims.push_back(d);
  return dims;
}

inline at::ScalarType stats_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// ---- Tolerances -------------------------------------------------------------------

// Relative tolerances against error scales (below): of the statistics and
// reductions (accumulated in float, or double for float64), and of the values
// an elementwise op stores in the input's dtype (a rounding of that dtype).
struct Tolerance {
  double reduction;
  double elementwise;
};

inline Tolerance tolerance_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return {1e-12, 1e-13};
    case at::kFloat: return {2e-6, 2e-6};
    case at::kHalf: return {2e-6, 1e-3};      // 2^-11 = 4.9e-4: half an ulp is 2.4e-4
    case at::kBFloat16: return {2e-6, 8e-3};  // 2^-8 = 3.9e-3: half an ulp is 2e-3
    default: return {0, 0};
  }
}

}  // namespace syncbn_test

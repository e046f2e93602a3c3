// The CPU kernels of the syncbn ops (cpp/src/cpu/batch_norm_kernels.cpp) on their
// real paths, against an ATen reference in float64: sizes that make several
// parallel tasks per channel (planar) or per input (rows) and several blocks per
// task, every layout the kernels read (contiguous, short segments read as rows,
// channels_last, channels_last_3d, (N, C) rows, one channel, non-contiguous),
// every dtype (float32, float64, float16, bfloat16), one and two intra-op threads
// (the results must also be bitwise the same for both), forward and backward;
// then syncbn::data_parallel on a conv-BN-ReLU net against torch::nn::BatchNorm2d
// on the whole batch.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <syncbn/syncbn.h>

#include "module_state.h"

namespace {

using syncbn_test::copy_state;

// Under a sanitizer (SYNCBN_SANITIZE builds, or SYNCBN_SANITIZED=1 set by hand)
// the inputs are smaller, but still several tasks per channel.
bool sanitized() {
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
bool thread_sanitized() {
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

std::vector<int> thread_counts() { return thread_sanitized() ? std::vector<int>{1} : std::vector<int>{1, 2}; }

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
// (constants of cpp/src/cpu/batch_norm_kernels.cpp)
constexpr int64_t kBlockValues = 4096;      // planar: values of a channel per block
constexpr int64_t kTaskValues = 1 << 18;    // input values per parallel task
constexpr int64_t kRowBlockValues = 16384;  // rows: values per block, in [16, 256] rows
constexpr int64_t kMinBlockRows = 16;
constexpr int64_t kMaxBlockRows = 256;
constexpr int64_t kMinPlanarRun = 16;  // shorter contiguous segments are read as rows

int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Split {
  int64_t tasks;            // per channel (planar) or per input (rows)
  int64_t blocks_per_task;  // of the first task
};

Split planar_split(int64_t values_per_channel) {
  const int64_t wanted = std::max<int64_t>(1, divup(values_per_channel, kTaskValues));
  const int64_t per_part = divup(divup(values_per_channel, wanted), kBlockValues) * kBlockValues;
  return {std::max<int64_t>(1, divup(values_per_channel, per_part)), per_part / kBlockValues};
}

Split rows_split(int64_t num_rows, int64_t width) {
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

std::string layout_name(Layout layout) {
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

std::vector<int64_t> shape_of(Layout layout) {
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
Split split_of(Layout layout, const std::vector<int64_t>& shape) {
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
double channel_mean(int64_t c) { return static_cast<double>((c * 37) % 11 - 5) * 0.7 + 0.3; }
double channel_std(int64_t c) { return 0.1 + static_cast<double>(c % 7) * 0.45; }

at::Tensor per_channel_view(const at::Tensor& values, int64_t dim) {
  std::vector<int64_t> shape(dim, 1);
  shape[1] = values.size(0);
  return values.view(shape);
}

// Random (N, C, *) values in `layout` and `dtype`, channel c ~ N(mean_c, std_c).
at::Tensor make_input(Layout layout, at::ScalarType dtype) {
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
at::Tensor make_grad(const at::Tensor& input, Layout layout) {
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

void expect_layout(const at::Tensor& input, Layout layout) {
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
at::Tensor in_other_order(const at::Tensor& t) {
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

std::vector<int64_t> reduced_dims(const at::Tensor& input) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < input.dim(); ++d) dims.push_back(d);
  return dims;
}

at::ScalarType stats_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// ---- Comparisons -----------------------------------------------------------------

// Relative tolerances against error scales (below): of the statistics and
// reductions (accumulated in float, or double for float64), and of the values
// an elementwise op stores in the input's dtype (a rounding of that dtype).
struct Tolerance {
  double reduction;
  double elementwise;
};

Tolerance tolerance_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return {1e-12, 1e-13};
    case at::kFloat: return {2e-6, 2e-6};
    case at::kHalf: return {2e-6, 1e-3};      // 2^-11 = 4.9e-4: half an ulp is 2.4e-4
    case at::kBFloat16: return {2e-6, 8e-3};  // 2^-8 = 3.9e-3: half an ulp is 2e-3
    default: return {0, 0};
  }
}

// |actual - expected| <= tolerance * scale, everywhere (scale: the size of the
// terms that made `expected`, so the bound is the computation's own error).
::testing::AssertionResult within(const at::Tensor& actual, const at::Tensor& expected, const at::Tensor& scale,
                                  double tolerance) {
  if (actual.sizes() != expected.sizes()) {
    return ::testing::AssertionFailure() << "shape " << actual.sizes() << ", expected " << expected.sizes();
  }
  if (actual.numel() == 0) return ::testing::AssertionSuccess();
  const at::Tensor a = actual.to(at::kDouble), e = expected.to(at::kDouble);
  const at::Tensor error = (a - e).abs();
  const at::Tensor bound = (scale.to(at::kDouble) * tolerance).expand_as(error);
  const at::Tensor excess = (error - bound).masked_fill(error.isnan(), std::numeric_limits<double>::infinity());
  const int64_t worst = excess.flatten().argmax().item<int64_t>();
  const double worst_excess = excess.flatten()[worst].item<double>();
  if (worst_excess <= 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "at flat index " << worst << ": got " << a.flatten()[worst].item<double>()
                                       << ", expected " << e.flatten()[worst].item<double>() << " (error "
                                       << error.flatten()[worst].item<double>() << " > "
                                       << bound.flatten()[worst].item<double>() << "; max error "
                                       << error.max().item<double>() << ")";
}

// The same tensor, bit for bit (NaN included).
::testing::AssertionResult identical(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) {
    return ::testing::AssertionFailure() << "shape/dtype differ";
  }
  if (torch::equal(a.contiguous(), b.contiguous())) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "differ by up to " << (a.to(at::kDouble) - b.to(at::kDouble)).abs().max();
}

// ---- The ops, at one and two threads ------------------------------------------------

std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return "float64";
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    default: return "?";
  }
}

// One layout per test (a test is a process under ctest: fewer, longer tests
// keep the sanitizer runs short); every dtype inside.
class CpuKernels : public ::testing::TestWithParam<Layout> {
 protected:
  void SetUp() override {
    layout_ = GetParam();
    const Split split = split_of(layout_, shape_of(layout_));
    // The sizes must reach the parallel tasks and the block loops.
    ASSERT_GE(split.tasks, 2) << "not a multi-task input";
    ASSERT_GE(split.blocks_per_task, 2) << "one block per task";
  }

  // Runs `check` for every dtype, with dtype_ and tolerance_ set.
  template <class F>
  void for_each_dtype(const F& check) {
    for (const at::ScalarType dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
      SCOPED_TRACE(dtype_name(dtype));
      dtype_ = dtype;
      tolerance_ = tolerance_of(dtype);
      check();
    }
  }

  Layout layout_ = Layout::kContiguous;
  at::ScalarType dtype_ = at::kFloat;
  Tolerance tolerance_{};
};

TEST_P(CpuKernels, LocalStatsAndMergeStats) {
  for_each_dtype([&] {
    torch::manual_seed(11);
    const at::Tensor x = make_input(layout_, dtype_);
    expect_layout(x, layout_);
    const at::Tensor x64 = x.to(at::kDouble);
    const auto dims = reduced_dims(x);
    const at::Tensor ref_mean = x64.mean(dims);
    const at::Tensor ref_m2 = (x64 - per_channel_view(ref_mean, x.dim())).square().sum(dims);
    const int64_t count = x.numel() / x.size(1);

    std::vector<std::tuple<at::Tensor, at::Tensor>> results;
    for (int threads : thread_counts()) {
      IntraOpThreads scope(threads);
      SCOPED_TRACE(::testing::Message() << threads << " thread(s)");
      auto [mean, m2] = syncbn::local_stats(x);
      EXPECT_EQ(mean.scalar_type(), stats_dtype(dtype_));
      EXPECT_EQ(m2.scalar_type(), stats_dtype(dtype_));
      // mean: its error is relative to the mean of |x|; M2 is a sum of squares.
      EXPECT_TRUE(within(mean, ref_mean, x64.abs().mean(dims), tolerance_.reduction));
      EXPECT_TRUE(within(m2, ref_m2, ref_m2, tolerance_.reduction));
      results.emplace_back(mean, m2);
    }
    for (size_t i = 1; i < results.size(); ++i) {
      EXPECT_TRUE(identical(std::get<0>(results[i]), std::get<0>(results[0]))) << "mean depends on the thread count";
      EXPECT_TRUE(identical(std::get<1>(results[i]), std::get<1>(results[0]))) << "m2 depends on the thread count";
    }

    // Merging the statistics of uneven slices (one empty) gives the whole batch's mean and biased variance.
    const int64_t batch = x.size(0);
    const std::vector<int64_t> bounds{0, batch / 5, batch / 5, batch};
    std::vector<at::Tensor> means, m2s;
    std::vector<int64_t> counts;
    for (size_t i = 0; i + 1 < bounds.size(); ++i) {
      const at::Tensor slice = x.narrow(0, bounds[i], bounds[i + 1] - bounds[i]);
      auto [mean, m2] = syncbn::local_stats(slice);
      means.push_back(mean);
      m2s.push_back(m2);
      counts.push_back(slice.numel() / std::max<int64_t>(1, x.size(1)));
    }
    auto [mean, var] = syncbn::merge_stats(torch::tensor(counts, torch::kLong), torch::stack(means), torch::stack(m2s));
    EXPECT_EQ(mean.scalar_type(), stats_dtype(dtype_));
    EXPECT_TRUE(within(mean, ref_mean, x64.abs().mean(dims), tolerance_.reduction));
    EXPECT_TRUE(within(var, ref_m2 / static_cast<double>(count), ref_m2 / static_cast<double>(count),
                       tolerance_.reduction));
  });
}

TEST_P(CpuKernels, NormalizeInBothEpsModes) {
  for_each_dtype([&] {
    torch::manual_seed(12);
    const at::Tensor x = make_input(layout_, dtype_);
    const at::Tensor x64 = x.to(at::kDouble);
    const int64_t channels = x.size(1);
    const auto acc = stats_dtype(dtype_);
    const at::Tensor mean = x64.mean(reduced_dims(x)).to(acc);
    const at::Tensor var = x64.var(reduced_dims(x), /*unbiased=*/false).to(acc);
    const at::Tensor weight = (torch::rand({channels}, torch::kDouble) + 0.5).to(acc);
    const at::Tensor bias = torch::randn({channels}, torch::kDouble).to(acc);

    struct Variant {
      syncbn::EpsMode mode;
      double eps;
      bool affine;
    };
    // Clamp mode with an eps above some channels' variance (std 0.1), without weight and bias.
    for (const Variant variant :
         {Variant{syncbn::EpsMode::Plus, 1e-3, true}, Variant{syncbn::EpsMode::Clamp, 0.05, false}}) {
      SCOPED_TRACE(syncbn::eps_mode_name(variant.mode));
      const at::Tensor var64 = var.to(at::kDouble);
      const at::Tensor invstd = variant.mode == syncbn::EpsMode::Plus ? (var64 + variant.eps).rsqrt()
                                                                      : var64.clamp_min(variant.eps).rsqrt();
      const at::Tensor scale = variant.affine ? invstd * weight.to(at::kDouble) : invstd;
      const at::Tensor shift = variant.affine ? bias.to(at::kDouble) : torch::zeros_like(invstd);
      const int64_t dim = x.dim();
      const at::Tensor m = per_channel_view(mean.to(at::kDouble), dim);
      const at::Tensor expected = (x64 - m) * per_channel_view(scale, dim) + per_channel_view(shift, dim);
      const at::Tensor error_scale =
          (x64.abs() + m.abs()) * per_channel_view(scale.abs(), dim) + per_channel_view(shift.abs(), dim);

      std::vector<at::Tensor> outputs;
      for (int threads : thread_counts()) {
        IntraOpThreads scope(threads);
        SCOPED_TRACE(::testing::Message() << threads << " thread(s)");
        const at::Tensor y =
            variant.affine ? syncbn::normalize(x, mean, var, weight, bias, variant.eps, variant.mode)
                           : syncbn::normalize(x, mean, var, std::nullopt, std::nullopt, variant.eps, variant.mode);
        EXPECT_EQ(y.scalar_type(), dtype_);
        EXPECT_TRUE(within(y, expected, error_scale, tolerance_.elementwise));
        outputs.push_back(y);
      }
      for (size_t i = 1; i < outputs.size(); ++i) EXPECT_TRUE(identical(outputs[i], outputs[0]));
    }
  });
}

TEST_P(CpuKernels, BackwardReduceAndBackwardElemt) {
  for_each_dtype([&] {
    torch::manual_seed(13);
    const at::Tensor x = make_input(layout_, dtype_);
    const at::Tensor dy = make_grad(x, layout_);
    const at::Tensor x64 = x.to(at::kDouble), dy64 = dy.to(at::kDouble);
    const int64_t channels = x.size(1), dim = x.dim();
    const auto dims = reduced_dims(x);
    const auto acc = stats_dtype(dtype_);
    const at::Tensor mean = x64.mean(dims).to(acc);
    const at::Tensor m = per_channel_view(mean.to(at::kDouble), dim);
    const at::Tensor ref_sum_dy = dy64.sum(dims);
    const at::Tensor ref_sum_dy_xmu = (dy64 * (x64 - m)).sum(dims);
    const at::Tensor dy_scale = torch::randn({channels}, torch::kDouble).to(acc);
    const at::Tensor x_scale = torch::randn({channels}, torch::kDouble).to(acc);
    const at::Tensor shift = torch::randn({channels}, torch::kDouble).to(acc);
    const auto view = [&](const at::Tensor& values) { return per_channel_view(values.to(at::kDouble), dim); };
    const at::Tensor expected = dy64 * view(dy_scale) + (x64 - m) * view(x_scale) + view(shift);
    const at::Tensor error_scale = dy64.abs() * view(dy_scale).abs() + (x64.abs() + m.abs()) * view(x_scale).abs() +
                                   view(shift).abs();

    std::vector<std::vector<at::Tensor>> results;
    for (int threads : thread_counts()) {
      IntraOpThreads scope(threads);
      SCOPED_TRACE(::testing::Message() << threads << " thread(s)");
      auto [sum_dy, sum_dy_xmu] = syncbn::backward_reduce(dy, x, mean);
      EXPECT_EQ(sum_dy.scalar_type(), acc);
      EXPECT_TRUE(within(sum_dy, ref_sum_dy, dy64.abs().sum(dims), tolerance_.reduction));
      EXPECT_TRUE(within(sum_dy_xmu, ref_sum_dy_xmu, (dy64 * (x64 - m)).abs().sum(dims), tolerance_.reduction));
      const at::Tensor grad_in = syncbn::backward_elemt(dy, x, mean, dy_scale, x_scale, shift);
      EXPECT_EQ(grad_in.scalar_type(), dtype_);
      EXPECT_TRUE(within(grad_in, expected, error_scale, tolerance_.elementwise));
      // A gradient in another memory order than the input's is read as well.
      const at::Tensor other = syncbn::backward_elemt(in_other_order(dy), x, mean, dy_scale, x_scale, shift);
      EXPECT_TRUE(identical(other, grad_in));
      results.push_back({sum_dy, sum_dy_xmu, grad_in});
    }
    for (size_t i = 1; i < results.size(); ++i) {
      for (size_t k = 0; k < results[i].size(); ++k) EXPECT_TRUE(identical(results[i][k], results[0][k])) << k;
    }
  });
}

// One training-mode BatchNorm forward and backward of the whole input, through
// the library's autograd path (one replica: syncbn::local_exchange), against
// autograd through at::batch_norm in float64. The parameters are float32 for
// float16/bfloat16 inputs (as under autocast).
TEST_P(CpuKernels, SyncBatchNormForwardAndBackwardEqualBatchNormInFloat64) {
  for_each_dtype([&] {
    torch::manual_seed(14);
    const at::Tensor x_data = make_input(layout_, dtype_);
    const at::Tensor dy = make_grad(x_data, layout_);
    const int64_t channels = x_data.size(1), dim = x_data.dim();
    const auto acc = stats_dtype(dtype_);
    const double eps = 1e-3;
    const at::Tensor weight_data = (torch::rand({channels}, torch::kDouble) + 0.5).to(acc);
    const at::Tensor bias_data = torch::randn({channels}, torch::kDouble).to(acc);

    // Reference.
    at::Tensor x64 = x_data.to(at::kDouble).clone().requires_grad_();
    at::Tensor w64 = weight_data.to(at::kDouble).clone().requires_grad_();
    at::Tensor b64 = bias_data.to(at::kDouble).clone().requires_grad_();
    at::Tensor rm64 = torch::zeros({channels}, torch::kDouble), rv64 = torch::ones({channels}, torch::kDouble);
    const at::Tensor y64 = at::batch_norm(x64, w64, b64, rm64, rv64, true, 0.1, eps, false);
    y64.backward(dy.to(at::kDouble));

    // Error scales: |x - mean| * |w| invstd + |b| for y; for dx, w invstd (|dy| + mean|dy| + |xhat| mean|dy xhat|).
    const auto dims = reduced_dims(x_data);
    const at::Tensor xd = x64.detach(), dyd = dy.to(at::kDouble);
    const at::Tensor mean = xd.mean(dims), invstd = (xd.var(dims, false) + eps).rsqrt();
    const at::Tensor xhat = (xd - per_channel_view(mean, dim)) * per_channel_view(invstd, dim);
    const at::Tensor w_invstd = per_channel_view(w64.detach().abs() * invstd, dim);
    const at::Tensor y_scale =
        (xd.abs() + per_channel_view(mean.abs(), dim)) * w_invstd + per_channel_view(b64.detach().abs(), dim);
    const at::Tensor dx_scale = w_invstd * (dyd.abs() + per_channel_view(dyd.abs().mean(dims), dim) +
                                            xhat.abs() * per_channel_view((dyd * xhat).abs().mean(dims), dim));
    // The statistics' float rounding enters every value: a few times the reduction tolerance.
    const double y_tolerance = tolerance_.elementwise + 20 * tolerance_.reduction;

    std::vector<std::vector<at::Tensor>> results;
    for (int threads : thread_counts()) {
      IntraOpThreads scope(threads);
      SCOPED_TRACE(::testing::Message() << threads << " thread(s)");
      at::Tensor x = x_data.clone().requires_grad_();
      at::Tensor weight = weight_data.clone().requires_grad_();
      at::Tensor bias = bias_data.clone().requires_grad_();
      at::Tensor rm = torch::zeros({channels}, acc), rv = torch::ones({channels}, acc);
      const at::Tensor y = syncbn::sync_batch_norm_train(x, weight, bias, rm, rv, 0.1, eps, syncbn::EpsMode::Plus,
                                                         syncbn::local_exchange());
      y.backward(dy);
      EXPECT_EQ(y.scalar_type(), dtype_);
      EXPECT_TRUE(within(y, y64, y_scale, y_tolerance)) << "output";
      EXPECT_EQ(x.grad().scalar_type(), dtype_);
      EXPECT_TRUE(within(x.grad(), x64.grad(), dx_scale, y_tolerance)) << "input gradient";
      EXPECT_TRUE(within(weight.grad(), w64.grad(), (dyd * xhat).abs().sum(dims), 20 * tolerance_.reduction))
          << "weight gradient";
      EXPECT_TRUE(within(bias.grad(), b64.grad(), dyd.abs().sum(dims), 20 * tolerance_.reduction)) << "bias gradient";
      EXPECT_TRUE(within(rm, rm64, rm64.abs() + 0.1 * xd.abs().mean(dims), 20 * tolerance_.reduction))
          << "running_mean";
      EXPECT_TRUE(within(rv, rv64, rv64, 20 * tolerance_.reduction)) << "running_var";
      results.push_back({y, x.grad(), weight.grad(), bias.grad(), rm, rv});
    }
    for (size_t i = 1; i < results.size(); ++i) {
      for (size_t k = 0; k < results[i].size(); ++k) EXPECT_TRUE(identical(results[i][k], results[0][k])) << k;
    }
  });
}

INSTANTIATE_TEST_SUITE_P(Layouts, CpuKernels,
                         ::testing::Values(Layout::kContiguous, Layout::kShortSegments, Layout::kChannelsLast,
                                           Layout::kChannelsLast3d, Layout::kRows, Layout::kOneChannel,
                                           Layout::kStrided),
                         [](const ::testing::TestParamInfo<Layout>& info) { return layout_name(info.param); });

// ---- data_parallel on a realistic shape --------------------------------------------

// conv-BN-ReLU x 3 on 16-channel 32x32 images, with BatchNorm module `BN`.
template <typename BN>
torch::nn::Sequential conv_bn_relu_net() {
  torch::nn::Sequential net;
  const std::vector<std::pair<int64_t, int64_t>> widths{{16, 32}, {32, 32}, {32, 16}};
  for (const auto& [in, out] : widths) {
    net->push_back(torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, 3).padding(1).bias(false)));
    net->push_back(BN(out));
    net->push_back(torch::nn::ReLU());
  }
  return net;
}

// |a - b| <= tolerance * max|b| (float32 through three conv-BN layers; conv
// itself may sum in another order for another batch size).
::testing::AssertionResult close_to(const at::Tensor& a, const at::Tensor& b, double tolerance = 2e-5) {
  const double scale = std::max(1e-30, b.abs().max().item<double>());
  return within(a, b, torch::full({}, scale, torch::kDouble), tolerance);
}

class DataParallelConvNet : public ::testing::TestWithParam<int64_t> {};

TEST_P(DataParallelConvNet, SyncBatchNorm2dEqualsBatchNorm2dOnTheWholeBatch) {
  const int64_t replicas = GetParam();
  torch::manual_seed(21);
  torch::nn::Sequential synced = conv_bn_relu_net<syncbn::SyncBatchNorm2d>();
  torch::nn::Sequential reference = conv_bn_relu_net<torch::nn::BatchNorm2d>();
  {
    torch::NoGradGuard no_grad;
    for (auto& item : synced->named_parameters()) {
      if (item.key().find("weight") != std::string::npos && item.value().dim() == 1) item.value().uniform_(0.5, 1.5);
      if (item.key().find("bias") != std::string::npos) item.value().uniform_(-0.5, 0.5);
    }
  }
  copy_state(*synced, *reference);
  const std::vector<torch::Device> devices(replicas, torch::kCPU);

  for (int step = 0; step < 2; ++step) {
    SCOPED_TRACE(::testing::Message() << replicas << " replicas, step " << step);
    const at::Tensor x = (torch::randn({8, 16, 32, 32}) * 2 + 0.5).requires_grad_();
    const at::Tensor x_ref = x.detach().clone().requires_grad_();
    const at::Tensor grad_out = torch::randn({8, 16, 32, 32});
    synced->zero_grad();
    reference->zero_grad();

    const at::Tensor y = syncbn::data_parallel(synced, x, devices);
    const at::Tensor y_ref = reference->forward(x_ref);
    y.backward(grad_out);
    y_ref.backward(grad_out);

    EXPECT_TRUE(close_to(y, y_ref)) << "output";
    EXPECT_TRUE(close_to(x.grad(), x_ref.grad())) << "input gradient";
    auto reference_parameters = reference->named_parameters();
    for (const auto& item : synced->named_parameters()) {
      ASSERT_TRUE(item.value().grad().defined()) << item.key();
      EXPECT_TRUE(close_to(item.value().grad(), reference_parameters[item.key()].grad(), 1e-4))
          << item.key() << " gradient";
    }
    auto reference_buffers = reference->named_buffers();
    for (const auto& item : synced->named_buffers()) {
      if (item.value().scalar_type() == torch::kLong) {
        EXPECT_TRUE(torch::equal(item.value(), reference_buffers[item.key()])) << item.key();
      } else {
        EXPECT_TRUE(close_to(item.value(), reference_buffers[item.key()])) << item.key();
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(CpuReplicas, DataParallelConvNet, ::testing::Values(2, 4));

}  // namespace

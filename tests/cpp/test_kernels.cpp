// The CPU kernels of the syncbn ops (cpp/src/cpu/batch_norm_kernels.cpp) on their
// real paths, against an ATen reference in float64: sizes that make several
// parallel tasks per channel (planar) or per input (rows) and several blocks per
// task, every layout the kernels read (contiguous, short segments read as rows,
// channels_last, channels_last_3d, (N, C) rows, one channel, non-contiguous),
// every dtype (float32, float64, float16, bfloat16), one and two intra-op threads
// (the results must also be bitwise the same for both), forward and backward.
#include <gtest/gtest.h>

#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <syncbn/syncbn.h>

#include "kernel_cases.h"
#include "tensor_compare.h"

namespace {

using syncbn_test::thread_counts;
using syncbn_test::Split;
using syncbn_test::Layout;
using syncbn_test::layout_name;
using syncbn_test::shape_of;
using syncbn_test::split_of;
using syncbn_test::per_channel_view;
using syncbn_test::make_input;
using syncbn_test::make_grad;
using syncbn_test::expect_layout;
using syncbn_test::in_other_order;
using syncbn_test::reduced_dims;
using syncbn_test::Tolerance;
using syncbn_test::tolerance_of;
using syncbn_test::within;
using syncbn_test::identical;
using syncbn_test::stats_dtype;

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
      syncbn_test::IntraOpThreads scope(threads);
      SCOPED_TRACE(::testing::Message() << threads << " thread(s)");
      auto [mean, m2] = syncbn::local_stats(x);
      EXPECT_EQ(mean.scalar_type(), at::kDouble);  // whatever the input's dtype: the merge needs their digits
      EXPECT_EQ(m2.scalar_type(), at::kDouble);
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
    EXPECT_EQ(mean.scalar_type(), at::kDouble);
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
        syncbn_test::IntraOpThreads scope(threads);
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
      syncbn_test::IntraOpThreads scope(threads);
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
      syncbn_test::IntraOpThreads scope(threads);
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

}  // namespace

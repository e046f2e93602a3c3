// syncbn::data_parallel on a realistic shape: a conv-BN-ReLU net of
// syncbn::SyncBatchNorm2d on CPU replicas against torch::nn::BatchNorm2d on the
// whole batch, forward, backward and running statistics over two steps.

#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <syncbn/syncbn.h>

#include "module_state.h"
#include "tensor_compare.h"

namespace {

using syncbn_test::copy_state;
using syncbn_test::within;

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

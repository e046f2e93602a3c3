// Helpers of the C++ data-parallel tests: CPU replicas and a synchronized layer with its torch reference.
#pragma once

#include <gtest/gtest.h>

#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <syncbn/syncbn.h>

#include "module_state.h"

namespace syncbn_test {

inline std::vector<torch::Device> cpu_replicas(int64_t n) { return std::vector<torch::Device>(n, torch::kCPU); }

inline void expect_close(const torch::Tensor& a, const torch::Tensor& b, const std::string& what) {
  EXPECT_TRUE(torch::allclose(a, b, 1e-10, 1e-10)) << what << ": max difference " << (a - b).abs().max().item<double>();
}

// A synchronized layer and torch's, in float64, with the same random affine parameters.
inline std::pair<syncbn::SyncBatchNorm2d, torch::nn::BatchNorm2d> matching_layers(
    const torch::nn::BatchNormOptions& options) {
  syncbn::SyncBatchNorm2d synced(options);
  torch::nn::BatchNorm2d reference(options);
  synced->to(torch::kDouble);
  reference->to(torch::kDouble);
  {
    torch::NoGradGuard no_grad;
    synced->weight.uniform_(0.5, 1.5);
    synced->bias.uniform_(-0.5, 0.5);
  }
  copy_state(*synced, *reference);
  return {synced, reference};
}

}  // namespace syncbn_test

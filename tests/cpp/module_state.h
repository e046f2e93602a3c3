// Helpers shared by the C++ tests.
#pragma once

#include <torch/torch.h>

namespace syncbn_test {

// Copies `from`'s parameters and buffers into `to`'s, matched by name (a
// reference module made with the same structure).
inline void copy_state(torch::nn::Module& from, torch::nn::Module& to) {
  torch::NoGradGuard no_grad;
  auto parameters = from.named_parameters();
  for (auto& item : to.named_parameters()) item.value().copy_(parameters[item.key()]);
  auto buffers = from.named_buffers();
  for (auto& item : to.named_buffers()) item.value().copy_(buffers[item.key()]);
}

}  // namespace syncbn_test

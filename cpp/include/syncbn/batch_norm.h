#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

#include <syncbn/export.h>

// The BatchNorm math, once, for Python and C++ users: the pure tensor ops.
//
// A synchronized BatchNorm pass over R replicas:
//   1. every replica computes its local statistics (count, mean, M2) per channel
//      in one pass over its slice (local_stats);
//   2. the master merges them with Chan's formula into the whole batch's mean
//      and biased variance (merge_stats), and hands them to every replica;
//   3. every replica normalizes its slice (normalize).
// The synchronized forward with autograd is in <syncbn/sync_batch_norm.h>.
namespace syncbn {

// How eps enters the inverse standard deviation.
enum class EpsMode : int64_t {
  Plus = 0,   // 1 / sqrt(var + eps), as nn.BatchNorm
  Clamp = 1,  // 1 / sqrt(max(var, eps)), as the established library
};

// "plus" or "clamp"; anything else is a ValueError.
SYNCBN_API EpsMode parse_eps_mode(const std::string& name);
SYNCBN_API std::string eps_mode_name(EpsMode mode);

// ---- Pure tensor ops --------------------------------------------------------
// Registered as torch.ops.syncbn.<name> (TORCH_LIBRARY(syncbn)): optimized CPU
// kernels, Meta kernels, and an ATen implementation serving other devices.
// Input is (N, C, *); per-channel tensors have length C and the statistics
// dtype: float32 for float16/bfloat16/float32 input, float64 for float64;
// local_stats returns float64 for every input.

// Per channel: (mean, M2 = sum((x - mean)^2)) of this replica's input, in
// float64 (a float32 local mean would lose the merge's accuracy where the mean
// is large next to the spread: Chan's formula weighs its rounding by n_i).
SYNCBN_API std::tuple<at::Tensor, at::Tensor> local_stats(const at::Tensor& input);

// Merges R replicas' statistics: counts (R,) int64, means and m2s (R, C).
// Returns the whole batch's (mean, biased variance), each (C,).
SYNCBN_API std::tuple<at::Tensor, at::Tensor> merge_stats(const at::Tensor& counts, const at::Tensor& means,
                                                          const at::Tensor& m2s);

// (x - mean) * invstd * weight + bias, invstd from var by `eps_mode`.
SYNCBN_API at::Tensor normalize(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
                                const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                double eps, EpsMode eps_mode);

// Per channel: (sum(dy), sum(dy * (x - mean))).
SYNCBN_API std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& grad_out, const at::Tensor& input,
                                                              const at::Tensor& mean);

// dy * dy_scale + (x - mean) * x_scale + shift, per channel constants.
SYNCBN_API at::Tensor backward_elemt(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                                     const at::Tensor& dy_scale, const at::Tensor& x_scale, const at::Tensor& shift);

// Makes sure the ops are registered (they are when the library loads): call it
// from an application that uses torch::ops::syncbn but no other symbol of ours,
// so that the linker keeps the library.
SYNCBN_API void register_ops();

}  // namespace syncbn

// The synchronized forward, for code that included everything from here.
#include <syncbn/sync_batch_norm.h>

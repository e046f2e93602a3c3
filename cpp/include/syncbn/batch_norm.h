#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <functional>
#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

#include <syncbn/callback_context.h>
#include <syncbn/export.h>
#include <syncbn/message.h>
#include <syncbn/sync_master.h>

// The BatchNorm math, once, for Python and C++ users.
//
// A synchronized BatchNorm pass over R replicas:
//   1. every replica computes its local statistics (count, mean, M2) per channel
//      in one pass over its slice (local_stats);
//   2. the master merges them with Chan's formula into the whole batch's mean
//      and biased variance (merge_stats), and hands them to every replica;
//   3. every replica normalizes its slice (normalize).
// Backward never waits on a barrier: the merge is one autograd node whose
// inputs are every replica's local statistics, so autograd itself sums the
// replicas' gradient contributions and routes each replica its share.
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
// dtype: float32 for float16/bfloat16/float32 input, float64 for float64.

// Per channel: (mean, M2 = sum((x - mean)^2)) of this replica's input.
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

// ---- Synchronized training-mode forward, with autograd -------------------------

// One replica's statistics message in, the merged statistics out:
// SyncMaster::run_master on copy 0, SlavePipe::run_slave on the others.
using StatisticsExchange = std::function<Message(Message)>;

// The master callback of a BatchNorm SyncMaster: merges every copy's statistics
// (differentiably) and hands every copy the whole batch's mean and variance.
// A whole batch of one value per channel raises nn.BatchNorm's ValueError, in
// every copy.
SYNCBN_API MasterCallback batch_norm_master_callback();

// The exchange of a replica that is alone (no replication): merges its own statistics.
SYNCBN_API StatisticsExchange local_exchange();

// One copy's end of its replication's BatchNorm barrier. Every synchronized
// BatchNorm layer of a replica exchanges through the same channel, so every
// message carries its layer (the module position) and the copy's call index:
// the master callback checks that all copies are at the same call of the same
// layer, and a copy whose forward returned early is caught by the barrier
// (SyncMaster::finish). Replicas that call the layers a different number of
// times or in a different order get an error naming the layers and copies.
class SYNCBN_API BatchNormChannel : public std::enable_shared_from_this<BatchNormChannel> {
 public:
  // Copy `copy_id`'s channel in the replication of `context` (made on first use;
  // copy 0's creates the replication's barrier and adds it to the group).
  static std::shared_ptr<BatchNormChannel> of(CallbackContext& context, int64_t copy_id);

  BatchNormChannel(int64_t copy_id, std::shared_ptr<SyncMaster> master, std::shared_ptr<SlavePipe> pipe);

  // The exchange of layer `layer_position` (named `layer_name`) through this channel.
  StatisticsExchange exchange_for(int64_t layer_position, std::string layer_name);

  int64_t copy_id() const { return copy_id_; }
  // The replication's barrier.
  const std::shared_ptr<SyncMaster>& master() const { return master_; }
  // This copy's forward returned: it sends no more statistics.
  void finish() const { master_->finish(copy_id_); }

 private:
  Message exchange(Message message, int64_t layer_position, const std::string& layer_name);

  const int64_t copy_id_;
  std::shared_ptr<SyncMaster> master_;
  std::shared_ptr<SlavePipe> pipe_;  // null on copy 0
  std::atomic<int64_t> calls_{0};
};

// Training-mode BatchNorm of one replica's slice with statistics over every
// replica's slices. When running_mean/running_var are given (pass them on the
// master only, or when alone), they are updated from the merged statistics with
// `exponential_average_factor` (the unbiased variance, as nn.BatchNorm).
// Differentiable in input, weight and bias, across replicas.
SYNCBN_API at::Tensor sync_batch_norm_train(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                            const std::optional<at::Tensor>& bias,
                                            const std::optional<at::Tensor>& running_mean,
                                            const std::optional<at::Tensor>& running_var,
                                            double exponential_average_factor, double eps, EpsMode eps_mode,
                                            const StatisticsExchange& exchange);

}  // namespace syncbn

#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <ostream>
#include <string>

#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/pimpl.h>

#include <syncbn/batch_norm.h>
#include <syncbn/batch_norm_channel.h>
#include <syncbn/callback_context.h>
#include <syncbn/cross_process.h>
#include <syncbn/export.h>
#include <syncbn/replicate.h>
#include <syncbn/sync_batch_norm.h>
#include <syncbn/sync_master.h>

namespace syncbn {

// The state a synchronized BatchNorm keeps per replication: which copy this is,
// and its end of the barrier (the master on copy 0, a pipe on the others).
class SYNCBN_API BatchNormSyncState {
 public:
  BatchNormSyncState();
  // The replication hook: joins this copy's channel of the replication's barrier.
  void on_replicate(CallbackContext& context, int64_t copy_id);
  // A copy failed: closes the replication, so every copy waiting on its barrier
  // wakes, and none writes anything.
  void abort(const std::string& reason) const;
  // This copy's forward returned.
  void finish() const;
  bool replicated() const { return channel_ != nullptr; }
  bool holds_buffers() const { return !channel_ || channel_->copy_id() == 0; }
  // Where this layer's statistics merge: through the channel, or alone when not replicated; and across the
  // process group, when set and `training` (as torch.nn.SyncBatchNorm, an eval-mode forward normalizing with
  // batch statistics, track_running_stats=false, stays within the process: evaluating on one rank works).
  LayerSync layer_sync(bool training) const;
  // Whether a forward must take the synchronized path (replicated, or training across several processes).
  bool synchronizes(bool training) const { return replicated() || (training && spans_processes(process_group_)); }

  void set_process_group(ProcessGroupPtr group) { process_group_ = std::move(group); }
  const ProcessGroupPtr& process_group() const { return process_group_; }

 private:
  std::shared_ptr<BatchNormChannel> channel_;
  int64_t position_ = -1;
  std::string name_;
  ProcessGroupPtr process_group_;
  int64_t layer_id_;  // construction order: the layer's identity across processes
};

// Training-mode forward of a synchronized BatchNorm module: nn.BatchNorm's
// num_batches_tracked/momentum handling on the copy that holds the buffers,
// statistics merged through `state`.
SYNCBN_API torch::Tensor sync_batch_norm_module_forward(const torch::Tensor& input,
                                                        const torch::nn::BatchNormOptions& options,
                                                        const torch::Tensor& weight, const torch::Tensor& bias,
                                                        const torch::Tensor& running_mean,
                                                        const torch::Tensor& running_var,
                                                        const torch::Tensor& num_batches_tracked, bool training,
                                                        const BatchNormSyncState& state);

// torch::nn::BatchNorm{1,2,3}d with batch statistics over every replica under
// syncbn::data_parallel (or syncbn::replicate). Same options, parameters,
// buffers and names as torch::nn::BatchNorm{1,2,3}d, so checkpoints load both
// ways; not replicated, or in eval mode with running statistics, it computes
// exactly what torch::nn::BatchNorm computes.
template <size_t D, typename Derived>
class SyncBatchNormImplBase : public torch::nn::BatchNormImplBase<D, Derived>, public ReplicationCallback {
 public:
  using torch::nn::BatchNormImplBase<D, Derived>::BatchNormImplBase;

  torch::Tensor forward(const torch::Tensor& input) {
    const bool training = this->is_training();
    const bool batch_stats = training || !this->options.track_running_stats();
    if (!batch_stats || !sync_.synchronizes(training)) return torch::nn::BatchNormImplBase<D, Derived>::forward(input);
    this->_check_input_dim(input);
    return sync_batch_norm_module_forward(input, this->options, this->weight, this->bias, this->running_mean,
                                          this->running_var, this->num_batches_tracked, training, sync_);
  }

  void on_replicate(CallbackContext& context, int64_t copy_id) override { sync_.on_replicate(context, copy_id); }

  // A c10d process group (e.g. ProcessGroupGloo over a FileStore) to also synchronize across: every replica of
  // every process of the group. Default: none (the replicas of this process only).
  void set_process_group(ProcessGroupPtr group) { sync_.set_process_group(std::move(group)); }
  const ProcessGroupPtr& process_group() const { return sync_.process_group(); }
  void on_replica_failure(const std::string& reason) override { sync_.abort(reason); }
  void on_copy_finished() override { sync_.finish(); }

  void pretty_print(std::ostream& stream) const override {
    const auto& options = this->options;
    stream << std::boolalpha << "syncbn::SyncBatchNorm" << D << "d(" << options.num_features()
           << ", eps=" << options.eps() << ", momentum=";
    if (options.momentum().has_value()) {
      stream << *options.momentum();
    } else {
      stream << "None";
    }
    stream << ", affine=" << options.affine() << ", track_running_stats=" << options.track_running_stats() << ')';
  }

 private:
  BatchNormSyncState sync_;
};

// nn.BatchNorm's input checks, same messages.
SYNCBN_API void check_batch_norm_input_dim(const torch::Tensor& input, size_t D);

class SYNCBN_API SyncBatchNorm1dImpl : public SyncBatchNormImplBase<1, SyncBatchNorm1dImpl> {
 public:
  using SyncBatchNormImplBase<1, SyncBatchNorm1dImpl>::SyncBatchNormImplBase;

 protected:
  void _check_input_dim(const torch::Tensor& input) override { check_batch_norm_input_dim(input, 1); }
};

class SYNCBN_API SyncBatchNorm2dImpl : public SyncBatchNormImplBase<2, SyncBatchNorm2dImpl> {
 public:
  using SyncBatchNormImplBase<2, SyncBatchNorm2dImpl>::SyncBatchNormImplBase;

 protected:
  void _check_input_dim(const torch::Tensor& input) override { check_batch_norm_input_dim(input, 2); }
};

class SYNCBN_API SyncBatchNorm3dImpl : public SyncBatchNormImplBase<3, SyncBatchNorm3dImpl> {
 public:
  using SyncBatchNormImplBase<3, SyncBatchNorm3dImpl>::SyncBatchNormImplBase;

 protected:
  void _check_input_dim(const torch::Tensor& input) override { check_batch_norm_input_dim(input, 3); }
};

TORCH_MODULE(SyncBatchNorm1d);
TORCH_MODULE(SyncBatchNorm2d);
TORCH_MODULE(SyncBatchNorm3d);

}  // namespace syncbn

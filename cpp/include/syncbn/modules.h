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
#include <syncbn/forward_across_processes.h>
#include <syncbn/replicate.h>
#include <syncbn/sync_batch_norm.h>
#include <syncbn/sync_master.h>

namespace syncbn {

// The state a synchronized BatchNorm keeps per replication: which copy this is,
// and its end of the barrier (the master on copy 0, a pipe on the others); and
// its layer number, which identifies the layer across processes.
//
// Layer numbers follow construction order, so every rank must build its
// synchronized layers in the same order; a new layer takes the smallest number
// given back, else the next one. Copies share the number of the layer they copy
// (one shared token), so that copies made on one rank only (an EMA model,
// clone(), the clones of an eval-mode data_parallel) shift no later layer's
// number. Cloneable::clone() also builds layers of its own (its reset(), and
// the reset() of every intermediate module, a block or a Sequential, which it
// then copy-assigns over): those must leave no trace. So a number goes back
// when its last holder (the layer and its copies) is assigned over or
// destroyed, unless it was published: a training-mode forward (the number goes
// into the exchange with the other ranks, which all run it; without a group
// too, which may come later) publishes it for good, and then nothing gives it
// back (a rank deleting a used model renumbers no later layer, whenever it
// deletes it). Eval-mode forwards publish nothing: they are what a rank
// does alone (validation), and a model built, maybe validated, and destroyed
// unused on every rank gives its numbers back on every rank alike.
//
// A copy is not replicated: it is tied to no replication's barrier, whatever
// the layer it copies (a clone of a replica works alone, as a new layer).
namespace detail {
class LayerNumber;  // the shared token (modules.cpp)
}  // namespace detail

class SYNCBN_API BatchNormSyncState {
 public:
  BatchNormSyncState();
  BatchNormSyncState(const BatchNormSyncState& other);
  BatchNormSyncState& operator=(const BatchNormSyncState& other);
  ~BatchNormSyncState() = default;
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
  // This call refused its input before exchanging: when alone in its process and training across processes,
  // tells the other ranks (announce_failed_call), so that they fail this call too; then the caller raises its own
  // error. Throws only what breaks the telling itself (an interrupt in the wait, the transport's error).
  void announce_refused(bool training, int64_t channels, const at::Device& device) const;
  // Whether a forward must take the synchronized path (replicated, or training across several processes).
  bool synchronizes(bool training) const { return replicated() || (training && spans_processes(process_group_)); }

  void set_process_group(ProcessGroupPtr group) { process_group_ = std::move(group); }
  const ProcessGroupPtr& process_group() const { return process_group_; }
  // The layer's place in a model ("layer1.0.bn1"), naming it in errors while it is not replicated (a replica's
  // name is its place in the module data_parallel replicated). Copies keep it.
  void set_place(std::string place) { place_ = std::move(place); }
  // The layer's number across processes (see above). Reading it publishes nothing.
  int64_t layer_id() const;
  // Makes the number this layer's for good (see above): called by every training-mode forward, and by
  // layer_sync(true).
  void publish_layer_id() const;

 private:
  std::shared_ptr<BatchNormChannel> channel_;
  int64_t position_ = -1;
  std::string name_;
  std::string place_;
  ProcessGroupPtr process_group_;
  std::shared_ptr<detail::LayerNumber> layer_id_;  // shared by copies; see above
  // Calls made alone across processes in a checkpointed forward (LayerSync::recent_calls); each copy its own.
  std::shared_ptr<CallRecords> recent_calls_ = std::make_shared<CallRecords>(kRecentCallsKept);
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
// exactly what torch::nn::BatchNorm computes. On the synchronized path, eps <= 0
// raises a ValueError wherever batch statistics normalize (training, or eval
// without running statistics), where torch::nn::BatchNorm accepts it (inf or
// NaN where a channel's variance is 0); a NaN eps is accepted, as torch does.
template <size_t D, typename Derived>
class SyncBatchNormImplBase : public torch::nn::BatchNormImplBase<D, Derived>,
                              public ReplicationCallback,
                              public CrossProcessLayer {
 public:
  using torch::nn::BatchNormImplBase<D, Derived>::BatchNormImplBase;

  torch::Tensor forward(const torch::Tensor& input) {
    const bool training = this->is_training();
    if (training) sync_.publish_layer_id();
    const bool batch_stats = training || !this->options.track_running_stats();
    if (!batch_stats || !sync_.synchronizes(training)) return torch::nn::BatchNormImplBase<D, Derived>::forward(input);
    try {
      this->_check_input_dim(input);
    } catch (...) {
      sync_.announce_refused(training, this->options.num_features(), input.device());
      throw;
    }
    return sync_batch_norm_module_forward(input, this->options, this->weight, this->bias, this->running_mean,
                                          this->running_var, this->num_batches_tracked, training, sync_);
  }

  void on_replicate(CallbackContext& context, int64_t copy_id) override { sync_.on_replicate(context, copy_id); }

  // A c10d process group (e.g. ProcessGroupGloo over a FileStore) to also synchronize across: every replica of
  // every process of the group. Default: none (the replicas of this process only).
  void set_process_group(ProcessGroupPtr group) { sync_.set_process_group(std::move(group)); }
  const ProcessGroupPtr& process_group() const { return sync_.process_group(); }
  // Its place in a model, naming it in errors where it runs without data_parallel (see the free
  // set_process_group below, which sets it).
  void set_place(std::string place) { sync_.set_place(std::move(place)); }
  // The group a forward now exchanges on: the process group in training mode, else none (see layer_sync).
  ProcessGroupPtr exchanging_group() const override {
    return this->is_training() ? sync_.process_group() : ProcessGroupPtr();
  }
  // The number that identifies this layer across processes: construction order, shared by copies, given back
  // when the layer and its copies are gone unless a training forward ran (BatchNormSyncState). A
  // cross-process BarrierError names it.
  int64_t layer_id() const { return sync_.layer_id(); }
  void on_replica_failure(const std::string& reason) override { sync_.abort(reason); }
  void on_copy_finished() override { sync_.finish(); }

  void pretty_print(std::ostream& stream) const override {
    const auto& opts = this->options;  // not `options`: that would shadow the member (-Wshadow)
    stream << std::boolalpha << "syncbn::SyncBatchNorm" << D << "d(" << opts.num_features() << ", eps=" << opts.eps()
           << ", momentum=";
    if (opts.momentum().has_value()) {
      stream << *opts.momentum();
    } else {
      stream << "None";
    }
    stream << ", affine=" << opts.affine() << ", track_running_stats=" << opts.track_running_stats() << ')';
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

// Gives `group` to every synchronized layer of `module` (SyncBatchNorm1d/2d/3d,
// `module` itself included), as Python's convert_model(model, process_group=)
// does, and names each by its place in `module` in errors where it runs without
// data_parallel ("'layer1.0.bn1': syncbn::SyncBatchNorm #3" rather than
// "syncbn::SyncBatchNorm #3"). Returns how many layers it set.
SYNCBN_API int64_t set_process_group(torch::nn::Module& module, const ProcessGroupPtr& group);

}  // namespace syncbn

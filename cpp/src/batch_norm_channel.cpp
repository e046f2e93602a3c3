#include <syncbn/batch_norm_channel.h>

#include <sstream>

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <syncbn/errors.h>
#include <syncbn/replication_group.h>
#include <syncbn/sync_batch_norm.h>

#include "statistics_message.h"

namespace syncbn {

namespace {

const char* const kCheckpointAdvice =
    "synchronized layers support torch.utils.checkpoint(..., use_reentrant=False) when the checkpointed block "
    "recomputes exactly what its forward computed (keep preserve_rng_state=True, no data-dependent control flow)";

}  // namespace

std::shared_ptr<BatchNormChannel> BatchNormChannel::of(CallbackContext& context, int64_t copy_id) {
  // One barrier per replication (per position for a context made by hand).
  const std::shared_ptr<ReplicationGroup>& group = context.group();
  CallbackContext& shared = group ? group->shared() : context;
  const std::string key = "syncbn.batch_norm.channel." + std::to_string(copy_id);
  if (auto channel = shared.try_get<std::shared_ptr<BatchNormChannel>>(key)) return *channel;
  std::shared_ptr<BatchNormChannel> channel;
  if (copy_id == 0) {
    auto master = std::make_shared<SyncMaster>(batch_norm_master_callback(group ? group->backward() : nullptr));
    master->set_label("synchronized BatchNorm");
    if (group) group->add_barrier(master);
    channel = std::make_shared<BatchNormChannel>(0, master, nullptr, group);
  } else {
    auto master_channel = shared.try_get<std::shared_ptr<BatchNormChannel>>("syncbn.batch_norm.channel.0");
    TORCH_CHECK(master_channel.has_value(), "synchronized BatchNorm: copy ", copy_id,
                " replicated before copy 0 (the master's replication hook must run first)");
    const auto& master = (*master_channel)->master();
    channel = std::make_shared<BatchNormChannel>(copy_id, master, master->register_slave(copy_id), group);
  }
  shared.set(key, channel);
  return channel;
}

BatchNormChannel::BatchNormChannel(int64_t copy_id, std::shared_ptr<SyncMaster> master,
                                   std::shared_ptr<SlavePipe> pipe, std::weak_ptr<ReplicationGroup> group)
    : copy_id_(copy_id), master_(std::move(master)), pipe_(std::move(pipe)), group_(std::move(group)) {}

Message BatchNormChannel::exchange(Message message, int64_t layer_position, const std::string& layer_name) {
  TORCH_CHECK(message.tensors.size() == 2 && message.ints.size() > detail::kSizes,
              "syncbn BatchNorm: malformed statistics message");
  // Without this, the barrier would blame the other copies' call counts (they finished too).
  TORCH_CHECK(!finished_, "synchronized BatchNorm layer '", layer_name, "' (copy ", copy_id_,
              "): this replica already ran its forward; replicas from syncbn::replicate serve one forward (one "
              "syncbn::parallel_apply): replicate the module again for the next one (syncbn::data_parallel does)");
  // The copies' calls are paired in the order each makes them: calls from threads of the user's own inside the
  // forward (two branches at once) would pair at random, or meet crosswise in a parallel backward (autograd numbers
  // nodes per thread). Refused in every copy alike, before any pass.
  if (const auto group = group_.lock(); group && group->copy_runs_in_scope(copy_id_) &&
                                        (ReplicaScope::current_group() != group.get() ||
                                         ReplicaScope::current_copy_id() != copy_id_)) {
    TORCH_CHECK(false, "synchronized BatchNorm layer '", layer_name, "' (copy ", copy_id_,
                ") was called from a thread other than the one running replica ", copy_id_,
                "'s forward (a thread of your own inside forward, e.g. branches run in a thread pool?): the "
                "replicas' synchronized calls are paired in the order each replica makes them, so a replica's "
                "synchronized layers must be called one after another from the thread running its forward");
  }
  const int64_t call = ++calls_;
  message.ints[detail::kLayer] = layer_position;
  message.ints[detail::kCall] = call;
  message.label = "layer '" + layer_name + "' (synchronized call " + std::to_string(call) + ")";
  // Made with gradients, or under saved-tensor hooks (a use_reentrant=False checkpoint, whose block may call the
  // layer under torch.no_grad()): not a use_reentrant=True checkpoint's forward (see recall()).
  const bool reusable = c10::GradMode::is_enabled() || under_saved_tensor_hooks();
  const Message sent{{message.tensors[detail::kLocalMean].detach(), message.tensors[detail::kLocalM2].detach()},
                     message.ints, nullptr, message.label};
  Message merged = pipe_ ? pipe_->run_slave(std::move(message)) : master_->run_master(std::move(message));
  records_.add(sent, merged, layer_position, reusable, sent.label);
  return merged;
}

Message BatchNormChannel::recall(const Message& message, int64_t layer_position, const std::string& layer_name) const {
  std::ostringstream where;
  where << "synchronized BatchNorm layer '" << layer_name << "' (copy " << copy_id_ << ")";
  const std::optional<CallRecords::Record> record = records_.find(message, layer_position, where.str());
  TORCH_CHECK(record.has_value(), where.str(),
              " was called again inside backward (a block recomputed by torch.utils.checkpoint?), but no call of its "
              "forward had these local statistics: the recomputation did not repeat the forward, so the whole batch's "
              "statistics of that call are unknown here; ",
              kCheckpointAdvice);
  TORCH_CHECK(record->reusable, where.str(),
              " is being recomputed inside backward for a forward that ran without gradients, as "
              "torch.utils.checkpoint(use_reentrant=True) runs it: that form recomputes each replica on its own, so "
              "the whole batch's gradients cannot be formed. Use torch.utils.checkpoint(..., use_reentrant=False); ",
              kCheckpointAdvice);
  return record->merged;
}

std::shared_ptr<ReplicaBackward> BatchNormChannel::backward() const {
  auto group = group_.lock();
  return group ? group->backward() : nullptr;
}

void BatchNormChannel::keep_merge(const at::Tensor& merged_mean, const at::Tensor& merged_var,
                                  const at::Tensor& anchor) const {
  if (auto group = group_.lock()) {
    const bool graph = merged_mean.requires_grad();  // else undefined: the calls stay aligned across copies
    group->keep_merge(copy_id_, {graph ? merged_mean : at::Tensor(), graph ? merged_var : at::Tensor()}, anchor);
  }
}

void BatchNormChannel::close(const std::string& reason) const {
  if (auto group = group_.lock()) {
    group->close(reason);
  } else {
    master_->close(reason);
  }
}

void BatchNormChannel::commit(const std::function<void()>& write) const {
  if (auto group = group_.lock()) {
    group->commit(write);
    return;
  }
  if (master_->closed()) {
    throw BarrierAbortedError("refused a write to the model: the " + master_->label() +
                              " barrier of this replication was closed");
  }
  write();
}

}  // namespace syncbn

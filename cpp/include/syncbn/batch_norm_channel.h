#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include <syncbn/call_records.h>
#include <syncbn/callback_context.h>
#include <syncbn/export.h>
#include <syncbn/message.h>
#include <syncbn/replica_backward.h>
#include <syncbn/sync_master.h>

namespace syncbn {

class ReplicationGroup;

// One copy's end of its replication's BatchNorm barrier. Every synchronized
// BatchNorm layer of a replica exchanges through the same channel, so every
// message carries its layer (the module position) and the copy's call index:
// the master callback checks that all copies are at the same call of the same
// layer, and a copy whose forward returned early is caught by the barrier
// (SyncMaster::finish). Replicas that call the layers a different number of
// times or in a different order get an error naming the layers and copies.
//
// The channel remembers each call's statistics, so that a call repeated inside
// backward (a block recomputed by torch.utils.checkpoint) gets the original
// call's merged statistics without a barrier (recall), and refuses the model
// writes of a replication that was closed (commit).
class SYNCBN_API BatchNormChannel {
 public:
  // Copy `copy_id`'s channel in the replication of `context` (made on first use;
  // copy 0's creates the replication's barrier and adds it to the group).
  static std::shared_ptr<BatchNormChannel> of(CallbackContext& context, int64_t copy_id);

  BatchNormChannel(int64_t copy_id, std::shared_ptr<SyncMaster> master, std::shared_ptr<SlavePipe> pipe,
                   std::weak_ptr<ReplicationGroup> group = {});

  // One synchronized call of layer `layer_position` (named `layer_name`): sends
  // this copy's statistics message through the barrier and returns the merged
  // statistics, remembering both.
  Message exchange(Message message, int64_t layer_position, const std::string& layer_name);

  // The merged statistics of the earlier call of layer `layer_position` whose
  // local statistics `message` repeats (a recomputation inside backward), with
  // no barrier. Throws an error that names checkpointing when there is no such
  // call, when the match is ambiguous, or when the original forward ran without
  // gradients (torch.utils.checkpoint(use_reentrant=True)).
  Message recall(const Message& message, int64_t layer_position, const std::string& layer_name) const;

  // Runs `write` (running statistics, buffers) unless the replication was
  // closed; then throws BarrierAbortedError (ReplicationGroup::commit).
  void commit(const std::function<void()>& write) const;

  // Ends the replication (ReplicationGroup::close; the barrier's close for a
  // channel made without a group): a failed copy's twins stop waiting, and write nothing.
  void close(const std::string& reason) const;

  int64_t copy_id() const { return copy_id_; }
  // The replication's backward (null for a channel made without a group).
  std::shared_ptr<ReplicaBackward> backward() const;
  // This copy's merged statistics of a call in a replication made for a parallel
  // backward (through its own merge node, when they have a graph): kept by the
  // group for the copy's backward task (ReplicationGroup::keep_merge).
  // `anchor`: defined where this copy's merge node leads to it (replica_merge).
  void keep_merge(const at::Tensor& merged_mean, const at::Tensor& merged_var, const at::Tensor& anchor) const;
  // The replication's barrier.
  const std::shared_ptr<SyncMaster>& master() const { return master_; }
  // This copy's forward returned: it sends no more statistics. A later exchange
  // (the replicas used for a second forward) is refused: a replication serves one forward.
  void finish() const {
    finished_ = true;
    master_->finish(copy_id_);
  }
  // The number of synchronized calls made through this channel.
  int64_t calls() const { return calls_; }

 private:
  const int64_t copy_id_;
  std::shared_ptr<SyncMaster> master_;
  std::shared_ptr<SlavePipe> pipe_;  // null on copy 0
  std::weak_ptr<ReplicationGroup> group_;
  std::atomic<int64_t> calls_{0};
  mutable std::atomic<bool> finished_{false};
  mutable CallRecords records_;  // every call of this replication's forward (recall marks what it finds)
};

}  // namespace syncbn

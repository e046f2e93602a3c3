#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <syncbn/callback_context.h>
#include <syncbn/export.h>
#include <syncbn/replica_backward.h>
#include <syncbn/sync_master.h>

namespace syncbn {

// What one replication shares across all its module positions and copies:
// storage (e.g. the one barrier every synchronized layer of the replicas uses),
// the barriers to tell when a copy's forward has returned or failed, so that
// nobody waits for a copy that will never come, and whether the replication is
// still alive.
//
// A replication dies with close(): its forward failed, was interrupted or timed
// out, and the caller gave up on it. A replica thread that outlives that moment
// (stuck somewhere, and woken later) must never write the user's model: every
// barrier pass, statistics update or buffer write it would make afterwards is
// refused with BarrierAbortedError (see commit() and ReplicaScope).
class SYNCBN_API ReplicationGroup {
 public:
  explicit ReplicationGroup(int64_t copies)
      : copies_(copies), backward_(std::make_shared<ReplicaBackward>(copies)) {}
  ReplicationGroup(const ReplicationGroup&) = delete;
  ReplicationGroup& operator=(const ReplicationGroup&) = delete;

  int64_t copies() const { return copies_; }
  // Storage shared by every position and copy of this replication.
  CallbackContext& shared() { return *shared_; }
  const std::shared_ptr<CallbackContext>& shared_context() const { return shared_; }

  // How the replication's backward runs (serial by default), and its meeting points.
  const std::shared_ptr<ReplicaBackward>& backward() const { return backward_; }

  // A barrier used by the replicas: copy_finished, abort and close reach it.
  void add_barrier(std::shared_ptr<SyncMaster> barrier);
  std::vector<std::shared_ptr<SyncMaster>> barriers() const;

  // Copy `copy_id`'s forward returned: it sends no more messages.
  void copy_finished(int64_t copy_id) const;
  // Wakes everyone waiting on this replication's barriers (fails the pass in
  // progress); the replication stays usable. Prefer close() once a copy failed.
  void abort(const std::string& reason) const;

  // Ends the replication for good: its barriers are closed (waiters wake now,
  // later passes fail at once), and from the moment close() returns no
  // commit() of it runs and no barrier pass of a thread in a ReplicaScope of it
  // starts. Idempotent; the first reason is kept.
  void close(const std::string& reason);
  bool closed() const;
  // Why the replication was closed ("" while alive).
  std::string close_reason() const;

  // Runs `write` (a write to the user's model: running statistics, buffers)
  // unless the replication is closed; throws BarrierAbortedError if it is.
  // Atomic with close(): a write either completes before close() returns or
  // never starts.
  void commit(const std::function<void()>& write) const;

  // Throws BarrierAbortedError, naming `what` was refused, if closed.
  void check_alive(const std::string& what) const;

  // Whether a thread has entered a ReplicaScope of copy `copy_id` (its forward runs under one: the threads of
  // parallel_apply and syncbn::data_parallel; not a replication run by the user's own threads).
  bool copy_runs_in_scope(int64_t copy_id) const;

  // A parallel backward's merge of one synchronized call by copy `copy_id`:
  // `roots` lead to its merge node (undefined where the call has no graph), and
  // `anchor`, where defined, is a leaf that node leads to (the copy's statistics
  // have no graph, its input detached, but another copy's do). Kept until
  // take_merges (none once closed). A copy whose outputs do not lead to a
  // meeting point that other copies' do (the layer's output unused by that
  // copy) starts its backward task from the roots too, so that the other
  // copies' share of the statistics' gradient reaches its input; it asks a
  // gradient for its anchors, so that autograd runs those nodes and the copy's
  // share reaches the other copies.
  void keep_merge(int64_t copy_id, std::vector<at::Tensor> roots, at::Tensor anchor);
  struct KeptMerges {
    std::vector<std::vector<at::Tensor>> roots;    // by copy, in the order each copy's forward made them
    std::vector<std::vector<at::Tensor>> anchors;  // by copy
  };
  // Every copy's kept roots and anchors (the same calls for every copy); the
  // group keeps none afterwards (they hold the graph, which must not hold the
  // group).
  KeptMerges take_merges();

 private:
  [[noreturn]] void throw_closed(const std::string& what) const;

  const int64_t copies_;
  const std::shared_ptr<CallbackContext> shared_ = std::make_shared<CallbackContext>();
  const std::shared_ptr<ReplicaBackward> backward_;
  mutable std::mutex mutex_;  // barriers_, reason_
  std::vector<std::shared_ptr<SyncMaster>> barriers_;
  mutable std::mutex commit_mutex_;  // held by commit() and close(): no write runs across a close
  KeptMerges kept_merges_;  // guarded by mutex_
  std::string reason_;  // closed when not empty; written holding both mutexes, so read holding either
  std::vector<bool> copies_in_scope_ = std::vector<bool>(copies_, false);  // by copy; guarded by mutex_

  friend class ReplicaScope;
};

// Marks the calling thread, for its lifetime, as running the replication
// hooks of `group` (execute_replication_callbacks): a SyncMaster learns which
// replication its slaves registered for, and a master of another replication
// (fewer copies, none registering) does not wait for them.
class SYNCBN_API ReplicationSetupScope {
 public:
  explicit ReplicationSetupScope(std::shared_ptr<ReplicationGroup> group);
  ~ReplicationSetupScope();
  ReplicationSetupScope(const ReplicationSetupScope&) = delete;
  ReplicationSetupScope& operator=(const ReplicationSetupScope&) = delete;

  // The group whose hooks run on this thread now, or null.
  static std::shared_ptr<ReplicationGroup> current();

 private:
  std::shared_ptr<ReplicationGroup> group_;
  ReplicationSetupScope* outer_;
};

// Marks the calling thread, for its lifetime, as running copy `copy_id` of
// `group` (parallel_apply's replica threads do this). Every barrier pass the
// thread starts while the group is closed is refused, even on a barrier that
// outlives the replication (a module's own SyncMaster, reset by the next
// replication): a replica thread left behind can never join a later
// replication's pass. Scopes nest; the innermost applies. The synchronized
// BatchNorm calls of a copy that runs in a scope must come from it.
class SYNCBN_API ReplicaScope {
 public:
  ReplicaScope(std::shared_ptr<ReplicationGroup> group, int64_t copy_id);
  ~ReplicaScope();
  ReplicaScope(const ReplicaScope&) = delete;
  ReplicaScope& operator=(const ReplicaScope&) = delete;

  // The innermost scope's group on this thread, or null.
  static ReplicationGroup* current_group();
  // The innermost scope's copy id on this thread, or -1.
  static int64_t current_copy_id();

 private:
  std::shared_ptr<ReplicationGroup> group_;
  int64_t copy_id_;
  ReplicaScope* outer_;
};

}  // namespace syncbn

#include <syncbn/replication_group.h>

#include <algorithm>
#include <utility>

#include <c10/util/Exception.h>

#include <syncbn/errors.h>

namespace syncbn {

void ReplicationGroup::add_barrier(std::shared_ptr<SyncMaster> barrier) {
  std::string reason;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (std::find(barriers_.begin(), barriers_.end(), barrier) == barriers_.end()) barriers_.push_back(barrier);
    reason = reason_;
  }
  // A barrier joining a dead replication is dead too.
  if (!reason.empty()) barrier->close(reason);
}

std::vector<std::shared_ptr<SyncMaster>> ReplicationGroup::barriers() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return barriers_;
}

void ReplicationGroup::copy_finished(int64_t copy_id) const {
  // A copy of a closed replication (left behind, returning late) tells nothing: a barrier it shares with a later
  // replication (a module's own SyncMaster) belongs to that one now.
  if (closed()) return;
  for (const auto& barrier : barriers()) barrier->finish(copy_id);
}

void ReplicationGroup::abort(const std::string& reason) const {
  for (const auto& barrier : barriers()) barrier->abort(reason);
}

void ReplicationGroup::close(const std::string& reason) {
  const std::string stated = reason.empty() ? std::string("the replication was closed") : reason;
  KeptMerges unused;  // freed unlocked: freeing a graph may need the GIL
  {
    std::lock_guard<std::mutex> commit_lock(commit_mutex_);  // waits for a write in progress
    std::lock_guard<std::mutex> lock(mutex_);
    if (!reason_.empty()) return;
    reason_ = stated;
    unused = std::exchange(kept_merges_, {});  // no backward will start from them
  }
  for (const auto& barrier : barriers()) barrier->close(stated);
}

void ReplicationGroup::keep_merge(int64_t copy_id, std::vector<at::Tensor> roots, at::Tensor anchor) {
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK_VALUE(copy_id >= 0 && copy_id < copies_, "keep_merge: no copy ", copy_id, " in a replication of ",
                    copies_);
  if (!reason_.empty()) return;
  if (kept_merges_.roots.empty()) {
    kept_merges_.roots.resize(copies_);
    kept_merges_.anchors.resize(copies_);
  }
  for (auto& root : roots) kept_merges_.roots[copy_id].push_back(std::move(root));
  if (anchor.defined()) kept_merges_.anchors[copy_id].push_back(std::move(anchor));
}

ReplicationGroup::KeptMerges ReplicationGroup::take_merges() {
  std::lock_guard<std::mutex> lock(mutex_);
  KeptMerges kept = std::exchange(kept_merges_, {});
  kept.roots.resize(copies_);
  kept.anchors.resize(copies_);
  return kept;
}

bool ReplicationGroup::closed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return !reason_.empty();
}

std::string ReplicationGroup::close_reason() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return reason_;
}

void ReplicationGroup::throw_closed(const std::string& what) const {
  throw BarrierAbortedError("refused " + what + ": its replication was closed (" + close_reason() +
                            "); a replica that outlives its forward can write nothing");
}

void ReplicationGroup::commit(const std::function<void()>& write) const {
  std::unique_lock<std::mutex> lock(commit_mutex_);
  if (!reason_.empty()) {
    lock.unlock();
    throw_closed("a write to the model");
  }
  write();
}

void ReplicationGroup::check_alive(const std::string& what) const {
  if (closed()) throw_closed(what);
}

namespace {
thread_local ReplicaScope* innermost_scope = nullptr;
thread_local ReplicationSetupScope* innermost_setup = nullptr;
}  // namespace

ReplicationSetupScope::ReplicationSetupScope(std::shared_ptr<ReplicationGroup> group)
    : group_(std::move(group)), outer_(innermost_setup) {
  innermost_setup = this;
}

ReplicationSetupScope::~ReplicationSetupScope() { innermost_setup = outer_; }

std::shared_ptr<ReplicationGroup> ReplicationSetupScope::current() {
  return innermost_setup != nullptr ? innermost_setup->group_ : nullptr;
}

ReplicaScope::ReplicaScope(std::shared_ptr<ReplicationGroup> group, int64_t copy_id)
    : group_(std::move(group)), copy_id_(copy_id), outer_(innermost_scope) {
  if (group_ && copy_id_ >= 0) {
    std::lock_guard<std::mutex> lock(group_->mutex_);
    if (copy_id_ < group_->copies_) group_->copies_in_scope_[copy_id_] = true;
  }
  innermost_scope = this;
}

bool ReplicationGroup::copy_runs_in_scope(int64_t copy_id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return copy_id >= 0 && copy_id < copies_ && copies_in_scope_[copy_id];
}

ReplicaScope::~ReplicaScope() { innermost_scope = outer_; }

ReplicationGroup* ReplicaScope::current_group() {
  return innermost_scope != nullptr ? innermost_scope->group_.get() : nullptr;
}

int64_t ReplicaScope::current_copy_id() { return innermost_scope != nullptr ? innermost_scope->copy_id_ : -1; }

}  // namespace syncbn

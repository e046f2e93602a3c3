#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <syncbn/callback_context.h>
#include <syncbn/export.h>
#include <syncbn/sync_master.h>

namespace syncbn {

// What one replication shares across all its module positions and copies:
// storage (e.g. the one barrier every synchronized layer of the replicas uses),
// and the barriers to tell when a copy's forward has returned or failed, so that
// nobody waits for a copy that will never come.
class SYNCBN_API ReplicationGroup {
 public:
  explicit ReplicationGroup(int64_t copies) : copies_(copies) {}
  ReplicationGroup(const ReplicationGroup&) = delete;
  ReplicationGroup& operator=(const ReplicationGroup&) = delete;

  int64_t copies() const { return copies_; }
  // Storage shared by every position and copy of this replication.
  CallbackContext& shared() { return *shared_; }
  const std::shared_ptr<CallbackContext>& shared_context() const { return shared_; }

  // A barrier used by the replicas: copy_finished and abort reach it.
  void add_barrier(std::shared_ptr<SyncMaster> barrier);
  std::vector<std::shared_ptr<SyncMaster>> barriers() const;

  // Copy `copy_id`'s forward returned: it sends no more messages.
  void copy_finished(int64_t copy_id) const;
  // A copy failed: wake everyone waiting on this replication's barriers.
  void abort(const std::string& reason) const;

 private:
  const int64_t copies_;
  const std::shared_ptr<CallbackContext> shared_ = std::make_shared<CallbackContext>();
  mutable std::mutex mutex_;
  std::vector<std::shared_ptr<SyncMaster>> barriers_;
};

}  // namespace syncbn

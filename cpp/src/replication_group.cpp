#include <syncbn/replication_group.h>

#include <algorithm>

namespace syncbn {

void ReplicationGroup::add_barrier(std::shared_ptr<SyncMaster> barrier) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (std::find(barriers_.begin(), barriers_.end(), barrier) == barriers_.end()) barriers_.push_back(std::move(barrier));
}

std::vector<std::shared_ptr<SyncMaster>> ReplicationGroup::barriers() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return barriers_;
}

void ReplicationGroup::copy_finished(int64_t copy_id) const {
  for (const auto& barrier : barriers()) barrier->finish(copy_id);
}

void ReplicationGroup::abort(const std::string& reason) const {
  for (const auto& barrier : barriers()) barrier->abort(reason);
}

}  // namespace syncbn

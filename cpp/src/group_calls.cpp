#include "group_calls.h"

#include <algorithm>
#include <iterator>
#include <sstream>

#include <c10/util/Exception.h>

namespace syncbn::detail {

namespace {

std::mutex calls_mutex_;
std::unordered_map<const c10d::ProcessGroup*, GroupCalls> calls_by_group;  // under calls_mutex_

}  // namespace

std::mutex& calls_mutex() { return calls_mutex_; }

GroupCalls& calls_of(const ProcessGroupPtr& group) {
  for (auto it = calls_by_group.begin(); it != calls_by_group.end();) {
    it = it->second.group.expired() ? calls_by_group.erase(it) : std::next(it);
  }
  return calls_by_group.try_emplace(group.get(), group).first->second;
}

int64_t exchange_key(ExchangeKind kind, int64_t layer_id) {
  return kind == ExchangeKind::kStatistics ? layer_id : -2 - layer_id;  // -1: none yet
}

ExchangeNumbers begin_exchange(const ProcessGroupPtr& group, ExchangeKind kind) {
  std::lock_guard<std::mutex> lock(calls_mutex());
  GroupCalls& calls = calls_of(group);
  const auto known = calls.channels_after.find(calls.previous_exchange);
  const int64_t number = kind == ExchangeKind::kStatistics ? ++calls.calls : ++calls.backward_exchanges;
  return {number, calls.calls, calls.backward_exchanges,
          known == calls.channels_after.end() ? 0 : known->second};
}

void realign_counts(const ProcessGroupPtr& group, int64_t calls_seen, int64_t backward_exchanges_seen) {
  std::lock_guard<std::mutex> lock(calls_mutex());
  GroupCalls& calls = calls_of(group);
  calls.calls = std::max(calls.calls, calls_seen);
  calls.backward_exchanges = std::max(calls.backward_exchanges, backward_exchanges_seen);
}

void end_exchange(const ProcessGroupPtr& group, int64_t key, int64_t channels) {
  std::lock_guard<std::mutex> lock(calls_mutex());
  GroupCalls& calls = calls_of(group);
  calls.channels_after[calls.previous_exchange] = channels;
  calls.previous_exchange = key;
}

namespace {

// The numbers a user knows a subgroup's ranks by (set_global_ranks), apart from GroupCalls: where() is called with
// calls_mutex() held.
struct GlobalRanks {
  c10::weak_intrusive_ptr<c10d::ProcessGroup> group;  // keeps the address from being reused, as GroupCalls does
  std::vector<int64_t> ranks;
};
std::mutex global_ranks_mutex;
std::unordered_map<const c10d::ProcessGroup*, GlobalRanks> global_ranks_by_group;

std::vector<int64_t> global_ranks_of(const ProcessGroupPtr& group) {
  std::lock_guard<std::mutex> lock(global_ranks_mutex);
  const auto found = global_ranks_by_group.find(group.get());
  if (found == global_ranks_by_group.end() || found->second.group.expired()) return {};
  return found->second.ranks;
}

// The group's ranks as the user knows them, where they differ from the group's own numbers (a subgroup's): the
// errors' lists of ranks use the group's numbers.
std::string global_ranks_note(const ProcessGroupPtr& group) {
  const std::vector<int64_t> ranks = global_ranks_of(group);
  if (ranks.empty()) return "";
  constexpr size_t kListed = 16;
  std::ostringstream out;
  out << "; the group's ranks 0.." << ranks.size() - 1 << " are global ranks";
  for (size_t r = 0; r < ranks.size() && r < kListed; ++r) out << (r ? ", " : " ") << ranks[r];
  if (ranks.size() > kListed) out << ", ...";
  out << " (this process: global rank " << ranks[static_cast<size_t>(group->getRank())] << ")";
  return out.str();
}

}  // namespace

std::string where(const ProcessGroupPtr& group, const std::string& label, const char* doing) {
  std::ostringstream out;
  out << "in synchronized BatchNorm " << label << ", " << doing << " across the process group (rank "
      << group->getRank() << " of " << group->getSize() << ", " << group->getBackendName() << global_ranks_note(group)
      << ")";
  return out.str();
}

}  // namespace syncbn::detail

namespace syncbn {

using detail::calls_mutex;
using detail::calls_of;
using detail::GlobalRanks;
using detail::global_ranks_by_group;
using detail::global_ranks_mutex;
using detail::GroupCalls;

void set_global_ranks(const ProcessGroupPtr& group, std::vector<int64_t> global_ranks) {
  TORCH_CHECK_VALUE(group, "set_global_ranks: no process group given");
  TORCH_CHECK_VALUE(static_cast<int64_t>(global_ranks.size()) == group->getSize(), "set_global_ranks: ",
                    global_ranks.size(), " global ranks given for a process group of ", group->getSize(),
                    " ranks (one per rank of the group, in the group's rank order)");
  std::vector<int64_t> sorted = global_ranks;
  std::sort(sorted.begin(), sorted.end());
  TORCH_CHECK_VALUE(sorted.front() >= 0 && std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end(),
                    "set_global_ranks: the global ranks must be distinct non-negative numbers");
  bool same_numbers = true;
  for (size_t r = 0; r < global_ranks.size(); ++r) same_numbers = same_numbers && global_ranks[r] == int64_t(r);
  std::lock_guard<std::mutex> lock(global_ranks_mutex);
  for (auto it = global_ranks_by_group.begin(); it != global_ranks_by_group.end();) {
    it = it->second.group.expired() ? global_ranks_by_group.erase(it) : std::next(it);
  }
  if (same_numbers) {  // nothing to tell
    global_ranks_by_group.erase(group.get());
  } else {
    GlobalRanks named{c10::weak_intrusive_ptr<c10d::ProcessGroup>(group), std::move(global_ranks)};
    global_ranks_by_group.insert_or_assign(group.get(), std::move(named));
  }
}

std::string cross_process_transport(const ProcessGroupPtr& group) {
  TORCH_CHECK_VALUE(group, "cross_process_transport needs a process group");
  std::lock_guard<std::mutex> lock(calls_mutex());
  const GroupCalls& calls = calls_of(group);
  if (!calls.transport_decided) return "not yet";
  return calls.shared_memory ? "shared memory" : "process group";
}

int64_t synchronized_calls(const ProcessGroupPtr& group) {
  TORCH_CHECK_VALUE(group, "synchronized_calls needs a process group");
  std::lock_guard<std::mutex> lock(calls_mutex());
  return calls_of(group).calls;
}

int64_t failed_synchronized_calls(const ProcessGroupPtr& group) {
  TORCH_CHECK_VALUE(group, "failed_synchronized_calls needs a process group");
  std::lock_guard<std::mutex> lock(calls_mutex());
  return calls_of(group).failed_calls;
}

}  // namespace syncbn

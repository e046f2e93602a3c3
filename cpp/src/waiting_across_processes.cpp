#include "waiting_across_processes.h"

#include <algorithm>
#include <cstddef>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace syncbn::detail {

namespace {

struct WaitRecord {
  int depth = 0;                                  // nested scopes open now
  std::chrono::steady_clock::time_point ended{};  // when the outermost scope last closed
};

// Threads that ever waited across processes. A record outlives its thread (whose id may be reused), and threads
// come and go (C++ data_parallel starts its replicas' threads at every forward): once there are this many, the
// older half of the records of threads not waiting now is dropped, long ended waits that no barrier's deadline
// can still count from.
constexpr size_t kMaxRecords = 1024;

void drop_older_records(std::unordered_map<std::thread::id, WaitRecord>& records) {
  std::vector<std::chrono::steady_clock::time_point> ends;
  for (const auto& entry : records) {
    if (entry.second.depth == 0) ends.push_back(entry.second.ended);
  }
  if (ends.empty()) return;
  const auto middle = ends.begin() + static_cast<std::ptrdiff_t>(ends.size() / 2);
  std::nth_element(ends.begin(), middle, ends.end());
  const auto cut = *middle;
  std::erase_if(records, [&](const auto& entry) { return entry.second.depth == 0 && entry.second.ended <= cut; });
}

std::mutex waiting_mutex;
std::unordered_map<std::thread::id, WaitRecord> wait_records;
int64_t threads_waiting = 0;                                           // in a scope now, process-wide
std::optional<std::chrono::steady_clock::time_point> last_wait_ended;  // of any thread's outermost scope

}  // namespace

WaitingAcrossProcesses::WaitingAcrossProcesses() {
  std::lock_guard<std::mutex> lock(waiting_mutex);
  if (wait_records.size() >= kMaxRecords) drop_older_records(wait_records);
  if (wait_records[std::this_thread::get_id()].depth++ == 0) ++threads_waiting;
}

WaitingAcrossProcesses::~WaitingAcrossProcesses() {
  std::lock_guard<std::mutex> lock(waiting_mutex);
  const auto it = wait_records.find(std::this_thread::get_id());
  if (it != wait_records.end() && --it->second.depth == 0) {
    it->second.ended = std::chrono::steady_clock::now();
    last_wait_ended = it->second.ended;
    --threads_waiting;
  }
}

std::optional<std::chrono::steady_clock::time_point> last_waited_across_processes(std::thread::id thread) {
  std::lock_guard<std::mutex> lock(waiting_mutex);
  const auto it = wait_records.find(thread);
  if (it == wait_records.end()) return std::nullopt;
  if (it->second.depth > 0) return std::chrono::steady_clock::now();
  return it->second.ended;
}

std::optional<std::chrono::steady_clock::time_point> last_waited_across_processes() {
  std::lock_guard<std::mutex> lock(waiting_mutex);
  if (threads_waiting > 0) return std::chrono::steady_clock::now();
  return last_wait_ended;
}

}  // namespace syncbn::detail

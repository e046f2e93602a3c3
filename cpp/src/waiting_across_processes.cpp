#include "waiting_across_processes.h"

#include <mutex>
#include <unordered_map>

namespace syncbn::detail {

namespace {

struct WaitRecord {
  int depth = 0;                                  // nested scopes open now
  std::chrono::steady_clock::time_point ended{};  // when the outermost scope last closed
};

// Threads that ever waited across processes. Records of threads not waiting now are dropped once there are many
// (threads come and go: a record outlives its thread, whose id may be reused); a barrier waiter that finds no
// record then times out as if the callback had not waited, the safe side.
constexpr size_t kMaxRecords = 1024;

std::mutex waiting_mutex;
std::unordered_map<std::thread::id, WaitRecord> wait_records;

}  // namespace

WaitingAcrossProcesses::WaitingAcrossProcesses() {
  std::lock_guard<std::mutex> lock(waiting_mutex);
  if (wait_records.size() >= kMaxRecords) {
    std::erase_if(wait_records, [](const auto& entry) { return entry.second.depth == 0; });
  }
  ++wait_records[std::this_thread::get_id()].depth;
}

WaitingAcrossProcesses::~WaitingAcrossProcesses() {
  std::lock_guard<std::mutex> lock(waiting_mutex);
  const auto it = wait_records.find(std::this_thread::get_id());
  if (it != wait_records.end() && --it->second.depth == 0) it->second.ended = std::chrono::steady_clock::now();
}

std::optional<std::chrono::steady_clock::time_point> last_waited_across_processes(std::thread::id thread) {
  std::lock_guard<std::mutex> lock(waiting_mutex);
  const auto it = wait_records.find(thread);
  if (it == wait_records.end()) return std::nullopt;
  if (it->second.depth > 0) return std::chrono::steady_clock::now();
  return it->second.ended;
}

}  // namespace syncbn::detail

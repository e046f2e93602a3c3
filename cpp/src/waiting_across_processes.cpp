#include "waiting_across_processes.h"

#include <mutex>
#include <unordered_map>

namespace syncbn::detail {

namespace {

std::mutex waiting_mutex;
std::unordered_map<std::thread::id, int> waiting_threads;  // thread -> nested scopes

}  // namespace

WaitingAcrossProcesses::WaitingAcrossProcesses() {
  std::lock_guard<std::mutex> lock(waiting_mutex);
  ++waiting_threads[std::this_thread::get_id()];
}

WaitingAcrossProcesses::~WaitingAcrossProcesses() {
  std::lock_guard<std::mutex> lock(waiting_mutex);
  const auto it = waiting_threads.find(std::this_thread::get_id());
  if (it != waiting_threads.end() && --it->second == 0) waiting_threads.erase(it);
}

bool is_waiting_across_processes(std::thread::id thread) {
  std::lock_guard<std::mutex> lock(waiting_mutex);
  return waiting_threads.count(thread) != 0;
}

}  // namespace syncbn::detail

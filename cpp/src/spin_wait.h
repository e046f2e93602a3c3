#pragma once

// Waiting for other threads of a replication: spin briefly, then sleep.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <optional>
#include <thread>

namespace syncbn::detail {

// How long a waiter spins before it sleeps: longer than a pass between replicas that run at once (3-11 us with
// 2-8 replicas, measured), short against the milliseconds a replica computes between passes.
inline constexpr std::chrono::microseconds kSpinBeforeSleep{50};

// The deadline of a wait of `seconds` that starts at `start` (now by default); nullopt (no deadline) for a timeout
// too long to represent.
inline std::optional<std::chrono::steady_clock::time_point> deadline_after(
    double seconds, std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now()) {
  if (seconds > 1e9) return std::nullopt;
  return start +
         std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(seconds));
}

// Waits on `cv` (`lock` held, as on return) until notified or `until`; returns false on timeout. `changes` must be
// bumped under the same mutex at every change a waiter waits for (and the waiters notified as before). The wait
// first spins up to kSpinBeforeSleep without the lock, watching `changes`: a thread that sleeps at once waits for
// the kernel to wake it, which took 40-50 us on a 2-core virtual machine (an idle virtual CPU is woken by an
// interrupt), against 3-6 us spinning. Each turn yields the core, so that threads with work to do (more replicas
// than cores) go first. Like a condition variable's, a `true` return may be spurious: re-check the condition.
inline bool spin_then_wait(std::condition_variable& cv, std::unique_lock<std::mutex>& lock,
                           const std::atomic<uint64_t>& changes,
                           const std::optional<std::chrono::steady_clock::time_point>& until) {
  const uint64_t seen = changes.load(std::memory_order_relaxed);
  lock.unlock();
  const auto spin_end = std::chrono::steady_clock::now() + kSpinBeforeSleep;
  bool moved = false;
  for (int turn = 0;; ++turn) {
    if (changes.load(std::memory_order_acquire) != seen) {
      moved = true;
      break;
    }
    if (turn % 16 == 15 && std::chrono::steady_clock::now() >= spin_end) break;
    std::this_thread::yield();
  }
  lock.lock();
  // Every change is made under the lock: none since `seen` means its notification is still to come.
  if (moved || changes.load(std::memory_order_relaxed) != seen) return true;
  if (!until) {
    cv.wait(lock);
    return true;
  }
  return cv.wait_until(lock, *until) == std::cv_status::no_timeout;
}

}  // namespace syncbn::detail

#pragma once

// Which threads are waiting for the other ranks of a process group, or did lately.

#include <chrono>
#include <optional>
#include <thread>

namespace syncbn::detail {

// Marks the calling thread, for the scope's life, as waiting for the other ranks of a process group: a wait that
// the group's own timeout bounds (init_process_group(timeout=...)), with its own error naming the ranks. A barrier
// whose master callback waits so does not time its other copies out meanwhile: a rank that is slow on purpose
// (validating, saving a checkpoint) must not fail the others' replicas after $SYNCBN_TIMEOUT when the user gave the
// group longer, and a rank that never comes is reported by the group's timeout, not as a slow master callback.
class WaitingAcrossProcesses {
 public:
  WaitingAcrossProcesses();
  ~WaitingAcrossProcesses();
  WaitingAcrossProcesses(const WaitingAcrossProcesses&) = delete;
  WaitingAcrossProcesses& operator=(const WaitingAcrossProcesses&) = delete;
};

// When `thread` last waited across processes: now while it is inside a WaitingAcrossProcesses scope, else when
// its last such scope ended; nullopt if it was never in one (or its record was dropped, long after: see the .cpp).
// A barrier's waiter needs the end too, not only "waiting now": a wait that ended just before the waiter's deadline
// leaves the callback its merge to finish, which is given a whole timeout from that end.
std::optional<std::chrono::steady_clock::time_point> last_waited_across_processes(std::thread::id thread);

// The same for any thread of the process: now while one is inside a scope, else when the last scope ended; nullopt
// if none ever was.
std::optional<std::chrono::steady_clock::time_point> last_waited_across_processes();

}  // namespace syncbn::detail

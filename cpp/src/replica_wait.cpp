#include <syncbn/replica_wait.h>

#include "waiting_across_processes.h"

namespace syncbn::detail {

namespace {

ReplicaWaitPolicy::Clock::duration clock_duration(double s) {
  return std::chrono::duration_cast<ReplicaWaitPolicy::Clock::duration>(std::chrono::duration<double>(s));
}

// Above this, a timeout means none (it would overflow the clock's time points).
constexpr double kLongestReplicaTimeoutSeconds = 1e9;

}  // namespace

ReplicaWaitPolicy::ReplicaWaitPolicy(double timeout_seconds) : timeout_(timeout_seconds) {}

void ReplicaWaitPolicy::returned() {
  if (!first_return_) first_return_ = Clock::now();
}

void ReplicaWaitPolicy::failed() {
  if (!first_failure_) first_failure_ = Clock::now();
}

std::optional<ReplicaWaitPolicy::Clock::time_point> ReplicaWaitPolicy::deadline() const {
  if (first_failure_) return *first_failure_ + clock_duration(kFailureGraceSeconds);
  if (first_return_ && timeout_ <= kLongestReplicaTimeoutSeconds) return *first_return_ + clock_duration(timeout_);
  return std::nullopt;
}

bool ReplicaWaitPolicy::renew() {
  if (first_failure_ || !first_return_) return false;
  const auto wait_ended = last_waited_across_processes();
  if (!wait_ended || *wait_ended <= *first_return_) return false;
  first_return_ = *wait_ended;
  return true;
}

}  // namespace syncbn::detail

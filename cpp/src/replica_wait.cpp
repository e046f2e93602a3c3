#include <syncbn/replica_wait.h>

#include "spin_wait.h"
#include "waiting_across_processes.h"

namespace syncbn::detail {

ReplicaWaitPolicy::ReplicaWaitPolicy(double timeout_seconds) : timeout_(timeout_seconds) {}

void ReplicaWaitPolicy::returned() {
  if (!first_return_) first_return_ = Clock::now();
}

void ReplicaWaitPolicy::failed() {
  if (!first_failure_) first_failure_ = Clock::now();
}

std::optional<ReplicaWaitPolicy::Clock::time_point> ReplicaWaitPolicy::deadline() const {
  if (first_failure_) return deadline_after(kFailureGraceSeconds, *first_failure_);
  if (first_return_) return deadline_after(timeout_, *first_return_);  // none for a timeout too long to represent
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

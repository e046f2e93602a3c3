#pragma once

#include <chrono>
#include <optional>

#include <syncbn/export.h>

namespace syncbn::detail {

// How long run_replicas (and DataParallelWithCallback's run_on_workers) waits for a replica once another failed.
constexpr double kFailureGraceSeconds = 1.0;

// How long the caller of a parallel apply waits for its replicas, the one policy of the C++ and the Python
// wrappers: until every replica reported, but once one failed at most kFailureGraceSeconds more, and once one
// returned at most the timeout more ($SYNCBN_TIMEOUT; none above 1e9 s), counted from the end of a later wait for
// other ranks (which the process group's timeout bounds: a replica may still be in a merge across processes after
// another returned). Not thread-safe: its owner serializes the calls.
class SYNCBN_API ReplicaWaitPolicy {
 public:
  using Clock = std::chrono::steady_clock;

  explicit ReplicaWaitPolicy(double timeout_seconds);

  // A replica returned, or failed: the first of each starts its bound.
  void returned();
  void failed();
  bool any_failed() const { return first_failure_.has_value(); }

  // Until when to wait for the next report (nullopt: no bound yet).
  std::optional<Clock::time_point> deadline() const;

  // Once the deadline passed: whether to wait on, because a wait for other ranks ended after the bound's start
  // (the timeout after a return then counts from that wait's end; never after a failure).
  bool renew();

 private:
  double timeout_;
  std::optional<Clock::time_point> first_failure_;
  std::optional<Clock::time_point> first_return_;
};

}  // namespace syncbn::detail

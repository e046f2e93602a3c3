// The wait policy of run_replicas and of DataParallelWithCallback (ReplicaWaitPolicy): how long the caller waits
// for its replicas after a failure or a return, and the renewal after a later wait for other ranks (marked with
// the library's internal scope, as cross_process.cpp marks its exchanges, so that no process group is needed).

#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include <syncbn/replica_wait.h>

#include "waiting_across_processes.h"

namespace {

using namespace std::chrono_literals;
using syncbn::detail::ReplicaWaitPolicy;
using Clock = ReplicaWaitPolicy::Clock;

// Seconds from now to `deadline`.
double seconds_until(Clock::time_point deadline) {
  return std::chrono::duration<double>(deadline - Clock::now()).count();
}

TEST(ReplicaWaitPolicy, NoBoundUntilAReplicaReportsThenTheTimeoutAfterTheFirstReturn) {
  ReplicaWaitPolicy wait(5.0);
  EXPECT_FALSE(wait.deadline().has_value());
  wait.returned();
  const auto first = wait.deadline();
  ASSERT_TRUE(first.has_value());
  EXPECT_GT(seconds_until(*first), 4.0);
  EXPECT_LE(seconds_until(*first), 5.0);
  std::this_thread::sleep_for(20ms);
  wait.returned();  // a later return does not move the bound
  EXPECT_EQ(wait.deadline(), first);
}

TEST(ReplicaWaitPolicy, AFailureBoundsTheWaitByTheGracePeriodEvenAfterAReturn) {
  ReplicaWaitPolicy wait(300.0);
  wait.returned();
  wait.failed();
  EXPECT_TRUE(wait.any_failed());
  const auto deadline = wait.deadline();
  ASSERT_TRUE(deadline.has_value());
  EXPECT_LE(seconds_until(*deadline), syncbn::detail::kFailureGraceSeconds);
  EXPECT_GT(seconds_until(*deadline), syncbn::detail::kFailureGraceSeconds - 0.5);
  EXPECT_FALSE(wait.renew());  // never after a failure
}

TEST(ReplicaWaitPolicy, ATimeoutBeyondABillionSecondsIsNone) {
  ReplicaWaitPolicy wait(1e12);
  wait.returned();
  EXPECT_FALSE(wait.deadline().has_value());
}

TEST(ReplicaWaitPolicy, TheTimeoutCountsFromTheEndOfALaterWaitForOtherRanks) {
  ReplicaWaitPolicy wait(0.5);
  EXPECT_FALSE(wait.renew());  // nothing returned yet
  wait.returned();
  const auto first = wait.deadline();
  ASSERT_TRUE(first.has_value());
  std::this_thread::sleep_for(50ms);
  {
    syncbn::detail::WaitingAcrossProcesses across;  // a replica waiting for other ranks after the return
    std::this_thread::sleep_for(700ms);             // past the first bound
    EXPECT_TRUE(wait.renew());                      // still waiting: renewed from now
  }
  EXPECT_TRUE(wait.renew());  // the wait ended after the bound's start: counted from its end
  const auto renewed = wait.deadline();
  ASSERT_TRUE(renewed.has_value());
  EXPECT_GE(*renewed, *first + 700ms);
  EXPECT_FALSE(wait.renew());  // no wait since that end: give up once the renewed bound passes
}

}  // namespace

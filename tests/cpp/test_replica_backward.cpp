#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <memory>
#include <thread>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <syncbn/errors.h>
#include <syncbn/replica_backward.h>

namespace {

using syncbn::ReplicaBackward;

std::vector<std::vector<at::Tensor>> sum_of_contributions(const std::vector<std::vector<at::Tensor>>& contributions) {
  at::Tensor total = at::zeros({1});
  for (const auto& c : contributions) {
    if (!c.empty()) total = total + c[0];
  }
  return std::vector<std::vector<at::Tensor>>(contributions.size(), {total});
}

}  // namespace

TEST(ReplicaBackward, ACopyWokenByAFailureReportsTheFirstReasonAndKeepsItsErrorsType) {
  ReplicaBackward backward(2);
  const int64_t run = backward.begin_run();
  ReplicaBackward::Point point;
  // Copy 1's task failed; a copy it woke closes again with its own reason: the first one stays the cause.
  backward.close("replica 1's backward raised ValueError", run);
  backward.close("replica 0's backward raised RuntimeError", run);
  try {
    backward.rendezvous(point, 0, run, {at::ones({1})}, sum_of_contributions, "layer 'bn'");
    ADD_FAILURE() << "expected BarrierAbortedError";
  } catch (const syncbn::BarrierAbortedError& error) {
    EXPECT_NE(std::string(error.what()).find("replica 1's backward raised ValueError"), std::string::npos)
        << error.what();
  }
  // Autograd hands the task a plain runtime_error; the typed one can be had again, for that copy only.
  EXPECT_THROW(backward.rethrow_failure(0, run), syncbn::BarrierAbortedError);
  EXPECT_NO_THROW(backward.rethrow_failure(1, run));
  // A new run forgets both.
  const int64_t next = backward.begin_run();
  EXPECT_NO_THROW(backward.rethrow_failure(0, next));
}

TEST(ReplicaBackward, ACopyThatWaitedInVainGetsABarrierTimeoutErrorAgain) {
  ::setenv("SYNCBN_TIMEOUT", "0.2", 1);
  ReplicaBackward backward(2);
  const int64_t run = backward.begin_run();
  ReplicaBackward::Point point;
  EXPECT_THROW(backward.rendezvous(point, 0, run, {at::ones({1})}, sum_of_contributions, "layer 'bn'"),
               syncbn::BarrierTimeoutError);
  EXPECT_THROW(backward.rethrow_failure(0, run), syncbn::BarrierTimeoutError);
  ::unsetenv("SYNCBN_TIMEOUT");
}

TEST(ReplicaBackward, ATaskOfAnEarlierRunIsRefusedAndWritesNothingIntoTheNextRun) {
  // A caller gave up on run 1 (a failure, an interrupt) and left copy 0's task waiting at a point; the same graph's
  // next backward (retain_graph) starts run 2 on the same points.
  ReplicaBackward backward(2);
  ReplicaBackward::Point point;
  const int64_t old_run = backward.begin_run();
  std::atomic<bool> refused{false};
  std::thread stale([&] {
    try {
      backward.rendezvous(point, 0, old_run, {at::full({1}, 100.0)}, sum_of_contributions, "layer 'bn'");
    } catch (const syncbn::BarrierAbortedError& error) {
      refused = std::string(error.what()).find("earlier parallel backward") != std::string::npos;
    }
  });
  const int64_t run = backward.begin_run();  // wakes the old task, if it already waits: refused either way
  stale.join();
  EXPECT_TRUE(refused.load());
  EXPECT_GT(run, old_run);
  // The old task's end, failure and reports do not reach run 2.
  backward.copy_done(0, old_run);
  backward.close("replica 0's backward raised RuntimeError (run 1)", old_run);
  EXPECT_EQ(backward.failure(0, old_run), nullptr);
  EXPECT_THROW(backward.rendezvous(point, 1, old_run, {at::full({1}, 100.0)}, sum_of_contributions, "layer 'bn'"),
               syncbn::BarrierAbortedError);
  // Run 2's copies meet with their own contributions only (copy 0 is waited for: not done, not closed).
  std::vector<at::Tensor> result0;
  std::thread copy0([&] {
    result0 = backward.rendezvous(point, 0, run, {at::full({1}, 1.0)}, sum_of_contributions, "layer 'bn'");
  });
  const std::vector<at::Tensor> result1 =
      backward.rendezvous(point, 1, run, {at::full({1}, 2.0)}, sum_of_contributions, "layer 'bn'");
  copy0.join();
  EXPECT_EQ(result1.at(0).item<double>(), 3.0);
  ASSERT_EQ(result0.size(), 1u);
  EXPECT_EQ(result0.at(0).item<double>(), 3.0);
  EXPECT_EQ(backward.failure(0, run), nullptr);
}

TEST(ReplicaBackward, AMergeFindsItsRunInTheThreadsScope) {
  auto backward = std::make_shared<ReplicaBackward>(2);
  auto other = std::make_shared<ReplicaBackward>(2);
  EXPECT_EQ(backward->current_run(), 0);  // the caller's thread: no run (a double backward is refused)
  const int64_t run = backward->begin_run();
  {
    ReplicaBackward::RunScope scope(backward, run);
    EXPECT_EQ(backward->current_run(), run);
    EXPECT_EQ(other->current_run(), 0);
    {
      ReplicaBackward::RunScope inner(other, other->begin_run());
      EXPECT_EQ(backward->current_run(), run);  // the innermost scope of this object
    }
  }
  EXPECT_EQ(backward->current_run(), 0);
  ReplicaBackward::Point point;
  EXPECT_THROW(backward->rendezvous(point, 0, 0, {at::ones({1})}, sum_of_contributions, "layer 'bn'"), c10::Error);
}

#include <gtest/gtest.h>

#include <cstdlib>
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
  backward.begin_run();
  ReplicaBackward::Point point;
  // Copy 1's task failed; a copy it woke closes again with its own reason: the first one stays the cause.
  backward.close("replica 1's backward raised ValueError");
  backward.close("replica 0's backward raised RuntimeError");
  try {
    backward.rendezvous(point, 0, {at::ones({1})}, sum_of_contributions, "layer 'bn'");
    ADD_FAILURE() << "expected BarrierAbortedError";
  } catch (const syncbn::BarrierAbortedError& error) {
    EXPECT_NE(std::string(error.what()).find("replica 1's backward raised ValueError"), std::string::npos)
        << error.what();
  }
  // Autograd hands the task a plain runtime_error; the typed one can be had again, for that copy only.
  EXPECT_THROW(backward.rethrow_failure(0), syncbn::BarrierAbortedError);
  EXPECT_NO_THROW(backward.rethrow_failure(1));
  // A new run forgets both.
  backward.begin_run();
  EXPECT_NO_THROW(backward.rethrow_failure(0));
}

TEST(ReplicaBackward, ACopyThatWaitedInVainGetsABarrierTimeoutErrorAgain) {
  ::setenv("SYNCBN_TIMEOUT", "0.2", 1);
  ReplicaBackward backward(2);
  backward.begin_run();
  ReplicaBackward::Point point;
  EXPECT_THROW(backward.rendezvous(point, 0, {at::ones({1})}, sum_of_contributions, "layer 'bn'"),
               syncbn::BarrierTimeoutError);
  EXPECT_THROW(backward.rethrow_failure(0), syncbn::BarrierTimeoutError);
  ::unsetenv("SYNCBN_TIMEOUT");
}

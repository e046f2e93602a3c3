#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
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

// Copies 0 (this thread) and 1 (a thread of its own) meet at `point` in run `run`. Returns what went wrong ("" if
// nothing): an exception escaping the helper thread would terminate the test binary instead of failing the test.
std::string meet_both_copies(ReplicaBackward& backward, ReplicaBackward::Point& point, int64_t run,
                             at::Tensor contribution0) {
  std::string error1;
  std::thread copy1([&] {
    try {
      backward.rendezvous(point, 1, run, {at::full({1}, 2.0)}, sum_of_contributions, "layer 'bn'");
    } catch (const std::exception& error) {
      error1 = error.what();
    }
  });
  std::string error0;
  try {
    backward.rendezvous(point, 0, run, {std::move(contribution0)}, sum_of_contributions, "layer 'bn'");
  } catch (const std::exception& error) {
    error0 = error.what();
  }
  copy1.join();  // bounded: copy 1's wait is (SYNCBN_TIMEOUT), and copy 0 arrived or failed
  return error0 + error1;
}

// What a tensor's deleter saw of a call into ReplicaBackward made while it ran. Shared: a detached thread may
// outlive the test's stack.
struct DeleterCallIn {
  std::mutex mutex;
  std::condition_variable changed;
  bool freed = false;             // the deleter ran
  bool returned = false;          // the call into ReplicaBackward returned (at any time)
  bool returned_in_time = false;  // ... while the deleter waited for it
};

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

TEST(ReplicaBackward, NothingIsFreedUnderItsLockSoADeleterMayCallIn) {
  // A tensor whose Python object is alive takes the GIL when freed, and a Python thread calls in (parallel()) holding
  // the GIL: if rendezvous freed the last run's contributions under mutex_, the two would deadlock. Here the deleter
  // stands for the GIL: it calls parallel(), which takes mutex_, on another thread and waits for it, bounded.
  ::setenv("SYNCBN_TIMEOUT", "30", 1);  // a broken barrier fails instead of waiting the default 300 s
  auto backward = std::make_shared<ReplicaBackward>(2);
  auto seen = std::make_shared<DeleterCallIn>();
  auto deleter = [backward, seen](void* data) {
    std::thread caller([backward, seen] {  // owns what it touches: it may be detached
      backward->parallel();
      {
        std::lock_guard<std::mutex> lock(seen->mutex);
        seen->returned = true;
      }
      seen->changed.notify_all();
    });
    bool returned = false;
    {
      std::unique_lock<std::mutex> lock(seen->mutex);
      returned = seen->changed.wait_for(lock, std::chrono::seconds(1), [&] { return seen->returned; });
      seen->freed = true;
      seen->returned_in_time = returned;
    }
    seen->changed.notify_all();
    // Joining a call blocked on mutex_ held by this very thread would deadlock: the test fails instead.
    if (returned) {
      caller.join();
    } else {
      caller.detach();
    }
    delete[] static_cast<float*>(data);
  };
  ReplicaBackward::Point point;
  {
    at::Tensor blob = torch::from_blob(new float[1]{1.0F}, {1}, deleter, torch::dtype(torch::kFloat32));
    const int64_t run = backward->begin_run();
    ASSERT_EQ(meet_both_copies(*backward, point, run, blob), "");
  }  // the test's reference is gone: the point keeps the last run's contribution
  ASSERT_FALSE(seen->freed) << "the contribution was freed before the next run: the test checks nothing";

  // The next run's first arrival drops the last run's contribution.
  const int64_t run = backward->begin_run();
  const std::string error = meet_both_copies(*backward, point, run, at::full({1}, 1.0));
  {
    // A detached call returns once the lock is free: wait for it (bounded) so that it ends within this test.
    std::unique_lock<std::mutex> lock(seen->mutex);
    seen->changed.wait_for(lock, std::chrono::seconds(10), [&] { return seen->returned; });
  }
  ::unsetenv("SYNCBN_TIMEOUT");
  EXPECT_EQ(error, "");
  std::lock_guard<std::mutex> lock(seen->mutex);
  ASSERT_TRUE(seen->freed) << "the next run's rendezvous did not free the last run's contribution";
  EXPECT_TRUE(seen->returned_in_time)
      << "ReplicaBackward::parallel(), called from the deleter of the last run's contribution, waited over 1 s for "
         "ReplicaBackward's lock: rendezvous frees tensors under mutex_ (a Python tensor's deleter takes the GIL, "
         "and a Python thread calls in holding the GIL: deadlock)";
}

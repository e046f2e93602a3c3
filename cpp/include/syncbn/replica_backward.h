#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include <syncbn/export.h>

namespace syncbn {

// How a replication's backward runs, and the meeting points its synchronized
// layers need when it runs in parallel.
//
// By default (serial) autograd runs every replica's backward on one thread, and
// a synchronized layer's merge node gets every replica's gradient at once: no
// waiting. A wrapper may instead run each replica's backward on a thread of its
// own, concurrently (set_parallel): then the merge node is reached once per
// replica, each time with that replica's share of the gradient, and becomes a
// rendezvous: each copy contributes, the last to arrive combines, every copy
// takes its own result. A copy whose backward task ended (copy_done) is not
// waited for; its contribution is absent.
class SYNCBN_API ReplicaBackward {
 public:
  // One meeting point (one synchronized call's merge node).
  class Point {
   private:
    friend class ReplicaBackward;
    int64_t run = -1;  // the backward run these fields belong to
    std::vector<std::vector<at::Tensor>> contributions;
    std::vector<bool> arrived;
    bool combining = false;  // a thread is combining the contributions
    bool combined = false;
    std::vector<std::vector<at::Tensor>> results;
    std::exception_ptr error;
  };

  using Combine = std::function<std::vector<std::vector<at::Tensor>>(const std::vector<std::vector<at::Tensor>>&)>;

  explicit ReplicaBackward(int64_t copies)
      : copies_(copies), done_(static_cast<size_t>(copies), false), failures_(static_cast<size_t>(copies)) {}
  ReplicaBackward(const ReplicaBackward&) = delete;
  ReplicaBackward& operator=(const ReplicaBackward&) = delete;

  int64_t copies() const { return copies_; }
  bool parallel() const;
  // Whether the next backward runs one task per replica, concurrently.
  void set_parallel(bool parallel);

  // A parallel backward run starts: forgets which copies were done and any
  // failure. Returns the run's id (from 1), which each of its tasks carries
  // (RunScope, and the calls below): a task of an earlier run, left running by
  // a caller that gave up on it (a failure, an interrupt), is refused and
  // writes nothing into this run.
  int64_t begin_run();
  // Copy `copy`'s backward task of run `run` ended (returned or failed).
  // Ignored for an earlier run.
  void copy_done(int64_t copy, int64_t run);
  // A task of run `run` failed: every copy waiting at a point fails with
  // BarrierAbortedError naming the first reason given in this run. Ignored for
  // an earlier run.
  void close(const std::string& reason, int64_t run);
  // The barrier error (BarrierAbortedError, BarrierTimeoutError) copy `copy`
  // got at a point in run `run`, if it got one (null otherwise, and for an
  // earlier run). Autograd hands a task the error as a plain runtime_error:
  // this gives its type back.
  std::exception_ptr failure(int64_t copy, int64_t run) const;
  // Rethrows failure(copy, run), if any.
  void rethrow_failure(int64_t copy, int64_t run) const;

  // Copy `copy`'s task of run `run` arrives at `point` with `contribution`.
  // Once every copy arrived or is done, `combine` runs once (on the last
  // thread to arrive) with the contributions by copy id (empty for a copy that
  // is done without arriving) and returns one result per copy; every arriving
  // copy returns its own. Waits at most $SYNCBN_TIMEOUT seconds
  // (BarrierTimeoutError naming `label` and the copies that never arrived).
  // Only within the current run, from a copy whose task has not ended:
  // anything else fails at once (run 0, no run: the calling thread of a double
  // backward running the replicas' graphs one after the other; an earlier run:
  // BarrierAbortedError, and the run in progress is left untouched).
  std::vector<at::Tensor> rendezvous(Point& point, int64_t copy, int64_t run, std::vector<at::Tensor> contribution,
                                     const Combine& combine, const std::string& label);

  // Marks the calling thread, for its lifetime, as running a task of run `run`
  // of `backward` (a merge node finds its run there: current_run). Scopes nest.
  class SYNCBN_API RunScope {
   public:
    RunScope(std::shared_ptr<ReplicaBackward> backward, int64_t run);
    ~RunScope();
    RunScope(const RunScope&) = delete;
    RunScope& operator=(const RunScope&) = delete;

   private:
    friend class ReplicaBackward;
    std::shared_ptr<ReplicaBackward> backward_;
    int64_t run_;
    RunScope* outer_;
  };
  // The run of the calling thread's innermost RunScope of this object; 0 if none.
  int64_t current_run() const;

 private:
  const int64_t copies_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::atomic<uint64_t> changes_{0};  // bumped under mutex_ at each change a waiter waits for
  bool parallel_ = false;
  int64_t run_ = 0;
  std::vector<bool> done_;
  std::string closed_reason_;  // non-empty: this run failed
  std::vector<std::exception_ptr> failures_;  // per copy, the barrier error it got in this run

  // Refuses a call of run `run` unless it is the current one. Under mutex_.
  void check_run(int64_t run, const std::string& label) const;
  // Records `error` as copy `copy`'s failure, then throws it. Under mutex_.
  template <class Error>
  [[noreturn]] void fail(int64_t copy, const Error& error) {
    failures_[copy] = std::make_exception_ptr(error);
    throw error;
  }
};

}  // namespace syncbn

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

  explicit ReplicaBackward(int64_t copies) : copies_(copies), done_(copies, false), failures_(copies) {}
  ReplicaBackward(const ReplicaBackward&) = delete;
  ReplicaBackward& operator=(const ReplicaBackward&) = delete;

  int64_t copies() const { return copies_; }
  bool parallel() const;
  // Whether the next backward runs one task per replica, concurrently.
  void set_parallel(bool parallel);

  // A parallel backward run starts: forgets which copies were done.
  void begin_run();
  // Copy `copy`'s backward task of this run ended (returned or failed).
  void copy_done(int64_t copy);
  // A task failed: every copy waiting at a point fails with BarrierAbortedError
  // naming the first reason given in this run.
  void close(const std::string& reason);
  // Rethrows the barrier error (BarrierAbortedError, BarrierTimeoutError) copy
  // `copy` got at a point in this run, if it got one. Autograd hands a task the
  // error as a plain runtime_error: this gives its type back.
  void rethrow_failure(int64_t copy) const;

  // Copy `copy` arrives at `point` with `contribution`. Once every copy arrived
  // or is done, `combine` runs once (on the last thread to arrive) with the
  // contributions by copy id (empty for a copy that is done without arriving)
  // and returns one result per copy; every arriving copy returns its own. Waits
  // at most $SYNCBN_TIMEOUT seconds (BarrierTimeoutError naming `label` and the
  // copies that never arrived). Only within a run (begin_run), from a copy whose
  // task has not ended: anything else (the calling thread of a double backward
  // running the replicas' graphs one after the other) fails at once.
  std::vector<at::Tensor> rendezvous(Point& point, int64_t copy, std::vector<at::Tensor> contribution,
                                     const Combine& combine, const std::string& label);

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

  // Records `error` as copy `copy`'s failure, then throws it. Under mutex_.
  template <class Error>
  [[noreturn]] void fail(int64_t copy, const Error& error) {
    failures_[copy] = std::make_exception_ptr(error);
    throw error;
  }
};

}  // namespace syncbn

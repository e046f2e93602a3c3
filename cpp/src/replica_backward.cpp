#include <syncbn/replica_backward.h>

#include <sstream>
#include <utility>

#include <c10/util/Exception.h>

#include <syncbn/errors.h>
#include <syncbn/sync_master.h>

#include "spin_wait.h"

namespace syncbn {

bool ReplicaBackward::parallel() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return parallel_;
}

void ReplicaBackward::set_parallel(bool parallel) {
  std::lock_guard<std::mutex> lock(mutex_);
  parallel_ = parallel;
}

namespace {
thread_local ReplicaBackward::RunScope* innermost_run_scope = nullptr;
}  // namespace

ReplicaBackward::RunScope::RunScope(std::shared_ptr<ReplicaBackward> backward, int64_t run)
    : backward_(std::move(backward)), run_(run), outer_(innermost_run_scope) {
  innermost_run_scope = this;
}

ReplicaBackward::RunScope::~RunScope() { innermost_run_scope = outer_; }

int64_t ReplicaBackward::current_run() const {
  for (const RunScope* scope = innermost_run_scope; scope != nullptr; scope = scope->outer_) {
    if (scope->backward_.get() == this) return scope->run_;
  }
  return 0;
}

int64_t ReplicaBackward::begin_run() {
  // The last run's failures are destroyed after the lock (nothing may be freed under mutex_: see rendezvous).
  std::vector<std::exception_ptr> old_failures(copies_);
  int64_t run = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    run = ++run_;
    done_.assign(copies_, false);
    closed_reason_.clear();
    failures_.swap(old_failures);
    // Wakes a task of the last run still waiting at a point: it is refused now (check_run).
    changes_.fetch_add(1, std::memory_order_release);
  }
  changed_.notify_all();
  return run;
}

void ReplicaBackward::check_run(int64_t run, const std::string& label) const {
  // Only a copy's task of a parallel run arrives here: the calling thread of a second backward (create_graph)
  // would run every replica's graph one after the other, and wait here for the others for ever.
  TORCH_CHECK(run > 0, label,
              ": a backward reached this synchronized layer's merge outside the replicas' parallel backward (a "
              "double backward, create_graph=True, runs the replicas' graphs one after the other, and this merge "
              "waits for every replica); in Python, build DataParallelWithCallback with parallel_backward=False: "
              "autograd's serial backward, which a double backward retraces");
  if (run != run_) {
    // Not recorded as a failure of the current run: that run is another caller's, and is healthy.
    throw BarrierAbortedError(label + ": refused a backward task of an earlier parallel backward of these replicas "
                              "(run " + std::to_string(run) + "; run " + std::to_string(run_) +
                              " is in progress): it was left running when its backward failed or was interrupted, "
                              "and may write nothing into a later one");
  }
}

void ReplicaBackward::copy_done(int64_t copy, int64_t run) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK_VALUE(copy >= 0 && copy < copies_, "copy_done: no copy ", copy, " in a replication of ", copies_);
    if (run != run_) return;  // a task of an earlier run: the current run's copy is still to come
    done_[copy] = true;
    changes_.fetch_add(1, std::memory_order_release);
  }
  changed_.notify_all();
}

void ReplicaBackward::close(const std::string& reason, int64_t run) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (run != run_) return;  // an earlier run's failure: not this run's
    // The first failure is the cause; the copies it woke report theirs after it.
    if (closed_reason_.empty()) closed_reason_ = reason.empty() ? std::string("a replica's backward failed") : reason;
    changes_.fetch_add(1, std::memory_order_release);
  }
  changed_.notify_all();
}

std::exception_ptr ReplicaBackward::failure(int64_t copy, int64_t run) const {
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK_VALUE(copy >= 0 && copy < copies_, "ReplicaBackward::failure: no copy ", copy, " in a replication of ",
                    copies_);
  return run == run_ ? failures_[copy] : nullptr;
}

void ReplicaBackward::rethrow_failure(int64_t copy, int64_t run) const {
  if (std::exception_ptr error = failure(copy, run)) std::rethrow_exception(error);
}

std::vector<at::Tensor> ReplicaBackward::rendezvous(Point& point, int64_t copy, int64_t run,
                                                    std::vector<at::Tensor> contribution, const Combine& combine,
                                                    const std::string& label) {
  TORCH_CHECK_VALUE(copy >= 0 && copy < copies_, label, ": no copy ", copy, " in a replication of ", copies_);
  const double timeout = default_timeout_seconds();
  // Nothing is freed under mutex_: freeing a tensor whose Python object is alive, or a python_error, takes the GIL,
  // and Python threads take mutex_ holding it. What a run drops (the last run's point, the combiner's copies) goes
  // into these, destroyed after the lock (declared before it).
  std::vector<std::vector<at::Tensor>> old_contributions, old_results, contributions, results;
  std::exception_ptr old_error, error;
  std::unique_lock<std::mutex> lock(mutex_);
  check_run(run, label);
  TORCH_CHECK(!done_[copy], label, ": copy ", copy, "'s backward task of this run already ended");
  if (point.run != run) {  // first arrival of this run
    point.run = run;
    old_contributions.swap(point.contributions);
    old_results.swap(point.results);
    old_error = std::exchange(point.error, nullptr);
    point.contributions.assign(copies_, {});
    point.arrived.assign(copies_, false);
    point.combining = false;
    point.combined = false;
  }
  TORCH_CHECK(!point.arrived[copy], label, ": copy ", copy, " reached the same synchronized call twice in one backward");
  point.arrived[copy] = true;
  point.contributions[copy] = std::move(contribution);

  auto everyone_in = [&] {
    for (int64_t i = 0; i < copies_; ++i) {
      if (!point.arrived[i] && !done_[i]) return false;
    }
    return true;
  };
  const auto deadline = detail::deadline_after(timeout);
  while (true) {
    // A later run began while this task waited (its caller gave up on it): the point is that run's now.
    check_run(run, label);
    if (point.combined) break;
    if (!closed_reason_.empty()) {
      fail(copy, BarrierAbortedError(label + ": the parallel backward failed: " + closed_reason_));
    }
    if (!point.combining && everyone_in()) {
      // The last to arrive combines, unlocked: other points may proceed meanwhile.
      point.combining = true;
      contributions = point.contributions;
      lock.unlock();
      try {
        results = combine(contributions);
      } catch (...) {
        error = std::current_exception();
      }
      lock.lock();
      if (run == run_ && point.run == run) {
        point.results = std::move(results);
        point.error = error;
        point.combined = true;
        changes_.fetch_add(1, std::memory_order_release);
      }
      lock.unlock();
      changed_.notify_all();
      lock.lock();
      continue;  // check_run, then point.combined
    }
    // Once every copy is in, the wait is for the combine (which may be a cross-process exchange, bounded by the
    // group's own timeout): without a deadline, or a waiter past it would spin until the combine ends.
    auto wait_until = deadline;
    if (point.combining || everyone_in()) wait_until.reset();
    if (!detail::spin_then_wait(changed_, lock, changes_, wait_until) && run == run_ && !point.combined &&
        !point.combining && !everyone_in() && closed_reason_.empty()) {
      std::ostringstream out;
      out << label << ": the parallel backward timed out after " << timeout
          << " s; copies that never reached this call: [";
      bool first = true;
      for (int64_t i = 0; i < copies_; ++i) {
        if (!point.arrived[i] && !done_[i]) {
          out << (first ? "" : ", ") << i;
          first = false;
        }
      }
      out << "] (raise SYNCBN_TIMEOUT, in seconds, to wait longer)";
      fail(copy, BarrierTimeoutError(out.str()));
    }
  }
  if (point.error) std::rethrow_exception(point.error);
  TORCH_CHECK(static_cast<int64_t>(point.results.size()) == copies_, label,
              ": the combined backward returned the wrong number of results");
  return point.results[copy];
}

}  // namespace syncbn

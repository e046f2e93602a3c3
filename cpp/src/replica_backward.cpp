#include <syncbn/replica_backward.h>

#include <sstream>

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

void ReplicaBackward::begin_run() {
  std::lock_guard<std::mutex> lock(mutex_);
  ++run_;
  done_.assign(copies_, false);
  closed_reason_.clear();
  failures_.assign(copies_, nullptr);
}

void ReplicaBackward::copy_done(int64_t copy) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK_VALUE(copy >= 0 && copy < copies_, "copy_done: no copy ", copy, " in a replication of ", copies_);
    done_[copy] = true;
    changes_.fetch_add(1, std::memory_order_release);
  }
  changed_.notify_all();
}

void ReplicaBackward::close(const std::string& reason) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    // The first failure is the cause; the copies it woke report theirs after it.
    if (closed_reason_.empty()) closed_reason_ = reason.empty() ? std::string("a replica's backward failed") : reason;
    changes_.fetch_add(1, std::memory_order_release);
  }
  changed_.notify_all();
}

void ReplicaBackward::rethrow_failure(int64_t copy) const {
  std::exception_ptr failure;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK_VALUE(copy >= 0 && copy < copies_, "rethrow_failure: no copy ", copy, " in a replication of ", copies_);
    failure = failures_[copy];
  }
  if (failure) std::rethrow_exception(failure);
}

std::vector<at::Tensor> ReplicaBackward::rendezvous(Point& point, int64_t copy, std::vector<at::Tensor> contribution,
                                                    const Combine& combine, const std::string& label) {
  TORCH_CHECK_VALUE(copy >= 0 && copy < copies_, label, ": no copy ", copy, " in a replication of ", copies_);
  const double timeout = default_timeout_seconds();
  std::unique_lock<std::mutex> lock(mutex_);
  // Only a copy's task of a parallel run arrives here: the calling thread of a second backward (create_graph)
  // would run every replica's graph one after the other, and wait here for the others for ever.
  TORCH_CHECK(run_ > 0 && !done_[copy], label,
              ": a backward reached this synchronized layer's merge outside the replicas' parallel backward (a "
              "double backward, create_graph=True, runs the replicas' graphs one after the other, and this merge "
              "waits for every replica); in Python, build DataParallelWithCallback with parallel_backward=False: "
              "autograd's serial backward, which a double backward retraces");
  if (point.run != run_) {  // first arrival of this run
    point.run = run_;
    point.contributions.assign(copies_, {});
    point.arrived.assign(copies_, false);
    point.combining = false;
    point.combined = false;
    point.results.clear();
    point.error = nullptr;
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
  while (!point.combined) {
    if (!closed_reason_.empty()) {
      fail(copy, BarrierAbortedError(label + ": the parallel backward failed: " + closed_reason_));
    }
    if (!point.combining && everyone_in()) {
      // The last to arrive combines, unlocked: other points may proceed meanwhile.
      point.combining = true;
      const auto contributions = point.contributions;
      const int64_t run = point.run;
      lock.unlock();
      std::vector<std::vector<at::Tensor>> results;
      std::exception_ptr error;
      try {
        results = combine(contributions);
      } catch (...) {
        error = std::current_exception();
      }
      lock.lock();
      if (point.run == run) {
        point.results = std::move(results);
        point.error = error;
        point.combined = true;
        changes_.fetch_add(1, std::memory_order_release);
      }
      lock.unlock();
      changed_.notify_all();
      lock.lock();
      break;
    }
    // Once every copy is in, the wait is for the combine (which may be a cross-process exchange, bounded by the
    // group's own timeout): without a deadline, or a waiter past it would spin until the combine ends.
    auto wait_until = deadline;
    if (point.combining || everyone_in()) wait_until.reset();
    if (!detail::spin_then_wait(changed_, lock, changes_, wait_until) && !point.combined && !point.combining &&
        !everyone_in() && closed_reason_.empty()) {
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

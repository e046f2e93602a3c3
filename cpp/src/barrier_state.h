#pragma once

// The shared state of one SyncMaster barrier and its SlavePipes: the slaves'
// mailboxes, the pass and generation counters, and the errors a pass can end
// in. Private to sync_master.cpp; every member is used under `mutex`, except
// that waiters read `changes` without it while they spin.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <c10/util/Exception.h>

#include <syncbn/errors.h>
#include <syncbn/replication_group.h>
#include <syncbn/sync_master.h>

#include "spin_wait.h"
#include "waiting_across_processes.h"

namespace syncbn {

namespace detail {

// One slave's mailbox. Passes are numbered per participant from 1 within a
// generation; a healthy barrier keeps every participant's number equal.
struct SlaveSlot {
  explicit SlaveSlot(int64_t id) : copy_id(id) {}
  const int64_t copy_id;
  int64_t entered = 0;       // passes this copy has entered
  int64_t message_pass = 0;  // the pass `message` belongs to
  Message message;
  int64_t result_pass = 0;  // the pass `result` belongs to
  Message result;
  bool waiting = false;   // a thread is inside run_slave for this copy
  bool finished = false;  // this copy sends no more messages in this generation
  std::string label;      // where the copy is in its latest pass
};

// What a barrier operation takes out of the state under the lock, destroyed after the lock is released (declare
// it before the lock): messages and errors may hold Python objects, whose destruction takes the GIL, and a thread
// holding the GIL may be waiting for the lock.
struct Graveyard {
  std::vector<Message> messages;
  std::vector<std::exception_ptr> errors;
  std::map<int64_t, std::shared_ptr<SlaveSlot>> slots;
  void push_back(Message&& message) { messages.push_back(std::move(message)); }
};

struct BarrierState {
  BarrierState(MasterCallback cb, double timeout) : callback(std::move(cb)), timeout_seconds(timeout) {}

  std::mutex mutex;
  std::condition_variable master_cv;  // the master waits here for the slaves' messages
  std::condition_variable slave_cv;   // slaves wait here for their results

  const MasterCallback callback;
  double timeout_seconds;
  std::string label;

  int64_t generation = 0;
  std::string generation_cause;  // what started the current generation, for the superseded error
  bool activated = false;  // the master has started a pass in this generation
  bool closed = false;     // close(): every pass of this generation fails
  std::string closed_reason;
  std::thread::id callback_thread;  // the thread running the master callback, while it runs
  std::map<int64_t, std::shared_ptr<SlaveSlot>> slots;  // by copy id, so ascending
  // The replication whose hooks registered this generation's slaves (ReplicationSetupScope), unless some slave
  // registered elsewhere (threads of the user's own): a master of another replication does not wait for them.
  std::weak_ptr<ReplicationGroup> registered_for;
  bool registered_elsewhere = false;
  int64_t master_entered = 0;  // passes the master has entered
  bool master_waiting = false;
  bool master_finished = false;
  std::string master_label;
  bool master_busy = false;      // a thread is inside run_master
  int64_t resolved_through = 0;  // every pass up to this one completed or failed
  int64_t failed_through = 0;    // every pass up to this one that had not completed, failed
  // Why passes failed, by the pass fail_pass was given: a pass that had not completed failed with the error of the
  // first failed pass at or after it (a copy arriving late at a pass gets that pass's error, not a later one's).
  std::map<int64_t, std::exception_ptr> failures;
  // Bumped (under `mutex`) whenever something a waiter waits for changes, so that a waiter can spin on it
  // without the lock before it sleeps on a condition variable.
  std::atomic<uint64_t> changes{0};

  void changed() { changes.fetch_add(1, std::memory_order_release); }

  std::string describe() const { return label.empty() ? "syncbn barrier" : "syncbn barrier of " + label; }

  bool all_slaves_sent(int64_t pass) const {
    for (const auto& entry : slots) {
      if (entry.second->message_pass != pass) return false;
    }
    return true;
  }

  // Fails `pass` for everyone: current waiters wake, and whoever enters it later
  // gets the same error. Unconsumed messages move to `graveyard`, to be
  // destroyed by the caller after the lock is released.
  void fail_pass(int64_t pass, std::exception_ptr error, Graveyard& graveyard) {
    failed_through = std::max(failed_through, pass);
    resolved_through = std::max(resolved_through, pass);
    auto [it, inserted] = failures.try_emplace(pass, error);
    if (!inserted) {
      graveyard.errors.push_back(std::move(it->second));
      it->second = std::move(error);
    }
    for (auto& entry : slots) {
      SlaveSlot& slot = *entry.second;
      if (slot.message_pass != 0 && slot.message_pass <= pass) graveyard.push_back(std::move(slot.message));
    }
    changed();
    master_cv.notify_all();
    slave_cv.notify_all();
  }

  // Forgets the slaves and the pass history; whoever waits on the old generation
  // wakes and throws. The old slots and errors go to `graveyard`, to be destroyed unlocked.
  void start_generation(Graveyard& graveyard, std::string cause) {
    ++generation;
    generation_cause = std::move(cause);
    activated = false;
    closed = false;
    closed_reason.clear();
    graveyard.slots.swap(slots);
    registered_for.reset();
    registered_elsewhere = false;
    master_entered = 0;
    master_finished = false;
    master_label.clear();
    resolved_through = 0;
    failed_through = 0;
    for (auto& entry : failures) graveyard.errors.push_back(std::move(entry.second));
    failures.clear();
    changed();
    master_cv.notify_all();
    slave_cv.notify_all();
  }

  // A call-count mismatch: `finished_copy` sent its last message in pass
  // `finished_after`, but `waiting_copy` waits in `pass` at `where`.
  std::exception_ptr mismatch_error(int64_t finished_copy, int64_t finished_after, int64_t waiting_copy, int64_t pass,
                                    const std::string& where) const {
    std::ostringstream out;
    out << describe() << ": copy " << finished_copy << " finished its forward after " << finished_after
        << " synchronized call(s), but copy " << waiting_copy << " made call " << pass;
    if (!where.empty()) out << " (" << where << ")";
    out << "; every replica must call the synchronized layers the same number of times, in the same order";
    return std::make_exception_ptr(BarrierError(out.str()));
  }

  // The first slave that finished before `pass`, if any.
  const SlaveSlot* finished_slave_before(int64_t pass) const {
    for (const auto& entry : slots) {
      if (entry.second->finished && entry.second->entered < pass) return entry.second.get();
    }
    return nullptr;
  }

  [[noreturn]] void throw_superseded(int64_t copy_id) const {
    std::ostringstream out;
    out << describe() << ": copy " << copy_id << " was waiting on a replication that has been replaced by a new one ("
        << generation_cause << ")";
    throw BarrierAbortedError(out.str());
  }

  // Rethrows the error `pass` failed with (pass <= failed_through).
  [[noreturn]] void rethrow_failure(int64_t pass) const {
    auto it = failures.lower_bound(pass);
    TORCH_INTERNAL_ASSERT(it != failures.end(), "no failure recorded for failed pass ", pass);
    std::rethrow_exception(it->second);
  }

  [[noreturn]] void throw_closed() const {
    throw BarrierAbortedError(describe() + " was closed: " + closed_reason);
  }

  // A barrier method that must not run inside the master callback (which runs in
  // the middle of a pass, inside run_master): says what the user did instead of
  // a confusing error about threads or generations.
  void check_not_in_callback(const char* what, const char* instead) const {
    TORCH_CHECK(callback_thread != std::this_thread::get_id(), describe(), ": ", what,
                " was called from inside the master callback, in the middle of a pass; ", instead);
  }

  // The timeout error for `pass`, naming where the waiting copy is and the copies that never arrived.
  std::exception_ptr timeout_error(int64_t pass, const std::string& waiter_label) const {
    std::vector<int64_t> missing;
    if (master_entered < pass) missing.push_back(0);
    for (const auto& entry : slots) {
      if (entry.second->message_pass < pass) missing.push_back(entry.first);
    }
    std::ostringstream out;
    out << describe() << " timed out after " << timeout_seconds << " s in pass " << pass;
    if (!waiter_label.empty()) out << " (waiting at " << waiter_label << ")";
    out << ": ";
    if (missing.empty()) {
      out << "every copy arrived, but the master callback did not return in time";
    } else {
      out << "copies that never arrived: [";
      for (size_t i = 0; i < missing.size(); ++i) out << (i ? ", " : "") << missing[i];
      out << "]";
    }
    out << " (raise SYNCBN_TIMEOUT, in seconds, or the barrier's timeout to wait longer)";
    return std::make_exception_ptr(BarrierTimeoutError(out.str()));
  }

  // While the master callback runs: when it last waited for the other ranks of a process group (now if it is
  // waiting; see waiting_across_processes.h), nullopt if it never did. A slave's deadline counts from then.
  std::optional<std::chrono::steady_clock::time_point> callback_last_waited_across_processes() const {
    if (callback_thread == std::thread::id()) return std::nullopt;
    return last_waited_across_processes(callback_thread);
  }

  // Deadline for a wait that starts now; nullopt for a timeout too long to represent.
  std::optional<std::chrono::steady_clock::time_point> deadline() const { return deadline_after(timeout_seconds); }

  // Waits on `cv` until notified or the deadline; returns false on timeout (spinning first: spin_wait.h).
  bool wait(std::condition_variable& cv, std::unique_lock<std::mutex>& lock,
            const std::optional<std::chrono::steady_clock::time_point>& until) {
    return spin_then_wait(cv, lock, changes, until);
  }
};

}  // namespace detail
}  // namespace syncbn

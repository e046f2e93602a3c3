#include <syncbn/sync_master.h>

#include <cxxabi.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <exception>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>

#include <c10/util/Exception.h>

#include <syncbn/replication_group.h>

#include "barrier_state.h"

namespace syncbn {

namespace detail {
namespace {

// A replica thread whose replication was closed (the caller gave up on it) starts no pass, on any barrier.
void check_replication_alive(const BarrierState& s) {
  if (ReplicationGroup* group = ReplicaScope::current_group()) {
    group->check_alive("a pass of the " + s.describe() + " by copy " + std::to_string(ReplicaScope::current_copy_id()));
  }
}

void check_timeout(double seconds) {
  TORCH_CHECK_VALUE(seconds > 0,  // false for NaN; infinity means no timeout

                    "the barrier timeout must be a positive number of seconds, got ", seconds);
}

// Sets a flag for a scope, however the scope ends; the barrier's mutex must be held whenever it changes.
struct FlagGuard {
  explicit FlagGuard(bool& flag) : flag_(&flag) { *flag_ = true; }
  ~FlagGuard() { release(); }
  // Clears the flag now, e.g. before the scope gives up the lock.
  void release() {
    if (flag_ != nullptr) *flag_ = false;
    flag_ = nullptr;
  }
  bool* flag_;
};

// Checks that the callback returned one result per copy, the master's first,
// and puts the slaves' results in copy-id order.
MessageList order_results(MessageList results, const std::vector<int64_t>& slave_ids, const std::string& where) {
  auto describe_ids = [&results] {
    std::ostringstream out;
    out << "[";
    for (size_t i = 0; i < results.size(); ++i) out << (i ? ", " : "") << results[i].first;
    out << "]";
    return out.str();
  };
  TORCH_CHECK(results.size() == slave_ids.size() + 1, where, ": the master callback must return one (copy_id, result)",
              " pair per copy (", slave_ids.size() + 1, "), but returned ", results.size(), " with copy ids ",
              describe_ids());
  TORCH_CHECK(results[0].first == 0, where, ": the master callback's first result must be the master's (copy 0), got",
              " copy ids ", describe_ids());
  std::map<int64_t, size_t> index_of;
  for (size_t i = 1; i < results.size(); ++i) {
    const bool fresh = index_of.emplace(results[i].first, i).second;
    TORCH_CHECK(fresh, where, ": the master callback returned copy ", results[i].first, " twice; copy ids ",
                describe_ids());
  }
  MessageList ordered;
  ordered.reserve(results.size());
  ordered.emplace_back(0, std::move(results[0].second));
  for (int64_t id : slave_ids) {
    auto it = index_of.find(id);
    TORCH_CHECK(it != index_of.end(), where, ": the master callback returned no result for copy ", id,
                "; copy ids ", describe_ids());
    ordered.emplace_back(id, std::move(results[it->second].second));
  }
  return ordered;
}

}  // namespace

}  // namespace detail

double default_timeout_seconds() {
  const char* text = std::getenv("SYNCBN_TIMEOUT");
  const char* first = text;
  while (first != nullptr && std::isspace(static_cast<unsigned char>(*first))) ++first;
  if (first == nullptr || *first == '\0') return 300.0;  // unset, empty or blank (`SYNCBN_TIMEOUT= cmd`)
  char* end = nullptr;
  const double seconds = std::strtod(text, &end);  // (leading blanks skipped; trailing ones too, below)
  const char* rest = end;
  while (std::isspace(static_cast<unsigned char>(*rest))) ++rest;
  TORCH_CHECK_VALUE(end != text && *rest == '\0' && seconds > 0, "SYNCBN_TIMEOUT must be a positive number of seconds,",
                    " got '", text, "'");
  return seconds;
}

SyncMaster::SyncMaster(MasterCallback callback, std::optional<double> timeout_seconds) {
  TORCH_CHECK_VALUE(static_cast<bool>(callback), "SyncMaster needs a master callback");
  const double timeout = timeout_seconds.value_or(default_timeout_seconds());
  detail::check_timeout(timeout);
  state_ = std::make_shared<detail::BarrierState>(std::move(callback), timeout);
}

SyncMaster::~SyncMaster() {
  // Wake anyone still waiting on this barrier instead of leaving them blocked, and fail at once a slave that comes
  // later (its pipe outlives the master): no master will ever run a pass.
  detail::Graveyard graveyard;  // destroyed after the lock
  std::lock_guard<std::mutex> lock(state_->mutex);
  state_->closed = true;
  state_->closed_reason = "its SyncMaster was destroyed";
  state_->fail_pass(state_->resolved_through + 1,
                    std::make_exception_ptr(BarrierAbortedError(state_->describe() + " was destroyed")), graveyard);
}

std::shared_ptr<SlavePipe> SyncMaster::register_slave(int64_t copy_id) {
  TORCH_CHECK_VALUE(copy_id > 0, "register_slave: copy ids of slaves start at 1 (0 is the master), got ", copy_id);
  detail::Graveyard graveyard;  // destroyed after the lock
  std::lock_guard<std::mutex> lock(state_->mutex);
  detail::BarrierState& s = *state_;
  s.check_not_in_callback("register_slave()",
                          "register the slaves in their replication hook (ReplicationCallback::on_replicate; in "
                          "Python, __data_parallel_replicate__)");
  // A pass since the last registration, or a copy registering again: a new replication.
  if (s.activated) {
    s.start_generation(graveyard, "copy " + std::to_string(copy_id) + " registered after a pass had run");
  } else if (s.slots.count(copy_id) != 0) {
    s.start_generation(graveyard, "copy " + std::to_string(copy_id) + " registered again");
  }
  const std::shared_ptr<ReplicationGroup> setting_up = ReplicationSetupScope::current();
  if (setting_up == nullptr) {
    s.registered_elsewhere = true;
  } else if (s.slots.empty()) {
    s.registered_for = setting_up;
  } else if (s.registered_for.lock() != setting_up) {
    s.registered_elsewhere = true;
  }
  s.slots.emplace(copy_id, std::make_shared<detail::SlaveSlot>(copy_id));
  return std::make_shared<SlavePipe>(state_, copy_id, s.generation);
}

void SyncMaster::reset() {
  detail::Graveyard graveyard;  // destroyed after the lock
  std::lock_guard<std::mutex> lock(state_->mutex);
  state_->check_not_in_callback(
      "reset()", "reset() starts a new replication: call it in the master's replication hook "
                 "(ReplicationCallback::on_replicate; in Python, __data_parallel_replicate__)");
  state_->start_generation(graveyard, "reset() was called");
}

Message SyncMaster::run_master(Message message) {
  detail::BarrierState& s = *state_;
  detail::Graveyard graveyard;  // destroyed after the lock
  std::unique_lock<std::mutex> lock(s.mutex);
  // Under the lock: checked before it, a thread of a closed replication stalled in between would join the pass of
  // whatever generation a later replication's reset() made. (Lock order: barrier, then group; the group never takes
  // a barrier's lock holding its own.)
  detail::check_replication_alive(s);
  s.check_not_in_callback("run_master()", "the callback must return its results, not start another pass");
  TORCH_CHECK(!s.master_busy, s.describe(), ": run_master is already running in another thread");
  if (s.closed) s.throw_closed();
  // Slaves registered by the hooks of an earlier replication, none since: this replication's copies register none
  // (a last batch of one sample, on one copy). Waiting for them could only time out.
  if (const ReplicationGroup* group = ReplicaScope::current_group();
      group != nullptr && !s.slots.empty() && !s.registered_elsewhere && s.registered_for.lock().get() != group) {
    s.start_generation(graveyard, "a replication of " + std::to_string(group->copies()) +
                                      " copies ran its master after slaves of an earlier replication had registered");
  }
  detail::FlagGuard busy(s.master_busy);
  s.activated = true;
  const int64_t generation = s.generation;
  const int64_t pass = ++s.master_entered;
  s.master_label = message.label;

  {
    detail::FlagGuard waiting(s.master_waiting);
    const auto until = s.deadline();
    while (true) {
      if (s.generation != generation) s.throw_superseded(0);
      if (s.closed) s.throw_closed();
      if (pass <= s.failed_through) s.rethrow_failure(pass);
      if (s.all_slaves_sent(pass)) break;
      if (const detail::SlaveSlot* done = s.finished_slave_before(pass)) {
        s.fail_pass(pass, s.mismatch_error(done->copy_id, done->entered, 0, pass, s.master_label), graveyard);
        continue;
      }
      if (!s.wait(s.master_cv, lock, until) && s.generation == generation &&
          pass > s.failed_through && !s.all_slaves_sent(pass)) {
        s.fail_pass(pass, s.timeout_error(pass, s.master_label), graveyard);
      }
    }
  }

  MessageList messages;
  std::vector<int64_t> slave_ids;
  messages.reserve(s.slots.size() + 1);
  slave_ids.reserve(s.slots.size());
  messages.emplace_back(0, std::move(message));
  for (auto& entry : s.slots) {
    messages.emplace_back(entry.first, std::move(entry.second->message));
    slave_ids.push_back(entry.first);
  }
  const std::string where = s.describe();

  // The callback runs unlocked: it may be slow, call into Python, or abort().
  s.callback_thread = std::this_thread::get_id();
  lock.unlock();
  MessageList results;
  try {
    results = detail::order_results(s.callback(std::move(messages)), slave_ids, where);
  } catch (abi::__forced_unwind&) {
    // The thread is being ended (a Python daemon thread taking the GIL in its callback while the interpreter shuts
    // down): not an exception current_exception() can hold. The slaves get an error of their own.
    lock.lock();
    s.callback_thread = std::thread::id();
    if (s.generation == generation && pass > s.failed_through) {
      s.fail_pass(pass,
                  std::make_exception_ptr(BarrierAbortedError(where + ": the master's thread ended in its callback")),
                  graveyard);
    }
    throw;
  } catch (...) {
    lock.lock();
    s.callback_thread = std::thread::id();
    if (s.generation == generation && pass > s.failed_through) s.fail_pass(pass, std::current_exception(), graveyard);
    throw;
  }
  lock.lock();
  s.callback_thread = std::thread::id();
  if (s.generation != generation || s.closed || pass <= s.failed_through) {
    // Replaced, closed, aborted or timed out meanwhile: the results are destroyed after the lock.
    for (auto& result : results) graveyard.push_back(std::move(result.second));
    results.clear();
    if (s.generation != generation) s.throw_superseded(0);
    if (s.closed) s.throw_closed();
    s.rethrow_failure(pass);
  }

  for (size_t i = 1; i < results.size(); ++i) {
    detail::SlaveSlot& slot = *s.slots.at(results[i].first);
    if (slot.result_pass != 0) graveyard.push_back(std::move(slot.result));
    slot.result = std::move(results[i].second);
    slot.result_pass = pass;
  }
  s.resolved_through = pass;
  s.changed();
  busy.release();
  lock.unlock();
  s.slave_cv.notify_all();
  return std::move(results[0].second);
}

void SyncMaster::abort(const std::string& reason) {
  detail::Graveyard graveyard;  // destroyed after the lock
  std::lock_guard<std::mutex> lock(state_->mutex);
  detail::BarrierState& s = *state_;
  s.fail_pass(s.resolved_through + 1,
              std::make_exception_ptr(BarrierAbortedError(s.describe() + " was aborted: " + reason)), graveyard);
}

void SyncMaster::close(const std::string& reason) {
  detail::Graveyard graveyard;  // destroyed after the lock
  std::lock_guard<std::mutex> lock(state_->mutex);
  detail::BarrierState& s = *state_;
  if (s.closed) return;
  s.closed = true;
  s.closed_reason = reason;
  s.fail_pass(s.resolved_through + 1, std::make_exception_ptr(BarrierAbortedError(s.describe() + " was closed: " + reason)),
              graveyard);
}

bool SyncMaster::closed() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->closed;
}

void SyncMaster::finish(int64_t copy_id) {
  detail::Graveyard graveyard;  // destroyed after the lock
  std::lock_guard<std::mutex> lock(state_->mutex);
  detail::BarrierState& s = *state_;
  if (copy_id == 0) {
    s.master_finished = true;
  } else {
    auto it = s.slots.find(copy_id);
    TORCH_CHECK_VALUE(it != s.slots.end(), s.describe(), ": finish(", copy_id, "): no such copy is registered");
    it->second->finished = true;
  }
  s.changed();
  // Waiters re-check: a pass that a finished copy will never join fails now.
  s.master_cv.notify_all();
  s.slave_cv.notify_all();
}

int64_t SyncMaster::nr_slaves() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return static_cast<int64_t>(state_->slots.size());
}

std::vector<int64_t> SyncMaster::slave_ids() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  std::vector<int64_t> ids;
  for (const auto& entry : state_->slots) ids.push_back(entry.first);
  return ids;
}

double SyncMaster::timeout_seconds() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->timeout_seconds;
}

void SyncMaster::set_timeout_seconds(double seconds) {
  detail::check_timeout(seconds);
  std::lock_guard<std::mutex> lock(state_->mutex);
  state_->timeout_seconds = seconds;
}

std::string SyncMaster::label() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->label;
}

void SyncMaster::set_label(std::string label) {
  std::lock_guard<std::mutex> lock(state_->mutex);
  state_->label = std::move(label);
}

SlavePipe::SlavePipe(std::shared_ptr<detail::BarrierState> state, int64_t copy_id, int64_t generation)
    : state_(std::move(state)), copy_id_(copy_id), generation_(generation) {
  TORCH_CHECK_VALUE(state_ != nullptr, "SlavePipe: no barrier (get a pipe from SyncMaster::register_slave)");
}

Message SlavePipe::run_slave(Message message) {
  detail::BarrierState& s = *state_;
  detail::Graveyard graveyard;                  // destroyed after the lock
  std::shared_ptr<detail::SlaveSlot> slot;      // may outlive its generation: release after the lock too
  std::unique_lock<std::mutex> lock(s.mutex);
  detail::check_replication_alive(s);  // under the lock, as run_master's
  if (s.generation != generation_) {
    std::ostringstream out;
    out << s.describe() << ": the pipe of copy " << copy_id_
        << " belongs to an earlier replication; register the slave again";
    throw BarrierAbortedError(out.str());
  }
  slot = s.slots.at(copy_id_);
  TORCH_CHECK(!slot->waiting, s.describe(), ": copy ", copy_id_, " is already inside run_slave in another thread");
  if (s.closed) s.throw_closed();
  detail::FlagGuard waiting(slot->waiting);
  // Not `activated`: as in the established library, only the master's pass starts one. A slave may enter its pass
  // before the other slaves of its replication have registered (threads started as they get their pipes).
  const int64_t pass = ++slot->entered;
  if (pass <= s.failed_through) s.rethrow_failure(pass);

  if (slot->message_pass != 0) graveyard.push_back(std::move(slot->message));
  slot->label = message.label;
  slot->message = std::move(message);
  slot->message_pass = pass;
  // Only the last message of a pass is news to a waiter (the master): the others would wake the spinners for nothing.
  if (s.master_waiting && s.master_entered == pass && s.all_slaves_sent(pass)) {
    s.changed();
    s.master_cv.notify_one();
  }

  auto until = s.deadline();
  while (true) {
    if (s.generation != generation_) s.throw_superseded(copy_id_);
    if (slot->result_pass == pass) break;
    if (s.closed) s.throw_closed();
    if (pass <= s.failed_through) s.rethrow_failure(pass);
    if (s.master_finished && s.master_entered < pass) {
      s.fail_pass(pass, s.mismatch_error(0, s.master_entered, copy_id_, pass, slot->label), graveyard);
      continue;
    }
    if (const detail::SlaveSlot* done = s.finished_slave_before(pass)) {
      s.fail_pass(pass, s.mismatch_error(done->copy_id, done->entered, copy_id_, pass, slot->label), graveyard);
      continue;
    }
    if (!s.wait(s.slave_cv, lock, until) && s.generation == generation_ &&
        slot->result_pass != pass && pass > s.failed_through) {
      // A callback waiting for other ranks is bounded by the group's timeout, not this one; its own work after
      // that wait (the merge) gets a whole timeout from the wait's end, even where that wait ended just now.
      if (const auto waited = s.callback_last_waited_across_processes()) {
        const auto renewed = detail::deadline_after(s.timeout_seconds, *waited);
        if (!renewed || !until || *renewed > *until) {
          until = renewed;
          continue;
        }
      }
      s.fail_pass(pass, s.timeout_error(pass, slot->label), graveyard);
    }
  }
  Message result = std::move(slot->result);
  slot->result = Message{};
  return result;
}

}  // namespace syncbn

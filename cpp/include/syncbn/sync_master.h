#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <syncbn/errors.h>
#include <syncbn/export.h>
#include <syncbn/message.h>

namespace syncbn {

// Receives every copy's message, the master's (copy 0) first and the others
// ordered by copy id, and returns one result per copy in the same form.
using MasterCallback = std::function<MessageList(MessageList)>;

// The barrier timeout in seconds when none is given: $SYNCBN_TIMEOUT, or 300
// (unset, empty or blank). Throws a ValueError when it is set to something
// that is not a positive number.
SYNCBN_API double default_timeout_seconds();

namespace detail {
struct BarrierState;
}

class SlavePipe;

// The master/slave reduction barrier (the established library's SyncMaster).
// Per pass: every registered slave sends one message with run_slave(); the
// master's run_master() collects them with its own, calls the master callback
// once, hands each slave its result and returns its own.
//
// No pass can hang forever or fail silently: abort(reason), an exception from
// the callback, or a timeout fail the pass for every participant, including one
// that arrives at that pass later; the pass after a failed one works normally.
// While the callback waits for the other ranks of a process group (a
// synchronized layer's cross-process exchange), the slaves wait on: the
// group's own timeout bounds that wait, and its error fails the pass.
// A thread running a replica of a closed replication (ReplicaScope) starts no
// pass. Calling run_master, reset or register_slave from inside the master
// callback is an error that says so.
// Each replication is a generation of registrations. A new one starts with
// reset() (the master's replication hook should call it: a replication may
// have fewer copies than the last), or implicitly when a slave registers after
// the master has run a pass or registers a copy id already registered (the
// established library's semantics: a slave may enter its pass before the other
// slaves register). Then the old pipes stop working, and anyone still waiting
// on the old generation is woken with BarrierAbortedError.
class SYNCBN_API SyncMaster {
 public:
  // `timeout_seconds` defaults to default_timeout_seconds(), read now.
  explicit SyncMaster(MasterCallback callback, std::optional<double> timeout_seconds = std::nullopt);
  ~SyncMaster();
  SyncMaster(const SyncMaster&) = delete;
  SyncMaster& operator=(const SyncMaster&) = delete;

  // A pipe for copy `copy_id` (> 0).
  std::shared_ptr<SlavePipe> register_slave(int64_t copy_id);

  // Starts a new generation with no slaves: for a new replication.
  void reset();

  // One pass from the master's side; returns the master's result.
  Message run_master(Message message);

  // Fails the pass in progress (or, if none is, the next one) for every
  // participant with BarrierAbortedError carrying `reason`.
  void abort(const std::string& reason);

  // Fails the pass in progress and every later pass of this generation, for
  // every participant, with BarrierAbortedError carrying `reason` (the
  // replication is dead: ReplicationGroup::close). The next generation
  // (reset(), or a new registration) opens the barrier again.
  void close(const std::string& reason);
  bool closed() const;

  // Copy `copy_id` will send no more messages in this generation (its forward
  // returned). Whoever waits for it in a later pass, now or later, fails at once
  // with a BarrierError naming both copies and where they are, instead of
  // waiting for the timeout: the copies made different numbers of calls.
  void finish(int64_t copy_id);

  int64_t nr_slaves() const;
  // The registered copy ids, ascending.
  std::vector<int64_t> slave_ids() const;

  double timeout_seconds() const;
  void set_timeout_seconds(double seconds);

  // A name for error messages, e.g. the layer this barrier synchronizes.
  std::string label() const;
  void set_label(std::string label);

 private:
  std::shared_ptr<detail::BarrierState> state_;
};

// A slave's end of a SyncMaster, for one generation.
class SYNCBN_API SlavePipe {
 public:
  SlavePipe(std::shared_ptr<detail::BarrierState> state, int64_t copy_id, int64_t generation);

  // One pass from this copy's side; returns this copy's result.
  Message run_slave(Message message);
  int64_t copy_id() const { return copy_id_; }

 private:
  std::shared_ptr<detail::BarrierState> state_;
  int64_t copy_id_;
  int64_t generation_;
};

}  // namespace syncbn

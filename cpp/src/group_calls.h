#pragma once

// What this process knows of each process group its synchronized layers exchange over: the counts of its
// synchronized calls (which size and number every exchange alike on every rank), its transport, the replica threads
// waiting in its backend, and the numbers a user knows its ranks by (for errors).

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include <syncbn/cross_process.h>

#include "shared_memory_exchange.h"

namespace syncbn {
class ReplicationGroup;
}

namespace syncbn::detail {

// What this process knows of its synchronized calls on one group. Every rank derives it alike, from the headers
// every rank received, so that every rank sizes the next exchange alike.
struct GroupCalls {
  explicit GroupCalls(const ProcessGroupPtr& of) : group(of) {}
  // While held, no new group can take this one's address. It keeps only the object's memory: when the user's last
  // reference goes, ProcessGroup::release_resources drops its backends and store (their threads, sockets) at once.
  c10::weak_intrusive_ptr<c10d::ProcessGroup> group;
  int64_t calls = 0;                 // forward exchanges (synchronized calls)
  int64_t backward_exchanges = 0;    // backward ones (a call's gradient summed)
  int64_t failed_calls = 0;          // forward exchanges a rank's failure was told in (this rank's own included)
  int64_t previous_exchange = -1;    // the last exchange every rank agreed on (exchange_key; -1: none)
  std::unordered_map<int64_t, int64_t> channels_after;  // exchange key -> channels of the exchange that followed it
  // Ranks on one host exchange through shared memory: decided at the group's first exchange of CPU tensors.
  bool transport_decided = false;
  std::shared_ptr<SharedMemoryExchange> shared_memory;
  // The replications whose replica threads wait in the group's backend now (one entry per waiting thread; each
  // lives while its thread waits), and why the group is out of step (empty: it is not).
  std::vector<const ReplicationGroup*> waiting_replications;
  std::string out_of_step;
};

// Guards every group's GroupCalls.
std::mutex& calls_mutex();

// The group's record, created at its first use (call with calls_mutex() held).
GroupCalls& calls_of(const ProcessGroupPtr& group);

// An exchange's identity, for sizing the next one: a layer's forward exchange, or its backward one.
int64_t exchange_key(ExchangeKind kind, int64_t layer_id);

// The next exchange of `kind` on `group`: its number (forward and backward ones counted apart), the counts of both
// kinds after it, and how many channels its first all-gather carries (what followed the previous exchange last
// time: exact in a network that calls its layers in the same order every step).
struct ExchangeNumbers {
  int64_t number;              // of this exchange, among those of its kind
  int64_t calls;               // forward exchanges so far, this one included if it is one
  int64_t backward_exchanges;  // backward ones so far, likewise
  int64_t capacity;
};
ExchangeNumbers begin_exchange(const ProcessGroupPtr& group, ExchangeKind kind);

// After ranks met at different steps (a rank that caught an exception and skipped the rest of its step, say), every
// rank counts on from the furthest rank's counts, alike: once each has left the failed step, their next steps pair
// again instead of failing for good, one call apart.
void realign_counts(const ProcessGroupPtr& group, int64_t calls_seen, int64_t backward_exchanges_seen);

// Records the exchange every rank agreed on and the channels it carried (the size of the next one).
void end_exchange(const ProcessGroupPtr& group, int64_t key, int64_t channels);

// "in synchronized BatchNorm <label>, <doing> across the process group (rank r of W, backend[, its global ranks])":
// the last line of every exchange error. Takes no lock of calls_mutex(): callable with it held.
std::string where(const ProcessGroupPtr& group, const std::string& label, const char* doing);

}  // namespace syncbn::detail

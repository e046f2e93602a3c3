#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <limits>
#include <mutex>
#include <optional>
#include <string>

#include <ATen/core/Tensor.h>

#include <syncbn/export.h>
#include <syncbn/message.h>

namespace syncbn {

// How many calls not yet recomputed a layer alone in its process keeps for
// recomputation across processes (LayerSync::recent_calls): its calls in the
// checkpointed forwards made before their backward (gradient accumulation).
inline constexpr size_t kRecentCallsKept = 16;

// Whether the running call is made under saved-tensor hooks, as in a
// torch.utils.checkpoint(use_reentrant=False) forward (with or without
// gradients): a call its block's recomputation repeats and finds again. (A
// use_reentrant=True checkpoint's forward runs without them.)
SYNCBN_API bool under_saved_tensor_hooks();

// The merged statistics of a layer's synchronized calls, found again by their
// local statistics: a call repeated inside backward (torch.utils.checkpoint
// recomputing a block) gets the original call's merged statistics without
// exchanging them again, and writes nothing. Thread-safe.
class SYNCBN_API CallRecords {
 public:
  // Where a call kept across forwards was made, to tell which of several calls whose local statistics match
  // (a rank whose batch repeats) a recomputation repeats.
  struct Origin {
    uint64_t thread = 0;       // the forward's thread (at::RecordFunction::currentThreadId())
    int64_t sequence_nr = -1;  // the autograd sequence number before the call's first node (-1: unknown)
    // The call's output's autograd node while it lives, else nullptr (empty: no node, e.g. a frozen layer on an
    // input without gradients): a recomputation prefers the calls its node reaches (its own forward's), and a
    // record whose graph was freed (its backward failed, or none ran) is forgotten first.
    std::function<const void*()> output_node;
    bool graph_lives() const { return !output_node || output_node() != nullptr; }
  };

  struct Record {
    int64_t layer = -1;  // the module position (replicas), or -1
    int64_t count = 0;
    at::Tensor local_mean, local_m2;  // detached
    Message merged;                   // tensors detached
    bool reusable = true;             // not made in a use_reentrant=True checkpoint's forward (see BatchNormChannel)
    std::string label;
    bool recalled = false;            // found again at least once
    Origin origin;
    // The node and backward (graph task) it was last recalled for, when told by its origin: a second call of the
    // same recomputation matching it is refused (see find()).
    const void* recalled_for_node = nullptr;
    int64_t recalled_in_task = -1;
  };

  // Keeps at most `capacity` records: beyond it forgets one whose graph was
  // freed, else one already recalled, else the oldest (keeping its
  // fingerprint, see forgot()).
  explicit CallRecords(size_t capacity = std::numeric_limits<size_t>::max()) : capacity_(capacity) {}

  // Remembers a call: `message` is the statistics message it sent (local mean
  // and M2, count), `merged` what it got back.
  void add(const Message& message, const Message& merged, int64_t layer, bool reusable, const std::string& label,
           Origin origin);
  void add(const Message& message, const Message& merged, int64_t layer, bool reusable, const std::string& label) {
    add(message, merged, layer, reusable, label, Origin{});
  }

  // The earlier call of layer `layer` whose local statistics `message` repeats
  // (within a relative 1e-4: non-deterministic kernels upstream), the closest
  // one; std::nullopt when none does. When two such calls had different merged
  // statistics: throws, naming `where` (which one is repeated cannot be told:
  // the calls of one forward), or with `across_forwards` (the calls of several
  // forwards, e.g. a rank whose batch repeats or is empty) takes, of those the
  // autograd node being evaluated reaches (the recomputation runs for a node
  // of its own forward, after the calls), the oldest not recalled yet (a block
  // recomputes its calls in order), else the newest; where it reaches none, the
  // one made last before that node on its thread; failing that, the oldest not
  // recalled yet, else the newest. A record told by the node twice in one
  // recomputation (two calls of one block in parallel branches whose local
  // statistics match) throws. Where the node reaches none of the calls whose
  // outputs live and one alike was forgotten: std::nullopt (see forgot()).
  std::optional<Record> find(const Message& message, int64_t layer, const std::string& where,
                             bool across_forwards = false);

  // Whether a record of layer `layer` that `message` would have matched was
  // forgotten (the capacity was exceeded): a recomputation that finds nothing
  // then fails with an error rather than exchanging again. By the records'
  // sums (a call's fingerprint), so false only where it surely was not.
  bool forgot(const Message& message, int64_t layer) const;

  size_t size() const;
  size_t capacity() const { return capacity_; }

 private:
  struct Fingerprint {
    int64_t layer;
    int64_t count;
    at::Tensor mean_sum, m2_sum;  // 0-dim float64, on the statistics' device (read only by forgot())
  };
  static constexpr size_t kFingerprintsKept = 1024;

  bool forgot_locked(const Message& message, int64_t layer) const;  // forgot(), holding mutex_

  const size_t capacity_;
  mutable std::mutex mutex_;
  std::deque<Record> records_;
  std::deque<Fingerprint> fingerprints_;  // parallel to records_
  std::deque<Fingerprint> forgotten_;
};

}  // namespace syncbn

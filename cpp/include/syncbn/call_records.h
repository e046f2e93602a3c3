#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <limits>
#include <mutex>
#include <optional>
#include <string>

#include <ATen/core/Tensor.h>

#include <syncbn/export.h>
#include <syncbn/message.h>

namespace syncbn {

// How many calls a layer alone in its process keeps for recomputation across
// processes (LayerSync::recent_calls): the forwards a checkpointed block may
// make before its backward recomputes them (gradient accumulation).
inline constexpr size_t kRecentCallsKept = 8;

// The merged statistics of a layer's synchronized calls, found again by their
// local statistics: a call repeated inside backward (torch.utils.checkpoint
// recomputing a block) gets the original call's merged statistics without
// exchanging them again, and writes nothing. Thread-safe.
class SYNCBN_API CallRecords {
 public:
  struct Record {
    int64_t layer = -1;  // the module position (replicas), or -1
    int64_t count = 0;
    at::Tensor local_mean, local_m2;  // detached
    Message merged;                   // tensors detached
    bool grad_enabled = true;         // the forward ran with gradients (not a use_reentrant=True checkpoint's)
    std::string label;
  };

  // Keeps at most `capacity` records, forgetting the oldest.
  explicit CallRecords(size_t capacity = std::numeric_limits<size_t>::max()) : capacity_(capacity) {}

  // Remembers a call: `message` is the statistics message it sent (local mean
  // and M2, count), `merged` what it got back.
  void add(const Message& message, const Message& merged, int64_t layer, bool grad_enabled, const std::string& label);

  // The earlier call of layer `layer` whose local statistics `message` repeats
  // (within a relative 1e-4: non-deterministic kernels upstream), the closest
  // one; std::nullopt when none does. Throws, naming `where`, when two such
  // calls had different merged statistics (which one is repeated cannot be told).
  std::optional<Record> find(const Message& message, int64_t layer, const std::string& where) const;

  size_t size() const;

 private:
  const size_t capacity_;
  mutable std::mutex mutex_;
  std::deque<Record> records_;
};

}  // namespace syncbn

#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include <syncbn/cross_process.h>

// The cross-process all-gather between ranks on one host, through a shared
// memory segment instead of the group's c10d backend: each rank writes its row
// into its own slot, publishes a sequence number and reads every other rank's
// row once all have published. On localhost gloo's all-gather costs a thread
// hop and a TCP round trip per exchange (about a millisecond here, twice per
// synchronized layer and step); this costs a few microseconds plus the wait for
// the slowest rank. The group is still the source of truth: it sets the segment
// up (collectively, at the group's first exchange), gives the timeout, and
// carries every exchange that does not fit the slots.
namespace syncbn::detail {

// What a rank is exchanging; told to every rank so that ranks at different steps
// fail alike instead of pairing unrelated values.
enum class ExchangeKind : int64_t { kStatistics = 1, kGradients = 2 };

// Told when ranks fail with one in backward and another in forward, whatever the transport: the usual cause.
inline constexpr const char* kSkippedBackwardExchange =
    " (a rank's backward exchanges once for each synchronized call its loss depends on: a rank that skipped the "
    "backward, whose loss does not use a synchronized call's output, or that made the call under torch.no_grad() "
    "exchanges nothing for it in backward and moves on ahead of the others)";

// The hook set by set_cross_process_wait_hook (empty: none).
std::function<void()> cross_process_wait_hook();

class SharedMemoryExchange {
 public:
  // The group's c10d all-gather of a CPU int64 row, (W, n): the set-up's channel.
  using Gather = std::function<at::Tensor(const at::Tensor&)>;

  // Sets up an exchange for `group`, collectively: every rank of the group must
  // call it at the same point (its first exchange). Returns null on every rank
  // alike unless every rank mapped the same segment (one host, or a shared
  // /dev/shm) and can see every other rank's process (so that a rank that exits
  // is noticed), and none set SYNCBN_SHARED_MEMORY=0.
  static std::shared_ptr<SharedMemoryExchange> connect(const ProcessGroupPtr& group, const Gather& gather);

  SharedMemoryExchange(const SharedMemoryExchange&) = delete;
  SharedMemoryExchange& operator=(const SharedMemoryExchange&) = delete;
  ~SharedMemoryExchange();

  // Every rank's `tensor` (CPU; the same size on every rank), stacked in rank
  // order: (W, n). nullopt on every rank alike when the rows are larger than the
  // slots (the caller then uses the group's all-gather). Throws BarrierError on
  // every rank when the ranks exchange rows of different sizes (naming each
  // rank's kind; rows of one size are gathered whatever their kinds: the
  // caller's headers tell), DistBackendError when a rank does not come within
  // `timeout`, its process exited or its own wait failed (then it gives up:
  // every later exchange fails at once, on this rank and on the others).
  std::optional<at::Tensor> all_gather(const at::Tensor& tensor, ExchangeKind kind, std::chrono::milliseconds timeout);

  // The largest row, in bytes, an exchange carries through the segment.
  int64_t capacity() const { return capacity_; }

 private:
  SharedMemoryExchange(void* base, size_t size, int rank, int world, int64_t capacity, std::vector<int64_t> pids,
                       std::vector<uint64_t> start_times);
  uint64_t* published(int rank) const;
  // Set (1) by a rank whose wait failed: it takes part in no later exchange, so whoever waits for it stops.
  uint64_t* gave_up(int rank) const;
  void give_up(std::string why);
  // Takes this rank's row of exchange `sequence` back (its wait is failing), so that no rank completes the exchange
  // with it afterwards. False, with the row put back, where every other rank had published its own: the exchange is
  // complete for them.
  bool withdraw(uint64_t sequence);
  char* slot(uint64_t sequence, int rank) const;
  void wake_waiters() const;
  void wait_for_every_rank(uint64_t sequence, std::chrono::milliseconds timeout);
  std::vector<int> missing_ranks(uint64_t sequence) const;

  void* base_;
  size_t size_;
  int rank_;
  int world_;
  int64_t capacity_;
  std::vector<int64_t> pids_;
  std::vector<uint64_t> start_times_;  // each rank's process start (to tell it from a later process of its pid)
  std::mutex mutex_;                   // one exchange at a time from this process
  uint64_t sequence_ = 0;
  std::string failure_;  // set once a wait failed here (timeout, interrupt, a rank exited or gave up): out of step
};

}  // namespace syncbn::detail

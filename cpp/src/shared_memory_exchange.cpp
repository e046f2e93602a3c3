#include "shared_memory_exchange.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>
#include <sstream>
#include <thread>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <syncbn/errors.h>
#include <syncbn/replication_group.h>

#include "shared_memory_segment.h"

#ifdef __linux__
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace syncbn::detail {

namespace {

using namespace shared_memory;  // the segment's layout

constexpr int kSpins = 2000;                  // polls before sleeping on the futex (tens of microseconds)
constexpr auto kSleepSlice = std::chrono::milliseconds(50);
constexpr auto kLivenessEvery = std::chrono::milliseconds(100);

void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

const char* describe(int64_t kind) {
  switch (static_cast<ExchangeKind>(kind)) {
    case ExchangeKind::kStatistics:
      return "exchanging statistics (forward)";
    case ExchangeKind::kGradients:
      return "summing gradients (backward)";
  }
  return "exchanging";
}

#ifdef __linux__
long futex(uint32_t* word, int operation, uint32_t value, const timespec* timeout) {
  return syscall(SYS_futex, word, operation, value, timeout, nullptr, 0);
}
#endif

std::mutex wait_hook_mutex;
std::function<void()> wait_hook;

}  // namespace

std::function<void()> cross_process_wait_hook() {
  std::lock_guard<std::mutex> lock(wait_hook_mutex);
  return wait_hook;
}

SharedMemoryExchange::SharedMemoryExchange(void* base, size_t size, int rank, int world, int64_t capacity,
                                           std::vector<int64_t> pids, std::vector<uint64_t> start_times)
    : base_(base),
      size_(size),
      rank_(rank),
      world_(world),
      capacity_(capacity),
      pids_(std::move(pids)),
      start_times_(std::move(start_times)) {}

SharedMemoryExchange::~SharedMemoryExchange() {
#ifdef __linux__
  munmap(base_, size_);
#endif
}

uint64_t* SharedMemoryExchange::published(int rank) const {
  return reinterpret_cast<uint64_t*>(static_cast<char*>(base_) + kLine + kLine * static_cast<size_t>(rank));
}

uint64_t* SharedMemoryExchange::gave_up(int rank) const { return published(rank) + 1; }  // same line, next word

void SharedMemoryExchange::give_up(std::string why) {
  failure_ = std::move(why);
  atomic(gave_up(rank_)).store(1, std::memory_order_release);
  wake_waiters();
}

char* SharedMemoryExchange::slot(uint64_t sequence, int rank) const {
  const size_t index = static_cast<size_t>(sequence & 1) * static_cast<size_t>(world_) + static_cast<size_t>(rank);
  return static_cast<char*>(base_) + kLine + kLine * static_cast<size_t>(world_) + index * slot_stride(capacity_);
}

void SharedMemoryExchange::wake_waiters() const {
#ifdef __linux__
  auto* header = static_cast<SegmentHeader*>(base_);
  atomic(&header->wake_word).fetch_add(1, std::memory_order_seq_cst);
  if (atomic(&header->waiters).load(std::memory_order_seq_cst) > 0) {
    futex(&header->wake_word, FUTEX_WAKE, INT_MAX, nullptr);
  }
#endif
}

std::vector<int> SharedMemoryExchange::missing_ranks(uint64_t sequence) const {
  std::vector<int> missing;
  for (int r = 0; r < world_; ++r) {
    if (atomic(published(r)).load(std::memory_order_acquire) < sequence) missing.push_back(r);
  }
  return missing;
}

bool SharedMemoryExchange::withdraw(uint64_t sequence) {
  atomic(published(rank_)).store(sequence - 1, std::memory_order_seq_cst);
  for (int r = 0; r < world_; ++r) {
    if (r != rank_ && atomic(published(r)).load(std::memory_order_seq_cst) < sequence) return true;
  }
  atomic(published(rank_)).store(sequence, std::memory_order_seq_cst);  // complete for the others: put it back
  wake_waiters();
  return false;
}

void SharedMemoryExchange::wait_for_every_rank(uint64_t sequence, std::chrono::milliseconds timeout) {
#ifdef __linux__
  // Every rank's row is published, read twice over (sequentially consistent): a rank that withdraws its row
  // (withdraw) after this rank's second read of it reads every other row already published in the first, so it
  // puts its row back and completes the exchange too, and one that withdrew before that read is seen missing.
  auto every_row_published = [&] {
    for (int r = 0; r < world_; ++r) {
      if (atomic(published(r)).load(std::memory_order_seq_cst) < sequence) return false;
    }
    return true;
  };
  auto arrived = [&] { return every_row_published() && every_row_published(); };
  // Before this wait fails: this rank's row is taken back (a rank arriving later must fail too, not complete the
  // exchange with it), unless every rank had published (it is complete for them: they may have read it).
  auto failing = [&](std::string why) {
    withdraw(sequence);
    give_up(std::move(why));
  };
  for (int spin = 0; spin < kSpins; ++spin) {
    if (arrived()) return;
    cpu_relax();
  }
  auto* header = static_cast<SegmentHeader*>(base_);
  const auto hook = cross_process_wait_hook();
  const auto start = std::chrono::steady_clock::now();
  auto next_liveness_check = start + kLivenessEvery;
  while (true) {
    // Registered as a waiter before reading the wake word, and the publisher bumps the word before looking for
    // waiters: either it sees this waiter and wakes it, or this read sees its bump and the futex returns at once.
    atomic(&header->waiters).fetch_add(1, std::memory_order_seq_cst);
    const uint32_t seen = atomic(&header->wake_word).load(std::memory_order_seq_cst);
    if (!arrived()) {
      const auto now = std::chrono::steady_clock::now();
      const auto left = std::max(std::chrono::milliseconds(1),
                                 std::min<std::chrono::milliseconds>(
                                     kSleepSlice, std::chrono::duration_cast<std::chrono::milliseconds>(
                                                      start + timeout - now)));
      const timespec slice{static_cast<time_t>(left.count() / 1000), static_cast<long>(left.count() % 1000) * 1000000};
      futex(&header->wake_word, FUTEX_WAIT, seen, &slice);
    }
    atomic(&header->waiters).fetch_sub(1, std::memory_order_seq_cst);
    if (arrived()) return;
    if (hook) {
      try {
        hook();
      } catch (...) {
        failing("a rank's wait was interrupted");
        throw;
      }
    }
    // A replica whose replication the caller gave up on (Ctrl-C, another replica's failure) waits no more: nothing
    // of this call can reach the model now, and the next forward must not find this wait still going.
    if (ReplicationGroup* replication = ReplicaScope::current_group(); replication && replication->closed()) {
      failing("a rank's replicas gave up waiting (" + replication->close_reason() + ")");
      throw BarrierAbortedError(failure_ + " (shared-memory exchange of rank " + std::to_string(rank_) + ")");
    }

    const auto now = std::chrono::steady_clock::now();
    const auto missing = missing_ranks(sequence);
    auto has_given_up = [&](int r) { return atomic(gave_up(r)).load(std::memory_order_acquire) != 0; };
    const auto given_up = std::find_if(missing.begin(), missing.end(), has_given_up);
    // A rank whose process exited never comes: say so now, not at the group's timeout (first, where another rank
    // gave up: what it gave up waiting for is the cause to tell).
    if (given_up != missing.end() || now >= next_liveness_check) {
      next_liveness_check = now + kLivenessEvery;
      for (int r : missing) {
        if (!has_given_up(r) && process_start_time(pids_[r]) != std::optional<uint64_t>(start_times_[r])) {
          std::ostringstream out;
          out << "rank " << r << " (process " << pids_[r] << ") exited before reaching this exchange";
          failing(out.str());
          TORCH_CHECK_WITH(DistBackendError, false, failure_, " (shared-memory exchange of rank ", rank_, ")");
        }
      }
    }
    // Nor does a rank whose own wait failed (interrupted and caught, timed out...): say so now too.
    if (given_up != missing.end()) {
      std::ostringstream out;
      out << "rank " << *given_up << " gave up this exchange or an earlier one (its wait failed: interrupted, "
          << "timed out, or its replicas gave up) and takes part in no later one";
      for (int other : missing) {  // (what it may have given up waiting for)
        if (!has_given_up(other)) out << "; rank " << other << " has not reached this exchange either";
      }
      failing(out.str());
      TORCH_CHECK_WITH(DistBackendError, false, failure_, " (shared-memory exchange of rank ", rank_,
                       "): the ranks are out of step; start the processes again");
    }
    if (now - start >= timeout) {
      std::ostringstream out;
      out << "timed out after " << timeout.count() << " ms (the group's timeout) waiting for rank";
      out << (missing.size() > 1 ? "s" : "");
      for (size_t i = 0; i < missing.size(); ++i) out << (i ? ", " : " ") << missing[i];
      out << " to reach this exchange";
      if (!withdraw(sequence)) return;  // the last of them came meanwhile: the exchange is complete
      give_up(out.str());
      TORCH_CHECK_WITH(DistBackendError, false, failure_, " (shared-memory exchange of rank ", rank_, ")");
    }
  }
#else
  (void)sequence;
  (void)timeout;
#endif
}

std::optional<at::Tensor> SharedMemoryExchange::all_gather(const at::Tensor& tensor, ExchangeKind kind,
                                                           std::chrono::milliseconds timeout) {
  TORCH_CHECK_VALUE(tensor.device().is_cpu(), "the shared-memory exchange carries CPU tensors only");
  const at::Tensor row = tensor.contiguous();
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK_WITH(DistBackendError, failure_.empty(),
                   "an earlier exchange across the process group failed (", failure_,
                   "): the ranks are out of step; start the processes again");

  const uint64_t sequence = ++sequence_;
  const int64_t bytes = static_cast<int64_t>(row.nbytes());
  char* mine = slot(sequence, rank_);
  auto* description = reinterpret_cast<SlotDescription*>(mine);
  description->bytes = bytes;
  description->kind = static_cast<int64_t>(kind);
  if (bytes <= capacity_) std::memcpy(mine + kLine, row.const_data_ptr(), static_cast<size_t>(bytes));
  atomic(published(rank_)).store(sequence, std::memory_order_release);
  wake_waiters();
  wait_for_every_rank(sequence, timeout);

  // Rows of one size are gathered even where the kinds differ: the caller's headers then tell every rank alike
  // what each is doing (and realign the ranks' counts). Rows of different sizes cannot be stacked.
  bool alike = true;
  for (int r = 0; r < world_; ++r) {
    const auto* other = reinterpret_cast<const SlotDescription*>(slot(sequence, r));
    alike = alike && other->bytes == bytes;
  }
  if (!alike) {
    std::ostringstream out;
    out << "the ranks of the process group are at different steps of their synchronized BatchNorm layers:";
    for (int r = 0; r < world_; ++r) {
      const auto* other = reinterpret_cast<const SlotDescription*>(slot(sequence, r));
      out << " rank " << r << " is " << describe(other->kind) << ", " << other->bytes << " bytes"
          << (r + 1 < world_ ? ";" : ".");
    }
    out << " Every rank must call the synchronized layers the same number of times, in the same order, forward "
           "and backward";
    bool any_backward = false, any_forward = false;
    for (int r = 0; r < world_; ++r) {
      const auto kind_of_rank = reinterpret_cast<const SlotDescription*>(slot(sequence, r))->kind;
      any_backward = any_backward || kind_of_rank == static_cast<int64_t>(ExchangeKind::kGradients);
      any_forward = any_forward || kind_of_rank == static_cast<int64_t>(ExchangeKind::kStatistics);
    }
    if (any_backward && any_forward) out << kSkippedBackwardExchange;
    throw BarrierError(out.str());
  }
  if (bytes > capacity_) return std::nullopt;  // alike on every rank: every rank uses the group's all-gather

  at::Tensor gathered = at::empty({world_, row.numel()}, row.options());
  char* out = static_cast<char*>(gathered.data_ptr());
  for (int r = 0; r < world_; ++r) {
    std::memcpy(out + static_cast<size_t>(r) * static_cast<size_t>(bytes), slot(sequence, r) + kLine,
                static_cast<size_t>(bytes));
  }
  return gathered;
}

}  // namespace syncbn::detail

namespace syncbn {

void set_cross_process_wait_hook(std::function<void()> hook) {
  std::lock_guard<std::mutex> lock(detail::wait_hook_mutex);
  detail::wait_hook = std::move(hook);
}

}  // namespace syncbn

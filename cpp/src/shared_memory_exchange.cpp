#include "shared_memory_exchange.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <syncbn/errors.h>
#include <syncbn/replication_group.h>

#ifdef __linux__
#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace syncbn::detail {

namespace {

// The segment: a header, each rank's published sequence number (a cache line each), then two sets of slots (an
// exchange uses the set of its sequence number's parity, so that a rank may write the next exchange while a slower
// one still reads this one; it can write the one after only once every rank published the next, having read this).
// A slot is its row's description (a cache line) and then the row.
constexpr uint64_t kMagic = 0x73796e63626e3031ULL;  // "syncbn01"
constexpr size_t kLine = 64;
constexpr int64_t kSlotCapacity = 64 * 1024;  // bytes of a row: its 8-word header + 2 x 4092 channels' 8-byte words
constexpr int kSpins = 2000;                  // polls before sleeping on the futex (tens of microseconds)
constexpr auto kSleepSlice = std::chrono::milliseconds(50);
constexpr auto kLivenessEvery = std::chrono::milliseconds(100);

struct SegmentHeader {
  uint64_t magic;
  uint64_t nonce;
  int64_t world;
  int64_t capacity;
  uint32_t wake_word;  // bumped at each publication; futex word
  uint32_t waiters;    // ranks sleeping on wake_word
};
static_assert(sizeof(SegmentHeader) <= kLine);

struct SlotDescription {
  int64_t bytes;
  int64_t kind;
};

size_t slot_stride(int64_t capacity) { return kLine + static_cast<size_t>(capacity); }

size_t segment_size(int world, int64_t capacity) {
  return kLine + kLine * static_cast<size_t>(world) + 2 * static_cast<size_t>(world) * slot_stride(capacity);
}

template <typename T>
std::atomic_ref<T> atomic(T* word) {
  return std::atomic_ref<T>(*word);
}

void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

bool enabled_by_environment() {
  const char* value = std::getenv("SYNCBN_SHARED_MEMORY");
  return value == nullptr || std::string(value) != "0";
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
// A process's start time (clock ticks since boot), or nullopt when it is gone or a zombie: with the pid, it tells
// the rank's process from a later one that reuses the pid.
std::optional<uint64_t> process_start_time(int64_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!stat || !std::getline(stat, line)) return std::nullopt;
  const auto name_end = line.rfind(')');
  if (name_end == std::string::npos) return std::nullopt;
  std::istringstream fields(line.substr(name_end + 1));
  std::string state;
  fields >> state;  // field 3
  if (state == "Z" || state == "X" || state == "x") return std::nullopt;
  std::string field;
  for (int index = 4; index < 22 && fields >> field; ++index) {
  }
  uint64_t start = 0;
  if (!(fields >> start)) return std::nullopt;  // field 22
  return start;
}

long futex(uint32_t* word, int operation, uint32_t value, const timespec* timeout) {
  return syscall(SYS_futex, word, operation, value, timeout, nullptr, 0);
}

// The set-up's row: what each rank tells every other (rank 0 also the segment's name).
constexpr int64_t kRowWords = 24;
constexpr int64_t kNameWords = 18;
enum RowField : int64_t { kWants = 0, kCreated, kNonce, kPid, kStartTime, kCapacity, kName };
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

std::shared_ptr<SharedMemoryExchange> SharedMemoryExchange::connect(const ProcessGroupPtr& group,
                                                                    const Gather& gather) {
#ifdef __linux__
  const int rank = group->getRank();
  const int world = group->getSize();
  const int64_t capacity = kSlotCapacity;
  const size_t size = segment_size(world, capacity);
  const auto own_start = process_start_time(getpid());
  const bool wants = enabled_by_environment() && own_start.has_value();

  // Every rank has arrived before rank 0 names a segment, so that it is named only between two back-to-back
  // gathers: a rank 0 killed while the others are late (a slow first forward) leaves nothing in /dev/shm.
  gather(at::zeros({1}, at::kLong));

  // Rank 0 creates the segment (reserving its memory now: a full /dev/shm fails here, not with a SIGBUS later).
  std::string name;
  void* base = nullptr;
  uint64_t nonce = 0;
  std::string failure;  // rank 0's: why it could not create the segment (a full /dev/shm)
  if (rank == 0 && wants) {
    std::random_device entropy;
    nonce = (static_cast<uint64_t>(entropy()) << 32) ^ entropy() ^
            static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
    std::ostringstream out;
    out << "/syncbn-" << getpid() << "-" << std::hex << nonce;
    name = out.str();
    const int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) {
      failure = std::string("shm_open: ") + std::strerror(errno);
    } else {
      if (const int error = posix_fallocate(fd, 0, static_cast<off_t>(size)); error == 0) {
        base = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (base == MAP_FAILED) {
          failure = std::string("mmap: ") + std::strerror(errno);
          base = nullptr;
        }
      } else {
        failure = "reserving " + std::to_string(size) + " bytes: " + std::strerror(error);
      }
      close(fd);
      if (base == nullptr) {
        shm_unlink(name.c_str());
      } else {
        std::memset(base, 0, size);
        auto* header = static_cast<SegmentHeader*>(base);
        header->nonce = nonce;
        header->world = world;
        header->capacity = capacity;
        atomic(&header->magic).store(kMagic, std::memory_order_release);
      }
    }
  }

  // A set-up collective that fails (a rank that never comes) leaves nothing mapped or named behind.
  auto gather_or_clean_up = [&](const at::Tensor& tensor) {
    try {
      return gather(tensor);
    } catch (...) {
      if (base != nullptr) munmap(base, size);
      if (rank == 0 && !name.empty()) shm_unlink(name.c_str());
      throw;
    }
  };

  at::Tensor row = at::zeros({kRowWords}, at::kLong);
  auto* words = row.data_ptr<int64_t>();
  words[kWants] = wants;
  words[kCreated] = base != nullptr;
  words[kNonce] = static_cast<int64_t>(nonce);
  words[kPid] = getpid();
  words[kStartTime] = static_cast<int64_t>(own_start.value_or(0));
  words[kCapacity] = capacity;
  std::memcpy(words + kName, name.c_str(), std::min(name.size(), static_cast<size_t>(kNameWords * 8 - 1)));
  const at::Tensor rows = gather_or_clean_up(row).contiguous();  // (W, kRowWords)
  const auto* all = rows.data_ptr<int64_t>();
  auto field = [&](int r, RowField f) { return all[r * kRowWords + f]; };

  bool everyone_wants = true;
  std::vector<int64_t> pids(world);
  std::vector<uint64_t> start_times(world);
  for (int r = 0; r < world; ++r) {
    everyone_wants = everyone_wants && field(r, kWants) != 0;
    pids[r] = field(r, kPid);
    start_times[r] = static_cast<uint64_t>(field(r, kStartTime));
  }
  bool ok = everyone_wants && field(0, kCreated) != 0 && field(0, kCapacity) == capacity;
  if (ok && rank != 0) {
    char remote_name[kNameWords * 8];
    std::memcpy(remote_name, all + kName, sizeof(remote_name));
    remote_name[sizeof(remote_name) - 1] = '\0';
    name = remote_name;
    const int fd = shm_open(name.c_str(), O_RDWR, 0);
    struct stat info {};
    if (fd >= 0 && fstat(fd, &info) == 0 && static_cast<size_t>(info.st_size) == size) {
      base = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      if (base == MAP_FAILED) base = nullptr;
    }
    if (fd >= 0) close(fd);
    const auto* header = static_cast<SegmentHeader*>(base);
    ok = header != nullptr && atomic(const_cast<uint64_t*>(&header->magic)).load(std::memory_order_acquire) == kMagic &&
         header->nonce == static_cast<uint64_t>(field(0, kNonce)) && header->world == world;
  }
  // Every other rank's process must be visible from here (the same pid namespace), so that one that exits is told
  // from one that is late.
  for (int r = 0; ok && r < world; ++r) {
    ok = process_start_time(pids[r]) == std::optional<uint64_t>(start_times[r]);
  }

  at::Tensor verdict = at::tensor({static_cast<int64_t>(ok)}, at::kLong);
  const at::Tensor verdicts = gather_or_clean_up(verdict);  // every rank has opened the segment, or failed to
  if (rank == 0 && !name.empty()) shm_unlink(name.c_str());  // nothing left behind, whatever happens next
  const bool everyone_ok = verdicts.min().item<int64_t>() == 1;
  if (!failure.empty() && everyone_wants) {  // not silently slower: say why (leaked segments can fill /dev/shm)
    TORCH_WARN("syncbn_ext: ranks on this host exchange through the process group's backend, not shared memory ",
               "(slower): rank 0 could not create a segment in /dev/shm (", failure,
               "). Free space there (or set SYNCBN_SHARED_MEMORY=0 on every rank to skip the attempt)");
  }
  if (!everyone_ok) {
    if (base != nullptr) munmap(base, size);
    return nullptr;
  }
  return std::shared_ptr<SharedMemoryExchange>(
      new SharedMemoryExchange(base, size, rank, world, capacity, std::move(pids), std::move(start_times)));
#else
  // Still a party to the set-up, so that every rank makes the same collectives.
  at::Tensor row = at::zeros({1}, at::kLong);
  gather(row);
  gather(row);
  gather(row);
  return nullptr;
#endif
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

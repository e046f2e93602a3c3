#include "shared_memory_exchange.h"

// Setting up a group's shared-memory exchange: collectively, at the group's first exchange of CPU tensors.

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "environment_switch.h"
#include "shared_memory_segment.h"

#ifdef __linux__
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

namespace syncbn::detail {

namespace shared_memory {

#ifdef __linux__
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
#else
std::optional<uint64_t> process_start_time(int64_t) { return std::nullopt; }
#endif

}  // namespace shared_memory

namespace {

using namespace shared_memory;  // the segment's layout

#ifdef __linux__
// The set-up's row: what each rank tells every other (rank 0 also the segment's name).
constexpr int64_t kRowWords = 24;
constexpr int64_t kNameWords = 18;
enum RowField : int64_t { kWants = 0, kCreated, kNonce, kPid, kStartTime, kCapacity, kName };
#endif

}  // namespace

std::shared_ptr<SharedMemoryExchange> SharedMemoryExchange::connect(const ProcessGroupPtr& group,
                                                                    const Gather& gather) {
#ifdef __linux__
  const int rank = group->getRank();
  const int world = group->getSize();
  const int64_t capacity = kSlotCapacity;
  const size_t size = segment_size(world, capacity);
  const auto own_start = process_start_time(getpid());
  const char* setting = std::getenv("SYNCBN_SHARED_MEMORY");
  const std::optional<bool> enabled = switch_value(setting, /*unset=*/true);
  const bool wants = enabled.value_or(false) && own_start.has_value();

  // Every rank has arrived before rank 0 names a segment, so that it is named only between two back-to-back
  // gathers: a rank 0 killed while the others are late (a slow first forward) leaves nothing in /dev/shm.
  // The ranks whose SYNCBN_SHARED_MEMORY is no yes or no say so here: every rank then fails alike, none waits.
  const at::Tensor invalid_settings = gather(at::tensor({static_cast<int64_t>(!enabled.has_value())}, at::kLong));
  if (invalid_settings.max().item<int64_t>() != 0) {
    std::ostringstream out;
    out << "SYNCBN_SHARED_MEMORY must be 1 (or true/yes/on: ranks on one host exchange through shared memory) or 0 "
           "(or false/no/off: through the process group's backend), but it is something else on rank";
    const at::Tensor ranks = invalid_settings.reshape({-1}).nonzero().reshape({-1});
    out << (ranks.numel() > 1 ? "s" : "");
    for (int64_t i = 0; i < ranks.numel(); ++i) out << (i == 0 ? " " : ", ") << ranks[i].item<int64_t>();
    if (!enabled.has_value()) out << " (here: '" << setting << "')";
    TORCH_CHECK_VALUE(false, out.str());
  }

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

}  // namespace syncbn::detail

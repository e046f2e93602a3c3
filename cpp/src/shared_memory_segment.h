#pragma once

// The shared-memory segment's layout, shared by its set-up (shared_memory_setup.cpp) and the exchange
// (shared_memory_exchange.cpp).

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <optional>

namespace syncbn::detail::shared_memory {

// The segment: a header, each rank's published sequence number (a cache line each), then two sets of slots (an
// exchange uses the set of its sequence number's parity, so that a rank may write the next exchange while a slower
// one still reads this one; it can write the one after only once every rank published the next, having read this).
// A slot is its row's description (a cache line) and then the row.
inline constexpr uint64_t kMagic = 0x73796e63626e3031ULL;  // "syncbn01"
inline constexpr size_t kLine = 64;
// Bytes of a row: its 8-word header + 2 x 4092 channels' 8-byte words.
inline constexpr int64_t kSlotCapacity = 64 * 1024;

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

inline size_t slot_stride(int64_t capacity) { return kLine + static_cast<size_t>(capacity); }

inline size_t segment_size(int world, int64_t capacity) {
  return kLine + kLine * static_cast<size_t>(world) + 2 * static_cast<size_t>(world) * slot_stride(capacity);
}

template <typename T>
inline std::atomic_ref<T> atomic(T* word) {
  return std::atomic_ref<T>(*word);
}

// A process's start time (clock ticks since boot), or nullopt when it is gone or a zombie: with the pid, it tells
// the rank's process from a later one that reuses the pid. (Linux: /proc.)
std::optional<uint64_t> process_start_time(int64_t pid);

}  // namespace syncbn::detail::shared_memory

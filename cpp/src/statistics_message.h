// Private to the core: the layout of a synchronized BatchNorm statistics message.
#pragma once

#include <cstddef>

namespace syncbn::detail {

// What a replica sends: tensors (mean_i, m2_i); ints (count_i, layer position,
// call index, input sizes...). Position and call index are -1 when the exchange
// is not a BatchNormChannel's (no tags to check).
constexpr size_t kCount = 0, kLayer = 1, kCall = 2, kSizes = 3;
constexpr size_t kLocalMean = 0, kLocalM2 = 1;

// What a copy gets back: tensors (mean, var) and ints (total count); the
// master's message also carries every copy's statistics, which a recomputation
// (checkpointing) needs to repeat the merge: tensors (..., means (R, C), m2s (R, C))
// and ints (..., count of each copy).
constexpr size_t kMergedMean = 0, kMergedVar = 1, kMergedMeans = 2, kMergedM2s = 3;
constexpr size_t kTotal = 0, kCopyCounts = 1;

}  // namespace syncbn::detail

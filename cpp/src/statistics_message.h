// Private to the core: the layout of a synchronized BatchNorm statistics message.
#pragma once

#include <cstddef>

namespace syncbn::detail {

// What a replica sends: tensors (mean_i, m2_i); ints (count_i, layer position,
// call index, the two autograd sequence numbers it reserved for the merge nodes
// (merge_nodes.h), input sizes...). Position and call index are -1 when the
// exchange is not a BatchNormChannel's (no tags to check).
constexpr size_t kCount = 0, kLayer = 1, kCall = 2, kMergeSequenceNr = 3, kShareSequenceNr = 4, kSizes = 5;
constexpr size_t kLocalMean = 0, kLocalM2 = 1;

// What a copy gets back: tensors (mean, var) and ints (total count).
constexpr size_t kMergedMean = 0, kMergedVar = 1;
constexpr size_t kTotal = 0;
// A parallel backward's merged message: whether some copy's statistics require grad.
constexpr size_t kAnyCopyRequiresGrad = 1;

}  // namespace syncbn::detail

#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <syncbn/export.h>

// Synchronization across processes: the statistics each process merged from
// its own replicas, merged again over a c10d process group (gloo on CPU, NCCL
// on GPUs), so that every rank normalizes with the whole global batch's. Ranks
// on one host exchange CPU rows through shared memory instead of the group's
// backend (set up through the group; see cross_process_transport).
namespace syncbn {

using ProcessGroupPtr = c10::intrusive_ptr<c10d::ProcessGroup>;

// A synchronized layer's cross-process step: its group (null: none), its id
// alike on every rank (its construction order), its name for errors.
struct GroupCall {
  ProcessGroupPtr group;
  int64_t layer_id = -1;
  std::string label;
};

// The int64 words of the header each rank sends ahead of its 2 words per
// channel ((mean, M2), or their gradients) in one exchange: a row is
// kExchangeHeaderWords + 2 * C words (C: the most channels the group has
// exchanged so far).
inline constexpr int64_t kExchangeHeaderWords = 8;

// What the group's merge gives every rank, bitwise alike: float64 (C,) tensors.
struct GroupStatistics {
  at::Tensor mean;  // of the whole global batch
  at::Tensor var;   // biased
  int64_t total = 0;
};

// One synchronized call's statistics across the group, in one all-gather of a
// packed tensor of the same size on every rank: every rank's (call number on
// this group, kind, layer id, channels, count, its counts of forward and
// backward exchanges, `backward_follows`) and (mean, M2) for as many
// channels as followed the previous exchange last time (every rank learns this
// alike from the exchanged headers; exact from the second step of a network
// that calls its layers in the same order). The headers are checked to agree before anything
// is paired, so ranks at different layers or calls fail with a BarrierError on
// every rank naming each rank's layer; channels the first exchange had no room
// for (the first step, a new order) follow in a second all-gather. Merged with
// Chan's formula in rank order (float64): bitwise alike on every rank.
// `mean` and `m2` are this process's, of `count` values per channel (0: an
// empty batch). `layer_id` identifies the layer alike on every rank (its
// construction order); `label` names it in errors. A rank that never comes is
// caught by the group's own timeout, with `label` in the error. Ranks met at
// different steps (their exchange counts differ) count on from the furthest
// rank's counts, alike, so that their next steps pair again. `backward_follows`:
// this rank's call will sum gradients in backward (its statistics require
// grad); ranks that differ get a BarrierError on every rank.
SYNCBN_API GroupStatistics merge_across_processes(const ProcessGroupPtr& group, int64_t layer_id, int64_t count,
                                                  const at::Tensor& mean, const at::Tensor& m2,
                                                  const std::string& label, bool backward_follows = false);

// This rank's call of layer `layer_id` failed before its exchange (its input
// or arguments were refused): takes part in the exchange the other ranks make
// for that call, marked failed, so that every rank fails at this call (a
// BarrierError naming the failed ranks) instead of pairing it with this rank's
// next call. `channels`: the layer's num_features; `device`: where the row
// goes (the input's: CUDA for NCCL). Returns once the exchange is over: its
// BarrierError (this rank's failure, or whatever else the exchange found wrong,
// which the other ranks are told) is the caller's to supersede with its own
// error. Other errors (an interrupt in the wait, the transport's) propagate.
SYNCBN_API void announce_failed_call(const ProcessGroupPtr& group, int64_t layer_id, int64_t channels,
                                     const std::string& label, at::Device device);

// How many synchronized calls (forward exchanges) this process has made on
// `group` so far, as every rank counts them (0 before the first).
SYNCBN_API int64_t synchronized_calls(const ProcessGroupPtr& group);

// How many of them failed in their exchange because a rank's failure was told
// there (announce_failed_call, announce_failed_forward: this rank's own
// announcements included), alike on every rank.
SYNCBN_API int64_t failed_synchronized_calls(const ProcessGroupPtr& group);

// This rank's forward failed before its first synchronized call on `group` (a
// replica that raised before it, code before the first layer): takes part in
// the first exchange the other ranks make in that forward, whatever its layer,
// marked failed, so that each of them fails that call with a BarrierError
// naming this rank, instead of pairing it with this rank's next forward (one
// step apart from then on). `device`: where the row goes (CUDA for NCCL);
// `label`: what failed, for error messages. Returns once the exchange is over
// (its BarrierError dropped); other errors (the group's timeout: no rank came)
// propagate. See ForwardAcrossProcesses for when a forward makes it.
SYNCBN_API void announce_failed_forward(const ProcessGroupPtr& group, at::Device device, const std::string& label);

// Backward: (d mean, d var) of layer `layer_id`'s call summed over the group:
// one all-gather, summed in rank order (fewer steps than an all-reduce for so
// few values, and bitwise alike on every rank); undefined gradients count as
// zeros. Returns float64. Packed as the forward's rows are, with a header
// (backward exchange number, kind, layer id, channels), so that ranks out of step
// (one in backward, another in its next forward: a rank whose loss does not
// use a call's output makes no backward exchange for it) fail with a
// BarrierError on every rank, whatever the transport. `zeros_device`: where this
// rank's zeros go when both gradients are undefined (default: the CPU; give the
// statistics' device, so that every rank of an NCCL group sends CUDA rows).
SYNCBN_API std::pair<at::Tensor, at::Tensor> sum_across_processes(const ProcessGroupPtr& group, int64_t layer_id,
                                                                  const at::Tensor& grad_mean,
                                                                  const at::Tensor& grad_var, int64_t channels,
                                                                  const std::string& label,
                                                                  std::optional<at::Device> zeros_device = std::nullopt);

// Whether `group` synchronizes anything: not null, and more than one rank.
SYNCBN_API bool spans_processes(const ProcessGroupPtr& group);

// Names `group`'s ranks in error messages by the numbers the user knows them
// by too: `global_ranks[r]` for the group's rank r (for a subgroup, its ranks
// in the world group: torch.distributed.get_process_group_ranks). Errors list
// the group's own rank numbers and add this mapping. Optional; the Python
// layers set it for every group torch.distributed made.
SYNCBN_API void set_global_ranks(const ProcessGroupPtr& group, std::vector<int64_t> global_ranks);

// How this process's synchronized layers exchange with the rest of `group`:
// "shared memory" (every rank on this host: the default for CPU tensors),
// "process group" (the group's own backend: ranks on several hosts,
// SYNCBN_SHARED_MEMORY=0 on some rank, GPU tensors), or "not yet" (no
// synchronized call on the group so far: it is decided at the first, alike on
// every rank). Rows larger than the shared slots (more than 4092 channels) go
// through the backend either way.
SYNCBN_API std::string cross_process_transport(const ProcessGroupPtr& group);

// Called about every 50 ms by a rank waiting for the others in a shared-memory
// exchange (the Python bindings deliver Ctrl-C this way); whatever it throws
// ends the wait, leaving the exchange out of step (every later one on the group
// fails). Empty: none (the default).
SYNCBN_API void set_cross_process_wait_hook(std::function<void()> hook);

}  // namespace syncbn

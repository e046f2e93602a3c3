#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include <ATen/core/Tensor.h>

#include <syncbn/batch_norm.h>
#include <syncbn/batch_norm_channel.h>
#include <syncbn/call_records.h>
#include <syncbn/cross_process.h>
#include <syncbn/export.h>
#include <syncbn/message.h>
#include <syncbn/replica_backward.h>
#include <syncbn/sync_master.h>

// The synchronized training-mode BatchNorm forward, with autograd across replicas.
//
// Backward never waits on a barrier: the merge is one autograd node whose
// inputs are every replica's local statistics, so autograd itself sums the
// replicas' gradient contributions and routes each replica its share (or, when
// a wrapper runs each replica's backward on its own thread, the replicas meet
// at that node: see ReplicaBackward). The master gives every copy its merged
// statistics through a node of the copy's own, so no autograd node is touched
// by two replica threads.
namespace syncbn {

// One replica's statistics message in, the merged statistics out:
// SyncMaster::run_master on copy 0, SlavePipe::run_slave on the others.
using StatisticsExchange = std::function<Message(Message)>;

// The master callback of a BatchNorm SyncMaster: merges every copy's statistics
// (differentiably) and hands every copy the whole batch's mean and variance.
// A whole batch of one value per channel raises nn.BatchNorm's ValueError, in
// every copy. `backward`: the replication's (its merge nodes meet there when
// the replicas' backward runs in parallel); none: always serial.
SYNCBN_API MasterCallback batch_norm_master_callback(std::shared_ptr<ReplicaBackward> backward = nullptr);

// The exchange of a replica that is alone (no replication): merges its own statistics.
SYNCBN_API StatisticsExchange local_exchange();

// Where one synchronized layer's statistics are merged: through its copy's
// channel of a replication, as layer `layer` (its module position) named `name`;
// or, without a channel, alone. With a process group of several ranks, the
// result is merged again across the group (see cross_process.h), the layer
// known there by `layer_id` (the same on every rank: its construction order).
struct LayerSync {
  std::shared_ptr<BatchNormChannel> channel;
  int64_t layer = -1;
  std::string name;
  ProcessGroupPtr process_group;
  int64_t layer_id = -1;
  // Without a channel, across processes: the layer's calls made under saved-tensor hooks (a checkpointed block's
  // forward), so that their recomputation inside backward reuses the merged statistics instead of exchanging
  // again (which ranks recomputing through a replica's channel would not do) and writes nothing. Optional.
  std::shared_ptr<CallRecords> recent_calls;
};

// Training-mode BatchNorm of one replica's slice with statistics over every
// replica's slices. When running_mean/running_var are given (pass them on the
// master only, or when alone), they are updated from the merged statistics with
// `exponential_average_factor` (the unbiased variance, as nn.BatchNorm), and
// num_batches_tracked, when given, counts the batch, once the merged statistics
// arrived: a pass that fails writes nothing, and neither does a replica whose
// replication was closed. Differentiable in input, weight and bias, across
// replicas.
//
// Inside backward (torch.utils.checkpoint recomputing a block with
// use_reentrant=False), a replicated layer takes the original call's merged
// statistics from its channel instead of the barrier, and writes nothing: the
// recomputation repeats the original graph and the gradients are the whole
// batch's.
SYNCBN_API at::Tensor sync_batch_norm_train(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                            const std::optional<at::Tensor>& bias,
                                            const std::optional<at::Tensor>& running_mean,
                                            const std::optional<at::Tensor>& running_var,
                                            const std::optional<at::Tensor>& num_batches_tracked,
                                            double exponential_average_factor, double eps, EpsMode eps_mode,
                                            const LayerSync& sync);

// The same through a plain exchange function (a barrier driven by hand): no
// layer tags, no recomputation support, no num_batches_tracked.
SYNCBN_API at::Tensor sync_batch_norm_train(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                            const std::optional<at::Tensor>& bias,
                                            const std::optional<at::Tensor>& running_mean,
                                            const std::optional<at::Tensor>& running_var,
                                            double exponential_average_factor, double eps, EpsMode eps_mode,
                                            const StatisticsExchange& exchange);

}  // namespace syncbn

// Private to the core: the autograd nodes that merge every replica's BatchNorm
// statistics (see batch_norm_functions.h for the whole graph).
//
// MergeStats takes every copy's (mean_i, m2_i) and gives the whole batch's
// (mean, var); each copy receives them through a ShareStats node of its own.
// Both are made by the master, on its thread, and get explicit sequence numbers
// that the replicas reserved at the same point of their forward, so that every
// replica's graph orders its nodes alike (see ReplicaBackward). Making an edge
// to a node writes to that node: R threads linking their Normalize_i to one
// shared node would race, so no node is linked from two threads.
//
// That graph joins the replicas' graphs at MergeStats: autograd runs every
// replica's backward on one thread (serial, the default), MergeStats gets every
// ShareStats_i's gradient summed and hands each LocalStats_i its share, with no
// waiting. When a wrapper runs each replica's backward on a thread of its own
// (ReplicaBackward::parallel, decided before the forward), the replicas' graphs
// must not meet: each copy makes its own ReplicaMerge node from its own
// statistics, and the copies meet there in backward (a rendezvous: the last to
// arrive sums every copy's gradient of (mean, var), in copy order).
#pragma once

#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>

#include <syncbn/cross_process.h>
#include <syncbn/replica_backward.h>

namespace syncbn::detail {

using torch::autograd::variable_list;

// The statistics one synchronized call merged: of this process's replicas, and
// of the whole process group when it spans several processes. `total` counts
// every value merged; mean and var in the statistics dtype.
struct Merged {
  at::Tensor mean, var;
  int64_t total = 0;
};

// A merge node's gradient of (mean, var) is the whole group's: summed across
// processes (one all-reduce) when `call.group` spans several.
std::pair<at::Tensor, at::Tensor> group_gradient(const GroupCall& call, const at::Tensor& grad_mean,
                                                 const at::Tensor& grad_var, const at::Tensor& like);

// group_gradient with a graph, for a backward under create_graph across
// processes: every rank's result is the sum of every rank's (a, b), so the
// gradient of each rank's (a, b) is the same sum of the gradients coming in,
// across the group again (GroupSumNode, itself differentiable). Every rank must
// take the same path through its backward, as for the first derivatives.
std::pair<at::Tensor, at::Tensor> group_sum_with_graph(const GroupCall& call, const at::Tensor& a, const at::Tensor& b,
                                                       const at::Tensor& like);

struct GroupSumNode : torch::autograd::Node {
  GroupSumNode(GroupCall call, at::Tensor like) : call_(std::move(call)), like_(std::move(like)) {}
  variable_list apply(variable_list&& grads) override;
  std::string name() const override { return "syncbn::GroupSumBackward"; }

 private:
  const GroupCall call_;
  const at::Tensor like_;  // (C,): the sums' size, dtype and device
};

struct MergeStatsNode : torch::autograd::Node {
  // The merged `mean` (C,), every copy's local mean (with its graph: a backward
  // under create_graph differentiates the merge through them), the counts and
  // the total (over every process) are what backward needs; `devices[i]` is
  // copy i's, where its gradient goes.
  MergeStatsNode(uint64_t sequence_nr, std::vector<int64_t> counts, int64_t total, at::Tensor mean,
                 std::vector<at::Tensor> local_means, std::vector<at::Device> devices, GroupCall call);

  variable_list apply(variable_list&& grads) override;
  std::string name() const override { return "syncbn::MergeStatsBackward"; }

 private:
  const std::vector<int64_t> counts_;
  const int64_t total_;
  const at::Tensor mean_;
  const std::vector<at::Tensor> local_means_;
  const std::vector<at::Device> devices_;
  const GroupCall call_;
};

// d mean_i and d m2_i of a copy with `count` of the `total` values and local
// mean `local_mean`, from the whole batch's d mean and d var (undefined: zero):
// mean = sum n_i mean_i / n; var = (sum m2_i + sum n_i (mean_i - mean)^2) / n, so
// d/d mean_i = n_i/n (d mean + 2 (mean_i - mean) d var) and d/d m2_i = d var / n.
std::pair<at::Tensor, at::Tensor> merge_backward(const at::Tensor& local_mean, const at::Tensor& mean, int64_t count,
                                                 int64_t total, const at::Tensor& grad_mean,
                                                 const at::Tensor& grad_var);

// One copy's merge in a parallel backward: (mean_i, m2_i) -> the whole batch's
// (mean, var), made by the copy itself; in backward the copies meet at `point`.
struct ReplicaMergeNode : torch::autograd::Node {
  ReplicaMergeNode(int64_t copy, int64_t count, int64_t total, at::Tensor local_mean, at::Tensor mean,
                   std::shared_ptr<ReplicaBackward> backward, std::shared_ptr<ReplicaBackward::Point> point,
                   GroupCall call);
  variable_list apply(variable_list&& grads) override;
  std::string name() const override { return "syncbn::ReplicaMergeBackward"; }

 private:
  const int64_t copy_, count_, total_;
  const at::Tensor local_mean_, mean_;
  const std::shared_ptr<ReplicaBackward> backward_;
  const std::shared_ptr<ReplicaBackward::Point> point_;
  const GroupCall call_;
};

struct ShareStatsNode : torch::autograd::Node {
  explicit ShareStatsNode(uint64_t sequence_nr) : Node(sequence_nr) {}
  variable_list apply(variable_list&& grads) override { return std::move(grads); }
  std::string name() const override { return "syncbn::ShareStatsBackward"; }
};

// The whole batch's statistics from every copy's (and every process's, when
// `call.group` spans several), without a graph.
Merged merge_values(const std::vector<at::Tensor>& means, const std::vector<at::Tensor>& m2s,
                    const std::vector<int64_t>& counts, const GroupCall& call);

// Whether any of the tensors requires grad. (Each copy's statistics were made on
// its own thread, so their flags carry that thread's grad mode, where the
// thread merging them may run under another.)
bool any_requires_grad(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b);

// The merged statistics with their graph, for a serial backward: every copy's
// (mean, var), each through its own ShareStats node. Without a copy whose
// statistics require grad, plain tensors. `share_sequence_nrs[i]`
// is copy i's reserved sequence number for its ShareStats, `merge_sequence_nr`
// the master's for MergeStats.
std::vector<std::pair<at::Tensor, at::Tensor>> merge_with_graph(const std::vector<at::Tensor>& means,
                                                                const std::vector<at::Tensor>& m2s,
                                                                const std::vector<int64_t>& counts,
                                                                const Merged& merged, uint64_t merge_sequence_nr,
                                                                const std::vector<uint64_t>& share_sequence_nrs,
                                                                const GroupCall& call);

// Copy `copy`'s (mean, var) for a parallel backward: through its own
// ReplicaMerge node from its (local_mean, local_m2), when some copy's
// statistics require grad (the master tells) and this copy records gradients;
// and the node's anchor where this copy's own statistics have none (see
// ReplicationGroup::keep_merge), else undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> replica_merge(int64_t copy, const at::Tensor& local_mean, const at::Tensor& local_m2,
                                                int64_t count, const Merged& merged, bool any_copy_requires_grad,
                                                std::shared_ptr<ReplicaBackward> backward,
                                                std::shared_ptr<ReplicaBackward::Point> point, GroupCall call);

}  // namespace syncbn::detail

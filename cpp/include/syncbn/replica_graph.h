#pragma once

#include <vector>

#include <ATen/core/Tensor.h>

#include <syncbn/export.h>

namespace syncbn {

// The autograd graphs of one replication's outputs, each cut at its replica's
// boundary (the tensors its backward task computes gradients for: its inputs
// and its parameters' views).
struct ReplicaGraphs {
  // No node is reached from two replicas (leaves aside; a synchronized layer's
  // merge node counts as each replica's own): each replica's backward can run
  // on a thread of its own.
  bool disjoint = true;
  // Per replica: the leaves requiring grad its graph reaches outside its
  // boundary (tensors the forward used without their passing through the
  // replication: their gradients must be computed too).
  std::vector<std::vector<at::Tensor>> foreign_leaves;
};

// Walks every replica's graph from `outputs[i]`, stopping at `boundaries[i]`.
SYNCBN_API ReplicaGraphs analyze_replica_graphs(const std::vector<std::vector<at::Tensor>>& outputs,
                                                const std::vector<std::vector<at::Tensor>>& boundaries);

// Which of `targets` (undefined, or tensors with a grad_fn) a backward from
// `starts` would reach: whether each target's node is on the starts' graph, cut
// at `boundary` (whose nodes are reached but not walked past).
SYNCBN_API std::vector<bool> reaches(const std::vector<at::Tensor>& starts, const std::vector<at::Tensor>& targets,
                                     const std::vector<at::Tensor>& boundary);

}  // namespace syncbn

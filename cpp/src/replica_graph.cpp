#include <syncbn/replica_graph.h>

#include <unordered_map>
#include <unordered_set>

#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/variable.h>


namespace syncbn {

namespace {

using torch::autograd::Node;

// The nodes a backward reaches `tensors` by (their grad_fn, or a leaf's gradient accumulator), for those that
// require grad.
std::vector<Node*> gradient_nodes(const std::vector<at::Tensor>& tensors) {
  std::vector<Node*> nodes;
  for (const auto& tensor : tensors) {
    if (!tensor.defined() || !tensor.requires_grad()) continue;
    if (auto fn = torch::autograd::impl::gradient_edge(tensor).function) nodes.push_back(fn.get());
  }
  return nodes;
}

std::unordered_set<const Node*> boundary_nodes(const std::vector<at::Tensor>& boundary) {
  const std::vector<Node*> nodes = gradient_nodes(boundary);
  return {nodes.begin(), nodes.end()};
}

}  // namespace

ReplicaGraphs analyze_replica_graphs(const std::vector<std::vector<at::Tensor>>& outputs,
                                     const std::vector<std::vector<at::Tensor>>& boundaries) {
  const size_t replicas = outputs.size();
  TORCH_CHECK_VALUE(boundaries.size() == replicas, "analyze_replica_graphs: ", replicas, " replicas' outputs but ",
                    boundaries.size(), " boundaries");
  ReplicaGraphs result;
  result.foreign_leaves.resize(replicas);
  std::unordered_map<const Node*, size_t> owner;  // non-leaf node -> the replica that reached it first
  for (size_t replica = 0; replica < replicas; ++replica) {
    const std::unordered_set<const Node*> stop = boundary_nodes(boundaries[replica]);
    std::vector<Node*> pending = gradient_nodes(outputs[replica]);
    std::unordered_set<const Node*> visited;
    while (!pending.empty()) {
      Node* node = pending.back();
      pending.pop_back();
      if (node == nullptr || stop.count(node) != 0 || !visited.insert(node).second) continue;
      if (auto* accumulate = dynamic_cast<torch::autograd::AccumulateGrad*>(node)) {
        result.foreign_leaves[replica].push_back(accumulate->variable);  // once: `visited` lets it through once
        continue;  // a leaf: shared by several replicas is fine (its gradients are summed)
      }
      auto [it, first] = owner.emplace(node, replica);
      if (!first && it->second != replica) {
        result.disjoint = false;  // two replicas' graphs meet here: their backward must run on one thread
        return result;
      }
      for (const auto& edge : node->next_edges()) pending.push_back(edge.function.get());
    }
  }
  return result;
}

std::vector<bool> reaches(const std::vector<at::Tensor>& starts, const std::vector<at::Tensor>& targets,
                          const std::vector<at::Tensor>& boundary) {
  std::unordered_map<const Node*, std::vector<size_t>> wanted;  // node -> the targets it stands for
  for (size_t i = 0; i < targets.size(); ++i) {
    if (!targets[i].defined()) continue;
    if (auto fn = torch::autograd::impl::gradient_edge(targets[i]).function) wanted[fn.get()].push_back(i);
  }
  std::vector<bool> reached(targets.size(), false);
  size_t left = wanted.size();
  const std::unordered_set<const Node*> stop = boundary_nodes(boundary);
  std::vector<Node*> pending = gradient_nodes(starts);
  std::unordered_set<const Node*> visited;
  while (!pending.empty() && left > 0) {
    Node* node = pending.back();
    pending.pop_back();
    if (node == nullptr || !visited.insert(node).second) continue;
    if (auto it = wanted.find(node); it != wanted.end()) {
      for (size_t i : it->second) reached[i] = true;
      --left;
    }
    if (stop.count(node) != 0) continue;  // reached, not walked past
    for (const auto& edge : node->next_edges()) pending.push_back(edge.function.get());
  }
  return reached;
}

}  // namespace syncbn

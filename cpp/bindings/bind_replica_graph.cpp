#include <ATen/SequenceNumber.h>
#include <torch/csrc/autograd/graph_task.h>

#include <syncbn/once_differentiable.h>
#include <syncbn/replica_graph.h>

#include "bindings.h"

namespace syncbn::python {

namespace py = pybind11;

void bind_replica_graph(py::module_& m) {
  m.def(
      "analyze_replica_graphs",
      [](const std::vector<std::vector<at::Tensor>>& outputs, const std::vector<std::vector<at::Tensor>>& boundaries) {
        ReplicaGraphs graphs;
        {
          py::gil_scoped_release no_gil;
          graphs = analyze_replica_graphs(outputs, boundaries);
        }
        return py::make_tuple(graphs.disjoint, graphs.foreign_leaves);
      },
      py::arg("outputs"), py::arg("boundaries"),
      "(disjoint, foreign_leaves): whether the replicas' graphs, cut at their boundaries, share no node, and the "
      "leaves each reaches outside its boundary.");
  m.def(
      "reaches",
      [](const std::vector<at::Tensor>& starts, const std::vector<std::optional<at::Tensor>>& targets,
         const std::vector<at::Tensor>& boundary) {
        std::vector<at::Tensor> defined;
        for (const auto& target : targets) defined.push_back(target.value_or(at::Tensor()));
        py::gil_scoped_release no_gil;
        return reaches(starts, defined, boundary);
      },
      py::arg("starts"), py::arg("targets"), py::arg("boundary"),
      "Per target (None: never): whether a backward from `starts` reaches its grad_fn, not walking past `boundary`.");
  m.def(
      "peek_sequence_number", [] { return at::sequence_number::peek(); },
      "The calling thread's next autograd sequence number.");
  m.def(
      "align_sequence_number",
      [](uint64_t target) {
        while (at::sequence_number::peek() < target) at::sequence_number::get_and_increment();
      },
      py::arg("target"),
      "Advances the calling thread's autograd sequence numbers to `target`, so that replicas that build the same "
      "graph number its nodes alike.");
  m.def(
      "current_graph_task_keep_graph", [] { return torch::autograd::get_current_graph_task_keep_graph(); },
      "Inside backward: whether the running backward keeps its graph (retain_graph).");
  m.def(
      "once_differentiable",
      [](const std::vector<std::optional<at::Tensor>>& grads, const std::string& message,
         const std::vector<at::Tensor>& computed_from) {
        std::vector<at::Tensor> tensors;
        for (const auto& grad : grads) tensors.push_back(grad.value_or(at::Tensor()));
        std::vector<std::optional<at::Tensor>> result;
        for (auto& tensor : once_differentiable(std::move(tensors), message, computed_from)) {
          result.push_back(tensor.defined() ? std::optional<at::Tensor>(std::move(tensor)) : std::nullopt);
        }
        return result;
      },
      py::arg("grads"), py::arg("message"), py::arg("computed_from") = std::vector<at::Tensor>(),
      "The gradients (None kept) detached, each an output of one autograd node that raises `message` when a "
      "second backward reaches it; `computed_from` (the gradients that came in) are its next edges, so that a "
      "second backward toward what they depend on reaches it.");
}

}  // namespace syncbn::python

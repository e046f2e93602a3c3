#pragma once

#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include <syncbn/export.h>

namespace syncbn {

// Gradients that a backward computed without a graph, made to fail a second
// backward through them with `message` (torch's @once_differentiable): each
// defined tensor, detached, becomes an output of one autograd Error node, so it
// requires grad and a double backward that reaches it raises instead of silently
// missing its second-order terms. Undefined tensors stay undefined.
//
// `computed_from`: the tensors the gradients were computed from (the gradients
// that came in), the node's next edges. torch.autograd.grad(..., inputs) runs
// only the nodes on a path to its inputs: without those edges it skips the node
// and returns zeros (or None) for what depends on the gradients, where it must
// raise (torch.autograd.functional.hessian, hvp, jvp).
SYNCBN_API std::vector<at::Tensor> once_differentiable(std::vector<at::Tensor> grads, const std::string& message,
                                                       const std::vector<at::Tensor>& computed_from = {});

}  // namespace syncbn

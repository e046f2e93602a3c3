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
SYNCBN_API std::vector<at::Tensor> once_differentiable(std::vector<at::Tensor> grads, const std::string& message);

}  // namespace syncbn

// Private to the core: backward_reduce and backward_elemt for a backward that
// builds a graph (create_graph=True, a double backward to come). The ops'
// CPU kernels are not differentiable; these are their ATen implementation
// (the same math, which serves every other device), called directly so that
// autograd records it.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace syncbn::detail {

std::tuple<at::Tensor, at::Tensor> backward_reduce_with_graph(const at::Tensor& grad_out, const at::Tensor& input,
                                                              const at::Tensor& mean);

at::Tensor backward_elemt_with_graph(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                                     const at::Tensor& dy_scale, const at::Tensor& x_scale, const at::Tensor& shift);

}  // namespace syncbn::detail

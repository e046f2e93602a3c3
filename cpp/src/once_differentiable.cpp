#include <syncbn/once_differentiable.h>

#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>

namespace syncbn {

std::vector<at::Tensor> once_differentiable(std::vector<at::Tensor> grads, const std::string& message,
                                            const std::vector<at::Tensor>& computed_from) {
  auto error = c10::make_intrusive<torch::autograd::Error>(message, torch::autograd::collect_next_edges(computed_from));
  for (auto& grad : grads) {
    if (!grad.defined()) continue;
    grad = grad.detach();
    torch::autograd::set_history(grad, error);
  }
  return grads;
}

}  // namespace syncbn

// Private to the core: the per-replica autograd functions of the synchronized
// BatchNorm forward (the merge across replicas is in merge_nodes.h).
//
// The graph of one pass over R replicas:
//
//   x_i -> LocalStats_i -> (mean_i, m2_i) ---> MergeStats -> (mean, var) -> ShareStats_i -> (mean, var)_i
//            |                                  (master)                    (one per copy,       |
//            |                                                               made by the master) |
//            +-- (dy token, scale token) ----> Normalize_i(x_i, (mean, var)_i, w, b) -> y_i <-----+
//
// LocalStats_i then computes dx_i in one pass: Normalize_i passes dy_i and the
// per-channel scale w * invstd to LocalStats_i as the gradients of two token
// inputs (zero-cost tensors LocalStats_i outputs and Normalize_i ignores), so
// the input gradient is one elementwise pass, as in nn.BatchNorm, instead of
// two gradients that autograd would have to add.
//
// Under create_graph (a double backward to come: a gradient penalty) both
// backwards build their gradients of differentiable ATen ops, and so does the
// merge of a serial backward, across processes too (merge_nodes.h): a second
// backward then gets the whole batch's second-order terms. (A checkpoint
// recomputation's recalled statistics are saved tensors: autograd gives them
// back with the forward's graph.) The merge of a parallel backward cannot be
// differentiated again: it fails a second backward with a message instead of
// silently missing its terms (torch's @once_differentiable, in C++).
#pragma once

#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <syncbn/batch_norm.h>

#include "differentiable_ops.h"
#include "inverse_std.h"

namespace syncbn::detail {

using torch::autograd::AutogradContext;
using torch::autograd::Function;
using torch::autograd::variable_list;

// Values per channel in an (N, C, *) input.
inline int64_t count_per_channel(const at::Tensor& input) {
  int64_t count = 1;
  for (int64_t d = 0; d < input.dim(); ++d) {
    if (d != 1) count *= input.size(d);
  }
  return count;
}

struct LocalStatsFunction : Function<LocalStatsFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input) {
    auto [mean, m2] = local_stats(input);
    at::Tensor dy_token = at::zeros({}, input.options()).expand(input.sizes());
    at::Tensor scale_token = at::zeros_like(mean);
    ctx->save_for_backward({input, mean});
    ctx->saved_data["count"] = count_per_channel(input);
    ctx->set_materialize_grads(false);
    return {mean, m2, dy_token, scale_token};
  }

  // grads: (d mean_i, d m2_i, dy_i, w * invstd). Returns (dx).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool create_graph = c10::GradMode::is_enabled();  // autograd's grad mode in backward
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& mean = saved[1];
    const int64_t count = ctx->saved_data["count"].toInt();
    const at::Tensor &grad_mean = grads[0], &grad_m2 = grads[1], &dy = grads[2], &scale = grads[3];
    if (!dy.defined() && !grad_mean.defined() && !grad_m2.defined()) return {at::Tensor()};
    // An empty input's gradient is empty; under create_graph it keeps its graph all the same, so that a second
    // backward on this rank reaches the sums across processes that the other ranks' make (merge_nodes.h).
    if (count == 0 && !create_graph) return {at::zeros_like(input)};
    // dx = dy * w * invstd + d mean_i / n_i + 2 d m2_i (x - mean_i)
    at::Tensor zeros = at::zeros_like(mean);
    at::Tensor dy_scale = scale.defined() ? scale : zeros;
    at::Tensor x_scale = grad_m2.defined() ? grad_m2 * 2 : zeros;
    at::Tensor shift = grad_mean.defined() ? grad_mean / static_cast<double>(std::max<int64_t>(count, 1)) : zeros;
    const at::Tensor& grad_out = dy.defined() ? dy : at::zeros_like(input);
    at::Tensor grad_input = create_graph ? backward_elemt_with_graph(grad_out, input, mean, dy_scale, x_scale, shift)
                                         : backward_elemt(grad_out, input, mean, dy_scale, x_scale, shift);
    return {grad_input};
  }
};

struct NormalizeFunction : Function<NormalizeFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& mean,
                            const at::Tensor& var, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& dy_token,
                            const at::Tensor& scale_token, double eps, int64_t eps_mode) {
    at::Tensor output = normalize(input, mean, var, weight, bias, eps, static_cast<EpsMode>(eps_mode));
    ctx->save_for_backward({input, mean, var, weight.value_or(at::Tensor())});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["eps_mode"] = eps_mode;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["bias_dtype"] = bias.has_value() && bias->defined() ? bias->scalar_type() : at::kFloat;
    ctx->set_materialize_grads(false);
    return output;
  }

  // Returns: input (routed through the dy token instead), mean, var, weight, bias,
  // dy token (dy itself), scale token (w * invstd), eps, eps_mode.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool create_graph = c10::GradMode::is_enabled();  // autograd's grad mode in backward
    const at::Tensor& dy = grads[0];
    variable_list result(9);
    if (!dy.defined()) return result;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &mean = saved[1], &var = saved[2], &weight = saved[3];
    const double eps = ctx->saved_data["eps"].toDouble();
    const auto mode = static_cast<EpsMode>(ctx->saved_data["eps_mode"].toInt());
    auto [sum_dy, sum_dy_xmu] =
        create_graph ? backward_reduce_with_graph(dy, input, mean) : backward_reduce(dy, input, mean);
    at::Tensor invstd = backward_inverse_std(var, at::toOpMathType(input.scalar_type()), eps, mode);
    at::Tensor weight_acc = weight.defined() ? weight.to(invstd.scalar_type()) : at::Tensor();
    at::Tensor scale = weight.defined() ? invstd * weight_acc : invstd;
    at::Tensor grad_invstd = weight.defined() ? sum_dy_xmu * weight_acc : sum_dy_xmu;
    result[1] = -scale * sum_dy;
    result[2] = grad_invstd * inverse_std_grad(var, invstd, eps, mode);
    if (weight.defined()) result[3] = (sum_dy_xmu * invstd).to(weight.scalar_type());
    if (ctx->saved_data["has_bias"].toBool()) result[4] = sum_dy.to(ctx->saved_data["bias_dtype"].toScalarType());
    result[5] = dy;
    result[6] = scale;
    return result;
  }
};

}  // namespace syncbn::detail

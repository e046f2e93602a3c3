// Private to the core: the autograd nodes of the synchronized BatchNorm forward.
//
// The graph of one pass over R replicas:
//
//   x_i -> LocalStats_i -> (mean_i, m2_i) ---> MergeStats -> (mean, var) -> ShareStats_i -> (mean, var)_i
//            |                                  (master)                    (one per copy,       |
//            |                                                               made by the master) |
//            +-- (dy token, scale token) ----> Normalize_i(x_i, (mean, var)_i, w, b) -> y_i <-----+
//
// Backward needs no barrier: autograd sums every ShareStats_i's gradient for the
// shared (mean, var), MergeStats hands each LocalStats_i its share, and
// LocalStats_i then computes dx_i in one pass. Normalize_i passes dy_i and the
// per-channel scale w * invstd to LocalStats_i as the gradients of two token
// inputs (zero-cost tensors LocalStats_i outputs and Normalize_i ignores), so
// the input gradient is one elementwise pass, as in nn.BatchNorm, instead of
// two gradients that autograd would have to add.
//
// Every node is created, and gets its graph edges, on one thread: MergeStats and
// the ShareStats_i on the master's, LocalStats_i and Normalize_i on replica i's.
// (Making an edge to a node writes to that node, so R threads linking their
// Normalize_i to one shared node would race.)
#pragma once

#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <syncbn/batch_norm.h>

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

  // grads: (d mean_i, d m2_i, dy_i, w * invstd).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& mean = saved[1];
    const int64_t count = ctx->saved_data["count"].toInt();
    const at::Tensor &grad_mean = grads[0], &grad_m2 = grads[1], &dy = grads[2], &scale = grads[3];
    if (!dy.defined() && !grad_mean.defined() && !grad_m2.defined()) return {at::Tensor()};
    if (count == 0) return {at::zeros_like(input)};
    // dx = dy * w * invstd + d mean_i / n_i + 2 d m2_i (x - mean_i)
    at::Tensor zeros = at::zeros_like(mean);
    at::Tensor dy_scale = scale.defined() ? scale : zeros;
    at::Tensor x_scale = grad_m2.defined() ? grad_m2 * 2 : zeros;
    at::Tensor shift = grad_mean.defined() ? grad_mean / static_cast<double>(count) : zeros;
    return {backward_elemt(dy.defined() ? dy : at::zeros_like(input), input, mean, dy_scale, x_scale, shift)};
  }
};

struct MergeStatsFunction : Function<MergeStatsFunction> {
  static variable_list forward(AutogradContext* ctx, at::TensorList means, at::TensorList m2s,
                               std::vector<int64_t> counts) {
    const at::Device device = means[0].device();
    std::vector<at::Tensor> local_means, local_m2s;
    for (size_t i = 0; i < means.size(); ++i) {
      local_means.push_back(means[i].to(device));
      local_m2s.push_back(m2s[i].to(device));
    }
    at::Tensor stacked_means = at::stack(local_means);
    at::Tensor count_tensor = at::tensor(counts, at::TensorOptions().dtype(at::kLong)).to(device);
    auto [mean, var] = merge_stats(count_tensor, stacked_means, at::stack(local_m2s));
    std::vector<std::string> devices;  // each replica's gradient goes back to its own device
    for (const auto& m : means) devices.push_back(m.device().str());
    ctx->save_for_backward({stacked_means, mean});
    ctx->saved_data["counts"] = counts;
    ctx->saved_data["devices"] = devices;
    ctx->set_materialize_grads(false);
    return {mean, var};
  }

  // mean = sum n_i mean_i / n; var = (sum m2_i + sum n_i (mean_i - mean)^2) / n, so
  // d/d mean_i = n_i/n (d mean + 2 (mean_i - mean) d var) and d/d m2_i = d var / n.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& stacked_means = saved[0];
    const at::Tensor& mean = saved[1];
    const auto counts = ctx->saved_data["counts"].toIntVector();
    const auto devices = ctx->saved_data["devices"].toList();  // of strings
    const at::Tensor &grad_mean = grads[0], &grad_var = grads[1];
    const size_t replicas = counts.size();
    variable_list result(2 * replicas + 1);  // means..., m2s..., counts
    if (!grad_mean.defined() && !grad_var.defined()) return result;
    int64_t total = 0;
    for (int64_t n : counts) total += n;
    if (total == 0) return result;
    at::Tensor weights = (at::tensor(counts, stacked_means.options().dtype(at::kDouble)) / static_cast<double>(total))
                             .to(stacked_means.scalar_type())
                             .unsqueeze(1);
    at::Tensor grad_means = at::zeros_like(stacked_means);
    if (grad_mean.defined()) grad_means = grad_means + grad_mean.unsqueeze(0) * weights;
    if (grad_var.defined()) grad_means = grad_means + (stacked_means - mean) * (grad_var.unsqueeze(0) * 2) * weights;
    at::Tensor grad_m2 = grad_var.defined() ? grad_var / static_cast<double>(total) : at::Tensor();
    for (size_t i = 0; i < replicas; ++i) {
      const at::Device device(devices.get(i).toStringRef());
      result[i] = grad_means[i].to(device);
      if (grad_m2.defined()) result[replicas + i] = grad_m2.to(device);
    }
    return result;
  }
};

// The merged statistics as one copy receives them: a node of the copy's own
// (made by the master), so that the copy's Normalize links to it, not to the
// MergeStats node every copy shares. Backward passes the gradients through.
struct ShareStatsFunction : Function<ShareStatsFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& mean, const at::Tensor& var) {
    ctx->set_materialize_grads(false);
    return {mean.clone(), var.clone()};
  }
  static variable_list backward(AutogradContext*, variable_list grads) { return {grads[0], grads[1]}; }
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
    const at::Tensor& dy = grads[0];
    variable_list result(9);
    if (!dy.defined()) return result;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &mean = saved[1], &var = saved[2], &weight = saved[3];
    const double eps = ctx->saved_data["eps"].toDouble();
    const auto mode = static_cast<EpsMode>(ctx->saved_data["eps_mode"].toInt());
    auto [sum_dy, sum_dy_xmu] = backward_reduce(dy, input, mean);
    at::Tensor invstd = inverse_std(var, eps, mode);
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

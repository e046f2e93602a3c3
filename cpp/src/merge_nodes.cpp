#include "merge_nodes.h"

#include <algorithm>

#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/variable.h>

#include <syncbn/batch_norm.h>
#include <syncbn/once_differentiable.h>

#include "cpu/batch_norm_kernels.h"
#include "host_values.h"

namespace syncbn::detail {

bool any_requires_grad(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  for (const auto* list : {&a, &b}) {
    for (const auto& t : *list) {
      if (t.requires_grad()) return true;
    }
  }
  return false;
}

namespace {

// `tensor` (a fresh alias of it) as an output of `node`.
at::Tensor output_of(const at::Tensor& tensor, const c10::intrusive_ptr<torch::autograd::Node>& node) {
  at::Tensor output = tensor.detach();
  torch::autograd::set_history(output, node);
  return output;
}

}  // namespace

std::pair<at::Tensor, at::Tensor> merge_backward(const at::Tensor& local_mean, const at::Tensor& mean, int64_t count,
                                                 int64_t total, const at::Tensor& grad_mean,
                                                 const at::Tensor& grad_var) {
  if (total == 0 || (!grad_mean.defined() && !grad_var.defined())) return {};
  const double weight = static_cast<double>(count) / static_cast<double>(total);
  at::Tensor grad_local_mean = at::zeros_like(local_mean);
  if (grad_mean.defined()) grad_local_mean = grad_local_mean + grad_mean * weight;
  if (grad_var.defined()) grad_local_mean = grad_local_mean + (local_mean - mean) * grad_var * (2 * weight);
  at::Tensor grad_m2 = grad_var.defined() ? grad_var / static_cast<double>(total) : at::Tensor();
  return {grad_local_mean, grad_m2};
}

std::pair<at::Tensor, at::Tensor> group_gradient(const GroupCall& call, const at::Tensor& grad_mean,
                                                 const at::Tensor& grad_var, const at::Tensor& like) {
  if (!spans_processes(call.group)) return {grad_mean, grad_var};
  auto [mean_sum, var_sum] = sum_across_processes(call.group, call.layer_id, grad_mean, grad_var, like.numel(),
                                                     call.label, like.device());
  return {mean_sum.to(like.options()), var_sum.to(like.options())};
}

std::pair<at::Tensor, at::Tensor> group_sum_with_graph(const GroupCall& call, const at::Tensor& a, const at::Tensor& b,
                                                       const at::Tensor& like) {
  if (!spans_processes(call.group)) return {a, b};
  at::Tensor a_sum, b_sum;
  {
    at::NoGradGuard no_grad;
    std::tie(a_sum, b_sum) = group_gradient(call, a, b, like);
  }
  // A node even where neither requires grad (a rank with an empty batch): the other ranks' second backward sums
  // through theirs, and this rank's must reach its own to take part.
  auto node = c10::make_intrusive<GroupSumNode>(call, like.detach());
  node->set_next_edges(torch::autograd::collect_next_edges(a, b));
  at::Tensor a_out = output_of(a_sum, node);  // input 0 of the node in backward
  at::Tensor b_out = output_of(b_sum, node);  // input 1
  return {std::move(a_out), std::move(b_out)};
}

variable_list GroupSumNode::apply(variable_list&& grads) {
  // Always across the group, undefined gradients as zeros: every rank's backward reaches this sum alike.
  auto [a, b] = c10::GradMode::is_enabled() ? group_sum_with_graph(call_, grads[0], grads[1], like_)
                                            : group_gradient(call_, grads[0], grads[1], like_);
  return {a, b};
}

MergeStatsNode::MergeStatsNode(uint64_t sequence_nr, std::vector<int64_t> counts, int64_t total, at::Tensor mean,
                               std::vector<at::Tensor> local_means, std::vector<at::Device> devices, GroupCall call)
    : Node(sequence_nr),
      counts_(std::move(counts)),
      total_(total),
      mean_(std::move(mean)),
      local_means_(std::move(local_means)),
      devices_(std::move(devices)),
      call_(std::move(call)) {}

variable_list MergeStatsNode::apply(variable_list&& grads) {
  // Under create_graph (autograd's grad mode in backward) the gradients get their graph: through the sums across
  // the group, and through the merged mean, which keeps its value and gets the graph of sum n_i mean_i / n over
  // every copy of every process. Across the group every rank makes the same sums whatever its gradients.
  const bool create_graph = c10::GradMode::is_enabled();
  const size_t replicas = counts_.size();
  std::vector<at::Tensor> means;  // on copy 0's device, in the statistics dtype, as the merged mean
  for (const auto& local_mean : local_means_) means.push_back(local_mean.to(mean_.device(), mean_.scalar_type()));
  at::Tensor mean = mean_;
  at::Tensor group_grad_mean, group_grad_var;
  if (!create_graph) {
    std::tie(group_grad_mean, group_grad_var) = group_gradient(call_, grads[0], grads[1], mean_);
  } else {
    std::tie(group_grad_mean, group_grad_var) = group_sum_with_graph(call_, grads[0], grads[1], mean_);
    if (total_ > 0) {  // the total is the whole group's: every rank alike
      at::Tensor weighted_means = at::zeros_like(mean_);
      for (size_t i = 0; i < replicas; ++i) {
        weighted_means = weighted_means + means[i] * (static_cast<double>(counts_[i]) / static_cast<double>(total_));
      }
      const at::Tensor mean_with_graph = group_sum_with_graph(call_, weighted_means, at::Tensor(), mean_).first;
      mean = mean_ + (mean_with_graph - mean_with_graph.detach());
    }
  }
  variable_list result(2 * replicas);  // means..., m2s...
  for (size_t i = 0; i < replicas; ++i) {
    auto [grad_mean, grad_m2] = merge_backward(means[i], mean, counts_[i], total_, group_grad_mean, group_grad_var);
    if (grad_mean.defined()) result[i] = grad_mean.to(devices_[i]);
    if (grad_m2.defined()) result[replicas + i] = grad_m2.to(devices_[i]);
  }
  return result;
}

ReplicaMergeNode::ReplicaMergeNode(int64_t copy, int64_t count, int64_t total, at::Tensor local_mean, at::Tensor mean,
                                   std::shared_ptr<ReplicaBackward> backward,
                                   std::shared_ptr<ReplicaBackward::Point> point, GroupCall call)
    : copy_(copy),
      count_(count),
      total_(total),
      local_mean_(std::move(local_mean)),
      mean_(std::move(mean)),
      backward_(std::move(backward)),
      point_(std::move(point)),
      call_(std::move(call)) {}

variable_list ReplicaMergeNode::apply(variable_list&& grads) {
  // Every copy's share of d(mean, var), summed in copy order by the last to arrive (then over the processes).
  const at::Device device = mean_.device();
  auto combine = [this, &device](const std::vector<std::vector<at::Tensor>>& contributions) {
    at::Tensor grad_mean, grad_var;
    for (const auto& contribution : contributions) {
      if (contribution.size() != 2) continue;  // a copy whose backward ended without reaching this call
      if (contribution[0].defined()) {
        grad_mean = grad_mean.defined() ? grad_mean + contribution[0].to(device) : contribution[0].to(device);
      }
      if (contribution[1].defined()) {
        grad_var = grad_var.defined() ? grad_var + contribution[1].to(device) : contribution[1].to(device);
      }
    }
    std::tie(grad_mean, grad_var) = group_gradient(call_, grad_mean, grad_var, mean_);
    return std::vector<std::vector<at::Tensor>>(contributions.size(), {grad_mean, grad_var});
  };
  const int64_t run = backward_->current_run();  // the calling task's (0: not a task of a parallel backward)
  std::vector<at::Tensor> total = backward_->rendezvous(*point_, copy_, run, {grads[0], grads[1]}, combine, call_.label);
  auto [grad_mean, grad_m2] =
      merge_backward(local_mean_, mean_, count_, total_, total[0].defined() ? total[0].to(local_mean_.device()) : total[0],
                     total[1].defined() ? total[1].to(local_mean_.device()) : total[1]);
  if (!c10::GradMode::is_enabled()) return {grad_mean, grad_m2};
  return once_differentiable(
      {grad_mean, grad_m2},
      call_.label +
          ": double backward (create_graph=True, e.g. a gradient penalty) through a synchronized BatchNorm whose CPU "
          "replicas run their backward in parallel is not supported: the copies' sums meet across threads, which is "
          "differentiable only once. In Python, build DataParallelWithCallback with parallel_backward=False "
          "(autograd's serial backward, which a double backward retraces); or compute such a term with plain "
          "BatchNorm layers (syncbn_ext.revert_model on a copy of the model) or with this layer in eval mode",
      {grads[0], grads[1]});
}

Merged merge_values(const std::vector<at::Tensor>& means, const std::vector<at::Tensor>& m2s,
                    const std::vector<int64_t>& counts, const GroupCall& call) {
  const at::Device device = means[0].device();
  const auto dtype = means[0].scalar_type();
  const bool across = spans_processes(call.group);
  int64_t total = 0;
  for (const int64_t count : counts) total += count;
  // Plain CPU tensors only: a tensor subclass (Python dispatch) takes the ops' dispatcher path below.
  const auto plain_cpu = [&](const at::Tensor& t) {
    return t.device().is_cpu() && t.scalar_type() == dtype && !t.key_set().has(c10::DispatchKey::Python);
  };
  if (!across && std::all_of(means.begin(), means.end(), plain_cpu) && std::all_of(m2s.begin(), m2s.end(), plain_cpu)) {
    // Every replica waits for this: one loop, no stacking (see cpu::merge_stats).
    at::NoGradGuard no_grad;
    auto [mean, var] = cpu::merge_stats(std::vector<double>(counts.begin(), counts.end()), means, m2s);
    return {mean, var, total};
  }
  std::vector<at::Tensor> local_means, local_m2s;
  for (size_t i = 0; i < means.size(); ++i) {
    // Across processes the merge continues in float64: this process's partial result goes to the other ranks.
    local_means.push_back(means[i].detach().to(device, across ? at::kDouble : dtype));
    local_m2s.push_back(m2s[i].detach().to(device, across ? at::kDouble : dtype));
  }
  at::Tensor count_tensor = host_values_to(at::tensor(counts, at::TensorOptions().dtype(at::kLong)), device);
  auto [mean, var] = merge_stats(count_tensor, at::stack(local_means), at::stack(local_m2s));
  if (!across) return {mean, var, total};
  GroupStatistics group = merge_across_processes(call.group, call.layer_id, total, mean,
                                                 var * static_cast<double>(total), call.label,
                                                 /*backward_follows=*/any_requires_grad(means, m2s));
  // float64 back to the statistics dtype.
  return {group.mean.to(dtype), group.var.to(dtype), group.total};
}

std::vector<std::pair<at::Tensor, at::Tensor>> merge_with_graph(const std::vector<at::Tensor>& means,
                                                                const std::vector<at::Tensor>& m2s,
                                                                const std::vector<int64_t>& counts,
                                                                const Merged& merged, uint64_t merge_sequence_nr,
                                                                const std::vector<uint64_t>& share_sequence_nrs,
                                                                const GroupCall& call) {
  std::vector<std::pair<at::Tensor, at::Tensor>> shared;
  if (!any_requires_grad(means, m2s)) {
    for (size_t i = 0; i < means.size(); ++i) shared.emplace_back(merged.mean, merged.var);
    return shared;
  }
  std::vector<at::Device> devices;
  for (const auto& m : means) devices.push_back(m.device());
  auto merge = c10::make_intrusive<MergeStatsNode>(merge_sequence_nr, counts, merged.total, merged.mean, means,
                                                   devices, call);
  std::vector<at::Tensor> inputs(means.begin(), means.end());
  inputs.insert(inputs.end(), m2s.begin(), m2s.end());
  merge->set_next_edges(torch::autograd::collect_next_edges(inputs));
  // Outputs in order: the n-th output_of(..., node) is the node's n-th input in backward.
  at::Tensor merged_mean = output_of(merged.mean, merge);
  at::Tensor merged_var = output_of(merged.var, merge);
  for (size_t i = 0; i < means.size(); ++i) {
    auto share = c10::make_intrusive<ShareStatsNode>(share_sequence_nrs[i]);
    share->set_next_edges(torch::autograd::collect_next_edges(merged_mean, merged_var));
    at::Tensor copy_mean = output_of(merged_mean, share);
    at::Tensor copy_var = output_of(merged_var, share);
    shared.emplace_back(std::move(copy_mean), std::move(copy_var));
  }
  return shared;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> replica_merge(int64_t copy, const at::Tensor& local_mean, const at::Tensor& local_m2,
                                                int64_t count, const Merged& merged, bool any_copy_requires_grad,
                                                std::shared_ptr<ReplicaBackward> backward,
                                                std::shared_ptr<ReplicaBackward::Point> point, GroupCall call) {
  const at::Device device = local_mean.device();
  // A node also where this copy's statistics have no graph (its input detached) but another copy's do: its
  // output's share of d(mean, var) must reach the others' inputs, as through the serial backward's merge.
  if (!any_copy_requires_grad || !c10::GradMode::is_enabled()) {
    return {merged.mean.to(device), merged.var.to(device), at::Tensor()};
  }
  auto merge = c10::make_intrusive<ReplicaMergeNode>(copy, count, merged.total, local_mean.detach(),
                                                     merged.mean.detach().to(device), std::move(backward),
                                                     std::move(point), std::move(call));
  auto edges = torch::autograd::collect_next_edges(local_mean, local_m2);
  at::Tensor anchor;
  if (!any_requires_grad({local_mean}, {local_m2})) {
    // The copy's backward task asks only for what it leads to: without a way to the anchor, autograd would skip
    // this node, and the other copies would miss this copy's share.
    anchor = at::zeros_like(local_mean).requires_grad_();
    edges[0] = torch::autograd::impl::gradient_edge(anchor);
  }
  merge->set_next_edges(std::move(edges));
  at::Tensor merged_mean = output_of(merged.mean.to(device), merge);  // input 0 of the node in backward
  at::Tensor merged_var = output_of(merged.var.to(device), merge);    // input 1
  return {std::move(merged_mean), std::move(merged_var), std::move(anchor)};
}

}  // namespace syncbn::detail

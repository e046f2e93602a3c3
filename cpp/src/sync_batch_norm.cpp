// The synchronized training-mode forward of <syncbn/sync_batch_norm.h>: the
// master callback that merges every copy's statistics, and the forward of one
// replica's slice (the autograd nodes are in batch_norm_functions.h).
#include <syncbn/sync_batch_norm.h>

#include <sstream>

#include <c10/util/Exception.h>
#include <torch/csrc/autograd/graph_task.h>

#include <syncbn/errors.h>

#include "batch_norm_functions.h"
#include "statistics_message.h"

namespace syncbn {

namespace {

using detail::variable_list;

std::string torch_size(const std::vector<int64_t>& sizes) {
  std::ostringstream out;
  out << "torch.Size([";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << "])";
  return out.str();
}

// nn.BatchNorm on CPU: parameters share the input's dtype, except float32
// parameters with a float16/bfloat16 input.
void check_dtype(const at::Tensor& input, const std::optional<at::Tensor>& values) {
  if (!values.has_value() || !values->defined() || values->scalar_type() == input.scalar_type()) return;
  const bool reduced_input = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
  TORCH_CHECK(reduced_input && values->scalar_type() == at::kFloat,
              "mixed dtype (CPU): all inputs must share same datatype.");
}

void check_features(const std::optional<at::Tensor>& values, const char* name, int64_t features) {
  if (values.has_value() && values->defined()) {
    TORCH_CHECK(values->numel() == features, name, " should contain ", features, " elements not ", values->numel());
  }
}

// nn.BatchNorm's checks and messages (F.batch_norm's among them).
void check_arguments(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                     const std::optional<at::Tensor>& running_var, double eps) {
  TORCH_CHECK_VALUE(input.dim() >= 2, "expected an input of shape (N, C, *), got ", input.dim(), "D input");
  TORCH_CHECK_NOT_IMPLEMENTED(at::isFloatingType(input.scalar_type()), "\"batch_norm\" not implemented for '",
                              input.scalar_type(), "'");
  TORCH_CHECK_VALUE(eps > 0, "batch_norm eps must be positive during training, but got ", eps);
  const int64_t features = input.size(1);
  check_features(running_mean, "running_mean", features);
  check_features(running_var, "running_var", features);
  check_features(weight, "weight", features);
  check_features(bias, "bias", features);
  for (const auto* values : {&weight, &bias, &running_mean, &running_var}) check_dtype(input, *values);
}

// The merged statistics one copy normalizes with.
struct Merged {
  at::Tensor mean, var;
  int64_t total = 0;
};

Merged unpack_merged(const Message& merged, const at::Device& device) {
  TORCH_CHECK(merged.tensors.size() >= 2 && !merged.ints.empty(),
              "syncbn BatchNorm: malformed merged statistics from the master");
  return {merged.tensors[detail::kMergedMean].to(device), merged.tensors[detail::kMergedVar].to(device),
          merged.ints[detail::kTotal]};
}

// A recomputation's merged statistics: the original call's, through the same
// nodes (so the tensors the original forward saved are saved again, in the same
// order): the master repeats the merge from every copy's recorded statistics;
// the others take the recorded result.
// `differentiable`: whether this copy's local statistics require grad, as every
// copy's did in the original forward (then the merge made a node, which saved tensors).
Merged replay(const Message& original, const at::Device& device, bool differentiable) {
  if (original.tensors.size() > detail::kMergedM2s) {
    std::vector<int64_t> counts(original.ints.begin() + detail::kCopyCounts, original.ints.end());
    std::vector<at::Tensor> means = original.tensors[detail::kMergedMeans].unbind(0);
    std::vector<at::Tensor> m2s = original.tensors[detail::kMergedM2s].unbind(0);
    for (auto* list : {&means, &m2s}) {
      for (auto& tensor : *list) tensor = tensor.detach().requires_grad_(differentiable);
    }
    variable_list merged = detail::MergeStatsFunction::apply(at::TensorList(means), at::TensorList(m2s), counts);
    variable_list mine = detail::ShareStatsFunction::apply(merged[0], merged[1]);
    return {mine[0].to(device), mine[1].to(device), original.ints[detail::kTotal]};
  }
  return unpack_merged(original, device);
}

// The body shared by both forms: `exchange` gets the merged statistics (a
// barrier pass), `recall` those of the call being recomputed, `commit` runs a
// write to the model.
at::Tensor train(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                 const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& num_batches_tracked,
                 double exponential_average_factor, double eps, EpsMode eps_mode, const StatisticsExchange& exchange,
                 const std::function<Message(const Message&)>& recall,
                 const std::function<void(const std::function<void()>&)>& commit) {
  check_arguments(input, weight, bias, running_mean, running_var, eps);
  variable_list local = detail::LocalStatsFunction::apply(input);
  Message message{{local[0], local[1]}, {detail::count_per_channel(input), -1, -1}, nullptr, {}};
  message.ints.insert(message.ints.end(), input.sizes().begin(), input.sizes().end());

  // A recomputation inside backward (torch.utils.checkpoint) repeats an earlier call: no barrier, no writes.
  if (recall && torch::autograd::get_current_graph_task_id() != -1) {
    Merged merged = replay(recall(message), input.device(), local[0].requires_grad());
    return detail::NormalizeFunction::apply(input, merged.mean, merged.var, weight, bias, local[2], local[3], eps,
                                            static_cast<int64_t>(eps_mode));
  }

  Merged merged = unpack_merged(exchange(std::move(message)), input.device());
  const bool update_stats = merged.total > 0 && running_mean.has_value() && running_mean->defined() &&
                            running_var.has_value() && running_var->defined();
  const bool count_batch = num_batches_tracked.has_value() && num_batches_tracked->defined();
  if (update_stats || count_batch) {
    commit([&] {
      at::NoGradGuard no_grad;
      if (update_stats) {
        const double factor = exponential_average_factor;
        const double unbias = static_cast<double>(merged.total) / static_cast<double>(merged.total - 1);
        const at::Tensor mean = merged.mean.detach(), var = merged.var.detach();
        running_mean->copy_(running_mean->to(mean.scalar_type()) * (1 - factor) + mean * factor);
        running_var->copy_(running_var->to(var.scalar_type()) * (1 - factor) + var * (factor * unbias));
      }
      if (count_batch) num_batches_tracked->add_(1);
    });
  }
  return detail::NormalizeFunction::apply(input, merged.mean, merged.var, weight, bias, local[2], local[3], eps,
                                          static_cast<int64_t>(eps_mode));
}

}  // namespace

MasterCallback batch_norm_master_callback() {
  return [](MessageList messages) {
    using detail::kCall;
    using detail::kCount;
    using detail::kLayer;
    using detail::kSizes;
    std::vector<at::Tensor> means, m2s;
    std::vector<int64_t> counts;
    int64_t total = 0;
    std::vector<int64_t> whole_batch_size;
    const Message& first = messages.front().second;
    for (const auto& [copy_id, message] : messages) {
      TORCH_CHECK(message.tensors.size() == 2 && message.ints.size() > kSizes, "syncbn BatchNorm: copy ", copy_id,
                  " sent a malformed statistics message");
      // Every copy must be at the same call of the same layer: never pair statistics across layers.
      if (message.ints[kLayer] != first.ints[kLayer] || message.ints[kCall] != first.ints[kCall]) {
        std::ostringstream out;
        out << "synchronized BatchNorm layers were called in a different order or number of times by the "
               "replicas: copy 0 is at "
            << first.label << " but copy " << copy_id << " is at " << message.label
            << "; every replica must call the synchronized layers the same number of times, in the same order";
        throw BarrierError(out.str());
      }
      means.push_back(message.tensors[detail::kLocalMean]);
      m2s.push_back(message.tensors[detail::kLocalM2]);
      counts.push_back(message.ints[kCount]);
      total += message.ints[kCount];
      std::vector<int64_t> sizes(message.ints.begin() + kSizes, message.ints.end());
      if (whole_batch_size.empty()) {
        whole_batch_size = sizes;
      } else {
        TORCH_CHECK(sizes.size() == whole_batch_size.size() && sizes[1] == whole_batch_size[1],
                    "syncbn BatchNorm: copy ", copy_id, " has input of size ", torch_size(sizes),
                    " but copy 0 has ", torch_size(whole_batch_size), "; replicas must agree on everything but dim 0");
        whole_batch_size[0] += sizes[0];
      }
    }
    TORCH_CHECK_VALUE(total != 1, "Expected more than 1 value per channel when training, got input size ",
                      torch_size(whole_batch_size));
    variable_list merged =
        detail::MergeStatsFunction::apply(at::TensorList(means), at::TensorList(m2s), counts);
    MessageList results;
    results.reserve(messages.size());
    for (const auto& entry : messages) {
      // Each copy's own node, made here on the master's thread (see batch_norm_functions.h).
      variable_list shared = detail::ShareStatsFunction::apply(merged[0], merged[1]);
      results.emplace_back(entry.first, Message{{shared[0], shared[1]}, {total}, nullptr, {}});
    }
    // The master also keeps every copy's statistics, for a recomputation to repeat the merge.
    Message& master = results.front().second;
    const at::Device device = merged[0].device();
    std::vector<at::Tensor> detached_means, detached_m2s;
    for (size_t i = 0; i < means.size(); ++i) {
      detached_means.push_back(means[i].detach().to(device));
      detached_m2s.push_back(m2s[i].detach().to(device));
    }
    master.tensors.push_back(at::stack(detached_means));
    master.tensors.push_back(at::stack(detached_m2s));
    master.ints.insert(master.ints.end(), counts.begin(), counts.end());
    return results;
  };
}

StatisticsExchange local_exchange() {
  return [callback = batch_norm_master_callback()](Message message) {
    MessageList messages;
    messages.emplace_back(0, std::move(message));
    return std::move(callback(std::move(messages)).front().second);
  };
}

at::Tensor sync_batch_norm_train(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                                 const std::optional<at::Tensor>& running_var,
                                 const std::optional<at::Tensor>& num_batches_tracked,
                                 double exponential_average_factor, double eps, EpsMode eps_mode,
                                 const LayerSync& sync) {
  if (!sync.channel) {
    return train(input, weight, bias, running_mean, running_var, num_batches_tracked, exponential_average_factor, eps,
                 eps_mode, local_exchange(), nullptr, [](const std::function<void()>& write) { write(); });
  }
  const BatchNormChannel& channel = *sync.channel;
  return train(
      input, weight, bias, running_mean, running_var, num_batches_tracked, exponential_average_factor, eps, eps_mode,
      [&](Message message) { return sync.channel->exchange(std::move(message), sync.layer, sync.name); },
      [&](const Message& message) { return channel.recall(message, sync.layer, sync.name); },
      [&](const std::function<void()>& write) { channel.commit(write); });
}

at::Tensor sync_batch_norm_train(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                                 const std::optional<at::Tensor>& running_var, double exponential_average_factor,
                                 double eps, EpsMode eps_mode, const StatisticsExchange& exchange) {
  return train(input, weight, bias, running_mean, running_var, std::nullopt, exponential_average_factor, eps, eps_mode,
               exchange, nullptr, [](const std::function<void()>& write) { write(); });
}

}  // namespace syncbn

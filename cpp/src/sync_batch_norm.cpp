// The synchronized training-mode forward of <syncbn/sync_batch_norm.h>: the
// master callback that merges every copy's statistics, and the forward of one
// replica's slice (the autograd nodes are in batch_norm_functions.h).
#include <syncbn/sync_batch_norm.h>

#include <sstream>

#include <ATen/SequenceNumber.h>
#include <ATen/record_function.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/graph_task.h>

#include <syncbn/errors.h>

#include "batch_norm_functions.h"
#include "merge_nodes.h"
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

// nn.BatchNorm's dtype rules and messages on CPU (ATen's mixed_type.h): the first
// defined parameter or buffer decides. Of the input's dtype, every one must be
// (the kernel's "expected scalar type"); of another, every one must be float32
// and the input float16 or bfloat16.
void check_dtypes(const at::Tensor& input, std::initializer_list<const std::optional<at::Tensor>*> values) {
  std::vector<at::ScalarType> types;
  for (const auto* value : values) {
    if (value->has_value() && (*value)->defined()) types.push_back((*value)->scalar_type());
  }
  if (types.empty()) return;
  if (types.front() == input.scalar_type()) {
    for (const auto type : types) {
      TORCH_CHECK(type == input.scalar_type(), "expected scalar type ", input.scalar_type(), " but found ", type);
    }
    return;
  }
  for (const auto type : types) {
    TORCH_CHECK(type == at::kFloat, "mixed dtype (CPU): expect parameter to have scalar type of Float");
  }
  TORCH_CHECK(at::isReducedFloatingType(input.scalar_type()), "mixed dtype (CPU): all inputs must share same datatype.");
}

void check_features(const std::optional<at::Tensor>& values, const char* name, int64_t features) {
  if (values.has_value() && values->defined()) {
    TORCH_CHECK(values->numel() == features, name, " should contain ", features, " elements not ", values->numel());
    TORCH_CHECK(values->dim() == 1, name, " should be a 1-D tensor of ", features,
                " elements (one per channel), not of shape ", values->sizes());
  }
}

// As torch's autograd: batch_norm is not differentiable with respect to the running statistics.
void check_not_requiring_grad(const std::optional<at::Tensor>& values, const char* name) {
  TORCH_CHECK(!(values.has_value() && values->defined() && values->requires_grad() && c10::GradMode::is_enabled()),
              "The function 'native_batch_norm' is not differentiable with respect to argument '", name,
              "'. This input cannot have requires_grad True.");
}

// nn.BatchNorm's checks and messages (F.batch_norm's among them).
void check_arguments(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                     const std::optional<at::Tensor>& running_var, double eps) {
  TORCH_CHECK_VALUE(input.dim() >= 2, "expected an input of shape (N, C, *), got ", input.dim(), "D input");
  // The types torch's batch_norm computes in (not the float8 types, which isFloatingType counts).
  const auto type = input.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16,
                              "\"batch_norm\" not implemented for '", type, "'");
  // As torch's: only eps <= 0 is refused (a NaN eps normalizes to NaN, an infinite one to zeros).
  TORCH_CHECK_VALUE(!(eps <= 0), "batch_norm eps must be positive during training, but got ", eps);
  const int64_t features = input.size(1);
  check_features(running_mean, "running_mean", features);
  check_features(running_var, "running_var", features);
  check_features(weight, "weight", features);
  check_features(bias, "bias", features);
  check_not_requiring_grad(running_mean, "running_mean");
  check_not_requiring_grad(running_var, "running_var");
  check_dtypes(input, {&weight, &bias, &running_mean, &running_var});
}

using detail::Merged;

Merged unpack_merged(const Message& merged, const at::Device& device) {
  TORCH_CHECK(merged.tensors.size() >= 2 && !merged.ints.empty(),
              "syncbn BatchNorm: malformed merged statistics from the master");
  return {merged.tensors[detail::kMergedMean].to(device), merged.tensors[detail::kMergedVar].to(device),
          merged.ints[detail::kTotal]};
}

// Tells the other ranks that this rank's call failed before its exchange (see announce_failed_call); the caller
// then raises its own error.
void announce_failure(const GroupCall& call, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& running_mean) {
  int64_t channels = input.dim() >= 2 ? input.size(1) : 0;  // the layer's own count where it has one
  if (running_mean.has_value() && running_mean->defined()) {
    channels = running_mean->numel();
  } else if (weight.has_value() && weight->defined()) {
    channels = weight->numel();
  }
  announce_failed_call(call.group, call.layer_id, channels, call.label, input.device());
}

// The body shared by both forms: `exchange` gets the merged statistics (a
// barrier pass); `channel`, when given, is the copy's (recomputations recall
// from it, writes commit through it, and a parallel backward's merge meets there).
at::Tensor train(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                 const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& num_batches_tracked,
                 double exponential_average_factor, double eps, EpsMode eps_mode, const StatisticsExchange& exchange,
                 const BatchNormChannel* channel, const LayerSync* sync) {
  // The layer's cross-process step, for the master's merge (every copy sends it alike).
  std::shared_ptr<GroupCall> group_call;
  if (sync != nullptr && spans_processes(sync->process_group)) {
    group_call = std::make_shared<GroupCall>(GroupCall{sync->process_group, sync->layer_id, sync->name});
  }
  // A recomputation inside backward (torch.utils.checkpoint) repeats an earlier call, which exchanged or was refused.
  const bool in_backward = torch::autograd::get_current_graph_task_id() != -1;
  // Every autograd node this call and the rest of its forward make comes after it (see CallRecords::Origin).
  const auto call_sequence_nr = static_cast<int64_t>(at::sequence_number::peek());
  variable_list local;
  int64_t count = 0;
  try {
    check_arguments(input, weight, bias, running_mean, running_var, eps);
    local = detail::LocalStatsFunction::apply(input);  // (it refuses what the checks let through: sparse inputs)
    count = detail::count_per_channel(input);
  } catch (...) {
    // Refused on this rank only, maybe: the other ranks must not pair this call with this rank's next one. Alone
    // in its process only: a replica's refusal closes its replication at once, which would cut copy 0's
    // announcement short while the other ranks are still on their way (and leave the group out of step).
    if (group_call && channel == nullptr && !in_backward) announce_failure(*group_call, input, weight, running_mean);
    throw;
  }
  // The merge nodes get sequence numbers reserved here, at the same point of every replica's forward.
  const auto merge_sequence_nr = static_cast<int64_t>(at::sequence_number::get_and_increment());
  const auto share_sequence_nr = static_cast<int64_t>(at::sequence_number::get_and_increment());
  Message message{{local[0], local[1]}, {count, -1, -1, merge_sequence_nr, share_sequence_nr}, group_call, {}};
  message.ints.insert(message.ints.end(), input.sizes().begin(), input.sizes().end());
  auto normalize = [&](const Merged& merged) {
    return detail::NormalizeFunction::apply(input, merged.mean, merged.var, weight, bias, local[2], local[3], eps,
                                            static_cast<int64_t>(eps_mode));
  };

  // A recomputation inside backward repeats the earlier call's statistics, with no barrier and no writes. (The
  // merge nodes save no tensors, so the recomputation saves what the forward did.)
  if (channel != nullptr && in_backward) {
    return normalize(unpack_merged(channel->recall(message, sync->layer, sync->name), input.device()));
  }
  // Alone in its process but across processes: the same for a call recorded in a checkpointed forward. (The forward
  // of a use_reentrant=True checkpoint runs without saved-tensor hooks and is not recorded: its recomputation's
  // graph is the one backward uses, so it exchanges again, as every rank's does.)
  CallRecords* const recent = channel == nullptr && group_call && sync != nullptr ? sync->recent_calls.get() : nullptr;
  if (recent != nullptr && in_backward) {
    if (const auto record = recent->find(message, -1, group_call->label, /*across_forwards=*/true)) {
      return normalize(unpack_merged(record->merged, input.device()));
    }
    // Exchanging again would pair with nothing on ranks that recall through a replica's channel, and count the
    // batch twice everywhere: an error instead, on every rank that forgot it.
    TORCH_CHECK(!recent->forgot(message, -1), "synchronized BatchNorm ", group_call->label,
                " was recomputed inside backward (torch.utils.checkpoint), but the statistics of that call were "
                "forgotten: a layer alone in its process across processes keeps its last ", kRecentCallsKept,
                " calls made in checkpointed forwards that were not recomputed yet. Run the backward sooner (fewer "
                "forwards or calls of the layer between a checkpointed forward and its backward), or replicate the "
                "model in this process (DataParallelWithCallback), whose replicas keep every call");
  }
  // Under saved-tensor hooks (a use_reentrant=False checkpoint), calls without gradients too: a block's recomputation
  // repeats its calls under torch.no_grad() (a stop-gradient target view) as well.
  const bool record_call = recent != nullptr && !in_backward && under_saved_tensor_hooks();
  std::optional<Message> sent;
  if (record_call) sent = Message{{local[0].detach(), local[1].detach()}, message.ints, nullptr, {}};

  Message result = exchange(std::move(message));
  Merged merged = unpack_merged(result, input.device());
  if (result.payload && channel != nullptr) {
    // The replicas' backward runs in parallel: this copy merges through a node of its own, where the copies
    // meet in backward (the master's message carries the meeting point).
    GroupCall call = group_call ? *group_call : GroupCall{};
    call.label = result.label;
    at::Tensor anchor;
    std::tie(merged.mean, merged.var, anchor) =
        detail::replica_merge(channel->copy_id(), local[0], local[1], count, merged,
                              result.ints.size() > detail::kAnyCopyRequiresGrad &&
                                  result.ints[detail::kAnyCopyRequiresGrad] != 0,
                              channel->backward(),
                              std::static_pointer_cast<ReplicaBackward::Point>(result.payload), std::move(call));
    // (Kept without a graph too: a call the backward never meets at.)
    channel->keep_merge(merged.mean, merged.var, anchor);
  }
  const bool update_stats = merged.total > 0 && running_mean.has_value() && running_mean->defined() &&
                            running_var.has_value() && running_var->defined();
  const bool count_batch = num_batches_tracked.has_value() && num_batches_tracked->defined();
  at::Tensor output = normalize(merged);  // (before the writes: a failure there writes nothing)
  if (update_stats || count_batch) {
    auto write = [&] {
      at::NoGradGuard no_grad;
      if (update_stats) {
        const double factor = exponential_average_factor;
        const double unbias = static_cast<double>(merged.total) / static_cast<double>(merged.total - 1);
        const at::Tensor mean = merged.mean.detach(), var = merged.var.detach();
        running_mean->copy_(running_mean->to(mean.scalar_type()) * (1 - factor) + mean * factor);
        running_var->copy_(running_var->to(var.scalar_type()) * (1 - factor) + var * (factor * unbias));
      }
      if (count_batch) num_batches_tracked->add_(1);
    };
    if (channel != nullptr) {
      channel->commit(write);
    } else {
      write();
    }
  }
  if (record_call) {
    // Where the call was made, and its output's graph, when it has one (a frozen layer on an input without
    // gradients has none), which a failed or dropped backward frees.
    CallRecords::Origin origin{at::RecordFunction::currentThreadId(), call_sequence_nr, {}};
    if (const auto& node = output.grad_fn()) {
      origin.output_node = [graph = c10::weak_intrusive_ptr<torch::autograd::Node>(node)]() -> const void* {
        return graph.lock().get();  // (the pointer outlives the lock only for comparison)
      };
    }
    recent->add(*sent, result, -1, /*reusable=*/true, group_call->label, std::move(origin));
  }
  return output;
}

}  // namespace

MasterCallback batch_norm_master_callback(std::shared_ptr<ReplicaBackward> backward) {
  return [backward = std::move(backward)](MessageList messages) {
    using detail::kCall;
    using detail::kCount;
    using detail::kLayer;
    using detail::kSizes;
    std::vector<at::Tensor> means, m2s;
    std::vector<int64_t> counts;
    std::vector<uint64_t> share_sequence_nrs;
    int64_t total = 0;
    // For nn.BatchNorm's message on a single value per channel: the copies' sizes summed along the batch, or (copies
    // of other numbers of dimensions, whose statistics merge all the same) the size of the copy holding that value.
    std::vector<int64_t> whole_batch_size, single_value_size;
    bool dimensions_agree = true;
    const Message& first = messages.front().second;
    // Across processes when the layer has a group of several ranks (the master's message carries it).
    GroupCall call = first.payload ? *std::static_pointer_cast<GroupCall>(first.payload) : GroupCall{};
    if (!first.label.empty()) call.label = first.label;
    if (call.label.empty()) call.label = "syncbn BatchNorm";
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
      share_sequence_nrs.push_back(static_cast<uint64_t>(message.ints[detail::kShareSequenceNr]));
      total += message.ints[kCount];
      std::vector<int64_t> sizes(message.ints.begin() + kSizes, message.ints.end());
      if (message.ints[kCount] == 1) single_value_size = sizes;
      if (whole_batch_size.empty()) {
        whole_batch_size = sizes;
      } else {
        if (sizes[1] != whole_batch_size[1]) {
          std::ostringstream out;
          const std::vector<int64_t> first_sizes(first.ints.begin() + kSizes, first.ints.end());
          out << call.label << ": copy " << copy_id << " has input of size " << torch_size(sizes)
              << " but copy 0 has " << torch_size(first_sizes)
              << "; the replicas' inputs must have the same number of channels (dim 1)";
          throw BarrierError(out.str());
        }
        dimensions_agree = dimensions_agree && sizes.size() == whole_batch_size.size();
        whole_batch_size[0] += sizes[0];
      }
    }
    if (!dimensions_agree) whole_batch_size = single_value_size;
    const Merged merged = detail::merge_values(means, m2s, counts, call);
    TORCH_CHECK_VALUE(merged.total != 1, "Expected more than 1 value per channel when training, got input size ",
                      torch_size(whole_batch_size),
                      spans_processes(call.group) ? " on this rank and 1 value per channel in the whole process group"
                                                  : "");
    MessageList results;
    results.reserve(messages.size());
    if (backward && backward->parallel()) {
      // Each copy merges through a node of its own (see merge_nodes.h): values, and the meeting point.
      auto point = std::make_shared<ReplicaBackward::Point>();
      const int64_t any_copy_requires_grad = detail::any_requires_grad(means, m2s) ? 1 : 0;
      for (const auto& entry : messages) {
        results.emplace_back(entry.first, Message{{merged.mean, merged.var}, {merged.total, any_copy_requires_grad},
                                                  point, first.label});
      }
      return results;
    }
    auto shared = detail::merge_with_graph(means, m2s, counts, merged,
                                           static_cast<uint64_t>(first.ints[detail::kMergeSequenceNr]),
                                           share_sequence_nrs, call);
    for (size_t i = 0; i < messages.size(); ++i) {
      results.emplace_back(messages[i].first,
                           Message{{shared[i].first, shared[i].second}, {merged.total}, nullptr, {}});
    }
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
                 eps_mode, local_exchange(), nullptr, &sync);
  }
  return train(
      input, weight, bias, running_mean, running_var, num_batches_tracked, exponential_average_factor, eps, eps_mode,
      [&](Message message) { return sync.channel->exchange(std::move(message), sync.layer, sync.name); },
      sync.channel.get(), &sync);
}

at::Tensor sync_batch_norm_train(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                                 const std::optional<at::Tensor>& running_var, double exponential_average_factor,
                                 double eps, EpsMode eps_mode, const StatisticsExchange& exchange) {
  return train(input, weight, bias, running_mean, running_var, std::nullopt, exponential_average_factor, eps, eps_mode,
               exchange, nullptr, nullptr);
}

}  // namespace syncbn

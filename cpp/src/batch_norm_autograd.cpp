// Synchronized BatchNorm forward with autograd across replicas.
//
// The graph of one pass over R replicas:
//
//   x_i -> LocalStats_i -> (mean_i, m2_i) ---> MergeStats (on the master) -> (mean, var)
//            |                                                                 |
//            +-- (dy token, scale token) ----> Normalize_i(x_i, mean, var, w, b) -> y_i
//
// Backward needs no barrier: autograd sums every Normalize_i's gradient for the
// shared (mean, var), MergeStats hands each LocalStats_i its share, and
// LocalStats_i then computes dx_i in one pass. Normalize_i passes dy_i and the
// per-channel scale w * invstd to LocalStats_i as the gradients of two token
// inputs (zero-cost tensors LocalStats_i outputs and Normalize_i ignores), so
// the input gradient is one elementwise pass, as in nn.BatchNorm, instead of
// two gradients that autograd would have to add.
#include <syncbn/batch_norm.h>

#include <sstream>

#include <syncbn/errors.h>
#include <syncbn/replication_group.h>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>

#include "inverse_std.h"

namespace syncbn {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Function;
using torch::autograd::variable_list;

// Values per channel in an (N, C, *) input.
int64_t count_per_channel(const at::Tensor& input) {
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
    at::Tensor invstd = detail::inverse_std(var, eps, mode);
    at::Tensor weight_acc = weight.defined() ? weight.to(invstd.scalar_type()) : at::Tensor();
    at::Tensor scale = weight.defined() ? invstd * weight_acc : invstd;
    at::Tensor grad_invstd = weight.defined() ? sum_dy_xmu * weight_acc : sum_dy_xmu;
    result[1] = -scale * sum_dy;
    result[2] = grad_invstd * detail::inverse_std_grad(var, invstd, eps, mode);
    if (weight.defined()) result[3] = (sum_dy_xmu * invstd).to(weight.scalar_type());
    if (ctx->saved_data["has_bias"].toBool()) result[4] = sum_dy.to(ctx->saved_data["bias_dtype"].toScalarType());
    result[5] = dy;
    result[6] = scale;
    return result;
  }
};

// A statistics message: tensors (mean_i, m2_i); ints (count_i, layer position,
// call index, input sizes...). Position and call index are -1 when the exchange
// is not a BatchNormChannel's (no tags to check).
constexpr size_t kCount = 0, kLayer = 1, kCall = 2, kSizes = 3;

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

}  // namespace

MasterCallback batch_norm_master_callback() {
  return [](MessageList messages) {
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
      means.push_back(message.tensors[0]);
      m2s.push_back(message.tensors[1]);
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
    variable_list merged = MergeStatsFunction::apply(at::TensorList(means), at::TensorList(m2s), counts);
    MessageList results;
    results.reserve(messages.size());
    for (const auto& entry : messages) {
      results.emplace_back(entry.first, Message{{merged[0], merged[1]}, {total}, nullptr, {}});
    }
    return results;
  };
}

std::shared_ptr<BatchNormChannel> BatchNormChannel::of(CallbackContext& context, int64_t copy_id) {
  // One barrier per replication (per position for a context made by hand).
  CallbackContext& shared = context.group() ? context.group()->shared() : context;
  const std::string key = "syncbn.batch_norm.channel." + std::to_string(copy_id);
  if (auto channel = shared.try_get<std::shared_ptr<BatchNormChannel>>(key)) return *channel;
  std::shared_ptr<BatchNormChannel> channel;
  if (copy_id == 0) {
    auto master = std::make_shared<SyncMaster>(batch_norm_master_callback());
    master->set_label("synchronized BatchNorm");
    if (context.group()) context.group()->add_barrier(master);
    channel = std::make_shared<BatchNormChannel>(0, master, nullptr);
  } else {
    auto master_channel = shared.try_get<std::shared_ptr<BatchNormChannel>>("syncbn.batch_norm.channel.0");
    TORCH_CHECK(master_channel.has_value(), "synchronized BatchNorm: copy ", copy_id,
                " replicated before copy 0 (the master's replication hook must run first)");
    const auto& master = (*master_channel)->master();
    channel = std::make_shared<BatchNormChannel>(copy_id, master, master->register_slave(copy_id));
  }
  shared.set(key, channel);
  return channel;
}

BatchNormChannel::BatchNormChannel(int64_t copy_id, std::shared_ptr<SyncMaster> master,
                                   std::shared_ptr<SlavePipe> pipe)
    : copy_id_(copy_id), master_(std::move(master)), pipe_(std::move(pipe)) {}

StatisticsExchange BatchNormChannel::exchange_for(int64_t layer_position, std::string layer_name) {
  return [self = shared_from_this(), layer_position, name = std::move(layer_name)](Message message) {
    return self->exchange(std::move(message), layer_position, name);
  };
}

Message BatchNormChannel::exchange(Message message, int64_t layer_position, const std::string& layer_name) {
  const int64_t call = ++calls_;
  message.ints[kLayer] = layer_position;
  message.ints[kCall] = call;
  message.label = "layer '" + layer_name + "' (synchronized call " + std::to_string(call) + ")";
  return pipe_ ? pipe_->run_slave(std::move(message)) : master_->run_master(std::move(message));
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
                                 const std::optional<at::Tensor>& running_var, double exponential_average_factor,
                                 double eps, EpsMode eps_mode, const StatisticsExchange& exchange) {
  TORCH_CHECK_VALUE(input.dim() >= 2, "expected an input of shape (N, C, *), got ", input.dim(), "D input");
  const int64_t features = input.size(1);
  // nn.BatchNorm's checks and messages.
  check_features(running_mean, "running_mean", features);
  check_features(running_var, "running_var", features);
  check_features(weight, "weight", features);
  check_features(bias, "bias", features);
  for (const auto* values : {&weight, &bias, &running_mean, &running_var}) check_dtype(input, *values);

  variable_list local = LocalStatsFunction::apply(input);
  Message message{{local[0], local[1]}, {count_per_channel(input), -1, -1}, nullptr, {}};
  message.ints.insert(message.ints.end(), input.sizes().begin(), input.sizes().end());
  Message merged = exchange(std::move(message));
  TORCH_CHECK(merged.tensors.size() == 2 && merged.ints.size() == 1,
              "syncbn BatchNorm: malformed merged statistics from the master");
  at::Tensor mean = merged.tensors[0].to(input.device());
  at::Tensor var = merged.tensors[1].to(input.device());
  const int64_t total = merged.ints[0];

  if (total > 0 && running_mean.has_value() && running_mean->defined() && running_var.has_value() &&
      running_var->defined()) {
    at::NoGradGuard no_grad;
    const double factor = exponential_average_factor;
    const double unbias = static_cast<double>(total) / static_cast<double>(total - 1);
    running_mean->copy_(running_mean->to(mean.scalar_type()) * (1 - factor) + mean.detach() * factor);
    running_var->copy_(running_var->to(var.scalar_type()) * (1 - factor) + var.detach() * (factor * unbias));
  }
  return NormalizeFunction::apply(input, mean, var, weight, bias, local[2], local[3], eps,
                                  static_cast<int64_t>(eps_mode));
}

}  // namespace syncbn

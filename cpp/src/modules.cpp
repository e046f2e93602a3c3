#include <syncbn/modules.h>

#include <atomic>

#include <c10/util/Exception.h>

namespace syncbn {

namespace {
std::atomic<int64_t> next_layer_id{0};
}  // namespace

BatchNormSyncState::BatchNormSyncState() : layer_id_(next_layer_id++) {}

void BatchNormSyncState::on_replicate(CallbackContext& context, int64_t copy_id) {
  channel_ = BatchNormChannel::of(context, copy_id);
  position_ = context.position();
  name_ = context.name().empty() ? std::string("<root>") : context.name();
}

void BatchNormSyncState::abort(const std::string& reason) const {
  if (channel_) channel_->close(reason);
}

void BatchNormSyncState::finish() const {
  if (channel_) channel_->finish();
}

LayerSync BatchNormSyncState::layer_sync(bool training) const {
  const std::string name = channel_ ? name_ : "syncbn::SyncBatchNorm #" + std::to_string(layer_id_);
  return LayerSync{channel_, position_, name, training ? process_group_ : ProcessGroupPtr(), layer_id_};
}

torch::Tensor sync_batch_norm_module_forward(const torch::Tensor& input, const torch::nn::BatchNormOptions& options,
                                             const torch::Tensor& weight, const torch::Tensor& bias,
                                             const torch::Tensor& running_mean, const torch::Tensor& running_var,
                                             const torch::Tensor& num_batches_tracked, bool training,
                                             const BatchNormSyncState& state) {
  // As torch::nn::BatchNorm: momentum, or 1 / num_batches_tracked for the cumulative average. But
  // num_batches_tracked moves only with the running statistics, once the merged statistics arrived: a failed
  // pass leaves every buffer untouched.
  double factor = options.momentum().value_or(0.0);
  const bool update_running_stats = training && options.track_running_stats() && state.holds_buffers();
  const bool count_batch = update_running_stats && num_batches_tracked.defined();
  if (count_batch && !options.momentum().has_value()) factor = 1.0 / (num_batches_tracked.item<double>() + 1);
  auto optional = [](const torch::Tensor& t) { return t.defined() ? std::optional<torch::Tensor>(t) : std::nullopt; };
  return sync_batch_norm_train(input, optional(weight), optional(bias),
                               update_running_stats ? optional(running_mean) : std::nullopt,
                               update_running_stats ? optional(running_var) : std::nullopt,
                               count_batch ? optional(num_batches_tracked) : std::nullopt, factor, options.eps(),
                               EpsMode::Plus, state.layer_sync(training));
}

void check_batch_norm_input_dim(const torch::Tensor& input, size_t D) {
  if (D == 1) {
    TORCH_CHECK_VALUE(input.dim() == 2 || input.dim() == 3, "expected 2D or 3D input (got ", input.dim(),
                      "D input)");
  } else {
    TORCH_CHECK_VALUE(input.dim() == static_cast<int64_t>(D) + 2, "expected ", D + 2, "D input (got ", input.dim(),
                      "D input)");
  }
}

}  // namespace syncbn

#include <syncbn/modules.h>

#include <mutex>
#include <set>

#include <c10/util/Exception.h>

namespace syncbn {

namespace {

// Layer numbers: the next never given, and those given back (by layers overwritten by assignment).
std::mutex layer_numbers_mutex;
int64_t next_layer_id = 0;     // guarded by layer_numbers_mutex
std::set<int64_t> free_layer_ids;  // guarded by layer_numbers_mutex

std::shared_ptr<const int64_t> take_layer_id() {
  std::lock_guard<std::mutex> lock(layer_numbers_mutex);
  int64_t id = next_layer_id;
  if (free_layer_ids.empty()) {
    ++next_layer_id;
  } else {
    id = *free_layer_ids.begin();  // the smallest: what a rank that made no copies takes from its counter
    free_layer_ids.erase(free_layer_ids.begin());
  }
  return std::make_shared<const int64_t>(id);
}

void give_back_layer_id(int64_t id) {
  std::lock_guard<std::mutex> lock(layer_numbers_mutex);
  free_layer_ids.insert(id);
}

}  // namespace

BatchNormSyncState::BatchNormSyncState() : layer_id_(take_layer_id()) {}

// Not the channel, position or name: a copy is tied to no replication.
BatchNormSyncState::BatchNormSyncState(const BatchNormSyncState& other)
    : process_group_(other.process_group_), layer_id_(other.layer_id_) {}

BatchNormSyncState& BatchNormSyncState::operator=(const BatchNormSyncState& other) {
  if (this == &other) return *this;
  // Cloneable::clone_ assigns the original's state over a layer its reset() just built: that layer's number
  // was taken on this rank only, so it goes back (when no copy of this layer holds it).
  if (layer_id_ != other.layer_id_ && layer_id_.use_count() == 1) give_back_layer_id(*layer_id_);
  layer_id_ = other.layer_id_;
  process_group_ = other.process_group_;
  channel_.reset();
  position_ = -1;
  name_.clear();
  return *this;
}

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
  const std::string name = channel_ ? name_ : "syncbn::SyncBatchNorm #" + std::to_string(*layer_id_);
  return LayerSync{channel_, position_, name, training ? process_group_ : ProcessGroupPtr(), *layer_id_};
}

torch::Tensor sync_batch_norm_module_forward(const torch::Tensor& input, const torch::nn::BatchNormOptions& options,
                                             const torch::Tensor& weight, const torch::Tensor& bias,
                                             const torch::Tensor& running_mean, const torch::Tensor& running_var,
                                             const torch::Tensor& num_batches_tracked, bool training,
                                             const BatchNormSyncState& state) {
  // torch::nn::BatchNorm (and this layer alone) fails on a channel-less input in ATen's batch_norm: the same
  // error here, where the merged statistics of no channel would otherwise run without one.
  TORCH_CHECK_INDEX(input.dim() < 2 || input.size(1) != 0,
                    "select(): index 0 out of range for tensor of size [0] at dimension 0");
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

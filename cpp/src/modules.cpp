#include <syncbn/modules.h>

#include <syncbn/errors.h>

#include <atomic>
#include <mutex>
#include <set>

#include <c10/util/Exception.h>

namespace syncbn {

namespace {

// Layer numbers: the next never given, and those given back (by layers gone unpublished).
struct LayerNumbers {
  std::mutex mutex;
  int64_t next = 0;        // guarded by mutex
  std::set<int64_t> free;  // guarded by mutex
};

// Never destroyed: a layer with static storage (in another translation unit) gives its number back during the
// exit, maybe after this file's statics are gone.
LayerNumbers& layer_numbers() {
  static auto* numbers = new LayerNumbers;
  return *numbers;
}

int64_t take_layer_id() {
  LayerNumbers& numbers = layer_numbers();
  std::lock_guard<std::mutex> lock(numbers.mutex);
  if (numbers.free.empty()) return numbers.next++;
  // The smallest: what a rank that made no copies takes from its counter (or from the same numbers given back).
  const int64_t id = *numbers.free.begin();
  numbers.free.erase(numbers.free.begin());
  return id;
}

void give_back_layer_id(int64_t id) {
  LayerNumbers& numbers = layer_numbers();
  std::lock_guard<std::mutex> lock(numbers.mutex);
  numbers.free.insert(id);
}

}  // namespace

// Held by a layer and its copies; the last holder gone takes the number back unless it was published.
class detail::LayerNumber {
 public:
  LayerNumber() : id(take_layer_id()) {}
  LayerNumber(const LayerNumber&) = delete;
  LayerNumber& operator=(const LayerNumber&) = delete;
  // A layer that never ran a training forward was known to no other rank: a fresh layer a clone() built and
  // assigned over, or a model built and dropped unused (on every rank alike).
  ~LayerNumber() {
    if (!published.load(std::memory_order_relaxed)) give_back_layer_id(id);
  }

  const int64_t id;
  std::atomic<bool> published{false};
};

BatchNormSyncState::BatchNormSyncState() : layer_id_(std::make_shared<detail::LayerNumber>()) {}

// Not the channel, position or name: a copy is tied to no replication.
BatchNormSyncState::BatchNormSyncState(const BatchNormSyncState& other)
    : place_(other.place_), process_group_(other.process_group_), layer_id_(other.layer_id_) {}

BatchNormSyncState& BatchNormSyncState::operator=(const BatchNormSyncState& other) {
  if (this == &other) return *this;
  // Cloneable::clone_ assigns the original's state over a layer its reset() just built: that layer's number,
  // taken on this rank only, goes back with its token (when no copy holds it and it was never published).
  layer_id_ = other.layer_id_;
  place_ = other.place_;
  process_group_ = other.process_group_;
  channel_.reset();
  position_ = -1;
  name_.clear();
  return *this;
}

int64_t BatchNormSyncState::layer_id() const { return layer_id_->id; }

void BatchNormSyncState::publish_layer_id() const {
  // Checked first: replica threads publish the shared token at every forward, and a read keeps the line shared.
  std::atomic<bool>& published = layer_id_->published;
  if (!published.load(std::memory_order_relaxed)) published.store(true, std::memory_order_relaxed);
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

void BatchNormSyncState::announce_refused(bool training, int64_t channels, const at::Device& device) const {
  if (!training || channel_ || !spans_processes(process_group_)) return;
  const LayerSync sync = layer_sync(training);
  announce_failed_call(sync.process_group, sync.layer_id, channels, sync.name, device);  // the caller raises next
}

LayerSync BatchNormSyncState::layer_sync(bool training) const {
  if (training) publish_layer_id();  // its number goes to the other ranks (or may, once it has a group)
  const int64_t id = layer_id();
  const std::string name = channel_          ? name_
                           : place_.empty() ? "syncbn::SyncBatchNorm #" + std::to_string(id)
                                            : "'" + place_ + "': syncbn::SyncBatchNorm #" + std::to_string(id);
  return LayerSync{channel_, position_, name, training ? process_group_ : ProcessGroupPtr(), id, recent_calls_};
}

torch::Tensor sync_batch_norm_module_forward(const torch::Tensor& input, const torch::nn::BatchNormOptions& options,
                                             const torch::Tensor& weight, const torch::Tensor& bias,
                                             const torch::Tensor& running_mean, const torch::Tensor& running_var,
                                             const torch::Tensor& num_batches_tracked, bool training,
                                             const BatchNormSyncState& state) {
  // A channel-less input: torch::nn::BatchNorm returns an empty output (as for any empty batch whose channels do
  // not match, which the synchronized path refuses: README); refused here with the error ATen gave, where the
  // merged statistics of no channel would otherwise run without one; announced to the other ranks first, as every
  // refusal before the exchange.
  if (input.dim() >= 2 && input.size(1) == 0) {
    state.announce_refused(training, options.num_features(), input.device());
    TORCH_CHECK_INDEX(false, "select(): index 0 out of range for tensor of size [0] at dimension 0");
  }
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

int64_t set_process_group(torch::nn::Module& module, const ProcessGroupPtr& group) {
  int64_t set = 0;
  const auto give = [&](auto* layer, const std::string& place) {
    if (layer == nullptr) return false;
    layer->set_process_group(group);
    layer->set_place(place);
    ++set;
    return true;
  };
  for (const auto& item : module.named_modules(/*name_prefix=*/"", /*include_self=*/true)) {
    torch::nn::Module& each = *item.value();
    give(dynamic_cast<SyncBatchNorm1dImpl*>(&each), item.key()) ||
        give(dynamic_cast<SyncBatchNorm2dImpl*>(&each), item.key()) ||
        give(dynamic_cast<SyncBatchNorm3dImpl*>(&each), item.key());
  }
  return set;
}

}  // namespace syncbn

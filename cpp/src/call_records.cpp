#include <syncbn/call_records.h>

#include <cmath>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "statistics_message.h"

namespace syncbn {

namespace {

// Local statistics of a recomputation and of the call it repeats agree exactly
// on a deterministic device; this much relative difference (non-deterministic
// kernels upstream) still counts as the same call.
constexpr double kRecallTolerance = 1e-4;

// The largest difference between two local statistics, relative to the recorded values.
double relative_difference(const at::Tensor& recomputed, const at::Tensor& recorded) {
  if (recorded.numel() == 0) return 0.0;
  at::Tensor a = recomputed.detach().to(at::kDouble), b = recorded.to(recomputed.device()).to(at::kDouble);
  at::Tensor difference = ((a - b).abs() / (b.abs() + 1.0)).nan_to_num(std::numeric_limits<double>::infinity());
  // NaN statistics (NaN input) recompute as NaN: equal where both are NaN.
  difference.masked_fill_(a.isnan() & b.isnan(), 0.0);
  return difference.max().item<double>();
}

bool same_tensors(const Message& a, const Message& b) {
  if (a.tensors.size() != b.tensors.size() || a.ints != b.ints) return false;
  for (size_t i = 0; i < a.tensors.size(); ++i) {
    if (!a.tensors[i].equal(b.tensors[i])) return false;
  }
  return true;
}

Message detached(const Message& message) {
  Message copy{{}, message.ints, nullptr, message.label};
  for (const auto& tensor : message.tensors) copy.tensors.push_back(tensor.detach());
  return copy;
}

}  // namespace

void CallRecords::add(const Message& message, const Message& merged, int64_t layer, bool grad_enabled,
                      const std::string& label) {
  Record record{layer,
                message.ints.at(detail::kCount),
                message.tensors.at(detail::kLocalMean).detach(),
                message.tensors.at(detail::kLocalM2).detach(),
                detached(merged),
                grad_enabled,
                label};
  std::lock_guard<std::mutex> lock(mutex_);
  if (capacity_ == 0) return;
  if (records_.size() == capacity_) records_.pop_front();
  records_.push_back(std::move(record));
}

std::optional<CallRecords::Record> CallRecords::find(const Message& message, int64_t layer,
                                                     const std::string& where) const {
  const int64_t count = message.ints.at(detail::kCount);
  std::lock_guard<std::mutex> lock(mutex_);
  const Record* best = nullptr;
  double best_difference = std::numeric_limits<double>::infinity();
  std::vector<const Record*> matches;
  for (const auto& record : records_) {
    if (record.layer != layer || record.count != count) continue;
    const double difference =
        std::max(relative_difference(message.tensors[detail::kLocalMean], record.local_mean),
                 relative_difference(message.tensors[detail::kLocalM2], record.local_m2));
    if (difference > kRecallTolerance) continue;
    matches.push_back(&record);
    if (difference < best_difference) {
      best = &record;
      best_difference = difference;
    }
  }
  if (best == nullptr) return std::nullopt;
  for (const Record* other : matches) {
    TORCH_CHECK(other == best || same_tensors(other->merged, best->merged), where,
                " was recomputed inside backward (torch.utils.checkpoint) with local statistics that match two of its "
                "forward's calls (", best->label, " and ", other->label,
                ") whose whole-batch statistics differ, so the call being recomputed cannot be told; checkpoint a "
                "block that calls the layer once, or do not checkpoint it");
  }
  return *best;
}

size_t CallRecords::size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return records_.size();
}

}  // namespace syncbn

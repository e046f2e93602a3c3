#include <syncbn/call_records.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <unordered_set>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/SavedTensorHooks.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/graph_task.h>

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

// The nodes of `candidates` (their outputs' nodes) that `from` reaches through its inputs: a breadth-first walk,
// ended once every one was found or after kMaxNodesWalked nodes.
constexpr size_t kMaxNodesWalked = 1 << 20;

std::unordered_set<const void*> reached_outputs(torch::autograd::Node* from,
                                                const std::unordered_set<const void*>& candidates) {
  std::unordered_set<const void*> reached;
  std::unordered_set<const torch::autograd::Node*> seen{from};
  std::deque<torch::autograd::Node*> frontier{from};
  while (!frontier.empty() && reached.size() < candidates.size() && seen.size() < kMaxNodesWalked) {
    torch::autograd::Node* node = frontier.front();
    frontier.pop_front();
    if (candidates.count(node)) reached.insert(node);
    for (const auto& edge : node->next_edges()) {
      torch::autograd::Node* next = edge.function.get();
      if (next != nullptr && seen.insert(next).second) frontier.push_back(next);
    }
  }
  return reached;
}

// Of `matches` (oldest first, local statistics alike, whole-batch statistics not), the call the recomputation
// running now repeats. torch.utils.checkpoint recomputes a block when backward evaluates a node its forward made
// in the block, after the calls, so: of the calls whose output that node reaches (its own forward's, not another
// forward's whose statistics this rank's batch repeats), the first not recalled yet (a block recomputes its calls
// in order), else the last; where it reaches none (no output node: a frozen layer on an input without gradients),
// the last call made before that node on its thread (autograd's sequence numbers count up per thread). nullptr
// where that cannot be told.
CallRecords::Record* made_in_the_recomputed_forward(const c10::intrusive_ptr<torch::autograd::Node>& node,
                                                   const std::vector<CallRecords::Record*>& matches,
                                                   bool& reached_none) {
  reached_none = false;
  if (!node) return nullptr;
  std::vector<std::pair<CallRecords::Record*, const void*>> outputs;
  std::unordered_set<const void*> candidates;
  for (CallRecords::Record* record : matches) {
    const void* output = record->origin.output_node ? record->origin.output_node() : nullptr;
    if (output != nullptr) {
      outputs.emplace_back(record, output);
      candidates.insert(output);
    }
  }
  if (!candidates.empty()) {
    const auto reached = reached_outputs(node.get(), candidates);
    CallRecords::Record* last = nullptr;
    for (const auto& [record, output] : outputs) {
      if (!reached.count(output)) continue;
      if (!record->recalled) return record;
      last = record;
    }
    if (last != nullptr) return last;
    reached_none = true;
  }
  CallRecords::Record* latest = nullptr;
  for (CallRecords::Record* record : matches) {
    const CallRecords::Origin& origin = record->origin;
    if (origin.sequence_nr < 0 || origin.thread != node->thread_id() ||
        static_cast<uint64_t>(origin.sequence_nr) > node->sequence_nr()) {
      continue;
    }
    if (latest == nullptr || origin.sequence_nr > latest->origin.sequence_nr) latest = record;
  }
  return latest;
}

}  // namespace

bool under_saved_tensor_hooks() { return !at::SavedTensorDefaultHooks::get_tls_state().stack.empty(); }

void CallRecords::add(const Message& message, const Message& merged, int64_t layer, bool reusable,
                      const std::string& label, Origin origin) {
  Record record{layer,
                message.ints.at(detail::kCount),
                message.tensors.at(detail::kLocalMean).detach(),
                message.tensors.at(detail::kLocalM2).detach(),
                detached(merged),
                reusable,
                label};
  record.origin = std::move(origin);
  std::lock_guard<std::mutex> lock(mutex_);
  if (capacity_ == 0) return;
  if (records_.size() == capacity_) {
    // A record whose graph was freed goes first, then one already recalled (its recomputation ran); else the
    // oldest. Its fingerprint stays.
    const auto first = [&](auto&& which) {
      return static_cast<size_t>(std::find_if(records_.begin(), records_.end(), which) - records_.begin());
    };
    size_t victim = first([](const Record& r) { return !r.origin.graph_lives(); });
    if (victim == records_.size()) victim = first([](const Record& r) { return r.recalled; });
    if (victim == records_.size()) victim = 0;
    forgotten_.push_back(fingerprints_[victim]);
    if (forgotten_.size() > kFingerprintsKept) forgotten_.pop_front();
    records_.erase(records_.begin() + static_cast<std::ptrdiff_t>(victim));
    fingerprints_.erase(fingerprints_.begin() + static_cast<std::ptrdiff_t>(victim));
  }
  fingerprints_.push_back(
      {layer, record.count, record.local_mean.sum(at::kDouble), record.local_m2.sum(at::kDouble)});  // no sync
  records_.push_back(std::move(record));
}

std::optional<CallRecords::Record> CallRecords::find(const Message& message, int64_t layer, const std::string& where,
                                                     bool across_forwards) {
  const int64_t count = message.ints.at(detail::kCount);
  std::lock_guard<std::mutex> lock(mutex_);
  Record* best = nullptr;
  double best_difference = std::numeric_limits<double>::infinity();
  std::vector<Record*> matches;
  for (auto& record : records_) {
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
  const auto differing = std::find_if(matches.begin(), matches.end(),
                                      [&](const Record* other) { return !same_tensors(other->merged, best->merged); });
  if (differing != matches.end()) {
    TORCH_CHECK(across_forwards, where,
                " was recomputed inside backward (torch.utils.checkpoint) with local statistics that match two of its "
                "forward's calls (", best->label, " and ", (*differing)->label,
                ") whose whole-batch statistics differ, so the call being recomputed cannot be told; checkpoint a "
                "block that calls the layer once, or do not checkpoint it");
    const c10::intrusive_ptr<torch::autograd::Node> node = torch::autograd::get_current_node();
    bool reached_none = false;
    best = made_in_the_recomputed_forward(node, matches, reached_none);
    // The node reaches none of the calls that have outputs: where one alike was forgotten, it may be its own (the
    // others are other forwards'): found nothing, and the caller says it was forgotten.
    if (reached_none && forgot_locked(message, layer)) return std::nullopt;
    if (best != nullptr) {
      // One recomputation (one node, one backward) repeating one call twice: two calls of its block matched it,
      // the block's calls in parallel branches (the node reaches one of them): the other got its statistics.
      const int64_t task = torch::autograd::get_current_graph_task_id();
      TORCH_CHECK(best->recalled_for_node != node.get() || best->recalled_in_task != task, where,
                  " was recomputed inside backward (torch.utils.checkpoint) with local statistics that match several "
                  "of its calls in one checkpointed block (", best->label, ") whose whole-batch statistics differ "
                  "(this rank's inputs to them repeat), so the call being recomputed cannot be told; checkpoint a "
                  "block that calls the layer once, or do not checkpoint it");
      best->recalled_for_node = node.get();
      best->recalled_in_task = task;
    } else {
      const auto unrecalled =
          std::find_if(matches.begin(), matches.end(), [](const Record* r) { return !r->recalled; });
      best = unrecalled != matches.end() ? *unrecalled : matches.back();  // records_ is oldest first
    }
  }
  best->recalled = true;
  return *best;
}

bool CallRecords::forgot(const Message& message, int64_t layer) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return forgot_locked(message, layer);
}

bool CallRecords::forgot_locked(const Message& message, int64_t layer) const {
  const int64_t count = message.ints.at(detail::kCount);
  // One statistic's sum, and how far a sum of values within the recall tolerance of each other (relative to each
  // value, plus 1) may be off: relative to the sum of their magnitudes plus their number; generous, so that no
  // forgotten call slips by. Read once, at the first fingerprint of this layer and count.
  struct Sum {
    double value, allowed;
  };
  const auto sum_of = [](const at::Tensor& values) {
    const at::Tensor v = values.detach();
    return Sum{v.sum(at::kDouble).item<double>(),
               2 * kRecallTolerance * (v.abs().sum(at::kDouble).item<double>() + static_cast<double>(v.numel()))};
  };
  const auto close = [](const Sum& sum, double recorded) {
    return std::abs(sum.value - recorded) <= sum.allowed || (std::isnan(sum.value) && std::isnan(recorded));
  };
  std::optional<Sum> mean_sum, m2_sum;
  for (const auto& print : forgotten_) {
    if (print.layer != layer || print.count != count) continue;
    if (!mean_sum) {
      mean_sum = sum_of(message.tensors[detail::kLocalMean]);
      m2_sum = sum_of(message.tensors[detail::kLocalM2]);
    }
    if (close(*mean_sum, print.mean_sum.item<double>()) && close(*m2_sum, print.m2_sum.item<double>())) return true;
  }
  return false;
}

size_t CallRecords::size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return records_.size();
}

}  // namespace syncbn

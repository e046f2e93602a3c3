#include <syncbn/cross_process.h>

#include <mutex>
#include <sstream>
#include <unordered_map>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <syncbn/batch_norm.h>
#include <syncbn/errors.h>

namespace syncbn {

namespace {

// The synchronized calls made on each group by this process: every rank counts alike.
int64_t next_call(const ProcessGroupPtr& group) {
  static std::mutex mutex;
  static std::unordered_map<const c10d::ProcessGroup*, int64_t> calls;
  std::lock_guard<std::mutex> lock(mutex);
  return ++calls[group.get()];
}

std::string where(const ProcessGroupPtr& group, const std::string& label, const char* doing) {
  std::ostringstream out;
  out << "in synchronized BatchNorm " << label << ", " << doing << " across the process group (rank "
      << group->getRank() << " of " << group->getSize() << ", " << group->getBackendName() << ")";
  return out.str();
}

// Waits for `work`; a failure (a rank that never came: the group's timeout) names our layer.
void wait(const c10::intrusive_ptr<c10d::Work>& work, const ProcessGroupPtr& group, const std::string& label,
          const char* doing) {
  try {
    work->wait();
  } catch (c10::Error& error) {
    error.add_context(where(group, label, doing));
    throw;
  } catch (const std::exception& error) {  // e.g. gloo's own: a peer that went away
    TORCH_CHECK_WITH(DistBackendError, false, error.what(), "\n", where(group, label, doing));
  }
}

std::vector<at::Tensor> all_gather(const ProcessGroupPtr& group, const at::Tensor& tensor, const std::string& label,
                                   const char* doing) {
  std::vector<std::vector<at::Tensor>> outputs(1);
  for (int r = 0; r < group->getSize(); ++r) outputs[0].push_back(at::empty_like(tensor));
  std::vector<at::Tensor> inputs{tensor};
  wait(group->allgather(outputs, inputs), group, label, doing);
  return outputs[0];
}

}  // namespace

bool spans_processes(const ProcessGroupPtr& group) { return group && group->getSize() > 1; }

GroupStatistics merge_across_processes(const ProcessGroupPtr& group, int64_t layer_id, int64_t count,
                                       const at::Tensor& mean, const at::Tensor& m2, const std::string& label) {
  TORCH_CHECK_VALUE(group, "merge_across_processes needs a process group");
  const int64_t channels = mean.numel();
  const auto device = mean.device();
  const int64_t call = next_call(group);

  // Every rank at the same call of the same layer, before any statistics are paired.
  at::Tensor header = at::tensor({call, layer_id, channels, count}, at::TensorOptions().dtype(at::kLong)).to(device);
  auto headers = all_gather(group, header, label, "checking that every rank is at the same layer");
  std::vector<std::vector<int64_t>> ranks;
  bool agree = true;
  const at::Tensor all_headers = at::stack(headers).cpu();  // one copy to the host for every rank's header
  const auto values = all_headers.accessor<int64_t, 2>();
  for (int64_t r = 0; r < values.size(0); ++r) {
    ranks.push_back({values[r][0], values[r][1], values[r][2], values[r][3]});
    agree = agree && ranks.back()[0] == call && ranks.back()[1] == layer_id && ranks.back()[2] == channels;
  }
  if (!agree) {
    std::ostringstream out;
    out << "synchronized BatchNorm layers were called in a different order or number of times by the ranks of the "
           "process group: rank "
        << group->getRank() << " is at " << label << ";";
    for (size_t r = 0; r < ranks.size(); ++r) {
      out << " rank " << r << ": synchronized call " << ranks[r][0] << " on this group, layer #" << ranks[r][1]
          << " (" << ranks[r][2] << " channels)" << (r + 1 < ranks.size() ? "," : ";");
    }
    out << " every rank must call the synchronized layers the same number of times, in the same order";
    throw BarrierError(out.str());
  }

  // Every rank's (mean, M2), merged in rank order: the same float64 operations on every rank.
  at::Tensor packed = at::cat({mean.reshape({channels}).to(at::kDouble), m2.reshape({channels}).to(at::kDouble)});
  auto gathered = all_gather(group, packed, label, "exchanging statistics");
  std::vector<int64_t> counts;
  int64_t total = 0;
  for (const auto& rank : ranks) {
    counts.push_back(rank[3]);
    total += rank[3];
  }
  at::Tensor stacked = at::stack(gathered);  // (W, 2C)
  at::Tensor count_tensor = at::tensor(counts, at::TensorOptions().dtype(at::kLong)).to(device);
  auto [group_mean, group_var] =
      merge_stats(count_tensor, stacked.narrow(1, 0, channels), stacked.narrow(1, channels, channels));
  return {group_mean, group_var, total};
}

std::pair<at::Tensor, at::Tensor> sum_across_processes(const ProcessGroupPtr& group, const at::Tensor& grad_mean,
                                                       const at::Tensor& grad_var, int64_t channels,
                                                       const std::string& label) {
  const auto device = grad_mean.defined() ? grad_mean.device() : grad_var.defined() ? grad_var.device() : at::kCPU;
  auto part = [&](const at::Tensor& grad) {
    return grad.defined() ? grad.reshape({channels}).to(at::kDouble)
                          : at::zeros({channels}, at::TensorOptions().dtype(at::kDouble).device(device));
  };
  std::vector<at::Tensor> tensors{at::cat({part(grad_mean), part(grad_var)})};
  wait(group->allreduce(tensors), group, label, "summing gradients");
  return {tensors[0].narrow(0, 0, channels), tensors[0].narrow(0, channels, channels)};
}

}  // namespace syncbn

#include <syncbn/cross_process.h>

#include <algorithm>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/ThreadLocalPythonObjects.h>
#include <ATen/record_function.h>
#include <c10/util/Exception.h>

#include <syncbn/batch_norm.h>
#include <syncbn/errors.h>
#include <syncbn/replication_group.h>

#include "group_calls.h"
#include "host_values.h"
#include "shared_memory_exchange.h"
#include "waiting_across_processes.h"

namespace syncbn {

namespace {

using detail::begin_exchange;
using detail::calls_mutex;
using detail::calls_of;
using detail::end_exchange;
using detail::exchange_key;
using detail::ExchangeNumbers;
using detail::GroupCalls;
using detail::realign_counts;
using detail::where;

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

// While alive, the calling thread holds none of the Python objects torch keeps in a thread's state (during a
// backward, torch 2.13 keeps one there), so that a collective started meanwhile captures none. A gloo work keeps
// the state it captured until its worker thread lets go of it, a moment after the work completes; if that moment
// falls in the interpreter's shutdown, releasing a Python object there aborts the process. Ours need none.
class WithoutThreadLocalPythonObjects {
 public:
  WithoutThreadLocalPythonObjects() : saved_(at::impl::ThreadLocalPythonObjects::get_state()) {
    at::impl::ThreadLocalPythonObjects::set_state({});
  }
  ~WithoutThreadLocalPythonObjects() { at::impl::ThreadLocalPythonObjects::set_state(std::move(saved_)); }
  WithoutThreadLocalPythonObjects(const WithoutThreadLocalPythonObjects&) = delete;
  WithoutThreadLocalPythonObjects& operator=(const WithoutThreadLocalPythonObjects&) = delete;

 private:
  at::impl::ThreadLocalPythonObjects saved_;  // copies of the references: nothing is released while set aside
};

// While alive, the calling replica thread's replication is listed among the group's waiting in its backend. A wait
// there cannot be left early: if the caller gives up on the replication meanwhile (Ctrl-C), the thread stays until
// the others come or the group's timeout, and its exchange is lost to this rank (see check_in_step).
class WaitingInBackend {
 public:
  explicit WaitingInBackend(const ProcessGroupPtr& group) : group_(group), replication_(ReplicaScope::current_group()) {
    if (replication_ == nullptr) return;
    std::lock_guard<std::mutex> lock(calls_mutex());
    calls_of(group_).waiting_replications.push_back(replication_);
  }
  ~WaitingInBackend() {
    if (replication_ == nullptr) return;
    std::lock_guard<std::mutex> lock(calls_mutex());
    auto& waiting = calls_of(group_).waiting_replications;
    waiting.erase(std::find(waiting.begin(), waiting.end(), replication_));
  }
  WaitingInBackend(const WaitingInBackend&) = delete;
  WaitingInBackend& operator=(const WaitingInBackend&) = delete;

 private:
  ProcessGroupPtr group_;
  const ReplicationGroup* replication_;  // the calling thread's (null: not a replica thread)
};

// Before any exchange on `group`, by either transport: once an exchange in its backend was abandoned (its
// replication closed while it waited), the ranks are out of step, and every later exchange fails at once instead of
// queueing behind the abandoned one.
void check_in_step(const ProcessGroupPtr& group, const std::string& label, const char* doing) {
  std::lock_guard<std::mutex> lock(calls_mutex());
  GroupCalls& calls = calls_of(group);
  for (const ReplicationGroup* waiting : calls.waiting_replications) {
    if (waiting->closed() && calls.out_of_step.empty()) {
      calls.out_of_step =
          "an earlier exchange was abandoned while it waited for the other ranks (" + waiting->close_reason() + ")";
    }
  }
  TORCH_CHECK_WITH(DistBackendError, calls.out_of_step.empty(), calls.out_of_step,
                   ": the ranks are out of step; start the processes again\n", where(group, label, doing));
}

// Every rank's `tensor` (the same size on every rank), stacked in rank order through the group's backend: (W, n).
at::Tensor c10d_all_gather(const ProcessGroupPtr& group, const at::Tensor& tensor, const std::string& label,
                           const char* doing) {
  WaitingInBackend waiting(group);
  std::vector<std::vector<at::Tensor>> outputs(1);
  for (int r = 0; r < group->getSize(); ++r) outputs[0].push_back(at::empty_like(tensor));
  std::vector<at::Tensor> inputs{tensor};
  c10::intrusive_ptr<c10d::Work> work;
  {
    WithoutThreadLocalPythonObjects no_python_objects;
    work = group->allgather(outputs, inputs);
  }
  wait(work, group, label, doing);
  return at::stack(outputs[0]);
}

std::chrono::milliseconds group_timeout(const ProcessGroupPtr& group) {
  try {
    return group->getBackend(c10::DeviceType::CPU)->getBackendOptions()->timeout;
  } catch (const std::exception&) {  // a backend that does not tell its options
    return std::chrono::duration_cast<std::chrono::milliseconds>(::kBackendDefaultTimeout);
  }
}

// The group's shared-memory exchange (null: none), set up at its first exchange of CPU tensors: every rank
// reaches that point at the same exchange, so the set-up's collectives pair alike.
std::shared_ptr<detail::SharedMemoryExchange> shared_memory_of(const ProcessGroupPtr& group,
                                                               const std::string& label) {
  {
    std::lock_guard<std::mutex> lock(calls_mutex());
    GroupCalls& calls = calls_of(group);
    if (calls.transport_decided) return calls.shared_memory;
  }
  auto exchange = detail::SharedMemoryExchange::connect(group, [&](const at::Tensor& row) {
    return c10d_all_gather(group, row, label, "setting up the exchange");
  });
  std::lock_guard<std::mutex> lock(calls_mutex());
  GroupCalls& calls = calls_of(group);
  calls.transport_decided = true;
  calls.shared_memory = std::move(exchange);
  return calls.shared_memory;
}

// Every rank's `tensor` (the same size on every rank), stacked in rank order: (W, n). Through shared memory where
// the group's ranks share a host (CPU tensors), else (or for a row too large for its slots) the group's backend.
// `sizes_known_alike`: every rank already knows every rank's row has this size (its headers agreed): a row too
// large for the slots then goes to the backend at once, without first comparing sizes through shared memory.
at::Tensor all_gather(const ProcessGroupPtr& group, const at::Tensor& tensor, detail::ExchangeKind kind,
                      const std::string& label, const char* doing, bool sizes_known_alike = false) {
  check_in_step(group, label, doing);
  detail::WaitingAcrossProcesses waiting;  // bounded by the group's timeout, not a barrier's
  if (!tensor.device().is_cpu()) {  // GPUs: the group's backend (NCCL) is the fast path
    std::lock_guard<std::mutex> lock(calls_mutex());
    calls_of(group).transport_decided = true;
  } else {
    const auto exchange = shared_memory_of(group, label);
    if (exchange && !(sizes_known_alike && static_cast<int64_t>(tensor.nbytes()) > exchange->capacity())) {
      RECORD_FUNCTION("syncbn::shared_memory_allgather", std::vector<c10::IValue>());
      std::optional<at::Tensor> gathered;
      try {
        gathered = exchange->all_gather(tensor, kind, group_timeout(group));
      } catch (c10::Error& error) {
        error.add_context(where(group, label, doing));
        throw;
      } catch (const BarrierError& error) {
        throw BarrierError(std::string(error.what()) + "\n" + where(group, label, doing));
      }
      if (gathered) return *gathered;
    }
  }
  return c10d_all_gather(group, tensor, label, doing);
}

// exchange number, kind, layer id, channels, count, the rank's forward and backward exchange counts, and whether
// the rank's call will sum gradients in backward (its statistics require grad; forward exchanges only)
constexpr int64_t kHeader = kExchangeHeaderWords;
static_assert(kHeader == 8, "describe each header word above");

// A count of kFailedCall: the rank's call failed before its exchange (announce_failed_call); with the layer
// kAnyCall, its forward failed before its first synchronized call (announce_failed_forward).
constexpr int64_t kFailedCall = -1;
constexpr int64_t kAnyCall = -1;

bool failed_forward(const at::TensorAccessor<int64_t, 2>& rows, int64_t r) {
  return rows[r][4] == kFailedCall && rows[r][2] == kAnyCall;
}

std::string describe_exchange(int64_t number, int64_t kind, int64_t layer_id, int64_t channels) {
  std::ostringstream out;
  if (layer_id == kAnyCall) {
    out << "synchronized call " << number << " on this group (its forward failed before its first synchronized call)";
    return out.str();
  }
  if (kind == static_cast<int64_t>(detail::ExchangeKind::kGradients)) {
    out << "backward exchange " << number << " on this group (summing gradients), layer #" << layer_id;
  } else {
    out << "synchronized call " << number << " on this group, layer #" << layer_id;
  }
  out << " (" << channels << " channels)";
  return out.str();
}

// What one exchange gathered, in rank order: every rank's two per-channel quantities, (W, C) each, count, and
// whether its backward will exchange.
struct GatheredRows {
  at::Tensor first;
  at::Tensor second;
  std::vector<int64_t> counts;
  std::vector<bool> backward_follows;
};

// Every rank's header (W, kHeader), checked to describe the same exchange; else a BarrierError on every rank alike,
// naming each rank's exchange and the likely cause, after realigning the ranks' counts.
void check_headers_agree(const ProcessGroupPtr& group, const at::Tensor& headers, int64_t number, int64_t kind_code,
                         int64_t layer_id, int64_t channels, const std::string& label, const char* doing) {
  const auto rows = headers.accessor<int64_t, 2>();
  const int64_t world = rows.size(0);
  bool agree = true, kinds_differ = false, numbers_differ = false, only_layer_numbers_differ = true,
       only_channels_differ = true;
  int64_t calls_seen = 0, backward_exchanges_seen = 0;
  // A rank whose forward failed before its first call stands for whatever call the others make: the layer and
  // channels are compared among the other rows only.
  for (int64_t r = 0; r < world; ++r) {
    if (!failed_forward(rows, r)) {
      layer_id = rows[r][2];
      channels = rows[r][3];
      break;
    }
  }
  for (int64_t r = 0; r < world; ++r) {
    const bool same_number = rows[r][0] == number && rows[r][1] == kind_code;
    const bool any_call = failed_forward(rows, r);
    agree = agree && same_number && (any_call || (rows[r][2] == layer_id && rows[r][3] == channels));
    only_layer_numbers_differ = only_layer_numbers_differ && same_number && (any_call || rows[r][3] == channels);
    only_channels_differ = only_channels_differ && same_number && (any_call || rows[r][2] == layer_id);
    kinds_differ = kinds_differ || rows[r][1] != kind_code;
    numbers_differ = numbers_differ || rows[r][5] != rows[0][5] || rows[r][6] != rows[0][6];
    calls_seen = std::max(calls_seen, rows[r][5]);
    backward_exchanges_seen = std::max(backward_exchanges_seen, rows[r][6]);
  }
  if (agree) return;
  if (numbers_differ) realign_counts(group, calls_seen, backward_exchanges_seen);

  std::ostringstream out;
  if (only_channels_differ) {
    out << "synchronized BatchNorm layer #" << layer_id << " has different numbers of channels on the ranks of the "
        << "process group:";
    for (int64_t r = 0; r < world; ++r) out << " rank " << r << ": " << rows[r][3] << (r + 1 < world ? "," : ";");
    out << " its inputs' channels (dim 1) differ: construct it alike (the same num_features) and give it inputs of "
           "that many channels on every rank";
    throw BarrierError(out.str() + "\n" + where(group, label, doing));
  }
  out << "synchronized BatchNorm layers were called in a different order or number of times by the ranks of the "
         "process group: rank "
      << group->getRank() << " is at " << label << ";";
  for (int64_t r = 0; r < world; ++r) {
    out << " rank " << r << ": " << describe_exchange(rows[r][0], rows[r][1], rows[r][2], rows[r][3])
        << (r + 1 < world ? "," : ";");
  }
  out << " every rank must call the synchronized layers the same number of times, in the same order";
  if (kinds_differ) out << ", forward and backward" << detail::kSkippedBackwardExchange;
  if (only_layer_numbers_differ) {
    out << " (only the layers' numbers differ: the ranks called different layers, e.g. one rank's previous step "
           "failed part-way and it started the next while the others were still in theirs, or they numbered the "
           "same layer differently: a process numbers its synchronized layers in the order it constructs them, so "
           "construct them in the same order on every rank, e.g. no synchronized layer built on one rank only "
           "before them)";
  }
  if (numbers_differ) {
    out << ". The ranks are at different steps (e.g. a rank whose step failed and was skipped, or that skipped a "
           "backward); each counts on from here alike, so that once every rank has left this step, the next steps "
           "pair again";
  }
  throw BarrierError(out.str() + "\n" + where(group, label, doing));
}

// Every rank fails alike when one announced a failed call, before anything is paired.
void check_no_rank_failed(const ProcessGroupPtr& group, const at::TensorAccessor<int64_t, 2>& rows,
                          const std::string& label, const char* doing) {
  std::vector<int64_t> failed_here, failed_before;
  for (int64_t r = 0; r < rows.size(0); ++r) {
    if (rows[r][4] == kFailedCall) (failed_forward(rows, r) ? failed_before : failed_here).push_back(r);
  }
  if (failed_here.empty() && failed_before.empty()) return;
  std::ostringstream out;
  out << "synchronized BatchNorm " << label << ":";
  if (!failed_here.empty()) {
    out << " rank(s)";
    for (const int64_t r : failed_here) out << " " << r;
    out << " raised in this call before exchanging their statistics (an input or argument it refused: see the "
           "error of that rank)"
        << (failed_before.empty() ? "" : ";");
  }
  if (!failed_before.empty()) {
    out << " rank(s)";
    for (const int64_t r : failed_before) out << " " << r;
    out << " raised in their forward before its first synchronized call (see the error of that rank)";
  }
  out << "; every rank fails this call alike, nothing was written, and the next call pairs again";
  throw BarrierError(out.str() + "\n" + where(group, label, doing));
}

// Every rank's row of one exchange: `values`, this rank's 2 x `channels` float64 values (two per-channel quantities,
// one after the other), gathered with every rank's `count`. The row is packed with
// a header into one int64 tensor of the same size on every rank: the header, then room for `capacity` channels of
// each quantity (what followed the previous exchange last time; zeros past this layer's channels). So ranks at
// different layers, or one in backward and another in forward, still exchange alike (a mismatch is our error, not a
// broken collective), and each sees every rank's header before anything is paired. Channels the first all-gather
// had no room for follow in a second one.
GatheredRows exchange_rows(const ProcessGroupPtr& group, detail::ExchangeKind kind, int64_t layer_id, int64_t channels,
                           int64_t count, bool backward_follows, const at::Tensor& values, const std::string& label,
                           const char* doing) {
  const auto device = values.device();
  const ExchangeNumbers numbers = begin_exchange(group, kind);
  const int64_t capacity = numbers.capacity;
  const int64_t first = std::min(channels, capacity);
  const auto kind_code = static_cast<int64_t>(kind);
  at::Tensor packed = at::zeros({kHeader + 2 * capacity}, at::TensorOptions().dtype(at::kLong).device(device));
  packed.narrow(0, 0, kHeader)
      .copy_(detail::host_values_to(at::tensor({numbers.number, kind_code, layer_id, channels, count, numbers.calls,
                                                numbers.backward_exchanges, static_cast<int64_t>(backward_follows)},
                                               at::kLong),
                                    device));
  at::Tensor packed_values = packed.narrow(0, kHeader, 2 * capacity).view(at::kDouble);
  packed_values.narrow(0, 0, first).copy_(values.narrow(0, 0, first));
  packed_values.narrow(0, capacity, first).copy_(values.narrow(0, channels, first));
  at::Tensor gathered;  // (W, kHeader + 2 capacity)
  at::Tensor headers;   // one copy to the host for every rank's header
  {
    // On GPUs the host waits for the other ranks here, in the copy to the host (NCCL's wait only orders streams):
    // that wait too is the group's to bound, not a barrier's (waiting_across_processes.h).
    detail::WaitingAcrossProcesses waiting;
    gathered = all_gather(group, packed, kind, label, doing);
    // ... and a replica thread waits in the group's backend until the copy ends: a wait abandoned there puts the
    // group out of step, as one abandoned in gloo's wait does (check_in_step).
    std::optional<WaitingInBackend> in_backend_until_copied;
    if (!packed.is_cpu()) in_backend_until_copied.emplace(group);
    headers = gathered.narrow(1, 0, kHeader).cpu();
  }
  check_headers_agree(group, headers, numbers.number, kind_code, layer_id, channels, label, doing);
  const auto rows = headers.accessor<int64_t, 2>();
  try {
    check_no_rank_failed(group, rows, label, doing);
  } catch (const BarrierError&) {
    std::lock_guard<std::mutex> lock(calls_mutex());
    if (kind == detail::ExchangeKind::kStatistics) ++calls_of(group).failed_calls;
    throw;
  }
  std::vector<int64_t> counts;
  std::vector<bool> backward_follows_on;
  for (int64_t r = 0; r < rows.size(0); ++r) {
    counts.push_back(rows[r][4]);
    backward_follows_on.push_back(rows[r][7] != 0);
  }

  // Every rank agrees on the exchange: the channels the first all-gather had no room for follow in a second one.
  const at::Tensor gathered_values = gathered.narrow(1, kHeader, 2 * capacity).view(at::kDouble);
  at::Tensor a = gathered_values.narrow(1, 0, first);  // (W, C)
  at::Tensor b = gathered_values.narrow(1, capacity, first);
  if (channels > first) {
    const int64_t rest = channels - first;
    at::Tensor remainder = at::cat({values.narrow(0, first, rest), values.narrow(0, channels + first, rest)});
    const at::Tensor gathered_rest =
        all_gather(group, remainder, kind, label, doing, /*sizes_known_alike=*/true);  // (W, 2 rest)
    a = at::cat({a, gathered_rest.narrow(1, 0, rest)}, 1);
    b = at::cat({b, gathered_rest.narrow(1, rest, rest)}, 1);
  }
  end_exchange(group, exchange_key(kind, layer_id), channels);
  return {std::move(a), std::move(b), std::move(counts), std::move(backward_follows_on)};
}

// Every rank's call sums gradients in backward, or none does: else a BarrierError on every rank alike (after the
// exchange, which every rank completed). A rank's input gradient depends on every rank's batch through the shared
// statistics, so a rank whose call needs none would leave the others waiting in backward (or pair their backward
// exchange with its next forward).
void check_backward_alike(const ProcessGroupPtr& group, const std::vector<bool>& backward_follows,
                          const std::string& label) {
  if (std::all_of(backward_follows.begin(), backward_follows.end(), [&](bool b) { return b == backward_follows[0]; })) {
    return;
  }
  std::ostringstream with, without;
  for (size_t r = 0; r < backward_follows.size(); ++r) (backward_follows[r] ? with : without) << " " << r;
  std::ostringstream out;
  out << "synchronized BatchNorm " << label << ": its statistics require grad on rank(s)" << with.str()
      << " but not on rank(s)" << without.str()
      << " (its input requires grad on some ranks only, or some ranks made the call under torch.no_grad()); every "
         "rank's backward must take part in this call's gradient, since each rank's input gradient depends on every "
         "rank's batch through the shared statistics: freeze the same layers, and set requires_grad and grad mode "
         "alike on every rank";
  throw BarrierError(out.str() + "\n" + where(group, label, "exchanging statistics"));
}

// Takes part in the exchange the other ranks make now with a row marked failed (layer `layer_id`, or kAnyCall): the
// BarrierError that makes every rank fail it is expected, this rank raising its caller's own error instead.
void take_part_as_failed(const ProcessGroupPtr& group, int64_t layer_id, int64_t channels, const std::string& label,
                         at::Device device, const char* doing) {
  const at::Tensor zeros = at::zeros({2 * channels}, at::TensorOptions().dtype(at::kDouble).device(device));
  try {
    exchange_rows(group, detail::ExchangeKind::kStatistics, layer_id, channels, kFailedCall,
                  /*backward_follows=*/false, zeros, label, doing);
  } catch (const BarrierError&) {
    return;
  }
  TORCH_CHECK(false, "the exchange completed without this rank's failure (", label, ")");  // unreachable
}

}  // namespace

bool spans_processes(const ProcessGroupPtr& group) { return group && group->getSize() > 1; }

GroupStatistics merge_across_processes(const ProcessGroupPtr& group, int64_t layer_id, int64_t count,
                                       const at::Tensor& mean, const at::Tensor& m2, const std::string& label,
                                       bool backward_follows) {
  TORCH_CHECK_VALUE(group, "merge_across_processes needs a process group");
  const int64_t channels = mean.numel();
  const at::Tensor statistics =
      at::cat({mean.reshape({channels}).to(at::kDouble), m2.reshape({channels}).to(at::kDouble)});
  const GatheredRows gathered = exchange_rows(group, detail::ExchangeKind::kStatistics, layer_id, channels, count,
                                              backward_follows, statistics, label, "exchanging statistics");
  check_backward_alike(group, gathered.backward_follows, label);
  int64_t total = 0;
  for (const int64_t c : gathered.counts) total += c;

  // Every rank's (mean, M2), merged in rank order: the same float64 operations on every rank.
  at::Tensor count_tensor =
      detail::host_values_to(at::tensor(gathered.counts, at::TensorOptions().dtype(at::kLong)), mean.device());
  auto [group_mean, group_var] = merge_stats(count_tensor, gathered.first, gathered.second);
  return {group_mean, group_var, total};
}

void announce_failed_call(const ProcessGroupPtr& group, int64_t layer_id, int64_t channels, const std::string& label,
                          at::Device device) {
  TORCH_CHECK_VALUE(group, "announce_failed_call needs a process group");
  take_part_as_failed(group, layer_id, channels, label, device, "exchanging statistics");
}

void announce_failed_forward(const ProcessGroupPtr& group, at::Device device, const std::string& label) {
  TORCH_CHECK_VALUE(group, "announce_failed_forward needs a process group");
  take_part_as_failed(group, kAnyCall, /*channels=*/0, label, device,
                      "telling the other ranks that its forward failed");
}

std::pair<at::Tensor, at::Tensor> sum_across_processes(const ProcessGroupPtr& group, int64_t layer_id,
                                                       const at::Tensor& grad_mean, const at::Tensor& grad_var,
                                                       int64_t channels, const std::string& label,
                                                       std::optional<at::Device> zeros_device) {
  TORCH_CHECK_VALUE(group, "sum_across_processes needs a process group");
  const auto device = grad_mean.defined() ? grad_mean.device()
                      : grad_var.defined() ? grad_var.device()
                                           : zeros_device.value_or(at::Device(at::kCPU));
  auto part = [&](const at::Tensor& grad) {
    return grad.defined() ? grad.reshape({channels}).to(at::kDouble)
                          : at::zeros({channels}, at::TensorOptions().dtype(at::kDouble).device(device));
  };
  // An all-gather summed here in rank order rather than an all-reduce: half the steps of a ring all-reduce for these
  // few values per channel (gloo on localhost: 1.2 ms against 2 ms), and the same sum, bitwise, on every rank.
  const GatheredRows gathered =
      exchange_rows(group, detail::ExchangeKind::kGradients, layer_id, channels, 0, /*backward_follows=*/false,
                    at::cat({part(grad_mean), part(grad_var)}), label, "summing gradients");
  // Summed as one contiguous (W, 2C) tensor, as always: a strided half's sum may round otherwise.
  const at::Tensor sum = at::cat({gathered.first, gathered.second}, 1).sum(0);
  return {sum.narrow(0, 0, channels), sum.narrow(0, channels, channels)};
}

}  // namespace syncbn

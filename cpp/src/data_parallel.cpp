#include <syncbn/data_parallel.h>

#include <mutex>
#include <thread>

#include <ATen/ThreadLocalState.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>

#include <syncbn/errors.h>

namespace syncbn {

ReplicaError::ReplicaError(int64_t copy_id, const std::string& message)
    : std::runtime_error(message), copy_id_(copy_id) {}

namespace detail {

namespace {

constexpr const char* kAbortTag = "syncbn::parallel_apply: replica ";

std::string where(int64_t copy_id, const std::optional<std::vector<torch::Device>>& devices) {
  return "in replica " + std::to_string(copy_id) + " on device " +
         (devices ? (*devices)[copy_id].str() : std::string("of the caller"));
}

// Rethrows `error` naming the replica: c10 errors keep their type, with context
// added; others become a ReplicaError with the original nested.
[[noreturn]] void rethrow_from_replica(const std::exception_ptr& error, int64_t copy_id,
                                       const std::optional<std::vector<torch::Device>>& devices) {
  try {
    std::rethrow_exception(error);
  } catch (c10::Error& e) {
    e.add_context("Raised " + where(copy_id, devices));
    throw;
  } catch (const std::exception& e) {
    std::throw_with_nested(ReplicaError(copy_id, "Caught " + std::string(e.what()) + " " + where(copy_id, devices)));
  }
}

bool caused_by_abort(const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const BarrierAbortedError& e) {
    return std::string(e.what()).find(kAbortTag) != std::string::npos;
  } catch (...) {
    return false;
  }
}

}  // namespace

void run_replicas(int64_t n, const std::function<void(int64_t)>& body,
                  const std::function<void(const std::string&)>& on_failure,
                  const std::optional<std::vector<torch::Device>>& devices) {
  std::vector<std::exception_ptr> errors(n);
  std::once_flag abort_once;
  const at::ThreadLocalState caller_state;  // grad mode, autocast, ...
  auto run = [&](int64_t i) {
    try {
      at::ThreadLocalStateGuard state_guard(caller_state);
      c10::OptionalDeviceGuard device_guard;
      if (devices) device_guard.reset_device((*devices)[i]);
      body(i);
    } catch (...) {
      errors[i] = std::current_exception();
      std::call_once(abort_once, [&] {
        std::string message = "<unknown>";
        try {
          std::rethrow_exception(errors[i]);
        } catch (const std::exception& e) {
          message = e.what();
        } catch (...) {
        }
        on_failure(kAbortTag + std::to_string(i) + " raised: " + message.substr(0, message.find('\n')));
      });
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (int64_t i = 0; i < n; ++i) threads.emplace_back(run, i);
  for (auto& thread : threads) thread.join();

  int64_t first = -1;
  for (int64_t i = 0; i < n && first < 0; ++i) {
    if (errors[i] && !caused_by_abort(errors[i])) first = i;
  }
  for (int64_t i = 0; i < n && first < 0; ++i) {
    if (errors[i]) first = i;
  }
  if (first >= 0) rethrow_from_replica(errors[first], first, devices);
}

void notify_replica_failure(const std::vector<std::shared_ptr<torch::nn::Module>>& replicas,
                            const std::string& reason) {
  for (const auto& replica : replicas) {
    for (const auto& module : replica->modules(/*include_self=*/true)) {
      if (auto hook = std::dynamic_pointer_cast<ReplicationCallback>(module)) hook->on_replica_failure(reason);
    }
  }
}

void notify_copy_finished(const std::shared_ptr<torch::nn::Module>& replica) {
  for (const auto& module : replica->modules(/*include_self=*/true)) {
    if (auto hook = std::dynamic_pointer_cast<ReplicationCallback>(module)) hook->on_copy_finished();
  }
}

std::vector<torch::Tensor> scatter(const torch::Tensor& input, const std::vector<torch::Device>& devices,
                                   int64_t dim) {
  std::vector<torch::Tensor> slices = input.chunk(static_cast<int64_t>(devices.size()), dim);
  for (size_t i = 0; i < slices.size(); ++i) {
    // A copy per replica, as on separate GPUs: in-place layers in one replica must
    // not write into the caller's input or a base the other threads share.
    slices[i] = slices[i].device() == devices[i] ? slices[i].clone() : slices[i].to(devices[i]);
  }
  return slices;
}

torch::Tensor gather(const std::vector<torch::Tensor>& outputs, const torch::Device& device, int64_t dim) {
  std::vector<torch::Tensor> moved;
  moved.reserve(outputs.size());
  for (const auto& output : outputs) moved.push_back(output.to(device));
  return torch::cat(moved, dim);
}

}  // namespace detail

}  // namespace syncbn

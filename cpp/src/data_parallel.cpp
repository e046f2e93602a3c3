#include <syncbn/data_parallel.h>

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <sstream>
#include <thread>

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include <syncbn/errors.h>

// at::set_num_threads sets the calling thread's count and also the process-wide default that threads started
// later take (threads started meanwhile, and every later one once a thread that got a replica's share ran
// data_parallel itself, got the share). torch's OpenMP backend keeps each thread's count in OpenMP's per-thread
// state, so set only that. Weak: resolved in the OpenMP runtime torch loaded, null where torch has none.
extern "C" void omp_set_num_threads(int) __attribute__((weak));

namespace syncbn {

bool thread_intra_op_threads_supported() { return &omp_set_num_threads != nullptr; }

bool set_thread_intra_op_threads(int threads) {
  TORCH_CHECK_VALUE(threads > 0, "set_thread_intra_op_threads: the number of threads must be positive, got ",
                    threads);
  if (!thread_intra_op_threads_supported()) return false;
  // torch sizes a thread's OpenMP team lazily, at its first parallel op, to the process-wide count, which would
  // undo a count set before: let it do that now, then set this thread's own.
  at::get_num_threads();
  omp_set_num_threads(threads);
  return true;
}

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
// added; barrier errors (which name their layer and copies) are rethrown as
// they are; others become a ReplicaError with the original nested.
[[noreturn]] void rethrow_from_replica(const std::exception_ptr& error, int64_t copy_id,
                                       const std::optional<std::vector<torch::Device>>& devices) {
  try {
    std::rethrow_exception(error);
  } catch (c10::Error& e) {
    e.add_context("Raised " + where(copy_id, devices));
    throw;
  } catch (const BarrierError&) {
    throw;  // names its barrier, layer and copies already
  } catch (const std::exception& e) {
    std::throw_with_nested(ReplicaError(copy_id, "Caught " + std::string(e.what()) + " " + where(copy_id, devices)));
  } catch (...) {  // not a std::exception (a thrown int, a foreign type): nested all the same
    std::throw_with_nested(ReplicaError(copy_id, "Caught an exception of a type not derived from std::exception " +
                                                     where(copy_id, devices)));
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

// What the caller and the replica threads share; outlives run_replicas when a
// replica is left behind.
struct ReplicaRun {
  ReplicaRun(int64_t n, std::function<void(int64_t)> body, std::function<void(const std::string&)> on_failure,
             std::optional<std::vector<torch::Device>> devices, std::shared_ptr<ReplicationGroup> group,
             int intra_op_threads, double timeout)
      : body(std::move(body)),
        on_failure(std::move(on_failure)),
        devices(std::move(devices)),
        group(std::move(group)),
        caller_streams(current_streams(this->devices)),
        intra_op_threads(intra_op_threads),
        errors(n),
        done(n, false),
        wait(timeout) {}

  // The caller's current stream on each accelerator of `devices` (none for the CPU).
  static std::vector<c10::Stream> current_streams(const std::optional<std::vector<torch::Device>>& devices) {
    std::vector<c10::Stream> streams;
    if (!devices) return streams;
    for (const auto& device : *devices) {
      if (device.is_cpu()) continue;
      const bool seen = std::any_of(streams.begin(), streams.end(),
                                    [&](const c10::Stream& s) { return s.device() == device; });
      if (!seen) streams.push_back(c10::impl::getDeviceGuardImpl(device.type())->getStream(device));
    }
    return streams;
  }

  const std::function<void(int64_t)> body;
  const std::function<void(const std::string&)> on_failure;
  const std::optional<std::vector<torch::Device>> devices;
  const std::shared_ptr<ReplicationGroup> group;
  const at::ThreadLocalState caller_state;  // grad mode, autocast, ...
  // Current in every replica's thread, for every device: current streams are per thread, and a replica copying
  // the master's merged statistics from device 0 must do it on the stream they were computed on (the caller's).
  const std::vector<c10::Stream> caller_streams;
  const int intra_op_threads;              // each replica thread's; 0: left as torch sets it

  std::mutex mutex;
  std::condition_variable changed;
  std::vector<std::exception_ptr> errors;  // guarded by mutex
  std::vector<bool> done;                  // guarded by mutex
  int64_t finished = 0;                    // guarded by mutex
  ReplicaWaitPolicy wait;                  // guarded by mutex
  bool failure_reported = false;           // guarded by mutex: on_failure runs once

  void run(int64_t i) {
    if (intra_op_threads > 0) set_thread_intra_op_threads(intra_op_threads);
    std::exception_ptr error;
    try {
      at::ThreadLocalStateGuard state_guard(caller_state);
      std::optional<ReplicaScope> scope;
      if (group) scope.emplace(group, i);
      c10::MultiStreamGuard stream_guard(caller_streams);
      c10::OptionalDeviceGuard device_guard;
      if (devices) device_guard.reset_device((*devices)[i]);
      body(i);
      // Nobody waits for this copy any more, in any barrier of the replication (a module's own SyncMaster added
      // to the group too, not only the library's layers).
      if (group) group->copy_finished(i);
    } catch (...) {
      error = std::current_exception();
    }
    bool report = false;
    {
      std::lock_guard<std::mutex> lock(mutex);
      errors[i] = error;
      done[i] = true;
      ++finished;
      if (error) {
        wait.failed();
        report = !failure_reported;
        failure_reported = true;
      } else {
        wait.returned();
      }
    }
    if (report) {
      // Wake the others (they may wait for this copy in a barrier), and make sure none of them writes anything.
      const std::string reason = kAbortTag + std::to_string(i) + " raised: " + first_line(error);
      if (group) group->close(reason);
      try {
        on_failure(reason);
      } catch (...) {  // a failing hook must not hide the replica's own error
      }
    }
    changed.notify_all();
  }

  static std::string first_line(const std::exception_ptr& error) {
    std::string message = "<unknown>";
    try {
      std::rethrow_exception(error);
    } catch (const std::exception& e) {
      message = e.what();
    } catch (...) {
    }
    return message.substr(0, message.find('\n'));
  }
};

}  // namespace

void run_replicas(int64_t n, std::function<void(int64_t)> body, std::function<void(const std::string&)> on_failure,
                  const std::optional<std::vector<torch::Device>>& devices, std::shared_ptr<ReplicationGroup> group) {
  const double timeout = default_timeout_seconds();
  // CPU replicas computing at once share the caller's intra-op threads instead of oversubscribing the cores.
  const bool on_cpu = !devices || std::all_of(devices->begin(), devices->end(), [](const torch::Device& device) {
    return device.is_cpu();
  });
  const int caller_threads = at::get_num_threads();
  const int share = on_cpu && thread_intra_op_threads_supported()
                        ? std::max<int>(1, static_cast<int>(caller_threads / std::max<int64_t>(n, 1)))
                        : 0;
  auto state = std::make_shared<ReplicaRun>(n, std::move(body), std::move(on_failure), devices, group, share, timeout);
  std::vector<std::thread> threads;
  threads.reserve(n);
  try {
    for (int64_t i = 0; i < n; ++i) threads.emplace_back([state, i] { state->run(i); });
  } catch (...) {
    // A thread could not start (the process's thread limit): those that did would wait for it at the barrier.
    // Close their replication so that they stop and write nothing, and leave them (they own what they use).
    const std::string reason = std::string(kAbortTag) + std::to_string(threads.size()) + " could not be started";
    if (state->group) state->group->close(reason);
    try {
      state->on_failure(reason);
    } catch (...) {
    }
    for (auto& thread : threads) thread.detach();
    throw;
  }

  std::unique_lock<std::mutex> lock(state->mutex);
  // Wait for every replica, within the policy's bounds (a grace period after a failure, the timeout after a return).
  while (state->finished < n) {
    const auto deadline = state->wait.deadline();
    if (!deadline) {
      state->changed.wait(lock);
    } else if (!state->changed.wait_until(lock, *deadline, [&] {
                 return state->finished == n || state->wait.deadline() != deadline;
               }) &&
               !state->wait.renew()) {
      break;  // given up on the replicas still running
    }
  }
  std::vector<int64_t> missing;
  for (int64_t i = 0; i < n; ++i) {
    if (!state->done[i]) missing.push_back(i);
  }
  const std::vector<std::exception_ptr> errors = state->errors;
  lock.unlock();

  std::string missing_text;
  for (size_t k = 0; k < missing.size(); ++k) missing_text += (k ? ", " : "") + std::to_string(missing[k]);
  for (int64_t i = 0; i < n; ++i) {
    if (std::find(missing.begin(), missing.end(), i) == missing.end()) {
      threads[i].join();
    } else {
      threads[i].detach();  // owns `state`: the replica can finish (or fail) later, writing nothing
    }
  }
  if (!missing.empty() && group) {
    group->close(std::string("syncbn::parallel_apply gave up on replica(s) [") + missing_text +
                 "], which did not return in time");
  }

  int64_t first = -1;
  for (int64_t i = 0; i < n && first < 0; ++i) {
    if (errors[i] && !caused_by_abort(errors[i])) first = i;
  }
  for (int64_t i = 0; i < n && first < 0; ++i) {
    if (errors[i]) first = i;
  }
  if (first >= 0) rethrow_from_replica(errors[first], first, devices);
  if (!missing.empty()) {
    std::ostringstream out;
    out << "syncbn::parallel_apply: replica(s) [" << missing_text << "] did not return within " << timeout
        << " s of the first replica's return (or of a later wait for other ranks); they were left running, detached"
        << (group ? ", and their replication was closed so that they can write nothing"
                  : " (no replication group was given, so nothing stops them writing)")
        << " (raise SYNCBN_TIMEOUT, in seconds, to wait longer)";
    throw BarrierTimeoutError(out.str());
  }
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

std::optional<std::vector<torch::Device>> with_indices(const std::optional<std::vector<torch::Device>>& devices) {
  if (!devices) return devices;
  std::vector<torch::Device> resolved = *devices;
  for (auto& device : resolved) {
    if (!device.is_cpu() && !device.has_index()) device = c10::impl::getDeviceGuardImpl(device.type())->getDevice();
  }
  return resolved;
}

void check_on_first_device(const torch::nn::Module& module, const torch::Device& first) {
  // "cuda" without an index is the current device (with_indices resolves the devices first); CPU tensors have none.
  const auto on_first = [&](const torch::Device& device) {
    return device.type() == first.type() && (!first.has_index() || device.is_cpu() || device.index() == first.index());
  };
  auto check = [&](const torch::Tensor& tensor) {
    TORCH_CHECK_VALUE(!tensor.defined() || on_first(tensor.device()),
                      "data_parallel: the module must have its parameters and buffers on device ", first,
                      " (devices[0], where replica 0 runs and whose buffers are written back) but found one of them "
                      "on device ",
                      tensor.device(), ": move the module there first (module->to(devices[0]))");
  };
  for (const auto& parameter : module.parameters()) check(parameter);
  for (const auto& buffer : module.buffers()) check(buffer);
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
  bool all_scalars = true;
  for (size_t i = 0; i < outputs.size(); ++i) {
    TORCH_CHECK(outputs[i].defined(), "data_parallel: replica ", i,
                " returned an undefined tensor, which cannot be gathered with the others' outputs");
    all_scalars = all_scalars && outputs[i].dim() == 0;
    moved.push_back(outputs[i].to(device));
  }
  // Joined as they are: under the caller's autocast, cat promotes, and CPU autocast refuses the 16-bit type other
  // than its own (float16 outputs under bfloat16 autocast), which one module on the whole batch returns.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  if (all_scalars && dim == 0) {
    TORCH_WARN_ONCE("data_parallel: was asked to gather along dimension 0, but all the replicas' outputs are "
                    "scalars; returning them as a vector instead (as nn.DataParallel does)");
    return torch::stack(moved);
  }
  return torch::cat(moved, dim);
}

}  // namespace detail

}  // namespace syncbn

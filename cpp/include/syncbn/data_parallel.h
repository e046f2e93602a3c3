#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <torch/cuda.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <syncbn/export.h>
#include <syncbn/forward_across_processes.h>
#include <syncbn/replica_wait.h>
#include <syncbn/replicate.h>
#include <syncbn/replication_group.h>
#include <syncbn/training_forward_lock.h>

namespace syncbn {

// A replica failed with an exception that is neither a c10::Error (those are
// rethrown as they are, with the replica named in their context) nor a
// syncbn::BarrierError (rethrown as it is: it names its layer and copies). The
// original exception is nested: std::rethrow_if_nested(error) gives it back.
class SYNCBN_API ReplicaError : public std::runtime_error {
 public:
  ReplicaError(int64_t copy_id, const std::string& message);
  int64_t copy_id() const { return copy_id_; }

 private:
  int64_t copy_id_;
};

// Sets the calling thread's own intra-op thread count (what its ATen parallel ops use): OpenMP's per-thread
// count, which torch's OpenMP backend reads, where at::set_num_threads also sets the process-wide count that
// every thread started later takes. Sizes the thread's team first (at::get_num_threads(): ATen would otherwise
// size it at the thread's first parallel op to the process-wide count, undoing this). Returns false, changing
// nothing, with a torch built without OpenMP (its thread pools have one process-wide size).
SYNCBN_API bool set_thread_intra_op_threads(int threads);
// Whether set_thread_intra_op_threads can set a per-thread count (torch has OpenMP).
SYNCBN_API bool thread_intra_op_threads_supported();

namespace detail {

// Runs body(i) for every i in [0, n), each on its own std::thread (never
// at::parallel_for: replicas wait on each other), with the caller's thread-local
// state (grad mode, autocast) and device i current, and, given a group, inside
// a ReplicaScope of it. When one throws, on_failure(reason) runs once and the
// group is closed, so the others stop waiting for it and can write nothing.
//
// Waits for every thread, but never for ever (ReplicaWaitPolicy): once a
// replica failed, at most kFailureGraceSeconds more; once one returned, at
// most $SYNCBN_TIMEOUT more for the others (counted from the end of a later
// wait for other ranks, which the group's timeout bounds). The threads
// still running then are detached (their replication closed: they can write
// nothing, and end at their next barrier) and the first failure (the lowest
// copy id, not counting errors the abort itself caused) is rethrown, naming its
// replica, or a BarrierTimeoutError naming the replicas that never returned.
// `body` and `on_failure` may thus run after this returns: they must own what
// they use (capture by value).
SYNCBN_API void run_replicas(int64_t n, std::function<void(int64_t)> body,
                             std::function<void(const std::string&)> on_failure,
                             const std::optional<std::vector<torch::Device>>& devices,
                             std::shared_ptr<ReplicationGroup> group = nullptr);

// Calls on_replica_failure(reason) on every module of every replica that implements ReplicationCallback.
SYNCBN_API void notify_replica_failure(const std::vector<std::shared_ptr<torch::nn::Module>>& replicas,
                                       const std::string& reason);

// Calls on_copy_finished() on every module of `replica` that implements ReplicationCallback.
SYNCBN_API void notify_copy_finished(const std::shared_ptr<torch::nn::Module>& replica);

// `devices` with every accelerator device named without an index ("cuda") made the calling thread's current one
// of its type, as nn.DataParallel resolves its device ids: each replica thread has a current device of its own.
SYNCBN_API std::optional<std::vector<torch::Device>> with_indices(
    const std::optional<std::vector<torch::Device>>& devices);

// As nn.DataParallel: the module's parameters and buffers must be on the first device, where replica 0 runs
// (its buffers are the ones written back). Throws a ValueError naming the device of one that is not.
SYNCBN_API void check_on_first_device(const torch::nn::Module& module, const torch::Device& first);

// nn.DataParallel's scatter for one tensor: chunks along `dim` (at most one per
// device; fewer when the batch is smaller), each copied onto its device.
SYNCBN_API std::vector<torch::Tensor> scatter(const torch::Tensor& input, const std::vector<torch::Device>& devices,
                                              int64_t dim);

// Concatenates the outputs along `dim` on `device` (differentiably); outputs that are all scalars (0-dim)
// with `dim` 0 are stacked into a vector, with a warning (once), as nn.DataParallel's gather does. An undefined
// output is an error naming its replica.
SYNCBN_API torch::Tensor gather(const std::vector<torch::Tensor>& outputs, const torch::Device& device, int64_t dim);

template <class T>
std::shared_ptr<torch::nn::Module> as_module(const std::shared_ptr<T>& module) {
  return module;
}
template <class T>
std::shared_ptr<torch::nn::Module> as_module(const torch::nn::ModuleHolder<T>& module) {
  return module.ptr();
}

}  // namespace detail

// Runs modules[i]->forward(inputs[i]) for every i at once, one std::thread per
// replica (see detail::run_replicas: bounded waits, failures rethrown with their
// copy id after the others were woken). Given the replication's group, its
// threads run in a ReplicaScope and a failure closes it. CPU replicas each get
// their share of the caller's intra-op threads (at::get_num_threads() / n, at
// least one), so that together they use the cores one module would. The share
// is set in the replica threads alone (OpenMP's per-thread count, not
// at::set_num_threads, which also sets the count of threads started later);
// with a torch built without OpenMP the replicas keep torch's count.
template <typename ModuleType>
std::vector<torch::Tensor> parallel_apply(std::vector<ModuleType>& modules, const std::vector<torch::Tensor>& inputs,
                                          const std::optional<std::vector<torch::Device>>& devices = std::nullopt,
                                          std::shared_ptr<ReplicationGroup> group = nullptr) {
  TORCH_CHECK_VALUE(modules.size() == inputs.size(), "parallel_apply: ", modules.size(), " replicas but ",
                    inputs.size(), " inputs");
  TORCH_CHECK_VALUE(!devices || devices->size() == modules.size(), "parallel_apply: ", modules.size(),
                    " replicas but ", devices->size(), " devices");
  // The replicas of syncbn::replicate on this thread: their group, which it could not return.
  if (!group && !modules.empty()) group = detail::take_remembered_replication(detail::as_module(modules.front()).get());
  // Shared with the replica threads, which may outlive this call (a replica left behind).
  struct Work {
    std::vector<ModuleType> modules;
    std::vector<std::shared_ptr<torch::nn::Module>> replicas;
    std::vector<torch::Tensor> inputs, outputs;
  };
  auto work = std::make_shared<Work>();
  work->modules = modules;
  for (const auto& module : modules) work->replicas.push_back(detail::as_module(module));
  work->inputs = inputs;
  work->outputs.resize(modules.size());
  detail::run_replicas(
      static_cast<int64_t>(modules.size()),
      [work](int64_t i) {
        const auto index = static_cast<size_t>(i);
        torch::Tensor output = work->modules[index]->forward(work->inputs[index]);
        detail::notify_copy_finished(work->replicas[index]);  // nobody waits for this copy any more
        work->outputs[index] = std::move(output);
      },
      [work](const std::string& reason) { detail::notify_replica_failure(work->replicas, reason); },
      detail::with_indices(devices), std::move(group));
  return work->outputs;
}

namespace detail {

// data_parallel's forward, once `devices` (none: no GPU: the module runs directly) are known, under the module's
// TrainingForwardLock.
template <typename ModuleType>
torch::Tensor data_parallel_forward(ModuleType& module, const std::shared_ptr<torch::nn::Module>& original,
                                    const torch::Tensor& input,
                                    const std::optional<std::vector<torch::Device>>& devices,
                                    const std::optional<torch::Device>& output_device, int64_t dim) {
  if (!devices) return module->forward(input);
  TORCH_CHECK_VALUE(!devices->empty(), "data_parallel needs at least one device");
  const torch::Device destination = output_device.value_or(devices->front());
  detail::check_on_first_device(*original, devices->front());  // one device too: before anything runs
  if (devices->size() == 1) return module->forward(input.to(devices->front())).to(destination);

  std::vector<torch::Tensor> inputs = detail::scatter(input, *devices, dim);
  std::vector<torch::Device> used(devices->begin(), devices->begin() + static_cast<int64_t>(inputs.size()));
  if (inputs.size() == 1) return module->forward(inputs.front()).to(destination);

  std::vector<std::shared_ptr<torch::nn::Module>> clones;
  for (const auto& device : used) clones.push_back(module->clone(device));
  IsolatedReplication replication(original, clones);
  using Replica = std::remove_pointer_t<decltype(std::declval<ModuleType&>().operator->())>;
  std::vector<std::shared_ptr<Replica>> replicas;
  for (const auto& clone : clones) {
    replicas.push_back(std::dynamic_pointer_cast<Replica>(clone));
    TORCH_CHECK(replicas.back() != nullptr, "data_parallel: clone() of the module returned a module of another type; ",
                "derive the module from torch::nn::Cloneable<ItsOwnType>");
  }
  std::vector<torch::Tensor> outputs = parallel_apply(replicas, inputs, used, replication.group());
  torch::Tensor output = detail::gather(outputs, destination, dim);  // before the write-back: a failure writes nothing
  replication.write_back();
  return output;
}

}  // namespace detail

// nn.DataParallel for LibTorch, with the replication callbacks: scatters `input`
// along `dim`, replicates `module` (clone() per device, then the callbacks),
// runs the replicas with syncbn::parallel_apply and gathers the outputs along
// `dim` on `output_device` (default: the first device). `devices`: CUDA devices
// (default: all of them), or N CPU replicas, std::vector<torch::Device>(N,
// torch::kCPU). With one device the module runs directly (its placement on
// it checked first), and so it does with none given and no GPU.
//
// Replica 0 works on copies of the module's buffers, written back only once
// every replica succeeded (IsolatedReplication): a failed, interrupted or timed
// out forward leaves every buffer untouched, and a replica left running (see
// detail::run_replicas) can write nothing. Training forwards of one module from
// several threads run one after another (TrainingForwardLock), each replicating
// the buffers the previous one wrote back. Across processes (layers given a
// process group), a forward that fails before its first synchronized call
// tells the other ranks, which fail that call too (ForwardAcrossProcesses).
template <typename ModuleType>
torch::Tensor data_parallel(ModuleType module, const torch::Tensor& input,
                            std::optional<std::vector<torch::Device>> devices = std::nullopt,
                            std::optional<torch::Device> output_device = std::nullopt, int64_t dim = 0) {
  const std::shared_ptr<torch::nn::Module> original = detail::as_module(module);
  if (!devices) {
    const auto count = static_cast<int64_t>(torch::cuda::device_count());
    if (count > 0) devices.emplace();
    for (int64_t i = 0; i < count; ++i) devices->emplace_back(torch::kCUDA, static_cast<c10::DeviceIndex>(i));
  }
  devices = detail::with_indices(devices);
  // Its replicas would make a replication of their own, synchronizing among themselves only. (Before the lock: a
  // replica's forward calling it with the outer module would wait for the outer forward, which waits for it.)
  TORCH_CHECK(!devices || devices->size() < 2 || ReplicaScope::current_group() == nullptr,
              "data_parallel was called inside a replica of another data_parallel (nested): its replicas would "
              "synchronize their BatchNorm statistics among themselves only, not over the whole batch. Call "
              "data_parallel once (the outer replicas already split the batch)");
  // Training forwards write the module's buffers (the replicas' through replica 0's write-back): one after another,
  // whatever the path. Then, counted from here, a failure before this forward's first synchronized call is told.
  const TrainingForwardLock one_training_forward_at_a_time(original);
  ForwardAcrossProcesses across_processes(*original, devices && !devices->empty() ? devices->front()
                                                                                  : torch::Device(torch::kCPU));
  try {
    return detail::data_parallel_forward(module, original, input, devices, output_device, dim);
  } catch (...) {
    across_processes.failed();  // a failure before the forward's first synchronized call: the other ranks are told
    throw;
  }
}

}  // namespace syncbn

#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/cuda.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <syncbn/export.h>
#include <syncbn/replicate.h>

namespace syncbn {

// A replica failed with an exception that is not a c10::Error (those are
// rethrown as they are, with the replica named in their context). The original
// exception is nested: std::rethrow_if_nested(error) gives it back.
class SYNCBN_API ReplicaError : public std::runtime_error {
 public:
  ReplicaError(int64_t copy_id, const std::string& message);
  int64_t copy_id() const { return copy_id_; }

 private:
  int64_t copy_id_;
};

namespace detail {

// Runs body(i) for every i in [0, n), each on its own std::thread (never
// at::parallel_for: replicas wait on each other), with the caller's thread-local
// state (grad mode, autocast) and device i current. When one throws,
// on_failure(reason) runs once so the others stop waiting for it; after every
// thread has stopped, the first failure (the lowest copy id, not counting errors
// the abort itself caused) is rethrown, naming its replica.
SYNCBN_API void run_replicas(int64_t n, const std::function<void(int64_t)>& body,
                             const std::function<void(const std::string&)>& on_failure,
                             const std::optional<std::vector<torch::Device>>& devices);

// Calls on_replica_failure(reason) on every module of every replica that implements ReplicationCallback.
SYNCBN_API void notify_replica_failure(const std::vector<std::shared_ptr<torch::nn::Module>>& replicas,
                                       const std::string& reason);

// Calls on_copy_finished() on every module of `replica` that implements ReplicationCallback.
SYNCBN_API void notify_copy_finished(const std::shared_ptr<torch::nn::Module>& replica);

// nn.DataParallel's scatter for one tensor: chunks along `dim` (at most one per
// device; fewer when the batch is smaller), each copied onto its device.
SYNCBN_API std::vector<torch::Tensor> scatter(const torch::Tensor& input, const std::vector<torch::Device>& devices,
                                              int64_t dim);

// Concatenates the outputs along `dim` on `device` (differentiably).
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
// replica. The first exception is rethrown with its copy id after every thread
// has stopped; the replicas' barriers are aborted first, so no thread is left
// waiting for the failed one.
template <typename ModuleType>
std::vector<torch::Tensor> parallel_apply(std::vector<ModuleType>& modules, const std::vector<torch::Tensor>& inputs,
                                          const std::optional<std::vector<torch::Device>>& devices = std::nullopt) {
  TORCH_CHECK_VALUE(modules.size() == inputs.size(), "parallel_apply: ", modules.size(), " replicas but ",
                    inputs.size(), " inputs");
  TORCH_CHECK_VALUE(!devices || devices->size() == modules.size(), "parallel_apply: ", modules.size(),
                    " replicas but ", devices->size(), " devices");
  std::vector<std::shared_ptr<torch::nn::Module>> replicas;
  for (const auto& module : modules) replicas.push_back(detail::as_module(module));
  std::vector<torch::Tensor> outputs(modules.size());
  detail::run_replicas(
      static_cast<int64_t>(modules.size()),
      [&](int64_t i) {
        outputs[i] = modules[i]->forward(inputs[i]);
        detail::notify_copy_finished(replicas[i]);  // nobody waits for this copy any more
      },
      [&](const std::string& reason) { detail::notify_replica_failure(replicas, reason); }, devices);
  return outputs;
}

// nn.DataParallel for LibTorch, with the replication callbacks: scatters `input`
// along `dim`, replicates `module` with syncbn::replicate, runs the replicas with
// syncbn::parallel_apply and gathers the outputs along `dim` on `output_device`
// (default: the first device). `devices`: CUDA devices (default: all of them),
// or N CPU replicas, std::vector<torch::Device>(N, torch::kCPU). With one
// device, or none given and no GPU, the module runs directly.
template <typename ModuleType>
torch::Tensor data_parallel(ModuleType module, const torch::Tensor& input,
                            std::optional<std::vector<torch::Device>> devices = std::nullopt,
                            std::optional<torch::Device> output_device = std::nullopt, int64_t dim = 0) {
  if (!devices) {
    const auto count = static_cast<int64_t>(torch::cuda::device_count());
    if (count == 0) return module->forward(input);
    devices.emplace();
    for (int64_t i = 0; i < count; ++i) devices->emplace_back(torch::kCUDA, static_cast<c10::DeviceIndex>(i));
  }
  TORCH_CHECK_VALUE(!devices->empty(), "data_parallel needs at least one device");
  const torch::Device destination = output_device.value_or(devices->front());
  if (devices->size() == 1) return module->forward(input.to(devices->front())).to(destination);

  std::vector<torch::Tensor> inputs = detail::scatter(input, *devices, dim);
  std::vector<torch::Device> used(devices->begin(), devices->begin() + static_cast<int64_t>(inputs.size()));
  if (inputs.size() == 1) return module->forward(inputs.front()).to(destination);
  auto replicas = replicate(module, used);
  return detail::gather(parallel_apply(replicas, inputs, used), destination, dim);
}

}  // namespace syncbn

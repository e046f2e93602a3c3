#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <syncbn/callback_context.h>
#include <syncbn/export.h>
#include <syncbn/replication_group.h>
#include <syncbn/training_forward_lock.h>  // declared here before it had its own header

namespace syncbn {

// Implemented by modules that must learn, after replication, which copy they
// are and share state with their twins in the other replicas (the established
// library's `__data_parallel_replicate__(ctx, copy_id)`).
class SYNCBN_API ReplicationCallback {
 public:
  virtual ~ReplicationCallback() = default;
  virtual void on_replicate(CallbackContext& context, int64_t copy_id) = 0;
  // Called by syncbn::parallel_apply on every replica when one replica failed:
  // wake whatever this copy's twins may be waiting on (e.g. abort a barrier).
  virtual void on_replica_failure(const std::string& reason) { (void)reason; }
  // Called by syncbn::parallel_apply on a replica's modules once its forward
  // returned: this copy takes part in no more passes (SyncMaster::finish).
  virtual void on_copy_finished() {}
};

// One module of a replica's tree, as the traversal sees it: a type name for the
// isomorphism check, and the hook to call (empty when the module has none).
// Lets the same traversal serve LibTorch modules and foreign (Python) ones; the
// hook gets the context's owner so that a foreign module may keep it.
struct ReplicaModule {
  std::string type_name;
  std::function<void(const std::shared_ptr<CallbackContext>&, int64_t)> on_replicate;
  std::string name;  // the module's path in the replica ("" for the root), for error messages
};

// Walks the replicas' module lists position by position, one shared context per
// position, and calls each module's hook with its copy id; at every position the
// master (copy 0) runs before any other copy. Replicas whose module lists differ
// in length or type get a ValueError naming the first differing position.
// Returns the contexts, one per position; they share one ReplicationGroup
// (context->group()), which the caller tells when a copy finishes or fails.
SYNCBN_API std::vector<std::shared_ptr<CallbackContext>> execute_replication_callbacks(
    const std::vector<std::vector<ReplicaModule>>& replicas);

// The LibTorch form: each replica's `modules()` (itself first, depth first), and
// the hook of every module that derives from ReplicationCallback.
SYNCBN_API std::vector<std::shared_ptr<CallbackContext>> execute_replication_callbacks(
    const std::vector<std::shared_ptr<torch::nn::Module>>& replicas);

// A replica's handle on `parameter`: the same data (and version counter), its
// gradient handed to the parameter's through a node autograd runs as soon as
// that gradient is complete, as it runs AccumulateGrad. A plain view's node is
// created before the replica's forward, so autograd, which runs the most
// recently created ready node first, would reach it only at the end of the
// backward: every replica's gradient of every parameter would stay alive until
// then and be summed then. A parameter that does not require grad gets a
// detached alias.
SYNCBN_API at::Tensor parameter_alias(const at::Tensor& parameter);

// Every replica's handle on `parameter`, replica 0 first: each as parameter_alias's,
// and the replicas' gradients summed in replica order (whichever replica's
// backward finishes first) by one node before they reach the parameter's, as
// complete_replication links clones: a backward's parameter gradients are then
// the same bits whether it runs the replicas' backward in one thread or several.
// Each handle has a node of its own, made here, so that replica threads never
// link their graphs to a node they share (pytorch/pytorch#58442).
SYNCBN_API std::vector<at::Tensor> parameter_aliases(const at::Tensor& parameter, int64_t replicas);

// Completes a replication made of clones of `original` (one per device, copy 0
// first): gradient edges from every clone's parameters to the original's (the
// gradients of all replicas add up on the original, as with nn.DataParallel),
// replica 0's buffers sharing storage with the original's when on the same
// device (so buffer updates such as BatchNorm running statistics land on the
// original), then the replication callbacks. Returns the contexts.
SYNCBN_API std::vector<std::shared_ptr<CallbackContext>> complete_replication(
    const std::shared_ptr<torch::nn::Module>& original, const std::vector<std::shared_ptr<torch::nn::Module>>& clones);

// A tensor's version counter; none for an inference tensor, which has none.
SYNCBN_API std::optional<int64_t> version_of(const at::Tensor& tensor);

// A buffer of a module and replica 0's copy of it, with both versions (as
// version_of) when the copy was made.
struct BufferCopy {
  at::Tensor original, copy;
  std::optional<int64_t> original_version, copy_version;
};

// Copies into each original the copy replica 0 changed (in place, resized as
// the copy was). Changed: its version moved or, since some kernels write their
// arguments in place without counting a version (BatchNorm's running
// statistics, fake quantization's observers, which may also resize them), its
// shape or values differ from the original's, unless the original was written
// in the meantime (through a reference the module keeps besides its buffers:
// that write stays). Every buffer is compared before any is written, so an
// original that views another (and sees its write) is not taken for changed.
// Only dense tensors can be compared (at::equal; on an accelerator, all of
// them at once, waiting for the device once); others go by their version.
// A tensor without a version (an inference tensor: copies made, or a module
// built, under inference mode) goes by comparison alone; a non-dense copy
// without one is copied back.
// Used by IsolatedReplication and by Python's CPU replicas.
SYNCBN_API void write_back_buffers(const std::vector<BufferCopy>& buffers);

// A replication whose replica 0 works on copies of the original's buffers:
// nothing a replica does reaches the original until write_back() (after every
// replica's forward succeeded) copies the buffers replica 0 changed into the
// original's. A replica thread left behind (a timeout, a failure elsewhere) can
// then never write the user's module. syncbn::data_parallel uses it.
class SYNCBN_API IsolatedReplication {
 public:
  IsolatedReplication(const std::shared_ptr<torch::nn::Module>& original,
                      const std::vector<std::shared_ptr<torch::nn::Module>>& clones);

  // The replication's group (shared by every context).
  std::shared_ptr<ReplicationGroup> group() const;
  // Copies each buffer replica 0 changed into the original's (same tensor
  // objects: write_back_buffers), unless the group was closed.
  void write_back() const;

 private:
  std::vector<std::shared_ptr<CallbackContext>> contexts_;
  std::vector<BufferCopy> buffers_;
};

// torch::nn::parallel::replicate with the replication callbacks: one clone()
// per device (the module must be a torch::nn::Cloneable<ModuleType>: a clone()
// that returns another type, e.g. a module derived from a Cloneable base, is
// refused), completed by complete_replication.
//
// The replicas serve one forward (one syncbn::parallel_apply): their
// synchronized layers then refuse further calls; replicate again for the next
// forward (syncbn::data_parallel does). A clone() of a replica is a new,
// unreplicated module.
namespace detail {

// The replication group of the replicas the calling thread's last syncbn::replicate made (their contexts, its only
// owners, are not returned; the synchronized layers hold it weakly), until parallel_apply takes it for them.
SYNCBN_API void remember_replication(const std::shared_ptr<torch::nn::Module>& first_replica,
                                     std::shared_ptr<ReplicationGroup> group);
// That group, taken (the thread keeps it no longer), if `first_replica` is the first replica it was remembered for;
// else null.
SYNCBN_API std::shared_ptr<ReplicationGroup> take_remembered_replication(const torch::nn::Module* first_replica);

}  // namespace detail

template <typename ModuleType>
std::vector<std::shared_ptr<ModuleType>> replicate(const std::shared_ptr<ModuleType>& module,
                                                   const std::vector<torch::Device>& devices) {
  TORCH_CHECK_VALUE(!devices.empty(), "syncbn::replicate needs at least one device");
  std::vector<std::shared_ptr<torch::nn::Module>> clones;
  std::vector<std::shared_ptr<ModuleType>> replicas;
  clones.reserve(devices.size());
  replicas.reserve(devices.size());
  for (const auto& device : devices) {
    clones.push_back(module->clone(device));
    replicas.push_back(std::dynamic_pointer_cast<ModuleType>(clones.back()));
    TORCH_CHECK(replicas.back() != nullptr,
                "syncbn::replicate: clone() of the module returned a module of another type; ",
                "derive the module from torch::nn::Cloneable<ItsOwnType>");
  }
  const std::vector<std::shared_ptr<CallbackContext>> contexts = complete_replication(module, clones);
  detail::remember_replication(clones.front(), contexts.empty() ? nullptr : contexts.front()->group());
  return replicas;
}

template <typename ModuleType>
std::vector<torch::nn::ModuleHolder<ModuleType>> replicate(const torch::nn::ModuleHolder<ModuleType>& module,
                                                           const std::vector<torch::Device>& devices) {
  auto replicas = replicate(module.ptr(), devices);
  return std::vector<torch::nn::ModuleHolder<ModuleType>>(replicas.begin(), replicas.end());
}

}  // namespace syncbn

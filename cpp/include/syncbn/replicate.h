#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <torch/nn/module.h>

#include <syncbn/callback_context.h>
#include <syncbn/export.h>

namespace syncbn {

// Implemented by modules that must learn, after replication, which copy they
// are and share state with their twins in the other replicas (the established
// library's `__data_parallel_replicate__(ctx, copy_id)`).
class SYNCBN_API ReplicationCallback {
 public:
  virtual ~ReplicationCallback() = default;
  virtual void on_replicate(CallbackContext& context, int64_t copy_id) = 0;
};

// One module of a replica's tree, as the traversal sees it: a type name for the
// isomorphism check, and the hook to call (empty when the module has none).
// Lets the same traversal serve LibTorch modules and foreign (Python) ones; the
// hook gets the context's owner so that a foreign module may keep it.
struct ReplicaModule {
  std::string type_name;
  std::function<void(const std::shared_ptr<CallbackContext>&, int64_t)> on_replicate;
};

// Walks the replicas' module lists position by position, one shared context per
// position, and calls each module's hook with its copy id; at every position the
// master (copy 0) runs before any other copy. Replicas whose module lists differ
// in length or type get a ValueError naming the first differing position.
// Returns the contexts, one per position.
SYNCBN_API std::vector<std::shared_ptr<CallbackContext>> execute_replication_callbacks(
    const std::vector<std::vector<ReplicaModule>>& replicas);

// The LibTorch form: each replica's `modules()` (itself first, depth first), and
// the hook of every module that derives from ReplicationCallback.
SYNCBN_API std::vector<std::shared_ptr<CallbackContext>> execute_replication_callbacks(
    const std::vector<std::shared_ptr<torch::nn::Module>>& replicas);

}  // namespace syncbn

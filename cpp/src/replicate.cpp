#include <syncbn/replicate.h>

#include <c10/util/Exception.h>

namespace syncbn {

namespace {

// Throws a ValueError naming the first position where `replica` differs from the master.
void check_isomorphic(const std::vector<ReplicaModule>& master, const std::vector<ReplicaModule>& replica,
                      size_t copy_id) {
  const size_t common = std::min(master.size(), replica.size());
  for (size_t position = 0; position < common; ++position) {
    TORCH_CHECK_VALUE(master[position].type_name == replica[position].type_name,
                      "replicas are not isomorphic: at module position ", position, " copy 0 has ",
                      master[position].type_name, " but copy ", copy_id, " has ", replica[position].type_name);
  }
  if (master.size() != replica.size()) {
    const bool master_longer = master.size() > replica.size();
    TORCH_CHECK_VALUE(false, "replicas are not isomorphic: copy 0 has ", master.size(), " modules but copy ", copy_id,
                      " has ", replica.size(), "; at module position ", common, " copy 0 has ",
                      master_longer ? master[common].type_name : std::string("<no module>"), " but copy ", copy_id,
                      " has ", master_longer ? std::string("<no module>") : replica[common].type_name);
  }
}

}  // namespace

std::vector<std::shared_ptr<CallbackContext>> execute_replication_callbacks(
    const std::vector<std::vector<ReplicaModule>>& replicas) {
  TORCH_CHECK_VALUE(!replicas.empty(), "execute_replication_callbacks needs at least one replica");
  const auto& master = replicas.front();
  for (size_t copy_id = 1; copy_id < replicas.size(); ++copy_id) {
    check_isomorphic(master, replicas[copy_id], copy_id);
  }
  std::vector<std::shared_ptr<CallbackContext>> contexts;
  contexts.reserve(master.size());
  for (size_t position = 0; position < master.size(); ++position) {
    contexts.push_back(std::make_shared<CallbackContext>());
  }
  // Replica-major order: all of copy 0 first, so at every position the master
  // has stored its shared state before any other copy looks for it.
  for (size_t copy_id = 0; copy_id < replicas.size(); ++copy_id) {
    const auto& modules = replicas[copy_id];
    for (size_t position = 0; position < modules.size(); ++position) {
      if (modules[position].on_replicate) {
        modules[position].on_replicate(contexts[position], static_cast<int64_t>(copy_id));
      }
    }
  }
  return contexts;
}

std::vector<std::shared_ptr<CallbackContext>> execute_replication_callbacks(
    const std::vector<std::shared_ptr<torch::nn::Module>>& replicas) {
  std::vector<std::vector<ReplicaModule>> views;
  views.reserve(replicas.size());
  for (size_t copy_id = 0; copy_id < replicas.size(); ++copy_id) {
    TORCH_CHECK_VALUE(replicas[copy_id] != nullptr, "replica ", copy_id, " is null");
    std::vector<ReplicaModule> view;
    for (const auto& module : replicas[copy_id]->modules(/*include_self=*/true)) {
      ReplicaModule entry{module->name(), {}};
      if (auto hook = std::dynamic_pointer_cast<ReplicationCallback>(module)) {
        entry.on_replicate = [hook](const std::shared_ptr<CallbackContext>& context, int64_t id) {
          hook->on_replicate(*context, id);
        };
      }
      view.push_back(std::move(entry));
    }
    views.push_back(std::move(view));
  }
  return execute_replication_callbacks(views);
}

}  // namespace syncbn

#include <syncbn/forward_across_processes.h>

#include <exception>
#include <vector>

#include <c10/util/Exception.h>

#include <syncbn/replication_group.h>

namespace syncbn {

ForwardAcrossProcesses::ForwardAcrossProcesses(const torch::nn::Module& module, at::Device device) : device_(device) {
  // In a replica (a nested data_parallel, which is refused), the outer forward tells for every replica: each
  // replica telling would pair with another call of the other ranks.
  if (ReplicaScope::current_group() != nullptr) return;
  std::vector<ProcessGroupPtr> groups;
  auto note = [&](const torch::nn::Module& each) {
    const auto* layer = dynamic_cast<const CrossProcessLayer*>(&each);
    if (layer == nullptr) return;
    ProcessGroupPtr group = layer->exchanging_group();
    if (!spans_processes(group)) return;
    for (const auto& known : groups) {
      if (known.get() == group.get()) return;
    }
    groups.push_back(std::move(group));
  };
  note(module);
  for (const auto& child : module.modules(/*include_self=*/false)) note(*child);
  if (groups.size() != 1) return;  // none, or several (see the header)
  group_ = groups.front();
  calls_before_ = synchronized_calls(group_);
}

void ForwardAcrossProcesses::failed() noexcept {
  try {
    if (!group_ || synchronized_calls(group_) != calls_before_) return;
    announce_failed_forward(group_, device_, "data_parallel's forward");
  } catch (const std::exception& error) {
    TORCH_WARN("data_parallel: its forward failed, and telling the other ranks of the process group so failed too "
               "(they may pair this step's first synchronized call with this rank's next forward): ",
               error.what());
  } catch (...) {
    TORCH_WARN("data_parallel: its forward failed, and telling the other ranks of the process group so failed too");
  }
}

}  // namespace syncbn

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
  for (auto& group : groups) {
    const int64_t calls = synchronized_calls(group);
    groups_.emplace_back(std::move(group), calls);
  }
}

void ForwardAcrossProcesses::failed() noexcept {
  try {
    for (const auto& [group, calls_before] : groups_) {
      if (synchronized_calls(group) != calls_before) return;  // the others meet this rank at another call
    }
    if (groups_.size() > 1) {  // (see the header)
      TORCH_WARN("data_parallel: its forward failed before its first synchronized call, and its module's layers "
                 "exchange on ", groups_.size(), " process groups: the other ranks are not told (only where the "
                 "layers use one group), and may pair this step's first synchronized call with this rank's next "
                 "forward, one step apart; restart the processes");
      return;
    }
    if (groups_.empty()) return;
    announce_failed_forward(groups_.front().first, device_, "data_parallel's forward");
  } catch (const std::exception& error) {
    TORCH_WARN("data_parallel: its forward failed, and telling the other ranks of the process group so failed too "
               "(they may pair this step's first synchronized call with this rank's next forward): ",
               error.what());
  } catch (...) {
    TORCH_WARN("data_parallel: its forward failed, and telling the other ranks of the process group so failed too");
  }
}

}  // namespace syncbn

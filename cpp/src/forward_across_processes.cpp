#include <syncbn/forward_across_processes.h>

#include <exception>
#include <thread>
#include <vector>

#include <c10/util/Exception.h>

#include <syncbn/replication_group.h>

namespace syncbn {

ForwardAcrossProcesses::ForwardAcrossProcesses(const torch::nn::Module& module, at::Device device) : device_(device) {
  // In a replica (a nested data_parallel, which is refused), the outer forward tells for every replica: each
  // replica telling would pair with another call of the other ranks.
  if (ReplicaScope::current_group() != nullptr) return;
  auto note = [&](const torch::nn::Module& each) {
    const auto* layer = dynamic_cast<const CrossProcessLayer*>(&each);
    if (layer == nullptr) return;
    ProcessGroupPtr group = layer->exchanging_group();
    if (!spans_processes(group)) return;
    for (const auto& known : groups_) {
      if (known.group.get() == group.get()) return;
    }
    const int64_t calls = synchronized_calls(group), failed = failed_synchronized_calls(group);
    groups_.push_back({std::move(group), calls, failed});
  };
  note(module);
  for (const auto& child : module.modules(/*include_self=*/false)) note(*child);
}

namespace {

// Tells `group`'s other ranks; where telling fails too (the group's timeout: no rank came), warns.
void announce_or_warn(const ProcessGroupPtr& group, at::Device device) noexcept {
  try {
    announce_failed_forward(group, device, "data_parallel's forward");
  } catch (const std::exception& error) {
    TORCH_WARN("data_parallel: its forward failed, and telling the other ranks of the process group so failed too "
               "(they may pair this step's first synchronized call with this rank's next forward): ",
               error.what());
  } catch (...) {
    TORCH_WARN("data_parallel: its forward failed, and telling the other ranks of the process group so failed too");
  }
}

}  // namespace

void ForwardAcrossProcesses::failed() noexcept {
  // Told only where the forward made no exchange but ones a failure was told in (see the header): after one that
  // paired (or failed otherwise), the other ranks wait at another call, maybe on a group already called, and
  // telling would wait for them there in vain.
  std::vector<ProcessGroupPtr> untold;
  try {
    for (const auto& [group, calls_before, failed_before] : groups_) {
      const int64_t failed = failed_synchronized_calls(group) - failed_before;
      if (synchronized_calls(group) - calls_before != failed) return;
      if (failed == 0) untold.push_back(group);
    }
  } catch (...) {
    return;  // (the counts throw nothing in practice: lookups under a lock)
  }
  if (untold.size() == 1) {
    announce_or_warn(untold.front(), device_);
    return;
  }
  // Several at once, each from a thread of its own: the other ranks reach them in their module's order, fail at
  // the first, and tell the rest the same way. (A thread that cannot start: told from here, in order.)
  std::vector<std::thread> threads;
  for (const auto& group : untold) {
    try {
      threads.emplace_back([group, device = device_] { announce_or_warn(group, device); });
    } catch (...) {
      announce_or_warn(group, device_);
    }
  }
  for (auto& thread : threads) thread.join();
}

}  // namespace syncbn

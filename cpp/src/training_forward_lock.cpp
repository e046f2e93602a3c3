#include <syncbn/training_forward_lock.h>

#include <algorithm>
#include <functional>
#include <unordered_map>

namespace syncbn {

namespace {

// One mutex per module some forward holds or waits for; entries of modules no
// forward holds any more expire and are dropped.
std::mutex registry_mutex;
std::unordered_map<const torch::nn::Module*, std::weak_ptr<std::recursive_mutex>> registry;

}  // namespace

TrainingForwardLock::TrainingForwardLock(const std::shared_ptr<torch::nn::Module>& module) {
  bool training = false;
  std::vector<const torch::nn::Module*> holders;  // the modules whose buffers a forward may write back
  for (const auto& sub : module->modules(/*include_self=*/true)) {
    training = training || sub->is_training();
    if (!sub->buffers(/*recurse=*/false).empty()) holders.push_back(sub.get());
  }
  if (!training || holders.empty()) return;
  // One global order (addresses) for every lock: two trees that overlap take their common modules in the same order.
  std::sort(holders.begin(), holders.end(), std::less<const torch::nn::Module*>());
  holders.erase(std::unique(holders.begin(), holders.end()), holders.end());
  {
    std::lock_guard<std::mutex> guard(registry_mutex);
    std::erase_if(registry, [](const auto& entry) { return entry.second.expired(); });
    for (const auto* holder : holders) {
      auto& entry = registry[holder];
      auto mutex = entry.lock();
      if (!mutex) {
        mutex = std::make_shared<std::recursive_mutex>();
        entry = mutex;
      }
      mutexes_.push_back(std::move(mutex));
    }
  }
  for (auto& mutex : mutexes_) mutex->lock();
}

TrainingForwardLock::~TrainingForwardLock() {
  for (auto it = mutexes_.rbegin(); it != mutexes_.rend(); ++it) (*it)->unlock();
}

}  // namespace syncbn

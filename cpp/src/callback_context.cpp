#include <syncbn/callback_context.h>

#include <algorithm>

namespace syncbn {

void CallbackContext::set_any(const std::string& key, std::any value) {
  std::any previous;  // destroyed after the lock is released
  std::lock_guard<std::mutex> lock(mutex_);
  std::any& slot = values_[key];
  previous = std::move(slot);
  slot = std::move(value);
}

std::optional<std::any> CallbackContext::get_any(const std::string& key) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = values_.find(key);
  if (it == values_.end()) return std::nullopt;
  return it->second;
}

bool CallbackContext::contains(const std::string& key) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return values_.count(key) != 0;
}

bool CallbackContext::erase(const std::string& key) {
  std::any removed;  // destroyed after the lock is released
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = values_.find(key);
  if (it == values_.end()) return false;
  removed = std::move(it->second);
  values_.erase(it);
  return true;
}

std::vector<std::string> CallbackContext::keys() const {
  std::vector<std::string> result;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    result.reserve(values_.size());
    for (const auto& entry : values_) result.push_back(entry.first);
  }
  std::sort(result.begin(), result.end());
  return result;
}

size_t CallbackContext::size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return values_.size();
}

}  // namespace syncbn

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

void CallbackContext::for_each_value(const std::function<void(const std::any&)>& visit) const {
  std::lock_guard<std::mutex> lock(mutex_);
  for (const auto& entry : values_) visit(entry.second);
}

size_t CallbackContext::erase_if(const std::function<bool(const std::any&)>& remove) {
  std::vector<std::any> removed;  // destroyed after the lock is released
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto it = values_.begin(); it != values_.end();) {
    if (remove(it->second)) {
      removed.push_back(std::move(it->second));
      it = values_.erase(it);
    } else {
      ++it;
    }
  }
  return removed.size();
}

size_t CallbackContext::size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return values_.size();
}

}  // namespace syncbn

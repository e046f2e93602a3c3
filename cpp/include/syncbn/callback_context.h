#pragma once

#include <any>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <typeinfo>
#include <unordered_map>
#include <vector>

#include <c10/util/Exception.h>
#include <c10/util/Type.h>

#include <syncbn/export.h>

namespace syncbn {

// Storage shared by every replica of one module position during a replication.
// The master (copy 0) typically stores its SyncMaster here, and the other copies
// read it to register themselves. Values are type-erased and copied in and out,
// so a reader never holds a reference into the map; every method is thread-safe.
class ReplicationGroup;

class SYNCBN_API CallbackContext {
 public:
  CallbackContext() = default;
  // A context of a replication: module position `position` (in modules()
  // order), named `name` (its path in the replica, "" for the root).
  CallbackContext(std::shared_ptr<ReplicationGroup> group, int64_t position, std::string name)
      : group_(std::move(group)), position_(position), name_(std::move(name)) {}
  CallbackContext(const CallbackContext&) = delete;
  CallbackContext& operator=(const CallbackContext&) = delete;

  template <class T>
  void set(const std::string& key, T value) {
    set_any(key, std::any(std::move(value)));
  }

  // The value stored under `key`; throws if it is missing or of another type.
  template <class T>
  T get(const std::string& key) const {
    std::optional<std::any> value = get_any(key);
    TORCH_CHECK(value.has_value(), "CallbackContext has no value under key '", key, "'");
    const T* typed = std::any_cast<T>(&*value);
    TORCH_CHECK(typed != nullptr, "CallbackContext value under key '", key, "' has type ",
                c10::demangle(value->type().name()), ", not the requested ", c10::demangle(typeid(T).name()));
    return *typed;
  }

  // Like get(), but std::nullopt when the key is missing or holds another type.
  template <class T>
  std::optional<T> try_get(const std::string& key) const {
    std::optional<std::any> value = get_any(key);
    if (!value.has_value()) return std::nullopt;
    const T* typed = std::any_cast<T>(&*value);
    if (typed == nullptr) return std::nullopt;
    return *typed;
  }

  void set_any(const std::string& key, std::any value);
  std::optional<std::any> get_any(const std::string& key) const;
  bool contains(const std::string& key) const;
  // Removes the value under `key`; returns whether there was one.
  bool erase(const std::string& key);
  std::vector<std::string> keys() const;
  size_t size() const;

  // Calls `visit` on each value, under the context's lock (for a garbage
  // collector that must see the values a binding stored: the lock is never
  // held by a thread that waits for anything else).
  void for_each_value(const std::function<void(const std::any&)>& visit) const;
  // Removes the values `remove` selects (destroyed after the lock is
  // released); returns how many.
  size_t erase_if(const std::function<bool(const std::any&)>& remove);

  // The replication this context belongs to; null for a context made by hand.
  const std::shared_ptr<ReplicationGroup>& group() const { return group_; }
  int64_t position() const { return position_; }
  const std::string& name() const { return name_; }

 private:
  std::shared_ptr<ReplicationGroup> group_;
  int64_t position_ = -1;
  std::string name_;
  mutable std::mutex mutex_;
  std::unordered_map<std::string, std::any> values_;
};

}  // namespace syncbn

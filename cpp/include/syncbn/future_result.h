#pragma once

#include <condition_variable>
#include <mutex>
#include <optional>

#include <syncbn/export.h>
#include <syncbn/message.h>

namespace syncbn {

// A one-slot hand-off between two threads: put() stores a result, get() waits
// for it and empties the slot. The established library's FutureResult.
class SYNCBN_API FutureResult {
 public:
  // Throws if the previous result has not been fetched yet.
  void put(Message result);
  // Waits for a result; with a timeout (seconds), throws BarrierTimeoutError
  // when none arrives in time. The timeout must be positive (a ValueError
  // otherwise, NaN included, as SyncMaster's); infinity waits for ever.
  Message get(std::optional<double> timeout_seconds = std::nullopt);
  bool ready() const;

 private:
  mutable std::mutex mutex_;
  std::condition_variable ready_cv_;
  std::optional<Message> result_;
};

}  // namespace syncbn

#include <syncbn/future_result.h>

#include <chrono>
#include <sstream>

#include <c10/util/Exception.h>

#include <syncbn/errors.h>

#include "spin_wait.h"

namespace syncbn {

void FutureResult::put(Message result) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK(!result_.has_value(), "FutureResult: the previous result has not been fetched yet");
    result_ = std::move(result);
  }
  ready_cv_.notify_one();
}

Message FutureResult::get(std::optional<double> timeout_seconds) {
  // As SyncMaster's timeouts: positive (NaN is not), infinity meaning none.
  TORCH_CHECK_VALUE(!timeout_seconds || *timeout_seconds > 0,
                    "FutureResult get(): the timeout must be a positive number of seconds, got ", *timeout_seconds);
  // (a timeout too long for the steady clock, infinity included, is none: wait_for would overflow into the past)
  const auto deadline = timeout_seconds ? detail::deadline_after(*timeout_seconds) : std::nullopt;
  std::unique_lock<std::mutex> lock(mutex_);
  auto has_result = [this] { return result_.has_value(); };
  if (deadline.has_value()) {
    if (!ready_cv_.wait_until(lock, *deadline, has_result)) {
      std::ostringstream message;
      message << "FutureResult: no result arrived within " << *timeout_seconds << " s";
      throw BarrierTimeoutError(message.str());
    }
  } else {
    ready_cv_.wait(lock, has_result);
  }
  Message result = std::move(*result_);
  result_.reset();
  return result;
}

bool FutureResult::ready() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return result_.has_value();
}

}  // namespace syncbn

#include <syncbn/future_result.h>

#include <chrono>
#include <cmath>

#include <c10/util/Exception.h>

#include <syncbn/errors.h>

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
  if (timeout_seconds && std::isinf(*timeout_seconds)) timeout_seconds.reset();
  std::unique_lock<std::mutex> lock(mutex_);
  auto has_result = [this] { return result_.has_value(); };
  if (timeout_seconds.has_value()) {
    const auto timeout = std::chrono::duration<double>(*timeout_seconds);
    if (!ready_cv_.wait_for(lock, timeout, has_result)) {
      throw BarrierTimeoutError("FutureResult: no result arrived within " + std::to_string(*timeout_seconds) + " s");
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

#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

namespace syncbn {

// What one replica hands the barrier, and what the master hands back.
// The core reads only `tensors` and `ints`; `payload` is opaque to it, and
// lets a binding carry a foreign object (a Python object, say) through the
// barrier. The barrier only moves messages, and destroys them outside its lock.
struct Message {
  std::vector<at::Tensor> tensors;
  std::vector<int64_t> ints;
  std::shared_ptr<void> payload;
  // Where the sender is (e.g. "layer 'features.1' (call 3)"), for error messages.
  std::string label;
};

// One message per copy: (copy id, message).
using MessageList = std::vector<std::pair<int64_t, Message>>;

}  // namespace syncbn

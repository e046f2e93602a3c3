// Private to the core: a few host values (counts, a header) onto a device.
#pragma once

#include <ATen/core/Tensor.h>

namespace syncbn::detail {

// `host` (a small CPU tensor) on `device`. Onto a CUDA device through pinned
// memory without waiting: a copy from pageable memory waits for the stream's
// work before it (one stall of the host per synchronized call).
inline at::Tensor host_values_to(const at::Tensor& host, const at::Device& device) {
  if (device.is_cpu()) return host;
  if (device.is_cuda()) return host.pin_memory().to(device, /*non_blocking=*/true);
  return host.to(device);
}

}  // namespace syncbn::detail

#include <gtest/gtest.h>

#include <optional>
#include <vector>

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/FakeGuardImpl.h>
#include <torch/torch.h>

#include <syncbn/syncbn.h>

// An accelerator this CPU build can select without one: torch's fake device guard, on the spare device type.
C10_REGISTER_GUARD_IMPL(PrivateUse1, c10::impl::FakeGuardImpl<c10::DeviceType::PrivateUse1>);

namespace {

constexpr auto kAccelerator = c10::DeviceType::PrivateUse1;

// data_parallel and parallel_apply resolve "cuda" (no index) on the caller's thread, as nn.DataParallel does:
// before, replica 0's clone of a module on the current device aliased the module's own tensors (to() of a tensor
// already there returns it), so that a failed forward wrote its buffers, and each replica thread took "cuda" as
// its own current device.
TEST(DataParallel, AcceleratorDevicesWithoutAnIndexAreTheCallersCurrentOnes) {
  const c10::DeviceGuard on_device_1(c10::Device(kAccelerator, 1));
  const std::vector<torch::Device> given{c10::Device(kAccelerator), c10::Device(kAccelerator, 0), torch::kCPU};
  const auto resolved = syncbn::detail::with_indices(given);
  ASSERT_TRUE(resolved.has_value());
  const std::vector<torch::Device> expected{c10::Device(kAccelerator, 1), c10::Device(kAccelerator, 0), torch::kCPU};
  EXPECT_EQ(*resolved, expected);
  EXPECT_FALSE(syncbn::detail::with_indices(std::nullopt).has_value());  // no devices: the module runs directly
}

}  // namespace

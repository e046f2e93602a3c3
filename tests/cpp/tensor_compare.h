// Tensor comparisons for the C++ tests, as gtest assertion results that say
// where and by how much two tensors differ.
#pragma once

#include <limits>

#include <gtest/gtest.h>
#include <torch/torch.h>

namespace syncbn_test {

// |actual - expected| <= tolerance * scale, everywhere (scale: the size of the
// terms that made `expected`, so the bound is the computation's own error).
inline ::testing::AssertionResult within(const at::Tensor& actual, const at::Tensor& expected, const at::Tensor& scale,
                                  double tolerance) {
  if (actual.sizes() != expected.sizes()) {
    return ::testing::AssertionFailure() << "shape " << actual.sizes() << ", expected " << expected.sizes();
  }
  if (actual.numel() == 0) return ::testing::AssertionSuccess();
  const at::Tensor a = actual.to(at::kDouble), e = expected.to(at::kDouble);
  const at::Tensor error = (a - e).abs();
  const at::Tensor bound = (scale.to(at::kDouble) * tolerance).expand_as(error);
  const at::Tensor excess = (error - bound).masked_fill(error.isnan(), std::numeric_limits<double>::infinity());
  const int64_t worst = excess.flatten().argmax().item<int64_t>();
  const double worst_excess = excess.flatten()[worst].item<double>();
  if (worst_excess <= 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "at flat index " << worst << ": got " << a.flatten()[worst].item<double>()
                                       << ", expected " << e.flatten()[worst].item<double>() << " (error "
                                       << error.flatten()[worst].item<double>() << " > "
                                       << bound.flatten()[worst].item<double>() << "; max error "
                                       << error.max().item<double>() << ")";
}

// The same tensor, bit for bit (NaN included).
inline ::testing::AssertionResult identical(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) {
    return ::testing::AssertionFailure() << "shape/dtype differ";
  }
  if (torch::equal(a.contiguous(), b.contiguous())) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "differ by up to " << (a.to(at::kDouble) - b.to(at::kDouble)).abs().max();
}

}  // namespace syncbn_test

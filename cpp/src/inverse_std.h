#pragma once

#include <ATen/core/Tensor.h>

#include <syncbn/batch_norm.h>

// Private to the core: how eps enters the inverse standard deviation, shared by
// the normalize op (forward) and its autograd node (backward) so they agree.
namespace syncbn::detail {

// 1 / sqrt(var + eps) (Plus) or 1 / sqrt(max(var, eps)) (Clamp).
inline at::Tensor inverse_std(const at::Tensor& var, double eps, EpsMode mode) {
  return mode == EpsMode::Clamp ? var.clamp_min(eps).rsqrt() : (var + eps).rsqrt();
}

// The inverse std a backward differentiates, from the float64 variance of a forward that normalized in the
// input's `opmath` dtype: 0 where that variance was beyond the dtype's range (the forward normalized with an
// inverse std of 0 there, as nn.BatchNorm's), so that the gradients are those of the output given.
inline at::Tensor backward_inverse_std(const at::Tensor& var, at::ScalarType opmath, double eps, EpsMode mode) {
  at::Tensor invstd = inverse_std(var, eps, mode);
  if (opmath == var.scalar_type()) return invstd;
  return invstd.masked_fill(var.to(opmath).isinf() & var.isfinite(), 0);
}

// d inverse_std / d var, given invstd = inverse_std(var, eps, mode).
inline at::Tensor inverse_std_grad(const at::Tensor& var, const at::Tensor& invstd, double eps, EpsMode mode) {
  at::Tensor grad = invstd.pow(3) * -0.5;
  return mode == EpsMode::Clamp ? grad * (var > eps) : grad;
}

}  // namespace syncbn::detail

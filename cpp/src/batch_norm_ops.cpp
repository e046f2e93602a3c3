// The pure tensor ops of <syncbn/batch_norm.h>: their schemas (TORCH_LIBRARY),
// the CPU kernels' front, Meta kernels, and an ATen implementation that serves
// every other device (CUDA among them).
#include <syncbn/batch_norm.h>

#include <cmath>
#include <limits>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "cpu/batch_norm_kernels.h"
#include "differentiable_ops.h"
#include "inverse_std.h"

namespace syncbn {

EpsMode parse_eps_mode(const std::string& name) {
  if (name == "plus") return EpsMode::Plus;
  if (name == "clamp") return EpsMode::Clamp;
  TORCH_CHECK_VALUE(false, "eps mode must be 'plus' (var + eps) or 'clamp' (max(var, eps)), got '", name, "'");
}

std::string eps_mode_name(EpsMode mode) { return mode == EpsMode::Clamp ? "clamp" : "plus"; }

namespace {

at::ScalarType stats_dtype(const at::Tensor& input) { return at::toOpMathType(input.scalar_type()); }

void check_input(const at::Tensor& input, const char* op) {
  TORCH_CHECK_VALUE(input.dim() >= 2, "syncbn::", op, ": expected an input of shape (N, C, *), got ", input.dim(),
                    "D input");
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "syncbn::", op,
              ": expected a floating point input, got dtype ", input.scalar_type());
}

void check_per_channel(const at::Tensor& input, const at::Tensor& values, const char* name, const char* op) {
  TORCH_CHECK(values.dim() == 1 && values.size(0) == input.size(1), "syncbn::", op, ": ", name,
              " should contain ", input.size(1), " elements (one per channel) not ", values.numel());
}

// (1, C, 1, ...): broadcasts a per-channel vector over an (N, C, *) input.
at::Tensor per_channel_view(const at::Tensor& values, const at::Tensor& input) {
  std::vector<int64_t> shape(input.dim(), 1);
  shape[1] = input.size(1);
  return values.view(shape);
}

// `tensor` as the ATen kernels below read it in the opmath `dtype`: as it is where ATen's type promotion converts
// each value as it reads it (a 16-bit float or `dtype` itself: on GPUs no full-size copy), else converted (a copy,
// so that a float64 gradient of a float32 input is rounded first, not promoted the other way).
at::Tensor read_as(const at::Tensor& tensor, at::ScalarType dtype) {
  return at::promote_types(tensor.scalar_type(), dtype) == dtype ? tensor : tensor.to(dtype);
}

std::vector<int64_t> reduced_dims(const at::Tensor& input) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < input.dim(); ++d) dims.push_back(d);
  return dims;
}

// scale = weight * invstd, shift = bias, per channel, in the statistics dtype.
std::pair<at::Tensor, at::Tensor> affine_scale_shift(const at::Tensor& input, const at::Tensor& var,
                                                     const std::optional<at::Tensor>& weight,
                                                     const std::optional<at::Tensor>& bias, double eps,
                                                     EpsMode mode) {
  const auto dtype = stats_dtype(input);
  at::Tensor scale = detail::inverse_std(var.to(dtype), eps, mode);
  if (weight.has_value() && weight->defined()) scale = scale * weight->to(dtype);
  at::Tensor shift = bias.has_value() && bias->defined() ? bias->to(dtype) : at::zeros_like(scale);
  return {scale, shift};
}

// ---- ATen implementation (any device) ------------------------------------------

std::tuple<at::Tensor, at::Tensor> local_stats_aten(const at::Tensor& input) {
  check_input(input, "local_stats");
  if (input.numel() == 0) {
    at::Tensor zeros = at::zeros({input.size(1)}, input.options().dtype(at::kDouble));
    return {zeros, zeros.clone()};
  }
  // Reduced in the opmath dtype (a float64 copy of the input would cost its size again), with that mean as a
  // shift: what it missed, the mean of the deviations, is added in float64, so the mean keeps its digits for the
  // merge (as the CPU kernels' does). Two passes: no sum of squares. One full-size temporary, the deviations,
  // squared in place.
  const auto dtype = stats_dtype(input);
  const at::Tensor x = read_as(input, dtype);
  const auto dims = reduced_dims(input);
  const double count = static_cast<double>(input.numel() / input.size(1));
  at::Tensor shift = at::mean(x, dims, /*keepdim=*/false, dtype);
  at::Tensor deviations = at::sub(x, per_channel_view(shift, x));
  at::Tensor correction = deviations.sum(dims).to(at::kDouble) / count;
  at::Tensor plain_mean = shift.to(at::kDouble);
  // (Non-finite data: the plain mean, inf as nn.BatchNorm's, where a correction of inf - inf would give nan.)
  at::Tensor mean = at::where(plain_mean.isfinite(), plain_mean + correction, plain_mean);
  at::Tensor m2 = deviations.square_().sum(dims).to(at::kDouble) - correction.square() * count;
  return {mean, m2};
}

void check_merge_stats(const at::Tensor& counts, const at::Tensor& means, const at::Tensor& m2s) {
  TORCH_CHECK(counts.dim() == 1 && means.dim() == 2 && m2s.sizes() == means.sizes() &&
                  counts.size(0) == means.size(0),
              "syncbn::merge_stats: expected counts (R,), means and m2s (R, C), got ", counts.sizes(), ", ",
              means.sizes(), ", ", m2s.sizes());
}

std::tuple<at::Tensor, at::Tensor> merge_stats_aten(const at::Tensor& counts, const at::Tensor& means,
                                                    const at::Tensor& m2s) {
  check_merge_stats(counts, means, m2s);
  // Chan's formula in float64 whatever the statistics dtype: it is C values per copy.
  at::Tensor n = counts.to(means.device(), at::kDouble).unsqueeze(1);
  at::Tensor total = n.sum(0);
  at::Tensor safe_total = total.clamp_min(1);
  at::Tensor means64 = means.to(at::kDouble);
  at::Tensor mean = (n * means64).sum(0) / safe_total;
  // An empty copy spreads nothing: 0 * (0 - mean)^2 is NaN where the square overflows (|mean| > 1e154).
  at::Tensor spread = (n * (means64 - mean).square()).masked_fill(n == 0, 0);
  at::Tensor m2 = m2s.to(at::kDouble).sum(0) + spread.sum(0);
  return {mean.to(means.scalar_type()), (m2 / safe_total).to(means.scalar_type())};
}

at::Tensor normalize_aten(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
                          const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
                          int64_t eps_mode) {
  check_input(input, "normalize");
  check_per_channel(input, mean, "mean", "normalize");
  check_per_channel(input, var, "var", "normalize");
  auto [scale, shift] = affine_scale_shift(input, var, weight, bias, eps, static_cast<EpsMode>(eps_mode));
  const auto dtype = stats_dtype(input);
  // (x - mean) * scale + shift in one full-size temporary of the opmath dtype (the output itself for a float32 or
  // float64 input).
  at::Tensor y = at::sub(read_as(input, dtype), per_channel_view(mean.to(dtype), input));
  y.mul_(per_channel_view(scale, input)).add_(per_channel_view(shift, input));
  return y.to(input.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> backward_reduce_aten(const at::Tensor& grad_out, const at::Tensor& input,
                                                        const at::Tensor& mean) {
  check_input(input, "backward_reduce");
  check_per_channel(input, mean, "mean", "backward_reduce");
  const auto dtype = stats_dtype(input);
  const auto dims = reduced_dims(input);
  if (input.numel() == 0) {
    at::Tensor zeros = at::zeros({input.size(1)}, input.options().dtype(dtype));
    return {zeros, zeros.clone()};
  }
  const at::Tensor dy = read_as(grad_out, dtype);
  // One full-size temporary: the deviations, multiplied by the gradient in place.
  at::Tensor dy_xmu = at::sub(read_as(input, dtype), per_channel_view(mean.to(dtype), input));
  dy_xmu.mul_(dy);
  return {at::sum(dy, dims, /*keepdim=*/false, dtype), dy_xmu.sum(dims)};
}

at::Tensor backward_elemt_aten(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                               const at::Tensor& dy_scale, const at::Tensor& x_scale, const at::Tensor& shift) {
  check_input(input, "backward_elemt");
  const auto dtype = stats_dtype(input);
  auto view = [&](const at::Tensor& values) { return per_channel_view(values.to(dtype), input); };
  // dy * dy_scale + (x - mean) * x_scale + shift, summed in that order, in two full-size temporaries.
  at::Tensor grad_in = at::mul(read_as(grad_out, dtype), view(dy_scale));
  grad_in.add_(at::sub(read_as(input, dtype), view(mean)).mul_(view(x_scale)));
  grad_in.add_(view(shift));
  return grad_in.to(input.scalar_type());
}

// ---- CPU: the vectorized kernels ---------------------------------------------------

// The ATen composite's math in one loop (its ~17 small ops cost ~0.1 ms per
// merge, which every replica waits for): cpu::merge_stats.
std::tuple<at::Tensor, at::Tensor> merge_stats_cpu(const at::Tensor& counts, const at::Tensor& means,
                                                   const at::Tensor& m2s) {
  check_merge_stats(counts, means, m2s);
  if (!counts.device().is_cpu() || !m2s.device().is_cpu() || m2s.scalar_type() != means.scalar_type() ||
      means.size(0) == 0) {
    return merge_stats_aten(counts, means, m2s);  // mixed devices or dtypes, or no copy: the general form
  }
  const at::Tensor n = counts.to(at::kDouble).contiguous();
  const std::vector<double> copy_counts(n.const_data_ptr<double>(), n.const_data_ptr<double>() + n.numel());
  return cpu::merge_stats(copy_counts, means.unbind(0), m2s.unbind(0));
}

std::tuple<at::Tensor, at::Tensor> local_stats_cpu(const at::Tensor& input) {
  check_input(input, "local_stats");
  auto [mean, m2] = cpu::local_stats(input);
  // A channel whose statistics are not finite: non-finite data (inf, nan), where the shifted algorithm's x - mean
  // gives nan and nn.BatchNorm's plain mean gives inf, or finite data whose squares overflow the kernels' blocks
  // (float32 deviations beyond ~1e18). Such a channel is computed again plainly in float64: the plain mean, and
  // an M2 that is nan for non-finite data and right for finite data.
  double* means = mean.data_ptr<double>();
  double* m2s = m2.data_ptr<double>();
  for (int64_t c = 0; c < mean.numel(); ++c) {
    if (std::isfinite(means[c]) && std::isfinite(m2s[c])) continue;
    const at::Tensor channel = input.select(1, c).to(at::kDouble);
    means[c] = channel.sum().item<double>() / static_cast<double>(channel.numel());
    m2s[c] = (channel - means[c]).square().sum().item<double>();
  }
  return {mean, m2};
}

at::Tensor normalize_cpu(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
                         int64_t eps_mode) {
  check_input(input, "normalize");
  check_per_channel(input, mean, "mean", "normalize");
  check_per_channel(input, var, "var", "normalize");
  auto [scale, shift] = affine_scale_shift(input, var, weight, bias, eps, static_cast<EpsMode>(eps_mode));
  return cpu::normalize(input, mean, scale, shift);
}

std::tuple<at::Tensor, at::Tensor> backward_reduce_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                                       const at::Tensor& mean) {
  check_input(input, "backward_reduce");
  check_per_channel(input, mean, "mean", "backward_reduce");
  return cpu::backward_reduce(grad_out, input, mean);
}

at::Tensor backward_elemt_cpu(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                              const at::Tensor& dy_scale, const at::Tensor& x_scale, const at::Tensor& shift) {
  check_input(input, "backward_elemt");
  return cpu::backward_elemt(grad_out, input, mean, dy_scale, x_scale, shift);
}


// ---- Meta: shapes and dtypes only (symbolic sizes allowed) ---------------------------

// Two per-channel tensors of the given dtype.
std::tuple<at::Tensor, at::Tensor> per_channel_pair_meta(const at::Tensor& input, at::ScalarType dtype) {
  auto options = input.options().dtype(dtype);
  return {at::empty_symint({input.sym_size(1)}, options), at::empty_symint({input.sym_size(1)}, options)};
}

std::tuple<at::Tensor, at::Tensor> local_stats_meta(const at::Tensor& input) {
  check_input(input, "local_stats");
  return per_channel_pair_meta(input, at::kDouble);
}

std::tuple<at::Tensor, at::Tensor> merge_stats_meta(const at::Tensor& counts, const at::Tensor& means,
                                                    const at::Tensor& m2s) {
  TORCH_CHECK(counts.dim() == 1 && means.dim() == 2 && m2s.dim() == 2,
              "syncbn::merge_stats: expected counts (R,), means and m2s (R, C)");
  return {at::empty_symint({means.sym_size(1)}, means.options()),
          at::empty_symint({means.sym_size(1)}, means.options())};
}

at::Tensor normalize_meta(const at::Tensor& input, const at::Tensor&, const at::Tensor&,
                          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, int64_t) {
  check_input(input, "normalize");
  return at::empty_like(input);
}

std::tuple<at::Tensor, at::Tensor> backward_reduce_meta(const at::Tensor&, const at::Tensor& input,
                                                        const at::Tensor&) {
  check_input(input, "backward_reduce");
  return per_channel_pair_meta(input, stats_dtype(input));
}

at::Tensor backward_elemt_meta(const at::Tensor&, const at::Tensor& input, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&) {
  check_input(input, "backward_elemt");
  return at::empty_like(input);
}

// The dispatcher handle of torch.ops.syncbn.<name>, looked up once.
template <class Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace

namespace detail {

std::tuple<at::Tensor, at::Tensor> backward_reduce_with_graph(const at::Tensor& grad_out, const at::Tensor& input,
                                                              const at::Tensor& mean) {
  return backward_reduce_aten(grad_out, input, mean);
}

at::Tensor backward_elemt_with_graph(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                                     const at::Tensor& dy_scale, const at::Tensor& x_scale, const at::Tensor& shift) {
  return backward_elemt_aten(grad_out, input, mean, dy_scale, x_scale, shift);
}

}  // namespace detail

TORCH_LIBRARY(syncbn, m) {
  m.def("local_stats(Tensor input) -> (Tensor mean, Tensor m2)");
  m.def("merge_stats(Tensor counts, Tensor means, Tensor m2s) -> (Tensor mean, Tensor var)");
  m.def(
      "normalize(Tensor input, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps, int eps_mode) "
      "-> Tensor");
  m.def("backward_reduce(Tensor grad_out, Tensor input, Tensor mean) -> (Tensor sum_dy, Tensor sum_dy_xmu)");
  m.def(
      "backward_elemt(Tensor grad_out, Tensor input, Tensor mean, Tensor dy_scale, Tensor x_scale, Tensor shift) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(syncbn, CPU, m) {
  m.impl("local_stats", TORCH_FN(local_stats_cpu));
  m.impl("merge_stats", TORCH_FN(merge_stats_cpu));
  m.impl("normalize", TORCH_FN(normalize_cpu));
  m.impl("backward_reduce", TORCH_FN(backward_reduce_cpu));
  m.impl("backward_elemt", TORCH_FN(backward_elemt_cpu));
}

TORCH_LIBRARY_IMPL(syncbn, Meta, m) {
  m.impl("local_stats", TORCH_FN(local_stats_meta));
  m.impl("merge_stats", TORCH_FN(merge_stats_meta));
  m.impl("normalize", TORCH_FN(normalize_meta));
  m.impl("backward_reduce", TORCH_FN(backward_reduce_meta));
  m.impl("backward_elemt", TORCH_FN(backward_elemt_meta));
}

// Every other device (CUDA among them): the same math in ATen ops.
TORCH_LIBRARY_IMPL(syncbn, CompositeExplicitAutograd, m) {
  m.impl("local_stats", TORCH_FN(local_stats_aten));
  m.impl("merge_stats", TORCH_FN(merge_stats_aten));
  m.impl("normalize", TORCH_FN(normalize_aten));
  m.impl("backward_reduce", TORCH_FN(backward_reduce_aten));
  m.impl("backward_elemt", TORCH_FN(backward_elemt_aten));
}

void register_ops() {
  // Registration happens when this library loads; looking an op up proves it.
  c10::Dispatcher::singleton().findSchemaOrThrow("syncbn::local_stats", "");
}

std::tuple<at::Tensor, at::Tensor> local_stats(const at::Tensor& input) {
  static auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>("syncbn::local_stats");
  return op.call(input);
}

std::tuple<at::Tensor, at::Tensor> merge_stats(const at::Tensor& counts, const at::Tensor& means,
                                               const at::Tensor& m2s) {
  static auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&)>("syncbn::merge_stats");
  return op.call(counts, means, m2s);
}

at::Tensor normalize(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
                     EpsMode eps_mode) {
  static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
                                        int64_t)>("syncbn::normalize");
  return op.call(input, mean, var, weight, bias, eps, static_cast<int64_t>(eps_mode));
}

std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& grad_out, const at::Tensor& input,
                                                   const at::Tensor& mean) {
  static auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&)>("syncbn::backward_reduce");
  return op.call(grad_out, input, mean);
}

at::Tensor backward_elemt(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                          const at::Tensor& dy_scale, const at::Tensor& x_scale, const at::Tensor& shift) {
  static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, const at::Tensor&)>("syncbn::backward_elemt");
  return op.call(grad_out, input, mean, dy_scale, x_scale, shift);
}

}  // namespace syncbn

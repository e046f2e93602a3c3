#include "batch_norm_kernels.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <exception>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/csrc/stable/c/shim.h>

#include "kernel_support.h"
#include "planar_kernels.h"
#include "rows_kernels.h"
#include "simd.h"

// Layouts (see Layout). A "planar" input is contiguous (N, C, S...): channel c
// is N segments of prod(S) values, and the kernels vectorize along a segment. A
// "rows" input has the channel as its fastest dim (channels_last, 2-d (N, C)):
// rows of C values, and the kernels vectorize across channels.
//
// Numerics. Values are accumulated in the acc type (float, or double for
// double) only within blocks, so that a lane of a vector accumulator (or a
// channel's accumulator in a rows block) adds at most a few hundred values;
// block results are merged in double. The local statistics use a shifted
// two-pass per block (the second pass reads the block from cache) and Chan's
// formula across blocks: sum and sum of squares are never formed.
//
// Determinism. The work is cut into tasks by the input's sizes only, never by
// the thread count, and partial results are merged in task order: results are
// bitwise the same for any number of threads.
namespace syncbn::cpu {
namespace {

// ---------------------------------------------------------------------------
// Argument checks.

void check_input(const at::Tensor& input, const char* name) {
  TORCH_CHECK(input.defined(), "syncbn: ", name, " is undefined");
  TORCH_CHECK(input.device().is_cpu(), "syncbn: ", name, " must be on the CPU, got ", input.device());
  TORCH_CHECK(input.dim() >= 2, "syncbn: ", name, " must be (N, C, *) with at least 2 dims, got shape ",
              input.sizes());
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "syncbn: ", name, " must be float32, float64, float16 or bfloat16, got ", dtype);
}

at::ScalarType acc_dtype_of(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A per-channel tensor as a contiguous 1-d acc-dtype tensor of C values.
at::Tensor per_channel(const at::Tensor& values, const char* name, int64_t channels, at::ScalarType acc_dtype) {
  TORCH_CHECK(values.defined(), "syncbn: ", name, " is undefined");
  TORCH_CHECK(values.device().is_cpu(), "syncbn: ", name, " must be on the CPU, got ", values.device());
  TORCH_CHECK(values.dim() == 1 && values.size(0) == channels, "syncbn: ", name,
              " must be 1-d with one value per channel (", channels, "), got shape ", values.sizes());
  return values.to(acc_dtype).contiguous();
}

// grad_out checked against the input, in the input's dtype and memory order
// (as the ATen fallback of the ops accepts it; a copy only when either differs).
at::Tensor grad_in_layout_of(const at::Tensor& grad_out, const at::Tensor& input, const Layout& layout) {
  check_input(grad_out, "grad_out");
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "syncbn: grad_out must have the input's shape ", input.sizes(),
              ", got ", grad_out.sizes());
  return grad_out.to(input.scalar_type()).contiguous(layout.format);
}

// The elementwise pass of normalize (kWithGrad false: dy_scale unread) and
// backward_elemt on either layout; the terms are acc-type tensors, one value
// per channel.
template <typename scalar_t, bool kWithGrad>
void elementwise(const Layout& layout, const scalar_t* grad, scalar_t* out, const at::Tensor& mean,
                 const at::Tensor& x_scale, const at::Tensor& shift, const at::Tensor& dy_scale) {
  if (layout.rows) {
    rows_elementwise<scalar_t, kWithGrad>(layout, grad, out, mean, x_scale, shift, dy_scale);
    return;
  }
  using acc_t = at::opmath_type<scalar_t>;
  const ElementwiseTerms<acc_t> terms{mean.const_data_ptr<acc_t>(), x_scale.const_data_ptr<acc_t>(),
                                      shift.const_data_ptr<acc_t>(),
                                      kWithGrad ? dy_scale.const_data_ptr<acc_t>() : nullptr};
  planar_elementwise<scalar_t, kWithGrad>(layout, grad, out, terms);
}

}  // namespace

// ---------------------------------------------------------------------------
// The kernels of batch_norm_kernels.h.

std::tuple<at::Tensor, at::Tensor> local_stats(const at::Tensor& input) {
  check_input(input, "input");
  const Layout layout = layout_of(input);
  // float64 whatever the input: the kernels reduce in double, and the merge (Chan's n_i (mean_i - mean)^2 term)
  // would magnify a rounding of mean_i to float32 where the mean is large next to the spread.
  const auto stats_options = input.options().dtype(at::kDouble);
  at::Tensor mean = at::zeros({layout.channels}, stats_options);
  at::Tensor m2 = at::zeros({layout.channels}, stats_options);
  if (layout.channels == 0 || layout.values_per_channel() == 0) return {mean, m2};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "syncbn_local_stats", [&] {
    if (layout.rows) {
      rows_local_stats<scalar_t>(layout, mean.data_ptr<double>(), m2.data_ptr<double>());
    } else {
      planar_stats<scalar_t>(layout, mean.data_ptr<double>(), m2.data_ptr<double>());
    }
  });
  return {mean, m2};
}

at::Tensor normalize(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& scale,
                     const at::Tensor& shift) {
  check_input(input, "input");
  const Layout layout = layout_of(input);
  const auto acc_dtype = acc_dtype_of(input);
  const at::Tensor mean_acc = per_channel(mean, "mean", layout.channels, acc_dtype);
  const at::Tensor scale_acc = per_channel(scale, "scale", layout.channels, acc_dtype);
  const at::Tensor shift_acc = per_channel(shift, "shift", layout.channels, acc_dtype);
  at::Tensor output = at::empty_like(layout.input);
  if (output.numel() == 0) return output;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "syncbn_normalize", [&] {
    elementwise<scalar_t, false>(layout, nullptr, output.data_ptr<scalar_t>(), mean_acc, scale_acc, shift_acc,
                                 at::Tensor());
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& grad_out, const at::Tensor& input,
                                                   const at::Tensor& mean) {
  check_input(input, "input");
  const Layout layout = layout_of(input);
  const at::Tensor grad = grad_in_layout_of(grad_out, input, layout);
  const auto acc_dtype = acc_dtype_of(input);
  const at::Tensor mean_acc = per_channel(mean, "mean", layout.channels, acc_dtype);
  const auto acc_options = input.options().dtype(acc_dtype);
  at::Tensor sum_dy = at::zeros({layout.channels}, acc_options);
  at::Tensor sum_dy_xmu = at::zeros({layout.channels}, acc_options);
  if (layout.channels == 0 || layout.values_per_channel() == 0) return {sum_dy, sum_dy_xmu};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "syncbn_backward_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto* dy = grad.const_data_ptr<scalar_t>();
    if (layout.rows) {
      rows_backward_reduce<scalar_t>(layout, dy, mean_acc, sum_dy.data_ptr<acc_t>(), sum_dy_xmu.data_ptr<acc_t>());
    } else {
      planar_grad_sums<scalar_t>(layout, dy, mean_acc.const_data_ptr<acc_t>(), sum_dy.data_ptr<acc_t>(),
                                 sum_dy_xmu.data_ptr<acc_t>());
    }
  });
  return {sum_dy, sum_dy_xmu};
}

std::tuple<at::Tensor, at::Tensor> merge_stats(const std::vector<double>& counts, const std::vector<at::Tensor>& means,
                                               const std::vector<at::Tensor>& m2s) {
  TORCH_CHECK(!means.empty() && means.size() == counts.size() && m2s.size() == counts.size(),
              "syncbn merge_stats: expected as many means and m2s as counts, at least one, got ", means.size(), ", ",
              m2s.size(), " and ", counts.size());
  const auto dtype = means[0].scalar_type();
  const int64_t channels = means[0].numel();
  const size_t copies = counts.size();
  std::vector<at::Tensor> mean_in, m2_in;  // contiguous (a no-op when they are)
  for (size_t i = 0; i < copies; ++i) {
    for (const auto* part : {&means[i], &m2s[i]}) {
      TORCH_CHECK(part->device().is_cpu() && part->dim() == 1 && part->numel() == channels &&
                      part->scalar_type() == dtype,
                  "syncbn merge_stats: expected 1-d CPU statistics of ", channels, " values of dtype ", dtype,
                  ", got ", part->sizes(), " of ", part->scalar_type(), " on ", part->device());
    }
    mean_in.push_back(means[i].contiguous());
    m2_in.push_back(m2s[i].contiguous());
  }
  double total = 0;
  for (const double count : counts) total += count;
  const double safe_total = std::max(total, 1.0);
  at::Tensor mean = at::empty({channels}, means[0].options());
  at::Tensor var = at::empty({channels}, means[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "syncbn_merge_stats", [&] {
    std::vector<const scalar_t*> mean_of(copies), m2_of(copies);
    for (size_t i = 0; i < copies; ++i) {
      mean_of[i] = mean_in[i].const_data_ptr<scalar_t>();
      m2_of[i] = m2_in[i].const_data_ptr<scalar_t>();
    }
    scalar_t* mean_out = mean.mutable_data_ptr<scalar_t>();
    scalar_t* var_out = var.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < channels; ++c) {
      double weighted = 0;
      for (size_t i = 0; i < copies; ++i) weighted += counts[i] * static_cast<double>(mean_of[i][c]);
      const double merged = weighted / safe_total;
      double m2 = 0, spread = 0;
      for (size_t i = 0; i < copies; ++i) {
        m2 += static_cast<double>(m2_of[i][c]);
        // An empty copy spreads nothing: 0 * (0 - mean)^2 is NaN where the square overflows (|mean| > 1e154).
        if (counts[i] == 0) continue;
        const double deviation = static_cast<double>(mean_of[i][c]) - merged;
        spread += counts[i] * (deviation * deviation);
      }
      mean_out[c] = static_cast<scalar_t>(merged);
      var_out[c] = static_cast<scalar_t>((m2 + spread) / safe_total);
    }
  });
  return {mean, var};
}

at::Tensor backward_elemt(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                          const at::Tensor& dy_scale, const at::Tensor& x_scale, const at::Tensor& shift) {
  check_input(input, "input");
  const Layout layout = layout_of(input);
  const at::Tensor grad = grad_in_layout_of(grad_out, input, layout);
  const auto acc_dtype = acc_dtype_of(input);
  const at::Tensor mean_acc = per_channel(mean, "mean", layout.channels, acc_dtype);
  const at::Tensor dy_scale_acc = per_channel(dy_scale, "dy_scale", layout.channels, acc_dtype);
  const at::Tensor x_scale_acc = per_channel(x_scale, "x_scale", layout.channels, acc_dtype);
  const at::Tensor shift_acc = per_channel(shift, "shift", layout.channels, acc_dtype);
  at::Tensor grad_in = at::empty_like(layout.input);
  if (grad_in.numel() == 0) return grad_in;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "syncbn_backward_elemt", [&] {
    elementwise<scalar_t, true>(layout, grad.const_data_ptr<scalar_t>(), grad_in.data_ptr<scalar_t>(), mean_acc,
                                x_scale_acc, shift_acc, dy_scale_acc);
  });
  return grad_in;
}

}  // namespace syncbn::cpu

#pragma once

#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>

// CPU kernels of the BatchNorm math (private to the core; the public ops are in
// <syncbn/batch_norm.h>). Input is (N, C, *) with the channel in dim 1, of
// dtype float32, float64, float16 or bfloat16, contiguous or channels_last
// (2d: ChannelsLast, 3d: ChannelsLast3d); any other layout is made contiguous
// first. N, C and the spatial sizes may be 0. "acc" is the accumulation dtype:
// float32 for float16, bfloat16 and float32 inputs, float64 for float64.
// Per-channel tensors are 1-d of length C; any float dtype and strides are
// accepted (converted to contiguous acc), and the returned ones are contiguous
// acc. Arguments are checked with TORCH_CHECK (c10::Error on misuse).
// Results do not depend on the number of threads (bitwise).
namespace syncbn::cpu {

// Per channel, the mean and M2 = sum((x - mean)^2): a shifted two-pass over
// cache-sized blocks (the block's mean as the shift, then sums of x - shift
// and its square from cache), blocks merged with Chan's formula in double.
// Never sum and sum of squares. One read of the input from memory.
// Returns (mean, m2) in float64 for every input dtype; zeros for an empty input.
std::tuple<at::Tensor, at::Tensor> local_stats(const at::Tensor& input);

// Chan's merge of R copies' statistics: copy i has counts[i] values per channel,
// mean means[i] and M2 m2s[i] (1-d, C values, one float dtype for all). In
// double, adding copy by copy from 0 (as the ATen composite's sums do); returns
// the whole's (mean, biased var) in that dtype. A total of 0 gives 0 and 0.
std::tuple<at::Tensor, at::Tensor> merge_stats(const std::vector<double>& counts, const std::vector<at::Tensor>& means,
                                               const std::vector<at::Tensor>& m2s);

// y = (x - mean[c]) * scale[c] + shift[c], the input's dtype and memory format.
at::Tensor normalize(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& scale,
                     const at::Tensor& shift);

// Per channel: sum_dy = sum(dy), sum_dy_xmu = sum(dy * (x - mean[c])). Acc dtype
// (accumulated in blocks, merged in double); zeros for an empty input. grad_out
// has the input's shape; another float dtype or memory format is converted.
std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& grad_out, const at::Tensor& input,
                                                   const at::Tensor& mean);

// grad_in = dy * dy_scale[c] + (x - mean[c]) * x_scale[c] + shift[c], the
// input's dtype and memory format. grad_out has the input's shape; another
// float dtype or memory format is converted.
at::Tensor backward_elemt(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                          const at::Tensor& dy_scale, const at::Tensor& x_scale, const at::Tensor& shift);

}  // namespace syncbn::cpu

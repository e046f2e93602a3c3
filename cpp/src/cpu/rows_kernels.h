#pragma once

#include "kernel_support.h"
#include "simd.h"

namespace syncbn::cpu {
namespace {  // private to batch_norm_kernels.cpp, which alone includes this header

// ---------------------------------------------------------------------------
// Rows kernels: `num_rows` rows of `width` values, vectorized across a row.
// They work per position p of a row; RowsPlan maps positions to channels.

// Rows of a layout as the kernels read them. A short row that is not a
// multiple of kWidth values (C = 3, 24, ...) would leave a partial vector in
// every row (measured 25x slower for C = 3): `group` consecutive rows are then
// read as one row of lcm(row, kWidth) values, and the last num_rows % group
// rows as a second region of ungrouped rows.
template <typename scalar_t>
struct RowsPlan {
  struct Region {
    int64_t offset;  // of its first value
    int64_t num_rows;
    int64_t width;
  };
  static constexpr int64_t kWidth = Io<scalar_t>::kWidth;
  // Rows at least this wide keep their partial vector (it is a small share).
  static constexpr int64_t kGroupBelowWidth = 16 * kWidth;

  int64_t channels;
  int64_t fold;
  std::vector<Region> regions;

  explicit RowsPlan(const Layout& layout) : channels(layout.channels), fold(layout.fold) {
    const int64_t row = layout.row_width();
    int64_t group = 1;
    if (row % kWidth != 0 && row < kGroupBelowWidth) group = kWidth / std::gcd(row, kWidth);
    const int64_t grouped_rows = layout.num_rows / group;
    const int64_t rest = layout.num_rows - grouped_rows * group;
    if (grouped_rows > 0) regions.push_back({0, grouped_rows, group * row});
    if (rest > 0) regions.push_back({grouped_rows * group * row, rest, row});
  }
  int64_t channel_of(int64_t position) const { return (position / fold) % channels; }
  // A per-channel acc array as one value per position of `region`.
  std::vector<at::opmath_type<scalar_t>> per_position(const at::Tensor& per_channel_values,
                                                      const Region& region) const {
    const auto* values = per_channel_values.const_data_ptr<at::opmath_type<scalar_t>>();
    std::vector<at::opmath_type<scalar_t>> out(region.width);
    for (int64_t p = 0; p < region.width; ++p) out[p] = values[channel_of(p)];
    return out;
  }
};

// Rows reductions are split into tasks of whole blocks of rows.
struct RowTasks {
  int64_t rows_per_block;
  int64_t rows_per_task;  // a multiple of rows_per_block
  int64_t num_tasks;

  RowTasks(int64_t num_rows, int64_t width) {
    rows_per_block = std::clamp(kRowBlockValues / std::max<int64_t>(1, width), kMinBlockRows, kMaxBlockRows);
    const int64_t wanted = std::max<int64_t>(1, divup(num_rows * width, kTaskValues));
    rows_per_task = divup(divup(num_rows, wanted), rows_per_block) * rows_per_block;
    num_tasks = std::max<int64_t>(1, divup(num_rows, rows_per_task));
  }
  int64_t task_rows(int64_t task, int64_t num_rows) const {
    return std::min(num_rows, (task + 1) * rows_per_task) - task * rows_per_task;
  }
};

// Adds the rows [0, rows) of a block into per-position acc arrays with
// accumulate(full, row, position, count, acc...). From memory, rows are read in
// memory order, one row at a time, the arrays staying in L1 (reading a vector
// of positions down the rows instead was up to 3x slower for two inputs read
// from memory). A block in cache (kInCache), or a row of a single vector, is
// read a vector of positions at a time, down the rows, the accumulators in
// registers. Partial vectors load zeros past `count`: the accumulate functions
// below add zero for those lanes.
template <typename scalar_t, int kArrays, bool kInCache, class Accumulate>
C10_ALWAYS_INLINE void accumulate_rows(int64_t rows, int64_t width, typename Io<scalar_t>::acc_t* acc_a,
                                       typename Io<scalar_t>::acc_t* acc_b, const Accumulate& accumulate) {
  static_assert(kArrays == 1 || kArrays == 2);
  using IoT = Io<scalar_t>;
  using Q = typename IoT::Q;
  if (kInCache || width <= IoT::kWidth) {
    for_each_vector<scalar_t>(width, [&](auto full, int64_t p, int64_t count) {
      constexpr bool kFull = decltype(full)::value;
      Q a, b;
      for (int64_t r = 0; r < rows; ++r) accumulate(full, r, p, count, a, b);
      IoT::template store<kFull>(acc_a + p, count, a);
      if constexpr (kArrays == 2) IoT::template store<kFull>(acc_b + p, count, b);
    });
    return;
  }
  std::fill(acc_a, acc_a + width, 0);
  if constexpr (kArrays == 2) std::fill(acc_b, acc_b + width, 0);
  for (int64_t r = 0; r < rows; ++r) {
    for_each_vector<scalar_t>(width, [&](auto full, int64_t p, int64_t count) {
      constexpr bool kFull = decltype(full)::value;
      Q a = IoT::template load<kFull>(acc_a + p, count);
      Q b;
      if constexpr (kArrays == 2) b = IoT::template load<kFull>(acc_b + p, count);
      accumulate(full, r, p, count, a, b);
      IoT::template store<kFull>(acc_a + p, count, a);
      if constexpr (kArrays == 2) IoT::template store<kFull>(acc_b + p, count, b);
    });
  }
}

// Mean and M2 of each position of `num_rows` rows of `width` values.
template <typename scalar_t>
std::vector<MeanM2> rows_stats(const scalar_t* data, int64_t num_rows, int64_t width) {
  using IoT = Io<scalar_t>;
  using acc_t = typename IoT::acc_t;
  using Q = typename IoT::Q;
  const RowTasks tasks(num_rows, width);
  // Per task: the means of its positions, then their M2s.
  std::vector<double> partial(tasks.num_tasks * 2 * width);

  parallel_for(0, tasks.num_tasks, grain_for(tasks.rows_per_task * width), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> block_shift(width), block_d(width), block_dd(width);
    for (int64_t task = begin; task < end; ++task) {
      double* mean = partial.data() + task * 2 * width;
      double* m2 = mean + width;
      std::fill(mean, mean + 2 * width, 0.0);
      double count = 0;
      const int64_t first_row = task * tasks.rows_per_task;
      const int64_t end_row = first_row + tasks.task_rows(task, num_rows);
      for (int64_t row_begin = first_row; row_begin < end_row; row_begin += tasks.rows_per_block) {
        const int64_t rows = std::min(end_row, row_begin + tasks.rows_per_block) - row_begin;
        const scalar_t* block = data + row_begin * width;
        // Pass 1: provisional means, used only as shifts.
        const auto add_x = [&](auto full, int64_t r, int64_t p, int64_t n, Q& sum, Q&) {
          sum = sum + IoT::template load<decltype(full)::value>(block + r * width + p, n);
        };
        accumulate_rows<scalar_t, 1, false>(rows, width, block_shift.data(), nullptr, add_x);
        const acc_t inv_rows = acc_t(1) / static_cast<acc_t>(rows);
        for (int64_t p = 0; p < width; ++p) block_shift[p] *= inv_rows;
        // Pass 2 (the block is in cache): sums of d = x - shift and d^2. Past a
        // partial vector, x = 0 and shift = 0: d = 0.
        const auto add_moments = [&](auto full, int64_t r, int64_t p, int64_t n, Q& sum_d, Q& sum_dd) {
          constexpr bool kFull = decltype(full)::value;
          const Q d = IoT::template load<kFull>(block + r * width + p, n) -
                      IoT::template load<kFull>(block_shift.data() + p, n);
          sum_d = sum_d + d;
          sum_dd = madd(d, d, sum_dd);
        };
        accumulate_rows<scalar_t, 2, true>(rows, width, block_d.data(), block_dd.data(), add_moments);
        // Chan's merge; all positions have the same counts, so the weights are shared.
        const double n_b = static_cast<double>(rows);
        const double total = count + n_b;
        const double weight_b = n_b / total, weight_cross = count * n_b / total;
        for (int64_t p = 0; p < width; ++p) {
          const double sum_d = block_d[p];
          const double delta = shifted_mean(block_shift[p], sum_d, n_b) - mean[p];
          mean[p] += delta * weight_b;
          m2[p] += shifted_m2(sum_d, block_dd[p], n_b) + delta * delta * weight_cross;
        }
        count = total;
      }
    }
  });

  std::vector<MeanM2> position(width);
  for (int64_t task = 0; task < tasks.num_tasks; ++task) {
    const double rows = static_cast<double>(tasks.task_rows(task, num_rows));
    const double* mean = partial.data() + task * 2 * width;
    for (int64_t p = 0; p < width; ++p) position[p].merge(rows, mean[p], mean[width + p]);
  }
  return position;
}

// sum(dy) and sum(dy * (x - mean[p])) of each position p, in double, added
// into sum_dy and sum_dy_xmu.
template <typename scalar_t>
void rows_grad_sums(const scalar_t* data, const scalar_t* grad, int64_t num_rows, int64_t width,
                    const at::opmath_type<scalar_t>* mean, double* sum_dy_out, double* sum_dy_xmu_out) {
  using IoT = Io<scalar_t>;
  using acc_t = typename IoT::acc_t;
  using Q = typename IoT::Q;
  const RowTasks tasks(num_rows, width);
  std::vector<double> partial(tasks.num_tasks * 2 * width);

  parallel_for(0, tasks.num_tasks, grain_for(tasks.rows_per_task * width), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> block_dy(width), block_dy_xmu(width);
    for (int64_t task = begin; task < end; ++task) {
      double* sum_dy = partial.data() + task * 2 * width;
      double* sum_dy_xmu = sum_dy + width;
      std::fill(sum_dy, sum_dy + 2 * width, 0.0);
      const int64_t first_row = task * tasks.rows_per_task;
      const int64_t end_row = first_row + tasks.task_rows(task, num_rows);
      for (int64_t row_begin = first_row; row_begin < end_row; row_begin += tasks.rows_per_block) {
        const int64_t rows = std::min(end_row, row_begin + tasks.rows_per_block) - row_begin;
        const int64_t start = row_begin * width;
        // Past a partial vector dy = 0: it adds nothing to either sum.
        const auto add_grads = [&](auto full, int64_t r, int64_t p, int64_t n, Q& s_dy, Q& s_dy_xmu) {
          constexpr bool kFull = decltype(full)::value;
          const int64_t at_row = start + r * width + p;
          const Q dy = IoT::template load<kFull>(grad + at_row, n);
          const Q x = IoT::template load<kFull>(data + at_row, n);
          s_dy = s_dy + dy;
          s_dy_xmu = madd(dy, x - IoT::template load<kFull>(mean + p, n), s_dy_xmu);
        };
        accumulate_rows<scalar_t, 2, false>(rows, width, block_dy.data(), block_dy_xmu.data(), add_grads);
        for (int64_t p = 0; p < width; ++p) {
          sum_dy[p] += block_dy[p];
          sum_dy_xmu[p] += block_dy_xmu[p];
        }
      }
    }
  });

  for (int64_t task = 0; task < tasks.num_tasks; ++task) {
    const double* part = partial.data() + task * 2 * width;
    for (int64_t p = 0; p < width; ++p) {
      sum_dy_out[p] += part[p];
      sum_dy_xmu_out[p] += part[width + p];
    }
  }
}

// out = (x - mean[p]) * x_scale[p] + shift[p], plus dy * dy_scale[p] when
// kWithGrad, per-position terms. One row at a time (tiles of rows, loading the
// terms once per tile, were up to 3x slower: several streams into the same pages).
template <typename scalar_t, bool kWithGrad>
void rows_elementwise_region(const scalar_t* x, const scalar_t* grad, scalar_t* out, int64_t num_rows, int64_t width,
                             const ElementwiseTerms<at::opmath_type<scalar_t>>& terms) {
  using IoT = Io<scalar_t>;
  using Q = typename IoT::Q;
  parallel_for(0, num_rows, grain_for(width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t start = r * width;
      for_each_vector<scalar_t>(width, [&](auto full, int64_t p, int64_t count) {
        constexpr bool kFull = decltype(full)::value;
        const Q xv = IoT::template load<kFull>(x + start + p, count);
        const Q m = IoT::template load<kFull>(terms.mean + p, count);
        const Q a = IoT::template load<kFull>(terms.x_scale + p, count);
        const Q b = IoT::template load<kFull>(terms.shift + p, count);
        Q value = madd(xv - m, a, b);
        if constexpr (kWithGrad) {
          const Q dy = IoT::template load<kFull>(grad + start + p, count);
          value = madd(dy, IoT::template load<kFull>(terms.dy_scale + p, count), value);
        }
        IoT::template store<kFull>(out + start + p, count, value);
      });
    }
  });
}

// The four operations on a rows layout: each region in turn, then positions
// folded into channels (in region and position order).
template <typename scalar_t>
void rows_local_stats(const Layout& layout, double* mean_out, double* m2_out) {
  const RowsPlan<scalar_t> plan(layout);
  const auto* data = layout.input.const_data_ptr<scalar_t>();
  std::vector<MeanM2> channel(layout.channels);
  for (const auto& region : plan.regions) {
    const std::vector<MeanM2> position = rows_stats<scalar_t>(data + region.offset, region.num_rows, region.width);
    for (int64_t p = 0; p < region.width; ++p) {
      channel[plan.channel_of(p)].merge(position[p].count, position[p].mean, position[p].m2);
    }
  }
  for (int64_t c = 0; c < layout.channels; ++c) {
    mean_out[c] = channel[c].mean;
    m2_out[c] = channel[c].m2;
  }
}

template <typename scalar_t>
void rows_backward_reduce(const Layout& layout, const scalar_t* grad, const at::Tensor& mean,
                          at::opmath_type<scalar_t>* sum_dy_out, at::opmath_type<scalar_t>* sum_dy_xmu_out) {
  const RowsPlan<scalar_t> plan(layout);
  const auto* data = layout.input.const_data_ptr<scalar_t>();
  std::vector<double> sum_dy(layout.channels, 0.0), sum_dy_xmu(layout.channels, 0.0);
  for (const auto& region : plan.regions) {
    const auto mean_p = plan.per_position(mean, region);
    std::vector<double> position_dy(region.width, 0.0), position_dy_xmu(region.width, 0.0);
    rows_grad_sums<scalar_t>(data + region.offset, grad + region.offset, region.num_rows, region.width,
                             mean_p.data(), position_dy.data(), position_dy_xmu.data());
    for (int64_t p = 0; p < region.width; ++p) {
      sum_dy[plan.channel_of(p)] += position_dy[p];
      sum_dy_xmu[plan.channel_of(p)] += position_dy_xmu[p];
    }
  }
  for (int64_t c = 0; c < layout.channels; ++c) {
    sum_dy_out[c] = static_cast<at::opmath_type<scalar_t>>(sum_dy[c]);
    sum_dy_xmu_out[c] = static_cast<at::opmath_type<scalar_t>>(sum_dy_xmu[c]);
  }
}

// Per-channel terms (acc_t tensors) spread to each region's positions.
template <typename scalar_t, bool kWithGrad>
void rows_elementwise(const Layout& layout, const scalar_t* grad, scalar_t* out, const at::Tensor& mean,
                      const at::Tensor& x_scale, const at::Tensor& shift, const at::Tensor& dy_scale) {
  const RowsPlan<scalar_t> plan(layout);
  const auto* data = layout.input.const_data_ptr<scalar_t>();
  for (const auto& region : plan.regions) {
    const auto m = plan.per_position(mean, region), a = plan.per_position(x_scale, region),
               b = plan.per_position(shift, region);
    const auto g = kWithGrad ? plan.per_position(dy_scale, region) : decltype(m){};
    const ElementwiseTerms<at::opmath_type<scalar_t>> terms{m.data(), a.data(), b.data(), g.data()};
    rows_elementwise_region<scalar_t, kWithGrad>(data + region.offset, kWithGrad ? grad + region.offset : nullptr,
                                                 out + region.offset, region.num_rows, region.width, terms);
  }
}

}  // namespace
}  // namespace syncbn::cpu

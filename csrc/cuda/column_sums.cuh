// The finishing reduction of the default kernel set: per segment, the column sums of the map
// kernels' per-block partials (the beta gradient over every block of the call, the bridge's and
// partial_l2's per-sample sums over a sample's chunks).  Parallel and deterministic: the rows of a
// segment are cut into fixed splits, each summed by one block in a fixed order (coalesced: the
// threads of a block read consecutive entries, a column's threads meet in a fixed shared-memory
// tree), then the splits of each segment are summed by the same kernel in one block.
#pragma once

#include <cstdint>

#include "launch.cuh"

namespace dfa {
namespace cuda {

constexpr int kSumThreads = 256;
constexpr int kSumRowsPerThread = 16;  // rows a thread adds per split: enough loads in flight, many splits

// Threads that share a column: the largest power of two with lanes * width <= kSumThreads.
__host__ __device__ inline int column_lanes(int width) {
  int lanes = 1;
  while (2 * lanes * width <= kSumThreads) lanes *= 2;
  return lanes;
}

// out[segment][split][col] = sign * sum over the split's rows r of w(r) * x[segment][r][col], with
// w(r) = row_weight[(segment * rows + r) / weight_period] (1 without weights).  Grid: (segments, splits).
template <typename In>
__global__ void __launch_bounds__(kSumThreads)
    column_sums_kernel(const In* x, int64_t rows, int width, int64_t rows_per_split, const In* row_weight,
                       int64_t weight_period, double sign, double* out) {
  __shared__ double tree[kSumThreads];
  const int lanes = column_lanes(width);
  const int col = threadIdx.x % width, lane = threadIdx.x / width;
  const int64_t segment = blockIdx.x, split = blockIdx.y;
  const int64_t begin = split * rows_per_split;
  const int64_t end = begin + rows_per_split < rows ? begin + rows_per_split : rows;
  double total = 0;
  if (lane < lanes) {
    for (int64_t r = begin + lane; r < end; r += lanes) {
      const int64_t row = segment * rows + r;  // < 2**31: x has at most one row per map-kernel block
      const double w = row_weight == nullptr
                           ? 1.0
                           : static_cast<double>(row_weight[uint32_t(row) / uint32_t(weight_period)]);
      total += w * static_cast<double>(x[row * width + col]);
    }
  }
  tree[threadIdx.x] = total;
  __syncthreads();
  for (int half = lanes / 2; half > 0; half >>= 1) {
    if (lane < half) tree[threadIdx.x] += tree[threadIdx.x + half * width];
    __syncthreads();
  }
  if (lane == 0) out[(segment * gridDim.y + split) * width + col] = sign * tree[threadIdx.x];
}

// Rows of one split: kSumRowsPerThread per thread of a column, more where the grid's y limit needs it.
inline int64_t column_sums_rows_per_split(int64_t rows, int width) {
  const int64_t by_work = int64_t(column_lanes(width)) * kSumRowsPerThread;
  const int64_t by_grid = (rows + 65534) / 65535;
  return by_work > by_grid ? by_work : by_grid;
}

inline int64_t column_sums_splits(int64_t rows, int width) {
  const int64_t per_split = column_sums_rows_per_split(rows, width);
  return rows <= per_split ? 1 : (rows + per_split - 1) / per_split;
}

// Doubles of scratch the two-stage sum needs (none when one split covers a segment).
inline int64_t column_sums_scratch(int64_t segments, int64_t rows, int width) {
  const int64_t splits = column_sums_splits(rows, width);
  return splits == 1 ? 0 : segments * splits * width;
}

// out[segment][col] = sign * sum_r w(r) x[segment * rows + r][col] (see column_sums_kernel).
template <typename A>
void column_sums(cudaStream_t stream, const A* x, int64_t segments, int64_t rows, int width, const A* row_weight,
                 int64_t weight_period, double sign, double* out, double* scratch) {
  const int64_t splits = column_sums_splits(rows, width);
  auto stage1 = column_sums_kernel<A>;
  DFA_LAUNCH(stage1, dim3(static_cast<unsigned>(segments), static_cast<unsigned>(splits)), kSumThreads, stream, x,
             rows, width, column_sums_rows_per_split(rows, width), row_weight, weight_period, sign,
             splits == 1 ? out : scratch);
  if (splits == 1) return;
  auto stage2 = column_sums_kernel<double>;
  DFA_LAUNCH(stage2, dim3(static_cast<unsigned>(segments), 1u), kSumThreads, stream,
             static_cast<const double*>(scratch), splits, width, splits, static_cast<const double*>(nullptr),
             int64_t(1), 1.0, out);
}

}  // namespace cuda
}  // namespace dfa

// The CUDA map kernels before issue 25's restructuring, kept unchanged so that one GPU run can time
// them against the default set (map_kernels.cuh): built only with DFA_CUDA_OLD_KERNELS=1 (setup.py)
// and chosen at run time with DFA_CUDA_KERNELS=old or torch.ops.dfa.cuda_kernels("old").
//
// Memory-bound design: each block owns one fixed chunk of one sample (kChunk elements) and each
// thread kItems elements of it, loaded as 16-byte vectors when every map is aligned (else one
// element at a time).  Forward reads the K maps once; backward re-reads them rather than storing
// K-sized intermediates.  Reductions are deterministic: warp shuffles in a fixed tree, per-warp
// partials summed in order, per-block partials written to global memory and summed over chunks in
// order by a small finishing kernel (no floating-point atomics).
#pragma once

#include <cstdint>

#include "../../common/dfa_math.h"
#include "../finish_kernels.cuh"
#include "../launch.cuh"
#include "../map_args.cuh"

namespace dfa {
namespace cuda {
namespace v1 {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 16;                         // elements per thread
constexpr int64_t kChunk = kThreads * kItems;      // elements per block (one chunk of one sample)
constexpr int kMaxWidth = 2 * kMaxK + 1;           // accumulators per block (bridge forward)

// Where this thread's elements of the block's chunk lie: element i = it * VEC + e of the thread
// sits at in-sample index first + (it * kThreads + threadIdx.x) * VEC + e.
template <typename T, int VEC>
struct Tile {
  static constexpr int kIters = kItems / VEC;
  int64_t sample_offset;  // b * N
  int64_t chunk_start;    // first in-sample index of the chunk
  int64_t N;

  __device__ int64_t index(int it) const { return chunk_start + (int64_t(it) * kThreads + threadIdx.x) * VEC; }
  __device__ bool valid(int it) const { return index(it) < N; }  // whole vectors: N % VEC == 0

  template <typename A>
  __device__ void load(const T* map, A (&out)[kItems]) const {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      if (valid(it)) {
        const Vec<T, VEC> v = *reinterpret_cast<const Vec<T, VEC>*>(map + sample_offset + index(it));
#pragma unroll
        for (int e = 0; e < VEC; ++e) out[it * VEC + e] = static_cast<A>(v.v[e]);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) out[it * VEC + e] = A(0);  // contributes nothing to any sum
      }
    }
  }

  template <typename A>
  __device__ void store(T* map, const A (&in)[kItems]) const {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      if (valid(it)) {
        Vec<T, VEC> v;
#pragma unroll
        for (int e = 0; e < VEC; ++e) v.v[e] = static_cast<T>(in[it * VEC + e]);
        *reinterpret_cast<Vec<T, VEC>*>(map + sample_offset + index(it)) = v;
      }
    }
  }

  // Channel of each element (one division per vector, then increments).
  __device__ void channels(int64_t C, int64_t inner, int (&ch)[kItems]) const {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int64_t n = index(it);
      int64_t c = (n / inner) % C, r = n % inner;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        ch[it * VEC + e] = static_cast<int>(c);
        if (++r == inner) {
          r = 0;
          c = c + 1 == C ? 0 : c + 1;
        }
      }
    }
  }
};

// Common prologue: alpha = softmax(beta) in shared memory and this block's tile.
template <typename T, int VEC>
__device__ Tile<T, VEC> begin_block(const MapArgs<T>& args, acc_type<T>* alpha) {
  if (threadIdx.x == 0) math::softmax(args.beta, alpha, args.K);
  __syncthreads();
  const int64_t item = blockIdx.x;
  const int64_t b = item / args.chunks;
  return Tile<T, VEC>{b * args.N, (item % args.chunks) * kChunk, args.N};
}

// sigma_j applied in place (no-op without margins).  Padding lanes past the sample's end stay 0
// rather than becoming margins, so they add nothing to any sum whatever the margins are.
template <typename T, int VEC>
__device__ void apply_margin(const Tile<T, VEC>& tile, acc_type<T> (&x)[kItems], const acc_type<T>* margins_row,
                             const int (&ch)[kItems]) {
  if (margins_row == nullptr) return;
#pragma unroll
  for (int it = 0; it < Tile<T, VEC>::kIters; ++it) {
    const bool valid = tile.valid(it);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const int i = it * VEC + e;
      x[i] = valid ? math::margin_relu(x[i], margins_row[ch[i]]) : acc_type<T>(0);
    }
  }
}

template <typename A>
__device__ A thread_dot(const A (&a)[kItems], const A (&b)[kItems]) {
  A sum = 0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) sum += a[i] * b[i];
  return sum;
}

// Per-block accumulators: warp sums in a fixed shuffle tree, then warps in order at the end.
template <typename A>
struct BlockSums {
  A (*warp_sums)[kMaxWidth];  // [kWarps][kMaxWidth] in shared memory

  __device__ void add(int slot, A v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5][slot] = v;
  }

  __device__ void write(A* out, int width) {
    __syncthreads();
    for (int a = threadIdx.x; a < width; a += kThreads) {
      A total = 0;
      for (int w = 0; w < kWarps; ++w) total += warp_sums[w][a];
      out[a] = total;
    }
  }
};

#define DFA_BLOCK_SHARED(A)                                   \
  __shared__ A alpha[kMaxK];                                  \
  __shared__ A warp_sums_storage[kWarps][kMaxWidth];          \
  BlockSums<A> sums{warp_sums_storage};                       \
  (void)sums;

template <typename T>
__device__ const acc_type<T>* margin_row(const MapArgs<T>& args, int j) {
  return args.margins == nullptr ? nullptr : args.margins + j * args.C;
}

// A = sum_j alpha_j sigma_j(T_j) over this thread's elements.
template <typename T, int VEC>
__device__ void aggregate_tile(const MapArgs<T>& args, const Tile<T, VEC>& tile, const acc_type<T>* alpha,
                               const int (&ch)[kItems], acc_type<T> (&agg)[kItems]) {
  using A = acc_type<T>;
#pragma unroll
  for (int i = 0; i < kItems; ++i) agg[i] = 0;
  for (int j = 0; j < args.K; ++j) {
    A x[kItems];
    tile.load(args.features[j], x);
    apply_margin(tile, x, margin_row(args, j), ch);
#pragma unroll
    for (int i = 0; i < kItems; ++i) agg[i] += alpha[j] * x[i];
  }
}

template <typename T, int VEC>
__device__ void tile_channels(const MapArgs<T>& args, const Tile<T, VEC>& tile, int (&ch)[kItems]) {
  if (args.margins != nullptr) {
    tile.channels(args.C, args.inner, ch);
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) ch[i] = 0;
  }
}

// The gradient of every map from an upstream gradient u of the aggregation:
// grad_features[j] = scale * alpha_j * u * [T_j >= m_j] (when written) and, when sums is given,
// slot j += <u, sigma_j(T_j)> (the beta gradient's dot products).
template <typename T, int VEC>
__device__ void map_grads(const MapArgs<T>& args, const Tile<T, VEC>& tile, const int (&ch)[kItems],
                          const acc_type<T>* alpha, const acc_type<T> (&u)[kItems], acc_type<T> scale,
                          const MapOutPtrs<T>& grad_features, bool write_features, BlockSums<acc_type<T>>* sums) {
  using A = acc_type<T>;
  for (int j = 0; j < args.K; ++j) {
    A x[kItems];
    tile.load(args.features[j], x);
    const A* m = margin_row(args, j);
    if (write_features) {
      A d[kItems];
#pragma unroll
      for (int i = 0; i < kItems; ++i)
        d[i] = scale * alpha[j] * u[i] * (m == nullptr ? A(1) : math::margin_relu_pass(x[i], m[ch[i]]));
      tile.store(grad_features.ptr[j], d);
    }
    if (sums != nullptr) {
      apply_margin(tile, x, m, ch);
      sums->add(j, thread_dot(u, x));
    }
  }
}

// ---------------------------------------------------------------------------------------------

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) aggregate_forward_kernel(MapArgs<T> args, T* out) {
  using A = acc_type<T>;
  __shared__ A alpha[kMaxK];
  const auto tile = begin_block<T, VEC>(args, alpha);
  int ch[kItems];
  tile_channels(args, tile, ch);
  A agg[kItems];
  aggregate_tile(args, tile, alpha, ch, agg);
  tile.store(out, agg);
}

// partials[item][j] = <grad, sigma_j(T_j)> over the chunk; grad_features[j] = alpha_j grad [T_j >= m_j].
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    aggregate_backward_kernel(MapArgs<T> args, const T* grad, MapOutPtrs<T> grad_features, bool write_features,
                              acc_type<T>* partials) {
  using A = acc_type<T>;
  DFA_BLOCK_SHARED(A)
  const auto tile = begin_block<T, VEC>(args, alpha);
  int ch[kItems];
  tile_channels(args, tile, ch);
  A g[kItems];
  tile.load(grad, g);
  map_grads(args, tile, ch, alpha, g, A(1), grad_features, write_features, partials != nullptr ? &sums : nullptr);
  if (partials != nullptr) sums.write(partials + int64_t(blockIdx.x) * args.K, args.K);
}

// partials[item] = (<s,s>, <s,T_j>..., <A,T_j>...) over the chunk.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) bridge_forward_kernel(MapArgs<T> args, const T* student, acc_type<T>* partials) {
  using A = acc_type<T>;
  DFA_BLOCK_SHARED(A)
  const auto tile = begin_block<T, VEC>(args, alpha);
  const int K = args.K;
  A s[kItems], agg[kItems];
  tile.load(student, s);
  sums.add(0, thread_dot(s, s));
#pragma unroll
  for (int i = 0; i < kItems; ++i) agg[i] = 0;
  for (int j = 0; j < K; ++j) {
    A x[kItems];
    tile.load(args.features[j], x);
#pragma unroll
    for (int i = 0; i < kItems; ++i) agg[i] += alpha[j] * x[i];
    sums.add(1 + j, thread_dot(s, x));
  }
  for (int j = 0; j < K; ++j) {  // second read of this thread's elements: served by L1/L2
    A x[kItems];
    tile.load(args.features[j], x);
    sums.add(1 + K + j, thread_dot(agg, x));
  }
  sums.write(partials + int64_t(blockIdx.x) * (2 * K + 1), 2 * K + 1);
}

// terms[b] = (cs, ca, ea, es) scaled by the upstream gradient: ds = cs s + ca A, dA = ea A + es s.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    bridge_backward_kernel(MapArgs<T> args, const T* student, const acc_type<T>* terms, T* grad_student,
                           MapOutPtrs<T> grad_features, bool write_features) {
  using A = acc_type<T>;
  __shared__ A alpha[kMaxK];
  const auto tile = begin_block<T, VEC>(args, alpha);
  const int64_t b = blockIdx.x / args.chunks;
  const A cs = terms[4 * b], ca = terms[4 * b + 1], ea = terms[4 * b + 2], es = terms[4 * b + 3];
  int ch[kItems];
  tile_channels(args, tile, ch);
  A s[kItems], agg[kItems], d[kItems];
  tile.load(student, s);
  aggregate_tile(args, tile, alpha, ch, agg);
  if (grad_student != nullptr) {
#pragma unroll
    for (int i = 0; i < kItems; ++i) d[i] = cs * s[i] + ca * agg[i];
    tile.store(grad_student, d);
  }
  if (write_features) {
    for (int j = 0; j < args.K; ++j) {
#pragma unroll
      for (int i = 0; i < kItems; ++i) d[i] = alpha[j] * (ea * agg[i] + es * s[i]);
      tile.store(grad_features.ptr[j], d);
    }
  }
}

// partials[item] = sum (s - t)^2 mask(s, t) over the chunk.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) partial_l2_forward_kernel(MapArgs<T> args, const T* student, acc_type<T>* partials) {
  using A = acc_type<T>;
  DFA_BLOCK_SHARED(A)
  const auto tile = begin_block<T, VEC>(args, alpha);
  int ch[kItems];
  tile_channels(args, tile, ch);
  A s[kItems], t[kItems];
  tile.load(student, s);
  aggregate_tile(args, tile, alpha, ch, t);
  A total = 0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const A d = s[i] - t[i];
    total += d * d * math::partial_l2_mask(s[i], t[i]);
  }
  sums.add(0, total);
  sums.write(partials + blockIdx.x, 1);
}

// e = 2 (s - t) mask; grad_student = g_b e; partials[item][j] = <e, sigma_j(T_j)>;
// grad_features[j] = -g_b alpha_j e [T_j >= m_j].
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    partial_l2_backward_kernel(MapArgs<T> args, const T* student, const acc_type<T>* grad, T* grad_student,
                               MapOutPtrs<T> grad_features, bool write_features, acc_type<T>* partials) {
  using A = acc_type<T>;
  DFA_BLOCK_SHARED(A)
  const auto tile = begin_block<T, VEC>(args, alpha);
  const A gb = grad[blockIdx.x / args.chunks];
  int ch[kItems];
  tile_channels(args, tile, ch);
  A s[kItems], e[kItems];
  tile.load(student, s);
  aggregate_tile(args, tile, alpha, ch, e);
#pragma unroll
  for (int i = 0; i < kItems; ++i) e[i] = A(2) * (s[i] - e[i]) * math::partial_l2_mask(s[i], e[i]);
  if (grad_student != nullptr) {
    A d[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) d[i] = gb * e[i];
    tile.store(grad_student, d);
  }
  if (partials == nullptr && !write_features) return;
  map_grads(args, tile, ch, alpha, e, -gb, grad_features, write_features, partials != nullptr ? &sums : nullptr);
  if (partials != nullptr) sums.write(partials + int64_t(blockIdx.x) * args.K, args.K);
}

// ---------------------------------------------------------------------------------------------
// Finishing kernels over the per-block partials (all tiny next to the map kernels).

constexpr int kReduceThreads = 128;

// out[segment][col] = sign * sum over the rows r of the segment of w(r) * x[r][col], with
// w(r) = row_weight[r / weight_period] (1 without weights).  One block per (segment, column):
// threads take rows in a fixed stride and a fixed shared-memory tree adds them, so the result
// is deterministic and the work is spread over the whole device.
template <typename A>
__global__ void __launch_bounds__(kReduceThreads)
    segment_column_sums_kernel(const A* x, int64_t rows_per_segment, int width, const A* row_weight,
                               int64_t weight_period, double sign, double* out) {
  __shared__ double tree[kReduceThreads];
  const int64_t segment = blockIdx.x;
  const int col = blockIdx.y;
  double total = 0;
  for (int64_t r = threadIdx.x; r < rows_per_segment; r += kReduceThreads) {
    const int64_t row = segment * rows_per_segment + r;
    const double w = row_weight == nullptr ? 1.0 : static_cast<double>(row_weight[row / weight_period]);
    total += w * static_cast<double>(x[row * width + col]);
  }
  tree[threadIdx.x] = total;
  __syncthreads();
  for (int half = kReduceThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) tree[threadIdx.x] += tree[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[segment * width + col] = sign * tree[0];
}

// The launch rules and kernels of this set, as backend.cuh's CudaBackend takes them.
struct Kernels {
  static constexpr const char* kName = "old";
  static constexpr int kBlockThreads = kThreads;

  // 16-byte vectors wherever every pointer is aligned and a sample holds whole vectors.
  template <typename T>
  static int vec_width(const MapArgs<T>& args, bool aligned) {
    return aligned && args.N % kVecWidth<T> == 0 ? kVecWidth<T> : 1;
  }
  template <typename T>
  static int64_t chunk(int /*vec*/) {
    return kChunk;
  }

  template <typename T, int VEC> static auto aggregate_forward() { return aggregate_forward_kernel<T, VEC>; }
  template <typename T, int VEC> static auto aggregate_backward() { return aggregate_backward_kernel<T, VEC>; }
  template <typename T, int VEC> static auto bridge_forward() { return bridge_forward_kernel<T, VEC>; }
  template <typename T, int VEC> static auto bridge_backward() { return bridge_backward_kernel<T, VEC>; }
  template <typename T, int VEC> static auto partial_l2_forward() { return partial_l2_forward_kernel<T, VEC>; }
  template <typename T, int VEC> static auto partial_l2_backward() { return partial_l2_backward_kernel<T, VEC>; }

  // out[segment][col] = sign * sum_r w(r) x[segment rows][col], one block per (segment, column).
  static int64_t column_sums_scratch(int64_t /*segments*/, int64_t /*rows*/, int /*width*/) { return 0; }
  template <typename A>
  static void column_sums(cudaStream_t stream, const A* x, int64_t segments, int64_t rows, int width,
                          const A* row_weight, int64_t weight_period, double sign, double* out, double* /*scratch*/) {
    auto kernel = segment_column_sums_kernel<A>;
    DFA_LAUNCH(kernel, dim3(static_cast<unsigned>(segments), static_cast<unsigned>(width)), kReduceThreads, stream,
               x, rows, width, row_weight, weight_period, sign, out);
  }
};

}  // namespace v1
}  // namespace cuda
}  // namespace dfa

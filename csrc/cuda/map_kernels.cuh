// CUDA kernels of the DFA ops (the default set; old/map_kernels_v1.cuh is the set before issue 25).
// Memory-bound design, sized in bytes in flight rather than elements:
// - each block owns one chunk of one sample and each thread kMapBytes (64 B) of every map in it,
//   as four 16-byte vectors whatever the dtype (16 float32 or 32 bfloat16/float16 values), so the
//   16-bit maps keep as many bytes in flight as float32 ones;
// - the maps stream through a two-slot ring in shared memory (MapStream, cp.async on sm_80 and
//   later): map j + 1 is in flight while map j's arithmetic runs, and no register holds it;
// - alpha = softmax(beta) is computed by every warp with shuffles while the first map loads, with
//   no block barrier in front of them;
// - margins are looked up once per vector and map: one value where a vector lies in one channel
//   (NCHW, inner % VEC == 0), one vector of VEC margins where its elements are consecutive
//   channels (channels_last, C % VEC == 0); other layouts take the scalar path (VEC = 1), where a
//   vector is one element;
// - channels are found with 32-bit division, once per vector, after the first loads are issued;
// - the register budget is chosen for kMinBlocks resident blocks per SM (__launch_bounds__).
// Reductions are deterministic: warp shuffles in a fixed tree, warps summed in order, per-block
// partials summed by column_sums.cuh in a fixed order (no floating-point atomics).  The
// per-element and per-sample formulas come from common/dfa_math.h, shared with the CPU kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../common/dfa_math.h"
#include "column_sums.cuh"
#include "finish_kernels.cuh"
#include "map_args.cuh"

namespace dfa {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMapBytes = 64;     // bytes of each map per thread on the vector path, any dtype
constexpr int kMaxWidth = 2 * kMaxK + 1;  // accumulators per block (bridge forward)
constexpr unsigned kFullMask = 0xffffffffu;

// Resident blocks per SM the registers are budgeted for: 3 x 256 threads leave 80 registers a
// thread (bench/test_cuda_resources.py checks the spills).  float64 and the scalar path keep the
// compiler's choice.
template <typename T, int VEC>
constexpr int kMinBlocks = (VEC > 1 && sizeof(T) <= 4) ? 3 : 1;

struct alignas(16) Words16 {
  uint32_t w[4];
};

// dst = *src (or zeros when !valid), asynchronously where the hardware can (cp.async, sm_80 and
// later: no registers held while the bytes are in flight); elsewhere, and in the CPU emulation, a
// plain copy.  The copy becomes visible to this thread after wait_copies().
template <typename Packed, typename T>
__device__ __forceinline__ void copy_async(Packed& dst, const T* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (sizeof(Packed) == 16) {
    const unsigned to = static_cast<unsigned>(__cvta_generic_to_shared(&dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(to), "l"(src), "r"(valid ? 16 : 0) : "memory");
    return;
  }
#endif
  dst = valid ? *reinterpret_cast<const Packed*>(src) : Packed{};
}

// *dst = v as one 16-byte store: spelled out in PTX because, short of registers, the compiler may
// otherwise split a vector into four 4-byte stores (it did for the first vector of each thread).
template <typename Packed, typename T>
__device__ __forceinline__ void store_vector(T* dst, const Packed& v) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(Packed) == 16) {
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "r"(v.w[0]), "r"(v.w[1]), "r"(v.w[2]),
                 "r"(v.w[3])
                 : "memory");
    return;
  }
#endif
  *reinterpret_cast<Packed*>(dst) = v;
}

// Closes the copies issued since the last call into one group.
__device__ __forceinline__ void commit_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until all groups but the newest one have landed.
__device__ __forceinline__ void wait_copies_but_one() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group 1;\n" ::: "memory");
#endif
}

// This thread's share of the block's chunk: vector it (0 <= it < kIters) of every map starts at
// in-sample index start + it * kStride.
template <typename T, int VEC>
struct Tile {
  using A = acc_type<T>;
  static constexpr int kIters = kMapBytes / int(sizeof(T) * VEC);  // 4 vectors, or 64 B of scalars
  static constexpr int kItems = kIters * VEC;
  static constexpr int kStride = kThreads * VEC;
  static constexpr int64_t kChunk = int64_t(kThreads) * kItems;
  // One map's vectors as loaded: 16-bit values stay two to a 32-bit register until they are used
  // (a Vec of c10::BFloat16 would take a register per value, twice the budget).
  using Packed = std::conditional_t<VEC == 1, Vec<T, 1>, Words16>;
  struct Raw {  // in registers
    Packed v[kIters];
    __device__ Packed operator[](int it) const { return v[it]; }
  };
  using Slot = Packed[kIters][kThreads];  // one map of the block in shared memory, a 16-B column per thread
  struct View {  // this thread's column of a slot, read vector by vector where used (few registers)
    const Slot* slot;
    __device__ Packed operator[](int it) const { return (*slot)[it][threadIdx.x]; }
  };

  int64_t start;   // in-sample index of vector 0
  int64_t offset;  // b * N + start: where vector 0 lies in every map
  int inside;      // vectors of this thread inside the sample (whole vectors: N % VEC == 0)

  __device__ explicit Tile(const MapArgs<T>& args) {
    const uint32_t chunks = static_cast<uint32_t>(args.chunks);  // B * chunks < 2**31 blocks
    const uint32_t b = blockIdx.x / chunks, chunk = blockIdx.x - b * chunks;
    start = int64_t(chunk) * kChunk + int64_t(threadIdx.x) * VEC;
    offset = int64_t(b) * args.N + start;
    const int64_t rest = args.N - start;
    inside = rest <= 0 ? 0 : rest >= int64_t(kIters - 1) * kStride + 1 ? kIters : int((rest + kStride - 1) / kStride);
  }

  __device__ bool valid(int it) const { return it < inside; }

  // Vectors past the sample's end read as 0, which adds nothing to any sum.
  __device__ void load(const T* map, Raw& r) const {
    const T* p = map + offset;
#pragma unroll
    for (int it = 0; it < kIters; ++it)
      r.v[it] = valid(it) ? *reinterpret_cast<const Packed*>(p + it * kStride) : Packed{};
  }

  // Starts copying this thread's vectors of a map into its column of slot (zeros past the sample's end).
  __device__ void fetch(const T* map, Slot& slot) const {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const bool in = valid(it);
      copy_async(slot[it][threadIdx.x], in ? map + offset + it * kStride : map, in);
    }
  }

  // Element e of vector it, in the accumulation type.
  template <class Vectors>
  __device__ static A at(const Vectors& r, int it, int e) {
    return element(r[it], e);
  }
  __device__ static A element(const Packed& v, int e) {
    if constexpr (VEC == 1) {
      return static_cast<A>(v.v[0]);
    } else if constexpr (sizeof(T) == 2) {
      const uint32_t word = v.w[e / 2];
      return static_cast<A>(T(static_cast<uint16_t>(e % 2 ? word >> 16 : word & 0xffffu), T::from_bits()));
    } else {
      T x;
      memcpy(&x, reinterpret_cast<const char*>(v.w) + e * sizeof(T), sizeof(T));
      return static_cast<A>(x);
    }
  }

  // Vector it of a map, rounded to T once and written as one 16-byte store.
  __device__ void store(T* map, int it, const A (&x)[VEC]) const {
    if (!valid(it)) return;
    Packed v{};
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const T y = static_cast<T>(x[e]);
      if constexpr (VEC == 1) {
        v.v[0] = y;
      } else if constexpr (sizeof(T) == 2) {
        v.w[e / 2] |= uint32_t(y.x) << (16 * (e % 2));
      } else {
        memcpy(reinterpret_cast<char*>(v.w) + e * sizeof(T), &y, sizeof(T));
      }
    }
    store_vector(map + offset + it * kStride, v);
  }

  // The values of every vector: f(it, e) -> A.
  template <class F>
  __device__ void store_all(T* map, F&& f) const {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      A x[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) x[e] = f(it, e);
      store(map, it, x);
    }
  }
};

// The margins of this thread's vectors in map j: -inf without margins (sigma is then the identity
// and its derivative 1, NaN included, as in dfa_math.h).
template <typename T, int VEC>
struct Margins {
  using A = acc_type<T>;
  static constexpr int kIters = Tile<T, VEC>::kIters;
  const MapArgs<T>& args;  // the kernel's parameters: the table, C and the layout cost no registers
  uint32_t ch[kIters];     // channel of each vector's first element

  __device__ Margins(const MapArgs<T>& a, const Tile<T, VEC>& tile) : args(a) {
    if (args.margins == nullptr) return;
    if (args.N < (int64_t(1) << 31)) {
      const uint32_t inner = uint32_t(args.inner), channels = uint32_t(args.C), start = uint32_t(tile.start);
#pragma unroll
      for (int it = 0; it < kIters; ++it) ch[it] = (start + uint32_t(it) * Tile<T, VEC>::kStride) / inner % channels;
    } else {
#pragma unroll
      for (int it = 0; it < kIters; ++it)
        ch[it] = uint32_t((tile.start + int64_t(it) * Tile<T, VEC>::kStride) / args.inner % args.C);
    }
  }

  __device__ void of(int j, int it, A (&m)[VEC]) const {
    if (args.margins == nullptr) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) m[e] = A(-INFINITY);
      return;
    }
    const A* row = args.margins + (uint64_t(j) * uint64_t(args.C) + ch[it]);
    if (VEC > 1 && args.inner == 1) {  // channels_last, C % VEC == 0: VEC consecutive, aligned margins
      const Vec<A, VEC> v = *reinterpret_cast<const Vec<A, VEC>*>(row);
#pragma unroll
      for (int e = 0; e < VEC; ++e) m[e] = v.v[e];
    } else {
      const A one = *row;
#pragma unroll
      for (int e = 0; e < VEC; ++e) m[e] = one;
    }
  }
};

// sigma_m(x), with the padding past the sample's end kept at 0 (a margin there would add to sums).
template <typename A>
__device__ __forceinline__ A sigma(A x, A m, bool valid) {
  return valid ? math::margin_relu(x, m) : A(0);
}

// alpha = softmax(beta), computed by each warp for itself (no block barrier): lane l takes beta_l
// and beta_{l+32}, the sums are butterflies (every lane gets the same bits), and the warp's alpha
// waits in shared memory, where a read costs no register between maps.
template <typename A>
struct WarpSoftmax {
  const A* row;  // this warp's alpha_0 .. alpha_{K-1}

  __device__ WarpSoftmax(const A* beta, int K) {
    using std::exp;
    __shared__ A table[kWarps][kMaxK];
    const int lane = threadIdx.x & 31;
    const A b0 = lane < K ? beta[lane] : A(-INFINITY), b1 = lane + 32 < K ? beta[lane + 32] : A(-INFINITY);
    A top = b1 > b0 ? b1 : b0;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const A other = __shfl_xor_sync(kFullMask, top, offset);
      top = other > top ? other : top;
    }
    const A e0 = lane < K ? exp(b0 - top) : A(0), e1 = lane + 32 < K ? exp(b1 - top) : A(0);
    A total = e0 + e1;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) total += __shfl_xor_sync(kFullMask, total, offset);
    A* out = table[threadIdx.x >> 5];
    if (lane < K) out[lane] = e0 / total;
    if (lane + 32 < K) out[lane + 32] = e1 / total;
    __syncwarp();
    row = out;
  }

  __device__ A operator()(int j) const { return row[j]; }
};

// Per-block accumulators: warp sums in a fixed shuffle tree, then warps in order at the end.
template <typename A>
struct BlockSums {
  A (*warp_sums)[kMaxWidth];  // [kWarps][kMaxWidth] in shared memory

  __device__ void add(int slot, A v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(kFullMask, v, offset);
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

// Streams items 0 .. count - 1 (maps, and the student where a kernel needs it) through a two-slot
// ring in shared memory: item i + 1 is being copied while item i is worked on, so every thread
// keeps 64 B of a map in flight without holding registers for it.  A thread reads only its own
// column of the ring, so no block barrier is needed.  start(item 0) is called before the block's
// prologue (alpha, channels), so the first loads are not waiting on it.
template <typename T, int VEC>
struct MapStream {
  using Tl = Tile<T, VEC>;
  typename Tl::Slot* ring;  // [2], __shared__
  const Tl& tile;

  __device__ void start(const T* first) const {
    tile.fetch(first, ring[0]);
    commit_copies();
  }

  // source(i) -> const T* of item i; work(i, const View&).
  template <class Source, class Work>
  __device__ void run(int count, Source&& source, Work&& work) const {
#pragma unroll 1
    for (int i = 0; i < count; ++i) {
      if (i + 1 < count) tile.fetch(source(i + 1), ring[(i + 1) & 1]);
      commit_copies();  // an empty group past the last item keeps the wait below uniform
      wait_copies_but_one();
      work(i, typename Tl::View{&ring[i & 1]});
    }
  }
};

// ---------------------------------------------------------------------------------------------

// Kernel prologues, as macros because __shared__ arrays must be declared in the kernel's scope.
// (The per-map accumulation below stays written out in each kernel: moved into a force-inlined
// helper, it made nvcc spill 52 B in the 16-bit partial_l2 forward; bench/test_cuda_resources.py.)
// DFA_MAP_STREAM(first): the block's tile `tile` and its two-slot map stream `stream`, the first
// map's copy (`first`) already in flight.  DFA_BLOCK_SUMS: the warp-partial accumulators `sums`.
#define DFA_MAP_STREAM(first)                 \
  const Tl tile(args);                        \
  __shared__ typename Tl::Slot ring[2];       \
  const MapStream<T, VEC> stream{ring, tile}; \
  stream.start(first)
#define DFA_BLOCK_SUMS                           \
  __shared__ A warp_sums[kWarps][kMaxWidth]; \
  BlockSums<A> sums{warp_sums}

// out = sum_j alpha_j sigma_j(T_j).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, (kMinBlocks<T, VEC>)) aggregate_forward_kernel(MapArgs<T> args, T* out) {
  using A = acc_type<T>;
  using Tl = Tile<T, VEC>;
  DFA_MAP_STREAM(args.features[0]);
  const WarpSoftmax<A> alpha(args.beta, args.K);
  const Margins<T, VEC> margins(args, tile);
  A agg[Tl::kItems] = {};
  stream.run(
      args.K, [&](int j) { return args.features[j]; },
      [&](int j, const typename Tl::View& r) {
        const A a = alpha(j);
#pragma unroll
        for (int it = 0; it < Tl::kIters; ++it) {
          A m[VEC];
          margins.of(j, it, m);
#pragma unroll
          for (int e = 0; e < VEC; ++e) agg[it * VEC + e] += a * sigma(Tl::at(r, it, e), m[e], tile.valid(it));
        }
      });
  tile.store_all(out, [&](int it, int e) { return agg[it * VEC + e]; });
}

// partials[block][j] = <grad, sigma_j(T_j)> over the chunk; grad_features[j] = alpha_j grad [T_j >= m_j].
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, (kMinBlocks<T, VEC>))
    aggregate_backward_kernel(MapArgs<T> args, const T* grad, MapOutPtrs<T> grad_features, bool write_features,
                              acc_type<T>* partials) {
  using A = acc_type<T>;
  using Tl = Tile<T, VEC>;
  DFA_BLOCK_SUMS;
  DFA_MAP_STREAM(args.features[0]);
  typename Tl::Raw g;  // the upstream gradient, kept as loaded
  tile.load(grad, g);
  const WarpSoftmax<A> alpha(args.beta, args.K);
  const Margins<T, VEC> margins(args, tile);
  stream.run(
      args.K, [&](int j) { return args.features[j]; },
      [&](int j, const typename Tl::View& r) {
        const A a = alpha(j);
        A dot = 0;
#pragma unroll
        for (int it = 0; it < Tl::kIters; ++it) {
          A m[VEC], d[VEC];
          margins.of(j, it, m);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const A x = Tl::at(r, it, e), u = Tl::at(g, it, e);
            dot += u * sigma(x, m[e], tile.valid(it));
            d[e] = a * u * math::margin_relu_pass(x, m[e]);
          }
          if (write_features) tile.store(grad_features.ptr[j], it, d);
        }
        if (partials != nullptr) sums.add(j, dot);
      });
  if (partials != nullptr) sums.write(partials + int64_t(blockIdx.x) * args.K, args.K);
}

// partials[block] = (<s,s>, <s,T_j>..., <A,T_j>...) over the chunk.  Items: s, T_1..K (A and
// <s,T_j>), T_1..K again (<A,T_j>: the second read is served by L2).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, (kMinBlocks<T, VEC>))
    bridge_forward_kernel(MapArgs<T> args, const T* student, acc_type<T>* partials) {
  using A = acc_type<T>;
  using Tl = Tile<T, VEC>;
  DFA_BLOCK_SUMS;
  const int K = args.K;
  DFA_MAP_STREAM(student);
  const WarpSoftmax<A> alpha(args.beta, K);
  A agg[Tl::kItems] = {};
  typename Tl::Raw s{};  // the student, kept as loaded
  stream.run(
      2 * K + 1, [&](int i) { return args.features[i <= K ? i - 1 : i - 1 - K]; },
      [&](int i, const typename Tl::View& r) {
        A dot = 0;
        if (i == 0) {
#pragma unroll
          for (int it = 0; it < Tl::kIters; ++it) {
            s.v[it] = r[it];
#pragma unroll
            for (int e = 0; e < VEC; ++e) dot += Tl::at(r, it, e) * Tl::at(r, it, e);
          }
        } else if (i <= K) {
          const A a = alpha(i - 1);
#pragma unroll
          for (int it = 0; it < Tl::kIters; ++it) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              const A x = Tl::at(r, it, e);
              agg[it * VEC + e] += a * x;
              dot += Tl::at(s, it, e) * x;
            }
          }
        } else {
#pragma unroll
          for (int it = 0; it < Tl::kIters; ++it)
#pragma unroll
            for (int e = 0; e < VEC; ++e) dot += agg[it * VEC + e] * Tl::at(r, it, e);
        }
        sums.add(i, dot);
      });
  sums.write(partials + int64_t(blockIdx.x) * (2 * K + 1), 2 * K + 1);
}

// terms[b] = (cs, ca, ea, es) scaled by the upstream gradient: ds = cs s + ca A, dA = ea A + es s.
// Items: T_1..K (A), then s.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, (kMinBlocks<T, VEC>))
    bridge_backward_kernel(MapArgs<T> args, const T* student, const acc_type<T>* terms, T* grad_student,
                           MapOutPtrs<T> grad_features, bool write_features) {
  using A = acc_type<T>;
  using Tl = Tile<T, VEC>;
  const int K = args.K;
  DFA_MAP_STREAM(args.features[0]);
  const WarpSoftmax<A> alpha(args.beta, K);
  const int64_t b = blockIdx.x / static_cast<uint32_t>(args.chunks);
  const A cs = terms[4 * b], ca = terms[4 * b + 1], ea = terms[4 * b + 2], es = terms[4 * b + 3];
  A agg[Tl::kItems] = {};  // A, then dA = ea A + es s
  stream.run(
      K + 1, [&](int i) { return i < K ? args.features[i] : student; },
      [&](int i, const typename Tl::View& r) {
        if (i < K) {
          const A a = alpha(i);
#pragma unroll
          for (int it = 0; it < Tl::kIters; ++it)
#pragma unroll
            for (int e = 0; e < VEC; ++e) agg[it * VEC + e] += a * Tl::at(r, it, e);
          return;
        }
#pragma unroll
        for (int it = 0; it < Tl::kIters; ++it) {  // vector by vector: s is never unpacked whole
          A ds[VEC];
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            A& x = agg[it * VEC + e];
            const A st = Tl::at(r, it, e);
            ds[e] = cs * st + ca * x;
            x = ea * x + es * st;
          }
          if (grad_student != nullptr) tile.store(grad_student, it, ds);
        }
      });
  if (!write_features) return;
#pragma unroll 1
  for (int j = 0; j < K; ++j) {
    const A a = alpha(j);
    tile.store_all(grad_features.ptr[j], [&](int it, int e) { return a * agg[it * VEC + e]; });
  }
}

// partials[block] = sum (s - t)^2 mask(s, t) over the chunk, t = sum_j alpha_j sigma_j(T_j).
// Items: T_1..K (t), then s.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, (kMinBlocks<T, VEC>))
    partial_l2_forward_kernel(MapArgs<T> args, const T* student, acc_type<T>* partials) {
  using A = acc_type<T>;
  using Tl = Tile<T, VEC>;
  DFA_BLOCK_SUMS;
  const int K = args.K;
  DFA_MAP_STREAM(args.features[0]);
  const WarpSoftmax<A> alpha(args.beta, K);
  const Margins<T, VEC> margins(args, tile);
  A t[Tl::kItems] = {};
  A total = 0;
  stream.run(
      K + 1, [&](int i) { return i < K ? args.features[i] : student; },
      [&](int i, const typename Tl::View& r) {
        if (i < K) {
          const A a = alpha(i);
#pragma unroll
          for (int it = 0; it < Tl::kIters; ++it) {
            A m[VEC];
            margins.of(i, it, m);
#pragma unroll
            for (int e = 0; e < VEC; ++e) t[it * VEC + e] += a * sigma(Tl::at(r, it, e), m[e], tile.valid(it));
          }
          return;
        }
#pragma unroll
        for (int it = 0; it < Tl::kIters; ++it)
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const A s = Tl::at(r, it, e), d = s - t[it * VEC + e];
            total += d * d * math::partial_l2_mask(s, t[it * VEC + e]);
          }
      });
  sums.add(0, total);
  sums.write(partials + blockIdx.x, 1);
}

// e = 2 (s - t) mask; grad_student = g_b e; partials[block][j] = <e, sigma_j(T_j)>;
// grad_features[j] = -g_b alpha_j e [T_j >= m_j].  Items: T_1..K (t), s (e), T_1..K again (gradients).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, (kMinBlocks<T, VEC>))
    partial_l2_backward_kernel(MapArgs<T> args, const T* student, const acc_type<T>* grad, T* grad_student,
                               MapOutPtrs<T> grad_features, bool write_features, acc_type<T>* partials) {
  using A = acc_type<T>;
  using Tl = Tile<T, VEC>;
  DFA_BLOCK_SUMS;
  const int K = args.K;
  DFA_MAP_STREAM(args.features[0]);
  const WarpSoftmax<A> alpha(args.beta, K);
  const Margins<T, VEC> margins(args, tile);
  const A gb = grad[blockIdx.x / static_cast<uint32_t>(args.chunks)];
  const bool map_grads = partials != nullptr || write_features;
  A e[Tl::kItems] = {};  // t, then e
  stream.run(
      map_grads ? 2 * K + 1 : K + 1, [&](int i) { return i < K ? args.features[i] : i == K ? student : args.features[i - K - 1]; },
      [&](int i, const typename Tl::View& r) {
        if (i < K) {
          const A a = alpha(i);
#pragma unroll
          for (int it = 0; it < Tl::kIters; ++it) {
            A m[VEC];
            margins.of(i, it, m);
#pragma unroll
            for (int v = 0; v < VEC; ++v) e[it * VEC + v] += a * sigma(Tl::at(r, it, v), m[v], tile.valid(it));
          }
          return;
        }
        if (i == K) {
#pragma unroll
          for (int it = 0; it < Tl::kIters; ++it) {  // vector by vector: s is never unpacked whole
            A ds[VEC];
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
              A& x = e[it * VEC + v];
              const A s = Tl::at(r, it, v);
              x = A(2) * (s - x) * math::partial_l2_mask(s, x);
              ds[v] = gb * x;
            }
            if (grad_student != nullptr) tile.store(grad_student, it, ds);
          }
          return;
        }
        const int j = i - K - 1;
        const A scale = -gb * alpha(j);
        A dot = 0;
#pragma unroll
        for (int it = 0; it < Tl::kIters; ++it) {
          A m[VEC], d[VEC];
          margins.of(j, it, m);
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            const A x = Tl::at(r, it, v);
            dot += e[it * VEC + v] * sigma(x, m[v], tile.valid(it));
            d[v] = scale * e[it * VEC + v] * math::margin_relu_pass(x, m[v]);
          }
          if (write_features) tile.store(grad_features.ptr[j], it, d);
        }
        if (partials != nullptr) sums.add(j, dot);
      });
  if (partials != nullptr) sums.write(partials + int64_t(blockIdx.x) * K, K);
}

// ---------------------------------------------------------------------------------------------

// The launch rules and kernels of this set, as backend.cuh's CudaBackend takes them.
struct Kernels {
  static constexpr const char* kName = "new";
  static constexpr int kBlockThreads = kThreads;

  // 16-byte vectors where every pointer is aligned, a sample holds whole vectors and the margins
  // of a vector are one value (inner % VEC == 0) or VEC consecutive ones (inner == 1, C % VEC == 0).
  template <typename T>
  static int vec_width(const MapArgs<T>& args, bool aligned) {
    constexpr int V = kVecWidth<T>;
    if (!aligned || args.N % V != 0) return 1;
    const bool margins_fit = args.margins == nullptr || args.inner % V == 0 || (args.inner == 1 && args.C % V == 0);
    return margins_fit ? V : 1;
  }
  template <typename T>
  static int64_t chunk(int vec) {
    return vec == 1 ? Tile<T, 1>::kChunk : Tile<T, kVecWidth<T>>::kChunk;
  }

  template <typename T, int VEC> static auto aggregate_forward() { return aggregate_forward_kernel<T, VEC>; }
  template <typename T, int VEC> static auto aggregate_backward() { return aggregate_backward_kernel<T, VEC>; }
  template <typename T, int VEC> static auto bridge_forward() { return bridge_forward_kernel<T, VEC>; }
  template <typename T, int VEC> static auto bridge_backward() { return bridge_backward_kernel<T, VEC>; }
  template <typename T, int VEC> static auto partial_l2_forward() { return partial_l2_forward_kernel<T, VEC>; }
  template <typename T, int VEC> static auto partial_l2_backward() { return partial_l2_backward_kernel<T, VEC>; }

  static int64_t column_sums_scratch(int64_t segments, int64_t rows, int width) {
    return cuda::column_sums_scratch(segments, rows, width);
  }
  template <typename A>
  static void column_sums(cudaStream_t stream, const A* x, int64_t segments, int64_t rows, int width,
                          const A* row_weight, int64_t weight_period, double sign, double* out, double* scratch) {
    cuda::column_sums(stream, x, segments, rows, width, row_weight, weight_period, sign, out, scratch);
  }
};

#undef DFA_MAP_STREAM
#undef DFA_BLOCK_SUMS

}  // namespace cuda
}  // namespace dfa

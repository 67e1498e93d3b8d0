// The torch-free description of one CPU kernel call and the kernel entry points, compiled once per
// instruction set (map_kernels_*.cpp) and picked at run time (kernel_table.cpp).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>

namespace dfa {
namespace cpu {

// Work is split into fixed-size chunks of one sample, and every reduction first sums within a
// chunk and then over chunks in index order: the result is the same for any number of threads.
constexpr int64_t kChunk = 16384;
// Elements staged at a time in small float buffers that stay in L1.
constexpr int64_t kBlock = 512;

// Accumulation type: float for 16- and 32-bit maps, double for double maps.  Partial sums over
// chunks are always kept in double.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t>
struct MapJob {
  using acc_t = acc_type<scalar_t>;
  int64_t B = 0, N = 0;         // samples, elements per sample
  int64_t C = 1, inner = 1;     // element n of a sample has channel (n / inner) % C
  int K = 0;                    // feature maps
  const scalar_t* const* features = nullptr;  // K pointers to [B, N] maps
  const acc_t* alpha = nullptr;               // K weights, softmax(beta)
  const acc_t* margins = nullptr;             // [K, C] margins, or nullptr for the identity

  int64_t chunks_per_sample() const { return (N + kChunk - 1) / kChunk; }
  int64_t items() const { return B * chunks_per_sample(); }
};

// Every kernel processes work items [begin, end) (item = one chunk of one sample); `partials`
// (when given) holds `width` doubles per item that the caller reduces in order.
template <typename scalar_t>
struct KernelTable {
  using acc_t = acc_type<scalar_t>;
  // out = sum_j alpha_j sigma_j(T_j)
  void (*aggregate_forward)(const MapJob<scalar_t>&, scalar_t* out, int64_t begin, int64_t end);
  // partials[K] += <grad, sigma_j(T_j)>;  grad_features[j] = alpha_j grad [T_j >= m_j]
  void (*aggregate_backward)(const MapJob<scalar_t>&, const scalar_t* grad, scalar_t* const* grad_features,
                             double* partials, int64_t begin, int64_t end);
  // partials[2K+1] += (<s,s>, <s,T_j>..., <A,T_j>...)
  void (*bridge_forward)(const MapJob<scalar_t>&, const scalar_t* student, double* partials, int64_t begin,
                         int64_t end);
  // terms[b] = (cs, ca, ea, es) already scaled by the upstream gradient of sample b
  void (*bridge_backward)(const MapJob<scalar_t>&, const scalar_t* student, const acc_t* terms,
                          scalar_t* grad_student, scalar_t* const* grad_features, int64_t begin, int64_t end);
  // partials[1] += sum (s - t)^2 mask(s, t)
  void (*partial_l2_forward)(const MapJob<scalar_t>&, const scalar_t* student, double* partials, int64_t begin,
                             int64_t end);
  // partials[K] += <e, sigma_j(T_j)> with e = 2 (s - t) mask;  grad_student = g_b e;
  // grad_features[j] = -g_b alpha_j e [T_j >= m_j]
  void (*partial_l2_backward)(const MapJob<scalar_t>&, const scalar_t* student, const acc_t* grad,
                              scalar_t* grad_student, scalar_t* const* grad_features, double* partials,
                              int64_t begin, int64_t end);
};

// The table for the best instruction set this CPU supports.
template <typename scalar_t>
const KernelTable<scalar_t>& kernels();

// Per-ISA tables (defined in map_kernels_*.cpp).
namespace isa_default {
template <typename scalar_t>
KernelTable<scalar_t> make_table();
}
namespace isa_avx2 {
template <typename scalar_t>
KernelTable<scalar_t> make_table();
bool supported();
}

}  // namespace cpu
}  // namespace dfa

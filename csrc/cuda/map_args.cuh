// What every CUDA map kernel receives, whichever kernel set runs it (map_kernels.cuh, the default,
// or old/map_kernels_v1.cuh, built for A/B runs): the K map pointers by value, beta, margins and
// the layout of one sample.  One definition, so that backend.cuh fills it once for both sets.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace dfa {
namespace cuda {

constexpr int kMaxK = 64;  // feature maps per call (pointers passed by value)

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// 16 bytes of T: the vector width of the aligned kernels.
template <typename T>
constexpr int kVecWidth = 16 / sizeof(T);

template <typename T>
struct MapArgs {
  using A = acc_type<T>;
  const T* features[kMaxK];
  const A* beta;     // [K], accumulation type; alpha = softmax(beta) is computed per block
  const A* margins;  // [K, C] or nullptr
  int64_t N;         // elements per sample
  int64_t chunks;    // chunks per sample
  int64_t C, inner;  // element n of a sample has channel (n / inner) % C
  int K;
};

template <typename T>
struct MapOutPtrs {
  T* ptr[kMaxK];
};

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

}  // namespace cuda
}  // namespace dfa

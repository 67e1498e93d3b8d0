// Block-wise CPU kernels of the DFA ops.  Included once per instruction set by map_kernels_*.cpp
// with DFA_CPU_ISA naming the namespace, so the same loops are compiled (and auto-vectorised) for
// each target.  Everything here works on raw pointers: it runs inside at::parallel_for workers.
//
// Within a block of kBlock elements the maps are converted to the accumulation type and reduced
// with SIMD lanes (omp simd); each block's sum is then added to a double per-chunk partial.

#include "../common/dfa_math.h"
#include "map_job.h"

namespace dfa {
namespace cpu {
namespace DFA_CPU_ISA {
namespace {

template <typename T, typename A>
inline void load(const T* __restrict x, A* __restrict out, int64_t L) {
  for (int64_t i = 0; i < L; ++i) out[i] = static_cast<A>(x[i]);
}

// The block as accumulation-type values: the map itself when it already has that type (no copy),
// else a converted copy in `tmp`.
template <typename T, typename A>
inline const A* view(const T* x, A* tmp, int64_t L) {
  if constexpr (std::is_same_v<T, A>) {
    return x;
  } else {
    load(x, tmp, L);
    return tmp;
  }
}

// Splits the block of flat offsets [g0, g0 + L) into runs over which the channel is constant
// (NCHW-like layouts: fn(..., std::false_type)) or rises by one per element (channels innermost:
// fn(..., std::true_type)), so margin lookups inside a run vectorise.
template <typename Fn>
inline void for_each_channel_run(int64_t g0, int64_t L, int64_t C, int64_t inner, Fn&& fn) {
  if (inner == 1) {
    int64_t c = g0 % C;
    for (int64_t i = 0; i < L;) {
      const int64_t len = std::min(L - i, C - c);
      fn(i, len, c, std::true_type{});
      i += len;
      c = 0;
    }
  } else {
    int64_t c = (g0 / inner) % C, r = g0 % inner;
    for (int64_t i = 0; i < L;) {
      const int64_t len = std::min(L - i, inner - r);
      fn(i, len, c, std::false_type{});
      i += len;
      r = 0;
      c = c + 1 == C ? 0 : c + 1;
    }
  }
}

// sigma_m(x) for one feature map's block: the map itself when m is null and no conversion is
// needed, else computed into `tmp`.
template <typename T, typename A>
inline const A* view_sigma(const MapJob<T>& job, const T* __restrict x, A* __restrict tmp, int64_t g0, int64_t L,
                           const A* m) {
  if (m == nullptr) return view(x, tmp, L);
  for_each_channel_run(g0, L, job.C, job.inner, [&](int64_t i0, int64_t len, int64_t c, auto per_element) {
    const T* __restrict xs = x + i0;
    A* __restrict o = tmp + i0;
    if constexpr (decltype(per_element)::value) {
      const A* __restrict mr = m + c;
      for (int64_t t = 0; t < len; ++t) o[t] = math::margin_relu(static_cast<A>(xs[t]), mr[t]);
    } else {
      const A mv = m[c];
      for (int64_t t = 0; t < len; ++t) o[t] = math::margin_relu(static_cast<A>(xs[t]), mv);
    }
  });
  return tmp;
}

// dL/dT_j for one block: out = scale * g * [x >= m] (no mask when m is null).
template <typename T, typename A>
inline void store_feature_grad(const MapJob<T>& job, const T* __restrict x, const A* __restrict g, A scale,
                               T* __restrict out, int64_t g0, int64_t L, const A* m) {
  if (m == nullptr) {
    for (int64_t i = 0; i < L; ++i) out[i] = static_cast<T>(scale * g[i]);
    return;
  }
  for_each_channel_run(g0, L, job.C, job.inner, [&](int64_t i0, int64_t len, int64_t c, auto per_element) {
    const T* __restrict xs = x + i0;
    const A* __restrict gs = g + i0;
    T* __restrict o = out + i0;
    if constexpr (decltype(per_element)::value) {
      const A* __restrict mr = m + c;
      for (int64_t t = 0; t < len; ++t)
        o[t] = static_cast<T>(scale * gs[t] * math::margin_relu_pass(static_cast<A>(xs[t]), mr[t]));
    } else {
      const A mv = m[c];
      for (int64_t t = 0; t < len; ++t)
        o[t] = static_cast<T>(scale * gs[t] * math::margin_relu_pass(static_cast<A>(xs[t]), mv));
    }
  });
}

template <typename A>
inline A dot(const A* __restrict a, const A* __restrict b, int64_t L) {
  A sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < L; ++i) sum += a[i] * b[i];
  return sum;
}

template <typename T>
inline const acc_type<T>* margin_row(const MapJob<T>& job, int j) {
  return job.margins == nullptr ? nullptr : job.margins + j * job.C;
}

// out = sum_j alpha_j sigma_j(T_j) for one block; tmp is scratch.
template <typename T, typename A>
inline void aggregate_block(const MapJob<T>& job, int64_t off, int64_t L, A* __restrict out, A* __restrict tmp) {
  for (int j = 0; j < job.K; ++j) {
    const A* __restrict x = view_sigma(job, job.features[j] + off, tmp, off, L, margin_row(job, j));
    const A a = job.alpha[j];
    if (j == 0) {
      for (int64_t i = 0; i < L; ++i) out[i] = a * x[i];
    } else {
      for (int64_t i = 0; i < L; ++i) out[i] += a * x[i];
    }
  }
}

// The gradient of every map from an upstream gradient u of the aggregation, for one block:
// grad_features[j] = scale * alpha_j * u * [T_j >= m_j] (when given) and, when partials is given,
// partials[j] += <u, sigma_j(T_j)> (the beta gradient's dot products).
template <typename T, typename A>
inline void map_grads_block(const MapJob<T>& job, int64_t off, int64_t L, const A* __restrict u, A scale,
                            T* const* grad_features, double* partials, A* __restrict tmp) {
  for (int j = 0; j < job.K; ++j) {
    if (partials != nullptr) {
      const A* x = view_sigma(job, job.features[j] + off, tmp, off, L, margin_row(job, j));
      partials[j] += dot(u, x, L);
    }
    if (grad_features != nullptr)
      store_feature_grad(job, job.features[j] + off, u, scale * job.alpha[j], grad_features[j] + off, off, L,
                         margin_row(job, j));
  }
}

// Calls fn(item, sample, flat offset, length) for every block of work items [begin, end).
template <typename T, typename Fn>
inline void for_each_block(const MapJob<T>& job, int64_t begin, int64_t end, Fn&& fn) {
  const int64_t per_sample = job.chunks_per_sample();
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / per_sample;
    const int64_t n_begin = (item % per_sample) * kChunk;
    const int64_t n_end = std::min(job.N, n_begin + kChunk);
    for (int64_t n = n_begin; n < n_end; n += kBlock) fn(item, b, b * job.N + n, std::min(kBlock, n_end - n));
  }
}

template <typename T>
void aggregate_forward(const MapJob<T>& job, T* out, int64_t begin, int64_t end) {
  using A = acc_type<T>;
  A agg[kBlock], tmp[kBlock];
  for_each_block(job, begin, end, [&](int64_t, int64_t, int64_t off, int64_t L) {
    if constexpr (std::is_same_v<T, A>) {
      aggregate_block(job, off, L, out + off, tmp);  // accumulate in place: no staging copy
    } else {
      aggregate_block(job, off, L, agg, tmp);
      T* __restrict o = out + off;
      for (int64_t i = 0; i < L; ++i) o[i] = static_cast<T>(agg[i]);
    }
  });
}

template <typename T>
void aggregate_backward(const MapJob<T>& job, const T* grad, T* const* grad_features, double* partials,
                        int64_t begin, int64_t end) {
  using A = acc_type<T>;
  A gbuf[kBlock], tmp[kBlock];
  for_each_block(job, begin, end, [&](int64_t item, int64_t, int64_t off, int64_t L) {
    const A* g = view(grad + off, gbuf, L);
    map_grads_block(job, off, L, g, A(1), grad_features, partials == nullptr ? nullptr : partials + item * job.K, tmp);
  });
}

template <typename T>
void bridge_forward(const MapJob<T>& job, const T* student, double* partials, int64_t begin, int64_t end) {
  using A = acc_type<T>;
  A sbuf[kBlock], agg[kBlock], tmp[kBlock];
  const int K = job.K;
  for_each_block(job, begin, end, [&](int64_t item, int64_t, int64_t off, int64_t L) {
    double* acc = partials + item * (2 * K + 1);
    const A* __restrict s = view(student + off, sbuf, L);
    acc[0] += dot(s, s, L);
    // First pass: A and <s, T_j> together; second pass (maps now cache-hot): <A, T_j>.
    for (int j = 0; j < K; ++j) {
      const A* __restrict x = view(job.features[j] + off, tmp, L);
      const A a = job.alpha[j];
      A st = 0;
      if (j == 0) {
#pragma omp simd reduction(+ : st)
        for (int64_t i = 0; i < L; ++i) {
          agg[i] = a * x[i];
          st += s[i] * x[i];
        }
      } else {
#pragma omp simd reduction(+ : st)
        for (int64_t i = 0; i < L; ++i) {
          agg[i] += a * x[i];
          st += s[i] * x[i];
        }
      }
      acc[1 + j] += st;
    }
    for (int j = 0; j < K; ++j) {
      const A* __restrict x = view(job.features[j] + off, tmp, L);
      acc[1 + K + j] += dot(agg, x, L);
    }
  });
}

template <typename T>
void bridge_backward(const MapJob<T>& job, const T* student, const acc_type<T>* terms, T* grad_student,
                     T* const* grad_features, int64_t begin, int64_t end) {
  using A = acc_type<T>;
  A sbuf[kBlock], agg[kBlock], tmp[kBlock];
  for_each_block(job, begin, end, [&](int64_t, int64_t b, int64_t off, int64_t L) {
    const A cs = terms[4 * b], ca = terms[4 * b + 1], ea = terms[4 * b + 2], es = terms[4 * b + 3];
    const A* __restrict s = view(student + off, sbuf, L);
    aggregate_block(job, off, L, agg, tmp);
    if (grad_student != nullptr) {
      T* __restrict o = grad_student + off;
      for (int64_t i = 0; i < L; ++i) o[i] = static_cast<T>(cs * s[i] + ca * agg[i]);
    }
    if (grad_features != nullptr) {
      for (int64_t i = 0; i < L; ++i) tmp[i] = ea * agg[i] + es * s[i];  // dL/dA
      for (int j = 0; j < job.K; ++j) {
        T* __restrict o = grad_features[j] + off;
        const A a = job.alpha[j];
        for (int64_t i = 0; i < L; ++i) o[i] = static_cast<T>(a * tmp[i]);
      }
    }
  });
}

template <typename T>
void partial_l2_forward(const MapJob<T>& job, const T* student, double* partials, int64_t begin, int64_t end) {
  using A = acc_type<T>;
  A sbuf[kBlock], t[kBlock], tmp[kBlock];
  for_each_block(job, begin, end, [&](int64_t item, int64_t, int64_t off, int64_t L) {
    const A* __restrict s = view(student + off, sbuf, L);
    aggregate_block(job, off, L, t, tmp);
    A sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < L; ++i) {
      const A d = s[i] - t[i];
      sum += d * d * math::partial_l2_mask(s[i], t[i]);
    }
    partials[item] += sum;
  });
}

template <typename T>
void partial_l2_backward(const MapJob<T>& job, const T* student, const acc_type<T>* grad, T* grad_student,
                         T* const* grad_features, double* partials, int64_t begin, int64_t end) {
  using A = acc_type<T>;
  A sbuf[kBlock], e[kBlock], tmp[kBlock];
  for_each_block(job, begin, end, [&](int64_t item, int64_t b, int64_t off, int64_t L) {
    const A gb = grad[b];
    const A* __restrict s = view(student + off, sbuf, L);
    aggregate_block(job, off, L, e, tmp);
    for (int64_t i = 0; i < L; ++i) e[i] = A(2) * (s[i] - e[i]) * math::partial_l2_mask(s[i], e[i]);
    if (grad_student != nullptr) {
      T* __restrict o = grad_student + off;
      for (int64_t i = 0; i < L; ++i) o[i] = static_cast<T>(gb * e[i]);
    }
    map_grads_block(job, off, L, e, -gb, grad_features, partials == nullptr ? nullptr : partials + item * job.K, tmp);
  });
}

}  // namespace

template <typename scalar_t>
KernelTable<scalar_t> make_table() {
  return {&aggregate_forward<scalar_t>,  &aggregate_backward<scalar_t>, &bridge_forward<scalar_t>,
          &bridge_backward<scalar_t>,    &partial_l2_forward<scalar_t>, &partial_l2_backward<scalar_t>};
}

template KernelTable<float> make_table<float>();
template KernelTable<double> make_table<double>();
template KernelTable<c10::Half> make_table<c10::Half>();
template KernelTable<c10::BFloat16> make_table<c10::BFloat16>();

}  // namespace DFA_CPU_ISA
}  // namespace cpu
}  // namespace dfa

// Block-wise CPU kernels of the DFA ops.  Included once per instruction set by map_kernels_*.cpp
// with DFA_CPU_ISA naming the namespace, so the same loops are compiled (and auto-vectorised) for
// each target.  Everything here works on raw pointers: it runs inside at::parallel_for workers.
//
// Within a block of kBlock elements the maps are converted to the accumulation type and reduced
// on explicit SIMD packs; each block's sum is then added to a double per-chunk partial.

#include "../common/dfa_math.h"
#include "map_job.h"

namespace dfa {
namespace cpu {
namespace DFA_CPU_ISA {
namespace {

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

// Reductions run on explicit SIMD packs (GCC vector extensions: one AVX register, or two SSE
// ones in the baseline build) with kChains independent accumulators, so several FMA chains are in
// flight instead of one latency-bound chain.  The combination order is fixed, so results never
// depend on the thread count; no -ffast-math is needed.
template <typename A>
struct Pack {
  typedef A type __attribute__((vector_size(32)));
  static constexpr int kWidth = 32 / sizeof(A);
};
template <typename A>
using pack_t = typename Pack<A>::type;
constexpr int kChains = 4;

template <typename A>
inline pack_t<A> loadu(const A* p) {
  pack_t<A> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

// 16- and 32-bit integer vectors with as many lanes as a float pack, for the bit-level bfloat16
// conversions.
typedef uint16_t half_lanes_t __attribute__((vector_size(Pack<float>::kWidth * 2)));
typedef uint32_t word_lanes_t __attribute__((vector_size(Pack<float>::kWidth * 4)));

template <typename To, typename From>
inline To bit_cast_pack(const From& v) {
  static_assert(sizeof(To) == sizeof(From));
  To out;
  __builtin_memcpy(&out, &v, sizeof(out));
  return out;
}

// A pack of W map values converted to the accumulation type A.  bfloat16 is the top half of a
// float, so widening it is a shift done on whole integer vectors (the scalar c10 conversion does
// not vectorise); other 16-bit types convert one lane at a time.
template <typename A, typename T>
inline pack_t<A> load_as(const T* p) {
  if constexpr (std::is_same_v<T, A>) {
    return loadu(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<A, float>) {
#if DFA_CPU_AVX2  // one vpmovzxwd from memory; GCC splits __builtin_convertvector into halves
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return bit_cast_pack<pack_t<A>>(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#else
    half_lanes_t h;
    __builtin_memcpy(&h, p, sizeof(h));
    return bit_cast_pack<pack_t<A>>(__builtin_convertvector(h, word_lanes_t) << 16);
#endif
  } else {
    pack_t<A> v;
    for (int k = 0; k < Pack<A>::kWidth; ++k) v[k] = static_cast<A>(p[k]);
    return v;
  }
}

// Stores a pack of A as W map values: c10's float -> bfloat16 rounding (to nearest even, NaN as
// 0x7FC0) on whole integer vectors, bit for bit the scalar conversion; others lane by lane.
template <typename T, typename P>
inline void store_as(T* p, const P& v) {
  using A = std::remove_cv_t<std::remove_reference_t<decltype(v[0])>>;
  if constexpr (std::is_same_v<T, A>) {
    __builtin_memcpy(p, &v, sizeof(v));
  } else if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<A, float>) {
    const word_lanes_t u = bit_cast_pack<word_lanes_t>(v);
    const word_lanes_t rounded = (u + ((u >> 16) & 1) + 0x7FFFu) >> 16;
    const word_lanes_t nan = bit_cast_pack<word_lanes_t>(v != v);  // all ones in NaN lanes
    const word_lanes_t bits = (rounded & ~nan) | ((word_lanes_t{} + 0x7FC0u) & nan);
#if DFA_CPU_AVX2  // pack the 32-bit lanes to 16 bits (in-lane), then gather the two halves
    const __m256i w = bit_cast_pack<__m256i>(bits);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(w, w), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
#else
    const half_lanes_t h = __builtin_convertvector(bits, half_lanes_t);
    __builtin_memcpy(p, &h, sizeof(h));
#endif
  } else {
    for (int k = 0; k < Pack<A>::kWidth; ++k) p[k] = static_cast<T>(v[k]);
  }
}

template <typename A, typename P>
inline void storeu(A* p, const P& v) {
  static_assert(sizeof(P) == sizeof(pack_t<A>));
  __builtin_memcpy(p, &v, sizeof(v));
}

// Calls pack_fn(i) for every whole pack of W elements from begin, then scalar_fn(i) for the tail.
template <typename A, typename PackFn, typename ScalarFn>
inline void elementwise(int64_t begin, int64_t end, PackFn&& pack_fn, ScalarFn&& scalar_fn) {
  constexpr int W = Pack<A>::kWidth;
  int64_t i = begin;
  for (; i + W <= end; i += W) pack_fn(i);
  for (; i < end; ++i) scalar_fn(i);
}

// The block as accumulation-type values: the map itself when it already has that type (no copy),
// else a converted copy in `tmp`.
template <typename T, typename A>
inline const A* view(const T* __restrict x, A* __restrict tmp, int64_t L) {
  if constexpr (std::is_same_v<T, A>) {
    return x;
  } else {
    elementwise<A>(
        0, L, [&](int64_t i) { storeu(tmp + i, load_as<A>(x + i)); }, [&](int64_t i) { tmp[i] = static_cast<A>(x[i]); });
    return tmp;
  }
}

// out[i] = T(value(i)) for i in [0, L): pack(i) gives W values from i, value(i) one.
template <typename T, typename A, typename PackFn, typename ValueFn>
inline void write(T* __restrict out, int64_t L, PackFn&& pack, ValueFn&& value) {
  elementwise<A>(
      0, L, [&](int64_t i) { store_as(out + i, pack(i)); }, [&](int64_t i) { out[i] = static_cast<T>(value(i)); });
}

// math::partial_l2_mask, packed.
template <typename P>
inline P partial_l2_mask_pack(const P& s, const P& t) {
  return ((s > t) | (t > P{})) ? P{} + 1 : P{};
}

template <typename A>
inline A pack_total(const pack_t<A> (&acc)[kChains], A tail) {
  const pack_t<A> v = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  A total = tail;
  for (int k = 0; k < Pack<A>::kWidth; ++k) total += v[k];
  return total;
}

// Sum over i in [begin, end) of a term given as pack_term(i) (the pack of W terms from i) and
// scalar_term(i) (one term, for the tail).
template <typename A, typename PackTerm, typename ScalarTerm>
inline A reduce(int64_t begin, int64_t end, PackTerm&& pack_term, ScalarTerm&& scalar_term) {
  constexpr int W = Pack<A>::kWidth;
  pack_t<A> acc[kChains] = {};
  int64_t i = begin;
  for (; i + kChains * W <= end; i += kChains * W)
    for (int c = 0; c < kChains; ++c) acc[c] += pack_term(i + c * W);
  A tail = 0;
  for (; i < end; ++i) tail += scalar_term(i);
  return pack_total(acc, tail);
}

template <typename A>
inline A dot(const A* __restrict a, const A* __restrict b, int64_t L) {
  return reduce<A>(
      0, L, [&](int64_t i) { return loadu(a + i) * loadu(b + i); }, [&](int64_t i) { return a[i] * b[i]; });
}

// One run of a block of map T_j (indices [i0, i0 + len) of the block) over which the margin is
// one value (kPerElement = false: NCHW-like layouts) or rises with the element (channels
// innermost), so sigma_j can be fused into the loop that consumes it: value(i) / pack(i) give
// sigma_j(T_j) at block index i (pack: W values from i), pass(i) its derivative [T_j >= m].
template <typename T, bool kHasMargin, bool kPerElement>
struct SigmaRun {
  using A = acc_type<T>;
  const T* __restrict x;  // the block of the map
  const A* __restrict m;  // margins of the run's first element's channel onwards (kPerElement)
  A mv;                   // the run's margin (!kPerElement)
  int64_t i0, len;

  A margin(int64_t i) const { return kPerElement ? m[i - i0] : mv; }
  A value(int64_t i) const {
    const A v = static_cast<A>(x[i]);
    if constexpr (kHasMargin) return math::margin_relu(v, margin(i));
    return v;
  }
  A pass(int64_t i) const {
    if constexpr (kHasMargin) return math::margin_relu_pass(static_cast<A>(x[i]), margin(i));
    return A(1);
  }
  pack_t<A> margin_pack(int64_t i) const { return kPerElement ? loadu(m + (i - i0)) : pack_t<A>{} + mv; }
  pack_t<A> pack(int64_t i) const {
    const pack_t<A> v = load_as<A>(x + i);
    if constexpr (kHasMargin) {
      const pack_t<A> mp = margin_pack(i);
      return v < mp ? mp : v;  // math::margin_relu, packed
    }
    return v;
  }
  pack_t<A> pass_pack(int64_t i) const {  // math::margin_relu_pass, packed
    if constexpr (kHasMargin) return load_as<A>(x + i) < margin_pack(i) ? pack_t<A>{} : pack_t<A>{} + 1;
    return pack_t<A>{} + 1;
  }
};

// Calls body(run) for the runs of map j's block at flat offset off, length L (one run covering
// the block when there are no margins).
template <typename T, typename Body>
inline void for_each_sigma_run(const MapJob<T>& job, int j, int64_t off, int64_t L, Body&& body) {
  using A = acc_type<T>;
  const T* x = job.features[j] + off;
  if (job.margins == nullptr) return body(SigmaRun<T, false, false>{x, nullptr, A(0), 0, L});
  const A* m = job.margins + j * job.C;
  for_each_channel_run(off, L, job.C, job.inner, [&](int64_t i0, int64_t len, int64_t c, auto per_element) {
    if constexpr (decltype(per_element)::value) {
      body(SigmaRun<T, true, true>{x, m + c, A(0), i0, len});
    } else {
      body(SigmaRun<T, true, false>{x, nullptr, m[c], i0, len});
    }
  });
}

// Like for_each_sigma_run, for G maps j0 .. j0 + G - 1 at once: body(runs) gets a std::array of
// their runs, which cover the same elements (the channel layout is the same for every map).
template <int G, typename T, typename Body>
inline void for_each_sigma_run_group(const MapJob<T>& job, int j0, int64_t off, int64_t L, Body&& body) {
  using A = acc_type<T>;
  if (job.margins == nullptr) {
    std::array<SigmaRun<T, false, false>, G> runs;
    for (int g = 0; g < G; ++g) runs[g] = {job.features[j0 + g] + off, nullptr, A(0), 0, L};
    return body(runs);
  }
  for_each_channel_run(off, L, job.C, job.inner, [&](int64_t i0, int64_t len, int64_t c, auto per_element) {
    constexpr bool kPerElement = decltype(per_element)::value;
    std::array<SigmaRun<T, true, kPerElement>, G> runs;
    for (int g = 0; g < G; ++g) {
      const A* m = job.margins + (j0 + g) * job.C;
      runs[g] = {job.features[j0 + g] + off, m + c, m[c], i0, len};
    }
    body(runs);
  });
}

// out (+)= sum over the G maps from j0 of alpha_j sigma_j(T_j): one write of `out` per G maps
// instead of per map; the first group (j0 == 0) initialises it.
template <int G, typename T, typename A>
inline void accumulate_group(const MapJob<T>& job, int j0, int64_t off, int64_t L, A* __restrict out) {
  A a[G];
  for (int g = 0; g < G; ++g) a[g] = job.alpha[j0 + g];
  for_each_sigma_run_group<G>(job, j0, off, L, [&](const auto& runs) {
    const bool first = j0 == 0;
    elementwise<A>(
        runs[0].i0, runs[0].i0 + runs[0].len,
        [&](int64_t i) {
          pack_t<A> v = first ? a[0] * runs[0].pack(i) : loadu(out + i) + a[0] * runs[0].pack(i);
          for (int g = 1; g < G; ++g) v += a[g] * runs[g].pack(i);
          storeu(out + i, v);
        },
        [&](int64_t i) {
          A v = first ? a[0] * runs[0].value(i) : out[i] + a[0] * runs[0].value(i);
          for (int g = 1; g < G; ++g) v += a[g] * runs[g].value(i);
          out[i] = v;
        });
  });
}

// sums[g] += <u, sigma_j(T_j)> for the G maps from j0 in one pass over u: G independent FMA
// chains, u loaded once per pack, one horizontal sum per map and block.
template <int G, int U, typename T, typename A>
inline void dot_group(const MapJob<T>& job, int j0, int64_t off, int64_t L, const A* const (&u)[U],
                      double* const (&sums)[U]) {
  constexpr int W = Pack<A>::kWidth;
  pack_t<A> acc[U][G] = {};
  A tail[U][G] = {};
  for_each_sigma_run_group<G>(job, j0, off, L, [&](const auto& runs) {
    elementwise<A>(
        runs[0].i0, runs[0].i0 + runs[0].len,
        [&](int64_t i) {
          pack_t<A> uv[U];
          for (int k = 0; k < U; ++k) uv[k] = loadu(u[k] + i);
          for (int g = 0; g < G; ++g) {
            const pack_t<A> x = runs[g].pack(i);
            for (int k = 0; k < U; ++k) acc[k][g] += uv[k] * x;
          }
        },
        [&](int64_t i) {
          for (int g = 0; g < G; ++g) {
            const A x = runs[g].value(i);
            for (int k = 0; k < U; ++k) tail[k][g] += u[k][i] * x;
          }
        });
  });
  for (int k = 0; k < U; ++k)
    for (int g = 0; g < G; ++g) {
      A total = tail[k][g];
      for (int w = 0; w < W; ++w) total += acc[k][g][w];
      sums[k][j0 + g] += total;
    }
}

// Runs fn(std::integral_constant<int, G>{}, j0) over the K maps in groups of up to kGroup.
template <int kGroup, typename Fn>
inline void for_each_map_group(int K, Fn&& fn) {
  int j = 0;
  for (; j + kGroup <= K; j += kGroup) fn(std::integral_constant<int, kGroup>{}, j);
  switch (K - j) {
    case 3: if constexpr (kGroup > 3) fn(std::integral_constant<int, 3>{}, j); break;
    case 2: if constexpr (kGroup > 2) fn(std::integral_constant<int, 2>{}, j); break;
    case 1: if constexpr (kGroup > 1) fn(std::integral_constant<int, 1>{}, j); break;
    default: break;
  }
}

// sums[k][j] += <u_k, sigma_j(T_j)> for every map j and each of the U vectors u_k, in one pass over
// the maps (each map pack is loaded and converted once for all U dots).  Groups of 4 / U maps keep
// the U x G accumulators, U vectors and G maps within the 16 vector registers.
template <int U, typename T, typename A>
inline void map_dots(const MapJob<T>& job, int64_t off, int64_t L, const A* const (&u)[U], double* const (&sums)[U]) {
  for_each_map_group<4 / U>(job.K, [&](auto group, int j0) { dot_group<decltype(group)::value>(job, j0, off, L, u, sums); });
}

// The gradient of every map from an upstream gradient u of the aggregation, for one block:
// grad_features[j] = scale * alpha_j * u * [T_j >= m_j] (when given) and, when partials is given,
// partials[j] += <u, sigma_j(T_j)> (the beta gradient's dot products).
template <typename T, typename A>
inline void map_grads_block(const MapJob<T>& job, int64_t off, int64_t L, const A* __restrict u, A scale,
                            T* const* grad_features, double* partials) {
  if (partials != nullptr) map_dots<1>(job, off, L, {u}, {partials});
  if (grad_features == nullptr) return;
  for (int j = 0; j < job.K; ++j) {
    T* __restrict out = grad_features[j] + off;
    const A a = scale * job.alpha[j];
    for_each_sigma_run(job, j, off, L, [&](const auto& run) {
      elementwise<A>(
          run.i0, run.i0 + run.len, [&](int64_t i) { store_as(out + i, a * loadu(u + i) * run.pass_pack(i)); },
          [&](int64_t i) { out[i] = static_cast<T>(a * u[i] * run.pass(i)); });
    });
  }
}

// out = sum_j alpha_j sigma_j(T_j) for one block, sigma fused into the accumulation.
template <typename T, typename A>
inline void aggregate_block(const MapJob<T>& job, int64_t off, int64_t L, A* __restrict out) {
  for_each_map_group<4>(job.K, [&](auto group, int j0) { accumulate_group<decltype(group)::value>(job, j0, off, L, out); });
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
  A agg[kBlock];
  for_each_block(job, begin, end, [&](int64_t, int64_t, int64_t off, int64_t L) {
    if constexpr (std::is_same_v<T, A>) {
      aggregate_block(job, off, L, out + off);  // accumulate in place: no staging copy
    } else {
      aggregate_block(job, off, L, agg);
      write<T, A>(out + off, L, [&](int64_t i) { return loadu(agg + i); }, [&](int64_t i) { return agg[i]; });
    }
  });
}

template <typename T>
void aggregate_backward(const MapJob<T>& job, const T* grad, T* const* grad_features, double* partials,
                        int64_t begin, int64_t end) {
  using A = acc_type<T>;
  A gbuf[kBlock];
  for_each_block(job, begin, end, [&](int64_t item, int64_t, int64_t off, int64_t L) {
    const A* g = view(grad + off, gbuf, L);
    map_grads_block(job, off, L, g, A(1), grad_features, partials == nullptr ? nullptr : partials + item * job.K);
  });
}

template <typename T>
void bridge_forward(const MapJob<T>& job, const T* student, double* partials, int64_t begin, int64_t end) {
  using A = acc_type<T>;
  A sbuf[kBlock], agg[kBlock];
  const int K = job.K;
  for_each_block(job, begin, end, [&](int64_t item, int64_t, int64_t off, int64_t L) {
    double* acc = partials + item * (2 * K + 1);
    const A* __restrict s = view(student + off, sbuf, L);
    acc[0] += dot(s, s, L);
    aggregate_block(job, off, L, agg);
    map_dots<2>(job, off, L, {s, agg}, {acc + 1, acc + 1 + K});  // <s, T_j> and <A, T_j>: the maps are cache-hot
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
    aggregate_block(job, off, L, agg);
    if (grad_student != nullptr)
      write<T, A>(
          grad_student + off, L, [&](int64_t i) { return cs * loadu(s + i) + ca * loadu(agg + i); },
          [&](int64_t i) { return cs * s[i] + ca * agg[i]; });
    if (grad_features != nullptr) {
      for (int64_t i = 0; i < L; ++i) tmp[i] = ea * agg[i] + es * s[i];  // dL/dA
      for (int j = 0; j < job.K; ++j) {
        const A a = job.alpha[j];
        write<T, A>(grad_features[j] + off, L, [&](int64_t i) { return a * loadu(tmp + i); }, [&](int64_t i) { return a * tmp[i]; });
      }
    }
  });
}

template <typename T>
void partial_l2_forward(const MapJob<T>& job, const T* student, double* partials, int64_t begin, int64_t end) {
  using A = acc_type<T>;
  A sbuf[kBlock], t[kBlock];
  for_each_block(job, begin, end, [&](int64_t item, int64_t, int64_t off, int64_t L) {
    const A* __restrict s = view(student + off, sbuf, L);
    aggregate_block(job, off, L, t);
    using P = pack_t<A>;
    partials[item] += reduce<A>(0,
        L,
        [&](int64_t i) {
          const P sv = loadu(s + i), tv = loadu(t + i), d = sv - tv;
          return d * d * partial_l2_mask_pack(sv, tv);
        },
        [&](int64_t i) {
          const A d = s[i] - t[i];
          return d * d * math::partial_l2_mask(s[i], t[i]);
        });
  });
}

template <typename T>
void partial_l2_backward(const MapJob<T>& job, const T* student, const acc_type<T>* grad, T* grad_student,
                         T* const* grad_features, double* partials, int64_t begin, int64_t end) {
  using A = acc_type<T>;
  A sbuf[kBlock], e[kBlock];
  for_each_block(job, begin, end, [&](int64_t item, int64_t b, int64_t off, int64_t L) {
    const A gb = grad[b];
    const A* __restrict s = view(student + off, sbuf, L);
    aggregate_block(job, off, L, e);
    elementwise<A>(
        0, L,
        [&](int64_t i) {
          const pack_t<A> sv = loadu(s + i), tv = loadu(e + i);
          storeu(e + i, A(2) * (sv - tv) * partial_l2_mask_pack(sv, tv));
        },
        [&](int64_t i) { e[i] = A(2) * (s[i] - e[i]) * math::partial_l2_mask(s[i], e[i]); });
    if (grad_student != nullptr)
      write<T, A>(grad_student + off, L, [&](int64_t i) { return gb * loadu(e + i); }, [&](int64_t i) { return gb * e[i]; });
    map_grads_block(job, off, L, e, -gb, grad_features, partials == nullptr ? nullptr : partials + item * job.K);
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

// Scalar formulas of the three DFA operations (method.md section 4), shared by the CPU and CUDA
// kernels so that every formula lives in exactly one place.  Torch-free on purpose: only plain
// arithmetic on a floating type `acc_t`, callable from host and device code.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define DFA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DFA_HOST_DEVICE inline
#endif

namespace dfa {
namespace math {

// OFD margin ReLU sigma_m(x) = max(x, m), written so that a NaN in x propagates (max() would
// silently replace it with the margin).
template <typename acc_t>
DFA_HOST_DEVICE acc_t margin_relu(acc_t x, acc_t m) {
  return x < m ? m : x;
}

// d sigma_m(x) / dx: 1 where x >= m (or x is NaN), 0 below the margin.  Matches the reference
// torch.where(x < m, m, x), whose gradient flows to x wherever the condition is false.
template <typename acc_t>
DFA_HOST_DEVICE acc_t margin_relu_pass(acc_t x, acc_t m) {
  return x < m ? acc_t(0) : acc_t(1);
}

// OFD partial-L2 mask: the loss counts where the student is above the target or the target is
// positive; where s <= t <= 0 the student is already "dead" like the teacher.  A multiplicative
// 0/1 weight (not a select) keeps NaN propagating through (s - t)^2 * mask.
template <typename acc_t>
DFA_HOST_DEVICE acc_t partial_l2_mask(acc_t s, acc_t t) {
  // Bitwise | (not ||) keeps the expression branch-free so loops over it vectorise.
  return static_cast<acc_t>((s > t) | (t > acc_t(0)));
}

// alpha = softmax(beta) over K entries, max-shifted so |beta| = 80 or more cannot overflow.
template <typename acc_t>
DFA_HOST_DEVICE void softmax(const acc_t* beta, acc_t* alpha, int K) {
  using std::exp;
  acc_t top = beta[0];
  for (int j = 1; j < K; ++j) top = beta[j] > top ? beta[j] : top;
  acc_t total = 0;
  for (int j = 0; j < K; ++j) {
    alpha[j] = exp(beta[j] - top);
    total += alpha[j];
  }
  for (int j = 0; j < K; ++j) alpha[j] /= total;
}

// Softmax Jacobian-vector product: dL/dbeta = alpha * (dL/dalpha - <alpha, dL/dalpha>).
template <typename acc_t>
DFA_HOST_DEVICE void softmax_backward(const acc_t* alpha, const acc_t* grad_alpha,
                                      acc_t* grad_beta, int K) {
  acc_t mean = 0;
  for (int j = 0; j < K; ++j) mean += alpha[j] * grad_alpha[j];
  for (int j = 0; j < K; ++j) grad_beta[j] = alpha[j] * (grad_alpha[j] - mean);
}

// Per-sample quantities of the bridge (student-to-teacher) loss of one sample, derived from the
// three dot products ss = <s,s>, sa = <s,A>, aa = <A,A> with A = sum_j alpha_j T_j:
//   u = s / max(|s|, eps), v = A / max(|A|, eps),  loss = |u - v|^2
//   dloss/ds = cs * s + ca * A,   dloss/dA = ea * A + es * s.
// Where a norm is below eps the normalisation is a plain division by eps (Jacobian I/eps), so a
// zero map gives a finite loss and gradient.
template <typename acc_t>
struct BridgeTerms {
  acc_t loss, cs, ca, ea, es;
};

template <typename acc_t>
DFA_HOST_DEVICE BridgeTerms<acc_t> bridge_terms(acc_t ss, acc_t sa, acc_t aa, acc_t eps) {
  using std::sqrt;
  const acc_t ns_raw = sqrt(ss), na_raw = sqrt(aa);
  // max(norm, eps) written so that a NaN norm stays NaN (and so do the gradients).
  const acc_t ns = ns_raw < eps ? eps : ns_raw;
  const acc_t na = na_raw < eps ? eps : na_raw;
  BridgeTerms<acc_t> r;
  r.loss = ss / (ns * ns) + aa / (na * na) - acc_t(2) * sa / (ns * na);
  const acc_t cross = acc_t(-2) / (ns * na);
  r.ca = cross;
  r.es = cross;
  r.cs = ns_raw > eps ? acc_t(2) * sa / (ns * ns * ns * na) : acc_t(2) / (ns * ns);
  r.ea = na_raw > eps ? acc_t(2) * sa / (na * na * na * ns) : acc_t(2) / (na * na);
  return r;
}

// bridge_terms of one sample from its row of saved statistics (<s,s>, <s,T_1..K>, <A,T_1..K>)
// and the weights alpha: <s,A> = sum_j alpha_j <s,T_j> and <A,A> = sum_j alpha_j <A,T_j>.
template <typename acc_t, typename row_t, typename alpha_t>
DFA_HOST_DEVICE BridgeTerms<acc_t> bridge_row_terms(const row_t* row, const alpha_t* alpha, int K, acc_t eps) {
  acc_t sa = 0, aa = 0;
  for (int j = 0; j < K; ++j) {
    sa += alpha[j] * static_cast<acc_t>(row[1 + j]);
    aa += alpha[j] * static_cast<acc_t>(row[1 + K + j]);
  }
  return bridge_terms<acc_t>(static_cast<acc_t>(row[0]), sa, aa, eps);
}

}  // namespace math
}  // namespace dfa

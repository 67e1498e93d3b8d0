// Per-sample and per-call finishing kernels of the bridge loss and the beta gradient, shared by both
// kernel sets (map_kernels.cuh, old/map_kernels_v1.cuh): they work on B or K values, not on maps.
#pragma once

#include "../common/dfa_math.h"
#include "map_args.cuh"

namespace dfa {
namespace cuda {

// Per-sample bridge loss from the summed dots (<s,s>, <s,T_j>, <A,T_j>): one thread per sample.
template <typename A>
__global__ void bridge_loss_kernel(const double* sums, const A* beta, int64_t B, int K, double eps, A* loss) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b >= B) return;
  double beta_d[kMaxK], alpha[kMaxK];
  for (int j = 0; j < K; ++j) beta_d[j] = beta[j];
  math::softmax(beta_d, alpha, K);
  loss[b] = static_cast<A>(math::bridge_row_terms(sums + b * (2 * K + 1), alpha, K, eps).loss);
}

// Bridge backward, per sample: terms[b] = (cs, ca, ea, es) * grad[b] (see bridge_backward_kernel)
// and contrib[b][j] = grad[b] (ea <A,T_j> + es <s,T_j>), whose column sums are dL/dalpha.
template <typename A>
__global__ void bridge_terms_kernel(const A* stats, const A* grad, const A* beta, int64_t B, int K, double eps,
                                    A* terms, A* contrib) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b >= B) return;
  double beta_d[kMaxK], alpha[kMaxK];
  for (int j = 0; j < K; ++j) beta_d[j] = beta[j];
  math::softmax(beta_d, alpha, K);
  const A* row = stats + b * (2 * K + 1);
  const auto t = math::bridge_row_terms(row, alpha, K, eps);
  const double g = grad[b];
  terms[4 * b] = static_cast<A>(g * t.cs);
  terms[4 * b + 1] = static_cast<A>(g * t.ca);
  terms[4 * b + 2] = static_cast<A>(g * t.ea);
  terms[4 * b + 3] = static_cast<A>(g * t.es);
  for (int j = 0; j < K; ++j) contrib[b * K + j] = static_cast<A>(g * (t.ea * row[1 + K + j] + t.es * row[1 + j]));
}

// dL/dbeta from dL/dalpha through the softmax Jacobian (K <= kMaxK values: one thread).
template <typename A>
__global__ void softmax_backward_kernel(const A* beta, const double* grad_alpha, int K, A* grad_beta) {
  double beta_d[kMaxK], alpha[kMaxK], out[kMaxK];
  for (int j = 0; j < K; ++j) beta_d[j] = beta[j];
  math::softmax(beta_d, alpha, K);
  math::softmax_backward(alpha, grad_alpha, out, K);
  for (int j = 0; j < K; ++j) grad_beta[j] = static_cast<A>(out[j]);
}

}  // namespace cuda
}  // namespace dfa

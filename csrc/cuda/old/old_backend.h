// The CUDA backend over the kernels before issue 25, as dfa_cuda.cu sees it: plain declarations, so
// that the default translation unit neither parses nor instantiates the old kernels (they are
// compiled once, in dfa_cuda_old.cu, and only when DFA_CUDA_OLD_KERNELS=1).
#pragma once

#include <vector>

#include "../../common/op_entry.h"

namespace dfa {
namespace cuda {

struct OldBackend {  // the six kernels of op_entry.h's Backend
  static void aggregate_forward(const MapBatch& batch, const at::Tensor& beta, const OptTensor& margins,
                                at::Tensor out);
  static at::Tensor aggregate_backward(const MapBatch& batch, const at::Tensor& beta, const OptTensor& margins,
                                       bool need_beta, std::vector<at::Tensor>& grad_features);
  static void bridge_forward(const MapBatch& batch, const at::Tensor& beta, double eps, at::Tensor loss,
                             at::Tensor stats);
  static at::Tensor bridge_backward(const MapBatch& batch, const at::Tensor& beta, const at::Tensor& grad,
                                    const at::Tensor& stats, double eps, at::Tensor grad_student, bool need_beta,
                                    std::vector<at::Tensor>& grad_features);
  static void partial_l2_forward(const MapBatch& batch, const at::Tensor& beta, const OptTensor& margins,
                                 at::Tensor loss);
  static at::Tensor partial_l2_backward(const MapBatch& batch, const at::Tensor& beta, const OptTensor& margins,
                                        const at::Tensor& grad, at::Tensor grad_student, bool need_beta,
                                        std::vector<at::Tensor>& grad_features);
};

}  // namespace cuda
}  // namespace dfa

// The CUDA backend over the kernels before issue 25 (map_kernels_v1.cuh), for A/B runs: compiled
// only when DFA_CUDA_OLD_KERNELS=1 (setup.py, CMakeLists.txt), so the default build does not pay for
// a second set; dfa_cuda.cu registers it behind the run-time switch of kernel_choice.cuh.
#include "../backend.cuh"
#include "map_kernels_v1.cuh"
#include "old_backend.h"

namespace dfa {
namespace cuda {

using Old = CudaBackend<v1::Kernels>;

void OldBackend::aggregate_forward(const MapBatch& batch, const at::Tensor& beta, const OptTensor& margins,
                                   at::Tensor out) {
  Old::aggregate_forward(batch, beta, margins, out);
}
at::Tensor OldBackend::aggregate_backward(const MapBatch& batch, const at::Tensor& beta, const OptTensor& margins,
                                          bool need_beta, std::vector<at::Tensor>& grad_features) {
  return Old::aggregate_backward(batch, beta, margins, need_beta, grad_features);
}
void OldBackend::bridge_forward(const MapBatch& batch, const at::Tensor& beta, double eps, at::Tensor loss,
                                at::Tensor stats) {
  Old::bridge_forward(batch, beta, eps, loss, stats);
}
at::Tensor OldBackend::bridge_backward(const MapBatch& batch, const at::Tensor& beta, const at::Tensor& grad,
                                       const at::Tensor& stats, double eps, at::Tensor grad_student, bool need_beta,
                                       std::vector<at::Tensor>& grad_features) {
  return Old::bridge_backward(batch, beta, grad, stats, eps, grad_student, need_beta, grad_features);
}
void OldBackend::partial_l2_forward(const MapBatch& batch, const at::Tensor& beta, const OptTensor& margins,
                                    at::Tensor loss) {
  Old::partial_l2_forward(batch, beta, margins, loss);
}
at::Tensor OldBackend::partial_l2_backward(const MapBatch& batch, const at::Tensor& beta, const OptTensor& margins,
                                           const at::Tensor& grad, at::Tensor grad_student, bool need_beta,
                                           std::vector<at::Tensor>& grad_features) {
  return Old::partial_l2_backward(batch, beta, margins, grad, grad_student, need_beta, grad_features);
}

}  // namespace cuda
}  // namespace dfa

// The CUDA backend over the kernels before issue 25 (map_kernels_v1.cuh), for A/B runs: compiled
// only when DFA_CUDA_OLD_KERNELS=1 (setup.py, CMakeLists.txt), so the default build does not pay for
// a second set; dfa_cuda.cu registers it behind the run-time switch of kernel_choice.cuh.
#include "../backend.cuh"
#include "map_kernels_v1.cuh"

namespace dfa {
namespace cuda {

template struct CudaBackend<v1::Kernels>;

}  // namespace cuda
}  // namespace dfa

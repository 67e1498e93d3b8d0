// The CUDA backend of the DFA ops as registered: CudaBackend (backend.cuh) over the default kernel
// set (map_kernels.cuh), and in a build with DFA_CUDA_OLD_KERNELS=1 also over the set before
// issue 25 (old/, compiled in its own translation unit), switched per call (kernel_choice.cuh).
#include <torch/library.h>

#include "backend.cuh"
#include "kernel_choice.cuh"
#include "map_kernels.cuh"
#ifdef DFA_CUDA_OLD_KERNELS
#include "old/old_backend.h"
#endif

namespace dfa {
namespace cuda {

#ifdef DFA_CUDA_OLD_KERNELS
using RegisteredBackend = SwitchedBackend<CudaBackend<Kernels>, OldBackend>;  // OldBackend: old/dfa_cuda_old.cu
#else
using RegisteredBackend = CudaBackend<Kernels>;
#endif

#ifndef DFA_CUDA_EMULATION
DFA_REGISTER_BACKEND(CUDA, RegisteredBackend)

TORCH_LIBRARY_FRAGMENT(dfa, m) {
  // Build and run-time information, not a tensor op: which CUDA kernel set runs (kernel_choice.cuh).
  m.def("cuda_kernels(str select='') -> str", &cuda_kernels);
}
#endif

}  // namespace cuda
}  // namespace dfa

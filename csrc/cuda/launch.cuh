// The few CUDA runtime touch points of the backend, as macros so that dfa_cuda.cu also compiles
// on the host against cpp_tests/cuda_emulation.h (DFA_CUDA_EMULATION), which runs the kernels on
// CPU threads: their logic is then tested on machines without a GPU.
#pragma once

#ifndef DFA_CUDA_EMULATION
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

// kernel must be a plain name (e.g. a local `auto kernel = some_kernel<T, V>;`).
#define DFA_LAUNCH(kernel, blocks, threads, stream, ...) kernel<<<(blocks), (threads), 0, (stream)>>>(__VA_ARGS__)
#define DFA_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define DFA_DEVICE_GUARD(device) const c10::cuda::CUDAGuard dfa_device_guard(device)
#define DFA_CURRENT_STREAM(device_index) c10::cuda::getCurrentCUDAStream(device_index).stream()
#endif

// A small CPU emulation of the CUDA execution model, enough to run csrc/cuda's kernels on the host:
// every block is run with one std::thread per CUDA thread, __shared__ variables are shared by the
// threads of the (one running) block, __syncthreads is a block barrier, __syncwarp a warp barrier and
// the __shfl_*_sync a warp exchange; cp.async takes map_kernels.cuh's fallback, a plain copy.  It
// exists so that the CUDA kernels' indexing, vectorisation, reductions and launch logic are tested
// on machines without a GPU; include it before csrc/cuda/dfa_cuda.cu.
#pragma once

#include <barrier>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define DFA_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one running block at a time: function statics are its shared memory

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
using cudaStream_t = void*;

namespace dfa_emu {

struct BlockState {
  explicit BlockState(unsigned threads)
      : block_barrier(threads), warps(threads / 32) {  // shuffles need whole warps
    for (auto& w : warps) w = std::make_unique<Warp>();
  }
  struct Warp {
    std::barrier<> barrier{32};
    uint64_t lanes[32];
  };
  std::barrier<> block_barrier;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local BlockState* current_block = nullptr;

// Runs kernel(args...) for every thread of every block (blocks one after another).
template <typename Kernel, typename... Args>
void launch(dim3 grid, int threads, Kernel kernel, Args... args) {
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      BlockState state(threads);
      std::vector<std::thread> pool;
      pool.reserve(threads);
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, bx, by, t] {
          threadIdx = dim3(t);
          blockIdx = dim3(bx, by);
          blockDim = dim3(threads);
          gridDim = grid;
          current_block = &state;
          kernel(args...);
        });
      }
      for (auto& th : pool) th.join();
    }
  }
}

template <typename Kernel, typename... Args>
void launch(int64_t blocks, int threads, Kernel kernel, Args... args) {
  launch(dim3(static_cast<unsigned>(blocks)), threads, kernel, args...);
}

}  // namespace dfa_emu

inline void __syncthreads() { dfa_emu::current_block->block_barrier.arrive_and_wait(); }

// Lane `lane` of the calling warp gets the value lane source(lane) passed.  All 32 lanes of the warp
// must call it (as on the device with a full mask).
template <typename T, typename Source>
T warp_exchange(T value, Source source) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  auto& warp = *dfa_emu::current_block->warps[threadIdx.x / 32];
  const unsigned lane = threadIdx.x % 32;
  std::memcpy(&warp.lanes[lane], &value, sizeof(T));
  warp.barrier.arrive_and_wait();
  T result = value;
  const unsigned from = source(lane);
  if (from < 32) std::memcpy(&result, &warp.lanes[from], sizeof(T));
  warp.barrier.arrive_and_wait();
  return result;
}

template <typename T>
T __shfl_down_sync(unsigned /*mask*/, T value, unsigned offset) {
  return warp_exchange(value, [&](unsigned lane) { return lane + offset; });  // past lane 31: own value
}

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T value, int mask) {
  return warp_exchange(value, [&](unsigned lane) { return lane ^ unsigned(mask); });
}

template <typename T>
T __shfl_sync(unsigned /*mask*/, T value, int src_lane) {
  return warp_exchange(value, [&](unsigned) { return unsigned(src_lane) % 32; });
}

inline void __syncwarp(unsigned /*mask*/ = 0xffffffffu) {
  dfa_emu::current_block->warps[threadIdx.x / 32]->barrier.arrive_and_wait();
}

#define DFA_LAUNCH(kernel, blocks, threads, stream, ...) ::dfa_emu::launch((blocks), (threads), kernel, __VA_ARGS__)
#define DFA_LAUNCH_CHECK() ((void)0)
#define DFA_DEVICE_GUARD(device) ((void)(device))
#define DFA_CURRENT_STREAM(device_index) ((void)(device_index), cudaStream_t{nullptr})

// CUDA backend of the DFA ops: kernel launches on the current stream of the maps' device, with
// beta and margins converted on the device (no host synchronisation).  Checks and output
// allocation: common/op_entry.h; kernels: map_kernels.cuh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>
#include <vector>

#include "../common/op_entry.h"
#include "launch.cuh"
#include "map_kernels.cuh"

namespace dfa {
namespace cuda {
namespace {

using at::Tensor;

template <typename T>
constexpr at::ScalarType acc_dtype() {
  return std::is_same_v<acc_type<T>, double> ? at::kDouble : at::kFloat;
}

// Kernel arguments of one call plus the device tensors they point into.
template <typename T>
struct Launch {
  using A = acc_type<T>;
  MapArgs<T> args{};
  Tensor beta;     // [K] in A
  Tensor margins;  // [K, C] in A, or undefined
  int64_t B = 0;
  int64_t blocks = 0;
  bool aligned = true;
  cudaStream_t stream;

  Launch(const MapBatch& batch, const Tensor& beta_in, const OptTensor& margins_in)
      : stream(DFA_CURRENT_STREAM(batch.features[0].get_device())) {
    const int64_t K = batch.features.size();
    TORCH_CHECK_VALUE(K <= kMaxK, "dfa: the CUDA kernels take at most ", kMaxK, " feature maps per call, got ", K);
    beta = beta_in.to(acc_dtype<T>()).contiguous();
    if (margins_in) margins = margins_in->to(acc_dtype<T>()).contiguous();
    for (int64_t j = 0; j < K; ++j) {
      args.features[j] = batch.features[j].const_data_ptr<T>();
      check_alignment(args.features[j]);
    }
    args.beta = beta.const_data_ptr<A>();
    args.margins = margins.defined() ? margins.const_data_ptr<A>() : nullptr;
    args.N = batch.N;
    args.chunks = (batch.N + kChunk - 1) / kChunk;
    args.C = std::max<int64_t>(batch.C, 1);
    args.inner = batch.inner;
    args.K = static_cast<int>(K);
    B = batch.B;
    blocks = B * args.chunks;
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "dfa: tensor too large for one CUDA launch");
    aligned = aligned && batch.N % kVecWidth<T> == 0;
  }

  // 16-byte vector access needs every map pointer aligned (sample strides are checked via N).
  void check_alignment(const void* p) { aligned = aligned && reinterpret_cast<uintptr_t>(p) % 16 == 0; }

  MapOutPtrs<T> outputs(std::vector<Tensor>& maps) {
    MapOutPtrs<T> out{};
    for (size_t j = 0; j < maps.size(); ++j) {
      out.ptr[j] = maps[j].mutable_data_ptr<T>();
      check_alignment(out.ptr[j]);
    }
    return out;
  }

  // Runs kernel_for(vec) (a callable taking std::integral_constant<int, VEC>) over all blocks.
  template <typename KernelFor>
  void run(KernelFor&& kernel_for) {
    if (blocks == 0) return;
    if (aligned) {
      kernel_for(std::integral_constant<int, kVecWidth<T>>{});
    } else {
      kernel_for(std::integral_constant<int, 1>{});
    }
    DFA_LAUNCH_CHECK();
  }

  Tensor partials(int width) const { return at::empty({blocks, width}, beta.options()); }
};

#define DFA_CUDA_DISPATCH(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

template <typename T>
const T* maybe_ptr(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

constexpr int kFinishThreads = 128;

int64_t finish_blocks(int64_t B) { return (B + kFinishThreads - 1) / kFinishThreads; }

struct CudaBackend {
  static void aggregate_forward(const MapBatch& batch, const Tensor& beta, const OptTensor& margins, Tensor out) {
    DFA_DEVICE_GUARD(out.device());
    DFA_CUDA_DISPATCH(out.scalar_type(), "dfa_aggregate_cuda", [&] {
      Launch<scalar_t> L(batch, beta, margins);
      scalar_t* dst = out.mutable_data_ptr<scalar_t>();
      L.check_alignment(dst);
      L.run([&](auto vec) {
        auto kernel = aggregate_forward_kernel<scalar_t, decltype(vec)::value>;
        DFA_LAUNCH(kernel, L.blocks, kThreads, L.stream, L.args, dst);
      });
    });
  }

  static Tensor aggregate_backward(const MapBatch& batch, const Tensor& beta, const OptTensor& margins,
                                   bool need_beta, std::vector<Tensor>& grad_features) {
    DFA_DEVICE_GUARD(batch.grad.device());
    Tensor grad_beta;
    DFA_CUDA_DISPATCH(batch.grad.scalar_type(), "dfa_aggregate_backward_cuda", [&] {
      using A = acc_type<scalar_t>;
      Launch<scalar_t> L(batch, beta, margins);
      const scalar_t* g = batch.grad.const_data_ptr<scalar_t>();
      L.check_alignment(g);
      const auto outs = L.outputs(grad_features);
      const bool write_features = !grad_features.empty();
      Tensor partials = need_beta ? L.partials(L.args.K) : Tensor();
      A* partial_ptr = need_beta ? partials.mutable_data_ptr<A>() : nullptr;
      L.run([&](auto vec) {
        auto kernel = aggregate_backward_kernel<scalar_t, decltype(vec)::value>;
        DFA_LAUNCH(kernel, L.blocks, kThreads, L.stream, L.args, g, outs, write_features, partial_ptr);
      });
      if (need_beta) grad_beta = finish_beta_grad<A>(L, partials, nullptr, A(1), beta);
    });
    return grad_beta;
  }

  static void bridge_forward(const MapBatch& batch, const Tensor& beta, double eps, Tensor loss, Tensor stats) {
    DFA_DEVICE_GUARD(loss.device());
    DFA_CUDA_DISPATCH(batch.student.scalar_type(), "dfa_bridge_st_loss_cuda", [&] {
      using A = acc_type<scalar_t>;
      Launch<scalar_t> L(batch, beta, std::nullopt);
      const scalar_t* s = batch.student.const_data_ptr<scalar_t>();
      L.check_alignment(s);
      const int width = 2 * L.args.K + 1;
      Tensor partials = L.partials(width);
      L.run([&](auto vec) {
        auto kernel = bridge_forward_kernel<scalar_t, decltype(vec)::value>;
        DFA_LAUNCH(kernel, L.blocks, kThreads, L.stream, L.args, s, partials.mutable_data_ptr<A>());
      });
      if (L.B == 0) return;
      auto finish = bridge_forward_finish_kernel<A>;
      DFA_LAUNCH(finish, finish_blocks(L.B), kFinishThreads, L.stream, partials.const_data_ptr<A>(), L.args.beta, L.B,
                 L.args.chunks, L.args.K, eps, loss.mutable_data_ptr<A>(), stats.mutable_data_ptr<A>());
      DFA_LAUNCH_CHECK();
    });
  }

  static Tensor bridge_backward(const MapBatch& batch, const Tensor& beta, const Tensor& grad, const Tensor& stats,
                                double eps, Tensor grad_student, bool need_beta, std::vector<Tensor>& grad_features) {
    DFA_DEVICE_GUARD(batch.student.device());
    Tensor grad_beta;
    DFA_CUDA_DISPATCH(batch.student.scalar_type(), "dfa_bridge_st_loss_backward_cuda", [&] {
      using A = acc_type<scalar_t>;
      Launch<scalar_t> L(batch, beta, std::nullopt);
      const Tensor g = grad.to(acc_dtype<scalar_t>()).contiguous();
      const Tensor st = stats.to(acc_dtype<scalar_t>()).contiguous();
      Tensor terms = at::empty({L.B, 4}, L.beta.options());
      Tensor grad_beta_acc = need_beta ? at::empty({L.args.K}, L.beta.options()) : Tensor();
      if (L.B > 0 || need_beta) {
        auto prepare = bridge_backward_terms_kernel<A>;
        DFA_LAUNCH(prepare, 1, std::max(kFinishThreads, kMaxK), L.stream, st.const_data_ptr<A>(),
                   g.const_data_ptr<A>(), L.args.beta, L.B, L.args.K, eps, terms.mutable_data_ptr<A>(),
                   need_beta ? grad_beta_acc.mutable_data_ptr<A>() : nullptr);
        DFA_LAUNCH_CHECK();
      }
      if (need_beta) grad_beta = grad_beta_acc.to(beta.scalar_type());
      const auto outs = L.outputs(grad_features);
      const bool write_features = !grad_features.empty();
      scalar_t* ds = grad_student.defined() ? grad_student.mutable_data_ptr<scalar_t>() : nullptr;
      if (ds != nullptr) L.check_alignment(ds);
      const scalar_t* s = batch.student.const_data_ptr<scalar_t>();
      L.check_alignment(s);
      if (ds == nullptr && !write_features) return;
      L.run([&](auto vec) {
        auto kernel = bridge_backward_kernel<scalar_t, decltype(vec)::value>;
        DFA_LAUNCH(kernel, L.blocks, kThreads, L.stream, L.args, s, terms.const_data_ptr<A>(), ds, outs,
                   write_features);
      });
    });
    return grad_beta;
  }

  static void partial_l2_forward(const MapBatch& batch, const Tensor& beta, const OptTensor& margins, Tensor loss) {
    DFA_DEVICE_GUARD(loss.device());
    DFA_CUDA_DISPATCH(batch.student.scalar_type(), "dfa_partial_l2_cuda", [&] {
      using A = acc_type<scalar_t>;
      Launch<scalar_t> L(batch, beta, margins);
      const scalar_t* s = batch.student.const_data_ptr<scalar_t>();
      L.check_alignment(s);
      Tensor partials = L.partials(1);
      L.run([&](auto vec) {
        auto kernel = partial_l2_forward_kernel<scalar_t, decltype(vec)::value>;
        DFA_LAUNCH(kernel, L.blocks, kThreads, L.stream, L.args, s, partials.mutable_data_ptr<A>());
      });
      if (L.B == 0) return;
      auto finish = partial_l2_forward_finish_kernel<A>;
      DFA_LAUNCH(finish, finish_blocks(L.B), kFinishThreads, L.stream, partials.const_data_ptr<A>(), L.B,
                 L.args.chunks, loss.mutable_data_ptr<A>());
      DFA_LAUNCH_CHECK();
    });
  }

  static Tensor partial_l2_backward(const MapBatch& batch, const Tensor& beta, const OptTensor& margins,
                                    const Tensor& grad, Tensor grad_student, bool need_beta,
                                    std::vector<Tensor>& grad_features) {
    DFA_DEVICE_GUARD(batch.student.device());
    Tensor grad_beta;
    DFA_CUDA_DISPATCH(batch.student.scalar_type(), "dfa_partial_l2_backward_cuda", [&] {
      using A = acc_type<scalar_t>;
      Launch<scalar_t> L(batch, beta, margins);
      const Tensor g = grad.to(acc_dtype<scalar_t>()).contiguous();
      const scalar_t* s = batch.student.const_data_ptr<scalar_t>();
      L.check_alignment(s);
      scalar_t* ds = grad_student.defined() ? grad_student.mutable_data_ptr<scalar_t>() : nullptr;
      if (ds != nullptr) L.check_alignment(ds);
      const auto outs = L.outputs(grad_features);
      const bool write_features = !grad_features.empty();
      Tensor partials = need_beta ? L.partials(L.args.K) : Tensor();
      A* partial_ptr = need_beta ? partials.mutable_data_ptr<A>() : nullptr;
      L.run([&](auto vec) {
        auto kernel = partial_l2_backward_kernel<scalar_t, decltype(vec)::value>;
        DFA_LAUNCH(kernel, L.blocks, kThreads, L.stream, L.args, s, g.const_data_ptr<A>(), ds, outs, write_features,
                   partial_ptr);
      });
      // dL/dalpha_j = -sum_b g_b <e_b, sigma_j(T_j)>
      if (need_beta) grad_beta = finish_beta_grad<A>(L, partials, g.const_data_ptr<A>(), A(-1), beta);
    });
    return grad_beta;
  }

  template <typename A, typename T>
  static Tensor finish_beta_grad(const Launch<T>& L, const Tensor& partials, const A* sample_weight, A sign,
                                 const Tensor& beta) {
    Tensor out = at::empty({L.args.K}, L.beta.options());
    auto kernel = beta_grad_from_partials_kernel<A>;
    DFA_LAUNCH(kernel, 1, kMaxK, L.stream, maybe_ptr<A>(partials), L.args.beta, sample_weight, sign, L.B,
               L.args.chunks, L.args.K, out.mutable_data_ptr<A>());
    DFA_LAUNCH_CHECK();
    return out.to(beta.scalar_type());
  }
};

}  // namespace

#ifndef DFA_CUDA_EMULATION
DFA_REGISTER_BACKEND(CUDA, CudaBackend)
#endif

}  // namespace cuda
}  // namespace dfa

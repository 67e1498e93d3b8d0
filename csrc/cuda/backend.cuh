// The CUDA backend of the DFA ops over one kernel set (map_kernels.cuh's Kernels, the default, or
// old/map_kernels_v1.cuh's, built for A/B runs): kernel launches on the current stream of the maps'
// device, with beta and margins converted on the device (no host synchronisation).  Checks and
// output allocation: common/op_entry.h.  A kernel set supplies the six map kernels, which vector
// width and chunk size a call gets, and the column sums that finish its reductions.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/op_entry.h"
#include "finish_kernels.cuh"
#include "launch.cuh"
#include "map_args.cuh"

namespace dfa {
namespace cuda {

using at::Tensor;

template <typename T>
constexpr at::ScalarType acc_dtype() {
  return std::is_same_v<acc_type<T>, double> ? at::kDouble : at::kFloat;
}

// Kernel arguments of one call plus the device tensors they point into.  The vector width (and
// with it the chunking and the number of blocks) is fixed by plan(), the first time blocks(),
// chunks() or run() is asked: every pointer must be given to check_alignment() before that.
template <typename T, class Kernels>
struct Launch {
  using A = acc_type<T>;
  MapArgs<T> args{};
  Tensor beta;     // [K] in A
  Tensor margins;  // [K, C] in A, or undefined
  int64_t B = 0;
  cudaStream_t stream;

  Launch(const MapBatch& batch, const Tensor& beta_in, const OptTensor& margins_in)
      : stream(DFA_CURRENT_STREAM(batch.features[0].get_device())) {
    const int64_t K = batch.features.size();
    TORCH_CHECK_VALUE(K <= kMaxK, "dfa: the CUDA kernels take at most ", kMaxK, " feature maps per call, got ", K);
    beta = beta_in.to(acc_dtype<T>()).contiguous();
    if (margins_in) {
      margins = margins_in->to(acc_dtype<T>()).contiguous();
      // a vector of margins is read in one piece (channels_last): a view at an offset gets its own storage
      if (reinterpret_cast<uintptr_t>(margins.const_data_ptr()) % (sizeof(A) * kVecWidth<T>) != 0)
        margins = margins.clone();
    }
    for (int64_t j = 0; j < K; ++j) {
      args.features[j] = batch.features[j].const_data_ptr<T>();
      check_alignment(args.features[j]);
    }
    args.beta = beta.const_data_ptr<A>();
    args.margins = margins.defined() ? margins.const_data_ptr<A>() : nullptr;
    args.N = batch.N;
    args.C = std::max<int64_t>(batch.C, 1);
    args.inner = batch.inner;
    args.K = static_cast<int>(K);
    B = batch.B;
  }

  // 16-byte vector access needs every map pointer aligned (sample strides: the kernel set checks N).
  void check_alignment(const void* p) {
    TORCH_INTERNAL_ASSERT(!planned_, "dfa: check_alignment after the launch was planned");
    aligned_ = aligned_ && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  }

  MapOutPtrs<T> outputs(std::vector<Tensor>& maps) {
    MapOutPtrs<T> out{};
    for (size_t j = 0; j < maps.size(); ++j) {
      out.ptr[j] = maps[j].mutable_data_ptr<T>();
      check_alignment(out.ptr[j]);
    }
    return out;
  }

  int64_t blocks() { return plan(), blocks_; }
  int64_t chunks() { return plan(), args.chunks; }

  // Runs kernel_for(vec) (a callable taking std::integral_constant<int, VEC>) over all blocks.
  template <typename KernelFor>
  void run(KernelFor&& kernel_for) {
    plan();
    if (blocks_ == 0) return;
    if (vec_ == kVecWidth<T>) {
      kernel_for(std::integral_constant<int, kVecWidth<T>>{});
    } else {
      kernel_for(std::integral_constant<int, 1>{});
    }
    DFA_LAUNCH_CHECK();
  }

  Tensor partials(int width) { return at::empty({blocks(), width}, beta.options()); }

  // Per segment, the column sums (double) of x = [segments * rows_per_segment, width] in A, each
  // row weighted by sign * row_weight[row / weight_period] (or sign alone).
  Tensor segment_sums(const Tensor& x, int64_t segments, int64_t rows_per_segment, int width,
                      const A* row_weight = nullptr, int64_t weight_period = 1, double sign = 1.0) const {
    Tensor out = at::empty({segments, width}, beta.options().dtype(at::kDouble));
    if (segments == 0 || width == 0) return out;
    const int64_t scratch_size = Kernels::column_sums_scratch(segments, rows_per_segment, width);
    Tensor scratch = at::empty({scratch_size}, out.options());
    Kernels::column_sums(stream, x.const_data_ptr<A>(), segments, rows_per_segment, width, row_weight,
                         std::max<int64_t>(weight_period, 1), sign, out.mutable_data_ptr<double>(),
                         scratch.mutable_data_ptr<double>());
    DFA_LAUNCH_CHECK();
    return out;
  }

  // dL/dbeta in the dtype of beta_in from dL/dalpha (K doubles on the device).
  Tensor beta_grad(const Tensor& grad_alpha, const Tensor& beta_in) const {
    Tensor out = at::empty({args.K}, beta.options());
    auto kernel = softmax_backward_kernel<A>;
    DFA_LAUNCH(kernel, 1, 1, stream, args.beta, grad_alpha.const_data_ptr<double>(), args.K, out.mutable_data_ptr<A>());
    DFA_LAUNCH_CHECK();
    return out.to(beta_in.scalar_type());
  }

 private:
  bool aligned_ = true;
  bool planned_ = false;
  int vec_ = 1;
  int64_t blocks_ = 0;

  void plan() {
    if (planned_) return;
    planned_ = true;
    vec_ = Kernels::template vec_width<T>(args, aligned_);
    const int64_t chunk = Kernels::template chunk<T>(vec_);
    args.chunks = (args.N + chunk - 1) / chunk;
    blocks_ = B * args.chunks;
    TORCH_CHECK(blocks_ <= std::numeric_limits<int32_t>::max(), "dfa: tensor too large for one CUDA launch");
  }
};

#define DFA_CUDA_DISPATCH(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

constexpr int kFinishThreads = 128;

inline int64_t finish_blocks(int64_t B) { return (B + kFinishThreads - 1) / kFinishThreads; }

template <class Kernels>
struct CudaBackend {
  static void aggregate_forward(const MapBatch& batch, const Tensor& beta, const OptTensor& margins, Tensor out) {
    DFA_DEVICE_GUARD(out.device());
    DFA_CUDA_DISPATCH(out.scalar_type(), "dfa_aggregate_cuda", [&] {
      Launch<scalar_t, Kernels> L(batch, beta, margins);
      scalar_t* dst = out.mutable_data_ptr<scalar_t>();
      L.check_alignment(dst);
      L.run([&](auto vec) {
        auto kernel = Kernels::template aggregate_forward<scalar_t, decltype(vec)::value>();
        DFA_LAUNCH(kernel, L.blocks(), Kernels::kBlockThreads, L.stream, L.args, dst);
      });
    });
  }

  static Tensor aggregate_backward(const MapBatch& batch, const Tensor& beta, const OptTensor& margins,
                                   bool need_beta, std::vector<Tensor>& grad_features) {
    DFA_DEVICE_GUARD(batch.grad.device());
    Tensor grad_beta;
    DFA_CUDA_DISPATCH(batch.grad.scalar_type(), "dfa_aggregate_backward_cuda", [&] {
      using A = acc_type<scalar_t>;
      const bool write_features = !grad_features.empty();
      if (!need_beta && !write_features) return;
      Launch<scalar_t, Kernels> L(batch, beta, margins);
      const scalar_t* g = batch.grad.const_data_ptr<scalar_t>();
      L.check_alignment(g);
      const auto outs = L.outputs(grad_features);
      Tensor partials = need_beta ? L.partials(L.args.K) : Tensor();
      A* partial_ptr = need_beta ? partials.mutable_data_ptr<A>() : nullptr;
      L.run([&](auto vec) {
        auto kernel = Kernels::template aggregate_backward<scalar_t, decltype(vec)::value>();
        DFA_LAUNCH(kernel, L.blocks(), Kernels::kBlockThreads, L.stream, L.args, g, outs, write_features, partial_ptr);
      });
      if (need_beta) grad_beta = L.beta_grad(L.segment_sums(partials, 1, L.blocks(), L.args.K), beta);
    });
    return grad_beta;
  }

  static void bridge_forward(const MapBatch& batch, const Tensor& beta, double eps, Tensor loss, Tensor stats) {
    DFA_DEVICE_GUARD(loss.device());
    DFA_CUDA_DISPATCH(batch.student.scalar_type(), "dfa_bridge_st_loss_cuda", [&] {
      using A = acc_type<scalar_t>;
      Launch<scalar_t, Kernels> L(batch, beta, std::nullopt);
      const scalar_t* s = batch.student.const_data_ptr<scalar_t>();
      L.check_alignment(s);
      const int width = 2 * L.args.K + 1;
      Tensor partials = L.partials(width);
      L.run([&](auto vec) {
        auto kernel = Kernels::template bridge_forward<scalar_t, decltype(vec)::value>();
        DFA_LAUNCH(kernel, L.blocks(), Kernels::kBlockThreads, L.stream, L.args, s, partials.mutable_data_ptr<A>());
      });
      if (L.B == 0) return;
      const Tensor sums = L.segment_sums(partials, L.B, L.chunks(), width);  // [B, 2K + 1]
      stats.copy_(sums);
      auto finish = bridge_loss_kernel<A>;
      DFA_LAUNCH(finish, finish_blocks(L.B), kFinishThreads, L.stream, sums.const_data_ptr<double>(), L.args.beta, L.B,
                 L.args.K, eps, loss.mutable_data_ptr<A>());
      DFA_LAUNCH_CHECK();
    });
  }

  static Tensor bridge_backward(const MapBatch& batch, const Tensor& beta, const Tensor& grad, const Tensor& stats,
                                double eps, Tensor grad_student, bool need_beta, std::vector<Tensor>& grad_features) {
    DFA_DEVICE_GUARD(batch.student.device());
    Tensor grad_beta;
    DFA_CUDA_DISPATCH(batch.student.scalar_type(), "dfa_bridge_st_loss_backward_cuda", [&] {
      using A = acc_type<scalar_t>;
      Launch<scalar_t, Kernels> L(batch, beta, std::nullopt);
      const Tensor g = grad.to(acc_dtype<scalar_t>()).contiguous();
      const Tensor st = stats.to(acc_dtype<scalar_t>()).contiguous();
      // Per sample: the coefficients of dL/ds and dL/dA (times g_b) and each sample's share of
      // dL/dalpha, from the saved dots; their column sums give the beta gradient.
      Tensor terms = at::empty({L.B, 4}, L.beta.options());
      Tensor contrib = at::empty({L.B, L.args.K}, L.beta.options());
      if (L.B > 0) {
        auto prepare = bridge_terms_kernel<A>;
        DFA_LAUNCH(prepare, finish_blocks(L.B), kFinishThreads, L.stream, st.const_data_ptr<A>(), g.const_data_ptr<A>(),
                   L.args.beta, L.B, L.args.K, eps, terms.mutable_data_ptr<A>(), contrib.mutable_data_ptr<A>());
        DFA_LAUNCH_CHECK();
      }
      if (need_beta) grad_beta = L.beta_grad(L.segment_sums(contrib, 1, L.B, L.args.K), beta);
      const auto outs = L.outputs(grad_features);
      const bool write_features = !grad_features.empty();
      scalar_t* ds = grad_student.defined() ? grad_student.mutable_data_ptr<scalar_t>() : nullptr;
      if (ds != nullptr) L.check_alignment(ds);
      const scalar_t* s = batch.student.const_data_ptr<scalar_t>();
      L.check_alignment(s);
      if (ds == nullptr && !write_features) return;
      L.run([&](auto vec) {
        auto kernel = Kernels::template bridge_backward<scalar_t, decltype(vec)::value>();
        DFA_LAUNCH(kernel, L.blocks(), Kernels::kBlockThreads, L.stream, L.args, s, terms.const_data_ptr<A>(), ds, outs,
                   write_features);
      });
    });
    return grad_beta;
  }

  static void partial_l2_forward(const MapBatch& batch, const Tensor& beta, const OptTensor& margins, Tensor loss) {
    DFA_DEVICE_GUARD(loss.device());
    DFA_CUDA_DISPATCH(batch.student.scalar_type(), "dfa_partial_l2_cuda", [&] {
      using A = acc_type<scalar_t>;
      Launch<scalar_t, Kernels> L(batch, beta, margins);
      const scalar_t* s = batch.student.const_data_ptr<scalar_t>();
      L.check_alignment(s);
      Tensor partials = L.partials(1);
      L.run([&](auto vec) {
        auto kernel = Kernels::template partial_l2_forward<scalar_t, decltype(vec)::value>();
        DFA_LAUNCH(kernel, L.blocks(), Kernels::kBlockThreads, L.stream, L.args, s, partials.mutable_data_ptr<A>());
      });
      if (L.B == 0) return;
      loss.copy_(L.segment_sums(partials, L.B, L.chunks(), 1).view({L.B}));
    });
  }

  static Tensor partial_l2_backward(const MapBatch& batch, const Tensor& beta, const OptTensor& margins,
                                    const Tensor& grad, Tensor grad_student, bool need_beta,
                                    std::vector<Tensor>& grad_features) {
    DFA_DEVICE_GUARD(batch.student.device());
    Tensor grad_beta;
    DFA_CUDA_DISPATCH(batch.student.scalar_type(), "dfa_partial_l2_backward_cuda", [&] {
      using A = acc_type<scalar_t>;
      Launch<scalar_t, Kernels> L(batch, beta, margins);
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
        auto kernel = Kernels::template partial_l2_backward<scalar_t, decltype(vec)::value>();
        DFA_LAUNCH(kernel, L.blocks(), Kernels::kBlockThreads, L.stream, L.args, s, g.const_data_ptr<A>(), ds, outs, write_features,
                   partial_ptr);
      });
      // dL/dalpha_j = -sum_b g_b <e_b, sigma_j(T_j)>
      if (need_beta)
        grad_beta = L.beta_grad(L.segment_sums(partials, 1, L.blocks(), L.args.K, g.const_data_ptr<A>(), L.chunks(), -1.0), beta);
    });
    return grad_beta;
  }
};

}  // namespace cuda
}  // namespace dfa

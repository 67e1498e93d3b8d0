// CPU backend of the DFA ops: softmax(beta) on the host, a parallel-for over fixed-size work items
// (one chunk of one sample each), and per-item partial sums reduced in a fixed order, so results
// do not depend on the thread count.  Checks and output allocation: common/op_entry.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../common/dfa_math.h"
#include "../common/op_entry.h"
#include "map_job.h"

namespace dfa {
namespace cpu {
namespace {

using at::Tensor;

// The kernel-side view of one call: map pointers, weights and margins in the accumulation type.
template <typename scalar_t>
struct JobData {
  using acc_t = acc_type<scalar_t>;
  std::vector<const scalar_t*> feature_ptrs;
  std::vector<acc_t> alpha;
  Tensor margins;  // [K, C] contiguous acc_t, or undefined
  MapJob<scalar_t> job;

  JobData(const MapBatch& batch, const Tensor& beta, const OptTensor& margins_in) {
    const int K = static_cast<int>(batch.features.size());
    for (const auto& f : batch.features) feature_ptrs.push_back(f.const_data_ptr<scalar_t>());
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const Tensor beta_acc = beta.to(acc_dtype).contiguous();
    alpha.resize(K);
    math::softmax(beta_acc.const_data_ptr<acc_t>(), alpha.data(), K);
    if (margins_in) margins = margins_in->to(acc_dtype).contiguous();
    job.B = batch.B;
    job.N = batch.N;
    job.C = std::max<int64_t>(batch.C, 1);
    job.inner = batch.inner;
    job.K = K;
    job.features = feature_ptrs.data();
    job.alpha = alpha.data();
    job.margins = margins.defined() ? margins.const_data_ptr<acc_t>() : nullptr;
  }
};

// Runs kernel(begin, end) over all work items in parallel.  Each item covers up to kChunk elements
// of K + 1 maps; the grain keeps a task at roughly 64k elements touched.
template <typename scalar_t, typename Fn>
void parallel_items(const MapJob<scalar_t>& job, Fn&& kernel) {
  const int64_t items = job.items();
  if (items == 0) return;
  const int64_t per_item = std::min(job.N, kChunk) * (job.K + 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(per_item, 1));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) { kernel(begin, end); });
}

// Per-item partials (width doubles each), reduced over the chunks of every sample in chunk order.
template <typename scalar_t>
std::vector<double> per_sample_sums(const MapJob<scalar_t>& job, const std::vector<double>& partials, int width) {
  std::vector<double> sums(job.B * width, 0.0);
  const int64_t per_sample = job.chunks_per_sample();
  for (int64_t b = 0; b < job.B; ++b)
    for (int64_t c = 0; c < per_sample; ++c)
      for (int a = 0; a < width; ++a) sums[b * width + a] += partials[(b * per_sample + c) * width + a];
  return sums;
}

// dL/dbeta in beta's dtype from dL/dalpha, through the softmax Jacobian.
template <typename acc_t>
Tensor beta_grad(const std::vector<acc_t>& alpha, const std::vector<double>& grad_alpha, const Tensor& beta) {
  const int K = static_cast<int>(alpha.size());
  std::vector<double> alpha_d(alpha.begin(), alpha.end()), out(K);
  math::softmax_backward(alpha_d.data(), grad_alpha.data(), out.data(), K);
  return at::tensor(out, beta.options().dtype(at::kDouble)).to(beta.scalar_type());
}

template <typename scalar_t>
std::vector<scalar_t*> pointers(std::vector<Tensor>& maps) {
  std::vector<scalar_t*> ptrs;
  for (auto& t : maps) ptrs.push_back(t.mutable_data_ptr<scalar_t>());
  return ptrs;
}

template <typename scalar_t>
scalar_t* const* or_null(std::vector<scalar_t*>& ptrs) {
  return ptrs.empty() ? nullptr : ptrs.data();
}

#define DFA_DISPATCH(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

struct CpuBackend {
  static void aggregate_forward(const MapBatch& batch, const Tensor& beta, const OptTensor& margins, Tensor out) {
    DFA_DISPATCH(out.scalar_type(), "dfa_aggregate_cpu", [&] {
      JobData<scalar_t> data(batch, beta, margins);
      scalar_t* dst = out.mutable_data_ptr<scalar_t>();
      parallel_items(data.job, [&](int64_t b, int64_t e) { kernels<scalar_t>().aggregate_forward(data.job, dst, b, e); });
    });
  }

  static Tensor aggregate_backward(const MapBatch& batch, const Tensor& beta, const OptTensor& margins,
                                   bool need_beta, std::vector<Tensor>& grad_features) {
    Tensor grad_beta;
    DFA_DISPATCH(batch.grad.scalar_type(), "dfa_aggregate_backward_cpu", [&] {
      JobData<scalar_t> data(batch, beta, margins);
      const int K = data.job.K;
      std::vector<double> partials(need_beta ? data.job.items() * K : 0, 0.0);
      std::vector<scalar_t*> dst = pointers<scalar_t>(grad_features);
      const scalar_t* g = batch.grad.const_data_ptr<scalar_t>();
      parallel_items(data.job, [&](int64_t b, int64_t e) {
        kernels<scalar_t>().aggregate_backward(data.job, g, or_null(dst), need_beta ? partials.data() : nullptr, b, e);
      });
      if (need_beta) {
        // One global dot product per map: per-sample sums, then samples in order.
        const std::vector<double> per_sample = per_sample_sums(data.job, partials, K);
        std::vector<double> grad_alpha(K, 0.0);
        for (int64_t b = 0; b < data.job.B; ++b)
          for (int j = 0; j < K; ++j) grad_alpha[j] += per_sample[b * K + j];
        grad_beta = beta_grad(data.alpha, grad_alpha, beta);
      }
    });
    return grad_beta;
  }

  static void bridge_forward(const MapBatch& batch, const Tensor& beta, double eps, Tensor loss, Tensor stats) {
    DFA_DISPATCH(batch.student.scalar_type(), "dfa_bridge_st_loss_cpu", [&] {
      using acc_t = acc_type<scalar_t>;
      JobData<scalar_t> data(batch, beta, std::nullopt);
      const int width = 2 * data.job.K + 1;
      std::vector<double> partials(data.job.items() * width, 0.0);
      const scalar_t* s = batch.student.const_data_ptr<scalar_t>();
      parallel_items(data.job, [&](int64_t b, int64_t e) { kernels<scalar_t>().bridge_forward(data.job, s, partials.data(), b, e); });
      const std::vector<double> sums = per_sample_sums(data.job, partials, width);
      acc_t* loss_ptr = loss.mutable_data_ptr<acc_t>();
      acc_t* stats_ptr = stats.mutable_data_ptr<acc_t>();
      for (int64_t b = 0; b < batch.B; ++b) {
        loss_ptr[b] = static_cast<acc_t>(math::bridge_row_terms(&sums[b * width], data.alpha.data(), data.job.K, eps).loss);
        for (int a = 0; a < width; ++a) stats_ptr[b * width + a] = static_cast<acc_t>(sums[b * width + a]);
      }
    });
  }

  static Tensor bridge_backward(const MapBatch& batch, const Tensor& beta, const Tensor& grad, const Tensor& stats,
                                double eps, Tensor grad_student, bool need_beta, std::vector<Tensor>& grad_features) {
    Tensor grad_beta;
    DFA_DISPATCH(batch.student.scalar_type(), "dfa_bridge_st_loss_backward_cpu", [&] {
      using acc_t = acc_type<scalar_t>;
      JobData<scalar_t> data(batch, beta, std::nullopt);
      const int K = data.job.K;
      const Tensor g = grad.to(at::kDouble).contiguous();
      const Tensor st = stats.to(at::kDouble).contiguous();
      const double* g_ptr = g.const_data_ptr<double>();
      const double* st_ptr = st.const_data_ptr<double>();
      // Per sample: the coefficients of dL/ds = cs s + ca A and dL/dA = ea A + es s (times g_b), and
      // dL/dalpha_j = sum_b <dL/dA_b, T_j> = sum_b g_b (ea <A,T_j> + es <s,T_j>) from the saved dots.
      std::vector<acc_t> terms(4 * batch.B);
      std::vector<double> grad_alpha(K, 0.0);
      for (int64_t b = 0; b < batch.B; ++b) {
        const double* row = st_ptr + b * (2 * K + 1);
        const auto t = math::bridge_row_terms(row, data.alpha.data(), K, eps);
        const double gb = g_ptr[b];
        terms[4 * b] = gb * t.cs;
        terms[4 * b + 1] = gb * t.ca;
        terms[4 * b + 2] = gb * t.ea;
        terms[4 * b + 3] = gb * t.es;
        for (int j = 0; j < K; ++j) grad_alpha[j] += gb * (t.ea * row[1 + K + j] + t.es * row[1 + j]);
      }
      if (need_beta) grad_beta = beta_grad(data.alpha, grad_alpha, beta);
      std::vector<scalar_t*> dst = pointers<scalar_t>(grad_features);
      if (grad_student.defined() || !dst.empty()) {
        scalar_t* ds = grad_student.defined() ? grad_student.mutable_data_ptr<scalar_t>() : nullptr;
        const scalar_t* s = batch.student.const_data_ptr<scalar_t>();
        parallel_items(data.job, [&](int64_t b, int64_t e) {
          kernels<scalar_t>().bridge_backward(data.job, s, terms.data(), ds, or_null(dst), b, e);
        });
      }
    });
    return grad_beta;
  }

  static void partial_l2_forward(const MapBatch& batch, const Tensor& beta, const OptTensor& margins, Tensor loss) {
    DFA_DISPATCH(batch.student.scalar_type(), "dfa_partial_l2_cpu", [&] {
      using acc_t = acc_type<scalar_t>;
      JobData<scalar_t> data(batch, beta, margins);
      std::vector<double> partials(data.job.items(), 0.0);
      const scalar_t* s = batch.student.const_data_ptr<scalar_t>();
      parallel_items(data.job, [&](int64_t b, int64_t e) { kernels<scalar_t>().partial_l2_forward(data.job, s, partials.data(), b, e); });
      const std::vector<double> sums = per_sample_sums(data.job, partials, 1);
      acc_t* loss_ptr = loss.mutable_data_ptr<acc_t>();
      for (int64_t b = 0; b < batch.B; ++b) loss_ptr[b] = static_cast<acc_t>(sums[b]);
    });
  }

  static Tensor partial_l2_backward(const MapBatch& batch, const Tensor& beta, const OptTensor& margins,
                                    const Tensor& grad, Tensor grad_student, bool need_beta,
                                    std::vector<Tensor>& grad_features) {
    Tensor grad_beta;
    DFA_DISPATCH(batch.student.scalar_type(), "dfa_partial_l2_backward_cpu", [&] {
      using acc_t = acc_type<scalar_t>;
      JobData<scalar_t> data(batch, beta, margins);
      const int K = data.job.K;
      const Tensor g = grad.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
      const acc_t* g_ptr = g.const_data_ptr<acc_t>();
      std::vector<double> partials(need_beta ? data.job.items() * K : 0, 0.0);
      std::vector<scalar_t*> dst = pointers<scalar_t>(grad_features);
      scalar_t* ds = grad_student.defined() ? grad_student.mutable_data_ptr<scalar_t>() : nullptr;
      const scalar_t* s = batch.student.const_data_ptr<scalar_t>();
      parallel_items(data.job, [&](int64_t b, int64_t e) {
        kernels<scalar_t>().partial_l2_backward(data.job, s, g_ptr, ds, or_null(dst),
                                                need_beta ? partials.data() : nullptr, b, e);
      });
      if (need_beta) {
        // dL/dalpha_j = sum_b g_b <dloss_b/dt, sigma_j(T_j)> = -sum_b g_b <e_b, sigma_j(T_j)>
        const std::vector<double> per_sample = per_sample_sums(data.job, partials, K);
        std::vector<double> grad_alpha(K, 0.0);
        for (int64_t b = 0; b < data.job.B; ++b)
          for (int j = 0; j < K; ++j) grad_alpha[j] -= static_cast<double>(g_ptr[b]) * per_sample[b * K + j];
        grad_beta = beta_grad(data.alpha, grad_alpha, beta);
      }
    });
    return grad_beta;
  }
};

}  // namespace

DFA_REGISTER_BACKEND(CPU, CpuBackend)

}  // namespace cpu
}  // namespace dfa

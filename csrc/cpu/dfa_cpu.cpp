// CPU implementations of the DFA ops: argument checks, layout and dtype dispatch, and the
// parallel-for over fixed-size work items whose partial sums are reduced in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

#include "../common/dfa_math.h"
#include "../common/inputs.h"
#include "map_job.h"

namespace dfa {
namespace cpu {
namespace {

using at::Tensor;

// The weights and margins of one call in the accumulation type, kept alive with the job.
template <typename scalar_t>
struct JobData {
  using acc_t = acc_type<scalar_t>;
  std::vector<const scalar_t*> feature_ptrs;
  std::vector<acc_t> alpha;
  Tensor margins;  // [K, C] contiguous acc_t, or undefined
  MapJob<scalar_t> job;

  JobData(const MapBatch& batch, const Tensor& beta, const std::optional<Tensor>& margins_in) {
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

// Sums per-item partials (width doubles each) over the chunks of every sample, in chunk order.
template <typename scalar_t>
std::vector<double> per_sample_sums(const MapJob<scalar_t>& job, const std::vector<double>& partials, int width) {
  std::vector<double> sums(job.B * width, 0.0);
  const int64_t per_sample = job.chunks_per_sample();
  for (int64_t b = 0; b < job.B; ++b)
    for (int64_t c = 0; c < per_sample; ++c)
      for (int a = 0; a < width; ++a) sums[b * width + a] += partials[(b * per_sample + c) * width + a];
  return sums;
}

// dL/dbeta from dL/dalpha (double) through the softmax Jacobian, in beta's dtype.
template <typename acc_t>
Tensor beta_grad(const std::vector<acc_t>& alpha, const std::vector<double>& grad_alpha, const Tensor& beta) {
  const int K = static_cast<int>(alpha.size());
  std::vector<double> alpha_d(alpha.begin(), alpha.end()), out(K);
  math::softmax_backward(alpha_d.data(), grad_alpha.data(), out.data(), K);
  return at::tensor(out, beta.options().dtype(at::kDouble)).to(beta.scalar_type());
}

std::vector<MapOutput> feature_outputs(at::TensorList features, at::MemoryFormat format) {
  std::vector<MapOutput> outs;
  for (const auto& f : features) outs.emplace_back(f, format);
  return outs;
}

template <typename scalar_t>
std::vector<scalar_t*> work_ptrs(std::vector<MapOutput>& outs) {
  std::vector<scalar_t*> ptrs;
  for (auto& o : outs) ptrs.push_back(o.work.mutable_data_ptr<scalar_t>());
  return ptrs;
}

std::vector<Tensor> finish_all(std::vector<MapOutput>& outs) {
  std::vector<Tensor> results;
  for (auto& o : outs) results.push_back(o.finish());
  return results;
}

#define DFA_DISPATCH(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

// ---------------------------------------------------------------------------------------------
// aggregate

Tensor aggregate_cpu(at::TensorList features, const Tensor& beta, const std::optional<Tensor>& margins) {
  constexpr const char* op = "dfa::aggregate";
  const MapBatch batch = prepare_maps(op, features);
  check_beta(op, beta, batch.features.size(), features[0]);
  check_margins(op, margins, batch.features.size(), batch.C, features[0]);
  MapOutput out(features[0], batch.format);
  DFA_DISPATCH(features[0].scalar_type(), "dfa_aggregate_cpu", [&] {
    JobData<scalar_t> data(batch, beta, margins);
    scalar_t* dst = out.work.mutable_data_ptr<scalar_t>();
    parallel_items(data.job, [&](int64_t b, int64_t e) { kernels<scalar_t>().aggregate_forward(data.job, dst, b, e); });
  });
  return out.finish();
}

std::tuple<Tensor, std::vector<Tensor>> aggregate_backward_cpu(const Tensor& grad, at::TensorList features,
                                                               const Tensor& beta,
                                                               const std::optional<Tensor>& margins,
                                                               std::array<bool, 2> output_mask) {
  constexpr const char* op = "dfa::aggregate_backward";
  const MapBatch batch = prepare_maps(op, features, std::nullopt, grad);
  const int K = batch.features.size();
  check_beta(op, beta, K, features[0]);
  check_margins(op, margins, K, batch.C, features[0]);
  const auto [need_beta, need_features] = output_mask;
  Tensor grad_beta = need_beta ? Tensor() : at::empty({0}, beta.options());
  std::vector<MapOutput> feature_outs = need_features ? feature_outputs(features, batch.format) : std::vector<MapOutput>{};
  DFA_DISPATCH(features[0].scalar_type(), "dfa_aggregate_backward_cpu", [&] {
    JobData<scalar_t> data(batch, beta, margins);
    std::vector<double> partials(need_beta ? data.job.items() * K : 0, 0.0);
    std::vector<scalar_t*> dst = work_ptrs<scalar_t>(feature_outs);
    const scalar_t* g = batch.grad.const_data_ptr<scalar_t>();
    parallel_items(data.job, [&](int64_t b, int64_t e) {
      kernels<scalar_t>().aggregate_backward(data.job, g, need_features ? dst.data() : nullptr,
                                             need_beta ? partials.data() : nullptr, b, e);
    });
    if (need_beta) {
      // The beta gradient is one global dot product per map: sum the per-sample sums in order.
      const std::vector<double> per_sample = per_sample_sums(data.job, partials, K);
      std::vector<double> grad_alpha(K, 0.0);
      for (int64_t b = 0; b < data.job.B; ++b)
        for (int j = 0; j < K; ++j) grad_alpha[j] += per_sample[b * K + j];
      grad_beta = beta_grad(data.alpha, grad_alpha, beta);
    }
  });
  return {grad_beta, finish_all(feature_outs)};
}

// ---------------------------------------------------------------------------------------------
// bridge_st_loss

// stats[b] = (<s,s>, <s,T_1..K>, <A,T_1..K>): all the backward needs besides the maps themselves.
std::tuple<Tensor, Tensor> bridge_st_loss_forward_cpu(const Tensor& student, at::TensorList features,
                                                      const Tensor& beta, double eps) {
  constexpr const char* op = "dfa::bridge_st_loss";
  const MapBatch batch = prepare_maps(op, features, student);
  const int K = batch.features.size();
  check_beta(op, beta, K, features[0]);
  check_eps(op, eps);
  const auto acc_dtype = opmath_type(features[0].scalar_type());
  Tensor loss = at::empty({batch.B}, features[0].options().dtype(acc_dtype));
  Tensor stats = at::empty({batch.B, 2 * K + 1}, features[0].options().dtype(acc_dtype));
  DFA_DISPATCH(features[0].scalar_type(), "dfa_bridge_st_loss_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    JobData<scalar_t> data(batch, beta, std::nullopt);
    const int width = 2 * K + 1;
    std::vector<double> partials(data.job.items() * width, 0.0);
    const scalar_t* s = batch.student.const_data_ptr<scalar_t>();
    parallel_items(data.job, [&](int64_t b, int64_t e) { kernels<scalar_t>().bridge_forward(data.job, s, partials.data(), b, e); });
    const std::vector<double> sums = per_sample_sums(data.job, partials, width);
    acc_t* loss_ptr = loss.mutable_data_ptr<acc_t>();
    acc_t* stats_ptr = stats.mutable_data_ptr<acc_t>();
    for (int64_t b = 0; b < batch.B; ++b) {
      const double* row = &sums[b * width];
      double sa = 0, aa = 0;
      for (int j = 0; j < K; ++j) {
        sa += data.alpha[j] * row[1 + j];
        aa += data.alpha[j] * row[1 + K + j];
      }
      loss_ptr[b] = static_cast<acc_t>(math::bridge_terms(row[0], sa, aa, eps).loss);
      for (int a = 0; a < width; ++a) stats_ptr[b * width + a] = static_cast<acc_t>(row[a]);
    }
  });
  return {loss, stats};
}

std::tuple<Tensor, Tensor, std::vector<Tensor>> bridge_st_loss_backward_cpu(
    const Tensor& grad, const Tensor& student, at::TensorList features, const Tensor& beta, const Tensor& stats,
    double eps, std::array<bool, 3> output_mask) {
  constexpr const char* op = "dfa::bridge_st_loss_backward";
  const MapBatch batch = prepare_maps(op, features, student);
  const int K = batch.features.size();
  check_beta(op, beta, K, features[0]);
  check_eps(op, eps);
  check_per_sample(op, "grad", grad, {batch.B}, features[0]);
  check_per_sample(op, "stats", stats, {batch.B, 2 * K + 1}, features[0]);
  const auto [need_student, need_beta, need_features] = output_mask;
  std::optional<MapOutput> student_out;
  if (need_student) student_out.emplace(student, batch.format);
  std::vector<MapOutput> feature_outs = need_features ? feature_outputs(features, batch.format) : std::vector<MapOutput>{};
  Tensor grad_beta = at::empty({0}, beta.options());
  DFA_DISPATCH(features[0].scalar_type(), "dfa_bridge_st_loss_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    JobData<scalar_t> data(batch, beta, std::nullopt);
    const Tensor g = grad.to(at::kDouble).contiguous();
    const Tensor st = stats.to(at::kDouble).contiguous();
    const double* g_ptr = g.const_data_ptr<double>();
    const double* st_ptr = st.const_data_ptr<double>();
    std::vector<acc_t> terms(4 * batch.B);
    std::vector<double> grad_alpha(K, 0.0);
    for (int64_t b = 0; b < batch.B; ++b) {
      const double* row = st_ptr + b * (2 * K + 1);
      double sa = 0, aa = 0;
      for (int j = 0; j < K; ++j) {
        sa += data.alpha[j] * row[1 + j];
        aa += data.alpha[j] * row[1 + K + j];
      }
      const auto t = math::bridge_terms(row[0], sa, aa, eps);
      const double gb = g_ptr[b];
      terms[4 * b] = gb * t.cs;
      terms[4 * b + 1] = gb * t.ca;
      terms[4 * b + 2] = gb * t.ea;
      terms[4 * b + 3] = gb * t.es;
      // dL/dalpha_j = sum_b <dL/dA_b, T_j> = sum_b g_b (ea <A,T_j> + es <s,T_j>)
      for (int j = 0; j < K; ++j) grad_alpha[j] += gb * (t.ea * row[1 + K + j] + t.es * row[1 + j]);
    }
    if (need_beta) grad_beta = beta_grad(data.alpha, grad_alpha, beta);
    if (need_student || need_features) {
      std::vector<scalar_t*> dst = work_ptrs<scalar_t>(feature_outs);
      scalar_t* ds = need_student ? student_out->work.mutable_data_ptr<scalar_t>() : nullptr;
      const scalar_t* s = batch.student.const_data_ptr<scalar_t>();
      parallel_items(data.job, [&](int64_t b, int64_t e) {
        kernels<scalar_t>().bridge_backward(data.job, s, terms.data(), ds, need_features ? dst.data() : nullptr, b, e);
      });
    }
  });
  Tensor grad_student = need_student ? student_out->finish() : at::empty({0}, student.options());
  return {grad_student, grad_beta, finish_all(feature_outs)};
}

// ---------------------------------------------------------------------------------------------
// partial_l2

Tensor partial_l2_cpu(const Tensor& student, at::TensorList features, const Tensor& beta,
                      const std::optional<Tensor>& margins) {
  constexpr const char* op = "dfa::partial_l2";
  const MapBatch batch = prepare_maps(op, features, student);
  const int K = batch.features.size();
  check_beta(op, beta, K, features[0]);
  check_margins(op, margins, K, batch.C, features[0]);
  Tensor loss = at::empty({batch.B}, features[0].options().dtype(opmath_type(features[0].scalar_type())));
  DFA_DISPATCH(features[0].scalar_type(), "dfa_partial_l2_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    JobData<scalar_t> data(batch, beta, margins);
    std::vector<double> partials(data.job.items(), 0.0);
    const scalar_t* s = batch.student.const_data_ptr<scalar_t>();
    parallel_items(data.job, [&](int64_t b, int64_t e) { kernels<scalar_t>().partial_l2_forward(data.job, s, partials.data(), b, e); });
    const std::vector<double> sums = per_sample_sums(data.job, partials, 1);
    acc_t* loss_ptr = loss.mutable_data_ptr<acc_t>();
    for (int64_t b = 0; b < batch.B; ++b) loss_ptr[b] = static_cast<acc_t>(sums[b]);
  });
  return loss;
}

std::tuple<Tensor, Tensor, std::vector<Tensor>> partial_l2_backward_cpu(const Tensor& grad, const Tensor& student,
                                                                        at::TensorList features, const Tensor& beta,
                                                                        const std::optional<Tensor>& margins,
                                                                        std::array<bool, 3> output_mask) {
  constexpr const char* op = "dfa::partial_l2_backward";
  const MapBatch batch = prepare_maps(op, features, student);
  const int K = batch.features.size();
  check_beta(op, beta, K, features[0]);
  check_margins(op, margins, K, batch.C, features[0]);
  check_per_sample(op, "grad", grad, {batch.B}, features[0]);
  const auto [need_student, need_beta, need_features] = output_mask;
  std::optional<MapOutput> student_out;
  if (need_student) student_out.emplace(student, batch.format);
  std::vector<MapOutput> feature_outs = need_features ? feature_outputs(features, batch.format) : std::vector<MapOutput>{};
  Tensor grad_beta = at::empty({0}, beta.options());
  DFA_DISPATCH(features[0].scalar_type(), "dfa_partial_l2_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    JobData<scalar_t> data(batch, beta, margins);
    const Tensor g = grad.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* g_ptr = g.const_data_ptr<acc_t>();
    std::vector<double> partials(need_beta ? data.job.items() * K : 0, 0.0);
    std::vector<scalar_t*> dst = work_ptrs<scalar_t>(feature_outs);
    scalar_t* ds = need_student ? student_out->work.mutable_data_ptr<scalar_t>() : nullptr;
    const scalar_t* s = batch.student.const_data_ptr<scalar_t>();
    parallel_items(data.job, [&](int64_t b, int64_t e) {
      kernels<scalar_t>().partial_l2_backward(data.job, s, g_ptr, ds, need_features ? dst.data() : nullptr,
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
  Tensor grad_student = need_student ? student_out->finish() : at::empty({0}, student.options());
  return {grad_student, grad_beta, finish_all(feature_outs)};
}

}  // namespace

TORCH_LIBRARY_IMPL(dfa, CPU, m) {
  m.impl("aggregate", &aggregate_cpu);
  m.impl("aggregate_backward", &aggregate_backward_cpu);
  m.impl("bridge_st_loss_forward", &bridge_st_loss_forward_cpu);
  m.impl("bridge_st_loss_backward", &bridge_st_loss_backward_cpu);
  m.impl("partial_l2", &partial_l2_cpu);
  m.impl("partial_l2_backward", &partial_l2_backward_cpu);
}

}  // namespace cpu
}  // namespace dfa

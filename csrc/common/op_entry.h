// Device-independent entry points of the DFA ops: argument checks, output allocation (strides as
// the fake kernels promise), output masks and the copy-back of non-standard layouts.  Each device
// supplies a Backend with the six kernels below, receiving checked inputs in one common layout and
// preallocated outputs to fill:
//
//   void   aggregate_forward (const MapBatch&, beta, margins, Tensor out)
//   Tensor aggregate_backward(const MapBatch& (with grad), beta, margins, bool need_beta,
//                             std::vector<Tensor>& grad_features)            -> grad_beta or {}
//   void   bridge_forward    (const MapBatch& (with student), beta, eps, Tensor loss, Tensor stats)
//   Tensor bridge_backward   (const MapBatch&, beta, grad, stats, eps, Tensor grad_student,
//                             bool need_beta, std::vector<Tensor>& grad_features)
//   void   partial_l2_forward(const MapBatch& (with student), beta, margins, Tensor loss)
//   Tensor partial_l2_backward(const MapBatch&, beta, margins, grad, Tensor grad_student,
//                              bool need_beta, std::vector<Tensor>& grad_features)
//
// An undefined grad_student / empty grad_features means "not requested".  grad_beta comes back
// in beta's dtype.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "inputs.h"

namespace dfa {

using OptTensor = std::optional<at::Tensor>;

namespace detail {

inline std::vector<MapOutput> feature_outputs(at::TensorList features, at::MemoryFormat format, bool needed) {
  std::vector<MapOutput> outs;
  if (needed)
    for (const auto& f : features) outs.emplace_back(f, format);
  return outs;
}

inline std::vector<at::Tensor> work_of(const std::vector<MapOutput>& outs) {
  std::vector<at::Tensor> work;
  for (const auto& o : outs) work.push_back(o.work);
  return work;
}

inline std::vector<at::Tensor> finish_all(std::vector<MapOutput>& outs) {
  std::vector<at::Tensor> results;
  for (auto& o : outs) results.push_back(o.finish());
  return results;
}

inline at::Tensor or_empty(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() ? t : at::empty({0}, like.options());
}

inline at::Tensor loss_like(const MapBatch& batch, const at::Tensor& ref, int64_t width = 0) {
  const auto options = ref.options().dtype(opmath_type(ref.scalar_type()));
  return width == 0 ? at::empty({batch.B}, options) : at::empty({batch.B, width}, options);
}

}  // namespace detail

template <class Backend>
at::Tensor aggregate_entry(at::TensorList features, const at::Tensor& beta, const OptTensor& margins) {
  constexpr const char* op = "dfa::aggregate";
  const MapBatch batch = prepare_maps(op, features);
  check_beta(op, beta, batch.features.size(), features[0]);
  check_margins(op, margins, batch.features.size(), batch.C, features[0]);
  MapOutput out(features[0], batch.format);
  Backend::aggregate_forward(batch, beta, margins, out.work);
  return out.finish();
}

template <class Backend>
std::tuple<at::Tensor, std::vector<at::Tensor>> aggregate_backward_entry(const at::Tensor& grad,
                                                                         at::TensorList features,
                                                                         const at::Tensor& beta,
                                                                         const OptTensor& margins,
                                                                         std::array<bool, 2> output_mask) {
  constexpr const char* op = "dfa::aggregate_backward";
  const MapBatch batch = prepare_maps(op, features, std::nullopt, grad);
  check_beta(op, beta, batch.features.size(), features[0]);
  check_margins(op, margins, batch.features.size(), batch.C, features[0]);
  const auto [need_beta, need_features] = output_mask;
  auto feature_outs = detail::feature_outputs(features, batch.format, need_features);
  auto feature_work = detail::work_of(feature_outs);
  const at::Tensor grad_beta = Backend::aggregate_backward(batch, beta, margins, need_beta, feature_work);
  return {detail::or_empty(grad_beta, beta), detail::finish_all(feature_outs)};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> bridge_st_loss_forward_entry(const at::Tensor& student, at::TensorList features,
                                                                const at::Tensor& beta, double eps) {
  constexpr const char* op = "dfa::bridge_st_loss";
  const MapBatch batch = prepare_maps(op, features, student);
  const int64_t K = batch.features.size();
  check_beta(op, beta, K, features[0]);
  check_eps(op, eps);
  at::Tensor loss = detail::loss_like(batch, features[0]);
  at::Tensor stats = detail::loss_like(batch, features[0], 2 * K + 1);
  Backend::bridge_forward(batch, beta, eps, loss, stats);
  return {loss, stats};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> bridge_st_loss_backward_entry(
    const at::Tensor& grad, const at::Tensor& student, at::TensorList features, const at::Tensor& beta,
    const at::Tensor& stats, double eps, std::array<bool, 3> output_mask) {
  constexpr const char* op = "dfa::bridge_st_loss_backward";
  const MapBatch batch = prepare_maps(op, features, student);
  const int64_t K = batch.features.size();
  check_beta(op, beta, K, features[0]);
  check_eps(op, eps);
  check_per_sample(op, "grad", grad, {batch.B}, features[0]);
  check_per_sample(op, "stats", stats, {batch.B, 2 * K + 1}, features[0]);
  const auto [need_student, need_beta, need_features] = output_mask;
  std::optional<MapOutput> student_out;
  if (need_student) student_out.emplace(student, batch.format);
  auto feature_outs = detail::feature_outputs(features, batch.format, need_features);
  auto feature_work = detail::work_of(feature_outs);
  const at::Tensor grad_beta = Backend::bridge_backward(batch, beta, grad, stats, eps,
                                                        need_student ? student_out->work : at::Tensor(),
                                                        need_beta, feature_work);
  return {need_student ? student_out->finish() : at::empty({0}, student.options()),
          detail::or_empty(grad_beta, beta), detail::finish_all(feature_outs)};
}

template <class Backend>
at::Tensor partial_l2_entry(const at::Tensor& student, at::TensorList features, const at::Tensor& beta,
                            const OptTensor& margins) {
  constexpr const char* op = "dfa::partial_l2";
  const MapBatch batch = prepare_maps(op, features, student);
  check_beta(op, beta, batch.features.size(), features[0]);
  check_margins(op, margins, batch.features.size(), batch.C, features[0]);
  at::Tensor loss = detail::loss_like(batch, features[0]);
  Backend::partial_l2_forward(batch, beta, margins, loss);
  return loss;
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> partial_l2_backward_entry(
    const at::Tensor& grad, const at::Tensor& student, at::TensorList features, const at::Tensor& beta,
    const OptTensor& margins, std::array<bool, 3> output_mask) {
  constexpr const char* op = "dfa::partial_l2_backward";
  const MapBatch batch = prepare_maps(op, features, student);
  check_beta(op, beta, batch.features.size(), features[0]);
  check_margins(op, margins, batch.features.size(), batch.C, features[0]);
  check_per_sample(op, "grad", grad, {batch.B}, features[0]);
  const auto [need_student, need_beta, need_features] = output_mask;
  std::optional<MapOutput> student_out;
  if (need_student) student_out.emplace(student, batch.format);
  auto feature_outs = detail::feature_outputs(features, batch.format, need_features);
  auto feature_work = detail::work_of(feature_outs);
  const at::Tensor grad_beta = Backend::partial_l2_backward(batch, beta, margins, grad,
                                                            need_student ? student_out->work : at::Tensor(),
                                                            need_beta, feature_work);
  return {need_student ? student_out->finish() : at::empty({0}, student.options()),
          detail::or_empty(grad_beta, beta), detail::finish_all(feature_outs)};
}

// Registers one Backend's kernels for a dispatch key, e.g. DFA_REGISTER_BACKEND(CPU, CpuBackend).
#define DFA_REGISTER_BACKEND(KEY, BACKEND)                                          \
  TORCH_LIBRARY_IMPL(dfa, KEY, m) {                                                 \
    m.impl("aggregate", &::dfa::aggregate_entry<BACKEND>);                           \
    m.impl("aggregate_backward", &::dfa::aggregate_backward_entry<BACKEND>);         \
    m.impl("bridge_st_loss_forward", &::dfa::bridge_st_loss_forward_entry<BACKEND>); \
    m.impl("bridge_st_loss_backward", &::dfa::bridge_st_loss_backward_entry<BACKEND>); \
    m.impl("partial_l2", &::dfa::partial_l2_entry<BACKEND>);                         \
    m.impl("partial_l2_backward", &::dfa::partial_l2_backward_entry<BACKEND>);       \
  }

}  // namespace dfa

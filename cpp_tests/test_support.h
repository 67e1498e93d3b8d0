// Shared by the C++ tests: pass/fail bookkeeping, a closeness check, and the dfa:: ops called
// through the dispatcher exactly as torch.ops.dfa does.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <array>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace dfa_test {

using at::Tensor;
using at::TensorList;
using OptTensor = std::optional<Tensor>;

inline int g_passed = 0;
inline int g_failed = 0;

inline void record(bool ok, const std::string& what, const std::string& detail = "") {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::cerr << "FAIL: " << what << (detail.empty() ? "" : ": ") << detail << "\n";
  }
}

// (not CHECK: c10/util/Logging.h defines that)
#define DFA_CHECK(cond, what)                                            \
  do {                                                                   \
    record(static_cast<bool>(cond), std::string(what) + " [" #cond "]"); \
  } while (0)

// float64 throughout; the kernels reduce in a different order than ATen, hence the tolerance.
inline void check_close(const Tensor& actual, const Tensor& expected, const std::string& what, double rtol = 1e-10,
                 double atol = 1e-10) {
  if (!actual.defined() || actual.sizes() != expected.sizes()) {
    std::ostringstream os;
    os << "shape " << (actual.defined() ? actual.sizes() : c10::IntArrayRef{}) << " vs expected "
       << expected.sizes();
    record(false, what, os.str());
    return;
  }
  if (actual.scalar_type() != expected.scalar_type()) {
    std::ostringstream os;
    os << "dtype " << actual.scalar_type() << " vs expected " << expected.scalar_type();
    record(false, what, os.str());
    return;
  }
  const bool ok = at::allclose(actual, expected, rtol, atol);
  std::ostringstream os;
  if (!ok) os << "max abs diff " << (actual - expected).abs().max().item<double>();
  record(ok, what, os.str());
}

// ---- the ops, through the dispatcher ----------------------------------------------------------------

inline c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

inline Tensor dfa_aggregate(TensorList features, const Tensor& beta, const OptTensor& margins) {
  static auto h = op("dfa::aggregate").typed<Tensor(TensorList, const Tensor&, const OptTensor&)>();
  return h.call(features, beta, margins);
}

inline std::tuple<Tensor, std::vector<Tensor>> dfa_aggregate_backward(const Tensor& grad, TensorList features,
                                                               const Tensor& beta, const OptTensor& margins,
                                                               std::array<bool, 2> mask) {
  static auto h = op("dfa::aggregate_backward")
                      .typed<std::tuple<Tensor, std::vector<Tensor>>(const Tensor&, TensorList, const Tensor&,
                                                                     const OptTensor&, std::array<bool, 2>)>();
  return h.call(grad, features, beta, margins, mask);
}

inline Tensor dfa_bridge_st_loss(const Tensor& student, TensorList features, const Tensor& beta, double eps) {
  static auto h = op("dfa::bridge_st_loss").typed<Tensor(const Tensor&, TensorList, const Tensor&, double)>();
  return h.call(student, features, beta, eps);
}

inline std::tuple<Tensor, Tensor> dfa_bridge_st_loss_forward(const Tensor& student, TensorList features, const Tensor& beta,
                                                      double eps) {
  static auto h = op("dfa::bridge_st_loss_forward")
                      .typed<std::tuple<Tensor, Tensor>(const Tensor&, TensorList, const Tensor&, double)>();
  return h.call(student, features, beta, eps);
}

inline std::tuple<Tensor, Tensor, std::vector<Tensor>> dfa_bridge_st_loss_backward(const Tensor& grad, const Tensor& student,
                                                                            TensorList features, const Tensor& beta,
                                                                            const Tensor& stats, double eps,
                                                                            std::array<bool, 3> mask) {
  static auto h =
      op("dfa::bridge_st_loss_backward")
          .typed<std::tuple<Tensor, Tensor, std::vector<Tensor>>(const Tensor&, const Tensor&, TensorList,
                                                                 const Tensor&, const Tensor&, double,
                                                                 std::array<bool, 3>)>();
  return h.call(grad, student, features, beta, stats, eps, mask);
}

inline Tensor dfa_partial_l2(const Tensor& student, TensorList features, const Tensor& beta, const OptTensor& margins) {
  static auto h =
      op("dfa::partial_l2").typed<Tensor(const Tensor&, TensorList, const Tensor&, const OptTensor&)>();
  return h.call(student, features, beta, margins);
}

inline std::tuple<Tensor, Tensor, std::vector<Tensor>> dfa_partial_l2_backward(const Tensor& grad, const Tensor& student,
                                                                        TensorList features, const Tensor& beta,
                                                                        const OptTensor& margins,
                                                                        std::array<bool, 3> mask) {
  static auto h = op("dfa::partial_l2_backward")
                      .typed<std::tuple<Tensor, Tensor, std::vector<Tensor>>(
                          const Tensor&, const Tensor&, TensorList, const Tensor&, const OptTensor&,
                          std::array<bool, 3>)>();
  return h.call(grad, student, features, beta, margins, mask);
}


inline int report(const char* suite) {
  std::printf("%s: %d passed, %d failed\n", suite, g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}

}  // namespace dfa_test

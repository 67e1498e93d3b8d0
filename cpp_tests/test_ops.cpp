// C++-side test of the dfa:: CPU kernels, called through the dispatcher exactly as torch.ops.dfa
// does (no Python, no autograd registration), against an ATen composition of the formulas of
// method.md section 4 on random float64 maps, in contiguous and channels_last layouts.
//
// The backward ops are checked against autograd of the same ATen composition.  Exit code 0 only
// when every check passes; the last line is "cpp_tests: N passed, M failed".
#include "test_support.h"

#include <array>
#include <cstdio>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace {

using namespace dfa_test;

// ---- reference: method.md section 4 as ATen ops ----------------------------------------------------

// sigma_j(x) = max(x, m_j) per channel (dim 1), as where(x < m, m, x); identity without margins.
Tensor margin_relu(const Tensor& x, const Tensor& m_j) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = -1;
  const Tensor m = m_j.reshape(shape);
  return at::where(x < m, m, x);
}

Tensor ref_aggregate(TensorList features, const Tensor& beta, const OptTensor& margins) {
  const Tensor alpha = at::softmax(beta, 0);
  Tensor total;
  for (size_t j = 0; j < features.size(); ++j) {
    const Tensor f = margins ? margin_relu(features[j], (*margins)[j]) : features[j];
    const Tensor term = alpha[j] * f;
    total = total.defined() ? total + term : term;
  }
  return total;
}

Tensor ref_bridge_st_loss(const Tensor& student, TensorList features, const Tensor& beta, double eps) {
  const Tensor s = student.flatten(1);
  const Tensor a = ref_aggregate(features, beta, std::nullopt).flatten(1);
  const Tensor u = s / s.norm(2, {1}, /*keepdim=*/true).clamp_min(eps);
  const Tensor v = a / a.norm(2, {1}, /*keepdim=*/true).clamp_min(eps);
  return (u - v).pow(2).sum(1);
}

Tensor ref_partial_l2(const Tensor& student, TensorList features, const Tensor& beta, const OptTensor& margins) {
  const Tensor t = ref_aggregate(features, beta, margins);
  const Tensor mask = ((student > t) | (t > 0)).to(student.scalar_type());
  return ((student - t).pow(2) * mask).flatten(1).sum(1);
}

// ---- cases -----------------------------------------------------------------------------------------

struct Case {
  std::vector<int64_t> shape;  // [B, C, *rest]
  int64_t K;
  at::MemoryFormat format;  // of every map
  bool margins;
  std::string name() const {
    std::ostringstream os;
    os << "shape=" << c10::IntArrayRef(shape) << " K=" << K
       << (format == at::MemoryFormat::ChannelsLast ? " channels_last" : " contiguous")
       << (margins ? " margins" : "");
    return os.str();
  }
};

Tensor make_map(const Case& c) {
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  Tensor t = at::randn(c.shape, opts);
  if (c.format != at::MemoryFormat::Contiguous) t = t.contiguous(c.format);
  return t;
}

void run_case(const Case& c) {
  const std::string tag = c.name();
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  std::vector<Tensor> features;
  for (int64_t j = 0; j < c.K; ++j) features.push_back(make_map(c));
  const Tensor student = make_map(c);
  const Tensor beta = at::randn({c.K}, opts);
  // Margins around 0 so the margin ReLU is active on a good share of elements.
  const OptTensor margins = c.margins ? OptTensor(0.5 * at::randn({c.K, c.shape[1]}, opts)) : std::nullopt;
  const int64_t B = c.shape[0];
  const double eps = 1e-12;

  // Leaves for autograd of the reference; the dfa ops get plain (no-grad) tensors since their
  // autograd formulas are registered from Python only.
  std::vector<Tensor> f_leaf;
  for (const auto& f : features) f_leaf.push_back(f.detach().clone(at::MemoryFormat::Preserve).requires_grad_(true));
  const Tensor s_leaf = student.detach().clone(at::MemoryFormat::Preserve).requires_grad_(true);
  const Tensor b_leaf = beta.detach().clone().requires_grad_(true);
  auto zero_grads = [&] {
    for (auto& f : f_leaf) f.mutable_grad() = Tensor();
    s_leaf.mutable_grad() = Tensor();
    b_leaf.mutable_grad() = Tensor();
  };
  auto leaf_feature_grads = [&] {
    std::vector<Tensor> gs;
    for (auto& f : f_leaf) gs.push_back(f.grad());
    return gs;
  };

  // aggregate ------------------------------------------------------------------------------------
  {
    const Tensor out = dfa_aggregate(features, beta, margins);
    const Tensor ref = ref_aggregate(features, beta, margins);
    check_close(out, ref, "aggregate " + tag);
    DFA_CHECK(out.is_contiguous(c.format), "aggregate keeps the layout " + tag);

    const Tensor g = make_map(c);
    zero_grads();
    ref_aggregate(f_leaf, b_leaf, margins).backward(g);
    auto [gb, gf] = dfa_aggregate_backward(g, features, beta, margins, {true, true});
    check_close(gb, b_leaf.grad(), "aggregate_backward grad_beta " + tag);
    DFA_CHECK(gf.size() == features.size(), "aggregate_backward returns K feature grads " + tag);
    const auto ref_gf = leaf_feature_grads();
    for (size_t j = 0; j < gf.size() && j < ref_gf.size(); ++j)
      check_close(gf[j], ref_gf[j], "aggregate_backward grad_features[" + std::to_string(j) + "] " + tag);
    auto [gb_only, gf_none] = dfa_aggregate_backward(g, features, beta, margins, {true, false});
    check_close(gb_only, b_leaf.grad(), "aggregate_backward grad_beta only " + tag);
    DFA_CHECK(gf_none.empty() || !gf_none[0].defined() || gf_none[0].numel() == 0,
          "aggregate_backward masked-out grad_features is empty " + tag);
  }

  // bridge_st_loss (no margins in its definition) -------------------------------------------------
  if (!c.margins) {
    const Tensor loss = dfa_bridge_st_loss(student, features, beta, eps);
    const Tensor ref = ref_bridge_st_loss(student, features, beta, eps);
    check_close(loss, ref, "bridge_st_loss " + tag);

    auto [loss2, stats] = dfa_bridge_st_loss_forward(student, features, beta, eps);
    check_close(loss2, ref, "bridge_st_loss_forward loss " + tag);
    DFA_CHECK(stats.sizes() == c10::IntArrayRef({B, 2 * c.K + 1}), "bridge_st_loss_forward stats shape " + tag);

    const Tensor gl = at::randn({B}, opts);
    zero_grads();
    ref_bridge_st_loss(s_leaf, f_leaf, b_leaf, eps).backward(gl);
    auto [gs, gb, gf] = dfa_bridge_st_loss_backward(gl, student, features, beta, stats, eps, {true, true, true});
    check_close(gs, s_leaf.grad(), "bridge_st_loss_backward grad_student " + tag);
    check_close(gb, b_leaf.grad(), "bridge_st_loss_backward grad_beta " + tag);
    const auto ref_gf = leaf_feature_grads();
    DFA_CHECK(gf.size() == features.size(), "bridge_st_loss_backward returns K feature grads " + tag);
    for (size_t j = 0; j < gf.size() && j < ref_gf.size(); ++j)
      check_close(gf[j], ref_gf[j], "bridge_st_loss_backward grad_features[" + std::to_string(j) + "] " + tag);
  }

  // partial_l2 -------------------------------------------------------------------------------------
  {
    const Tensor loss = dfa_partial_l2(student, features, beta, margins);
    const Tensor ref = ref_partial_l2(student, features, beta, margins);
    check_close(loss, ref, "partial_l2 " + tag);

    const Tensor gl = at::randn({B}, opts);
    zero_grads();
    ref_partial_l2(s_leaf, f_leaf, b_leaf, margins).backward(gl);
    auto [gs, gb, gf] = dfa_partial_l2_backward(gl, student, features, beta, margins, {true, true, true});
    check_close(gs, s_leaf.grad(), "partial_l2_backward grad_student " + tag);
    check_close(gb, b_leaf.grad(), "partial_l2_backward grad_beta " + tag);
    const auto ref_gf = leaf_feature_grads();
    DFA_CHECK(gf.size() == features.size(), "partial_l2_backward returns K feature grads " + tag);
    for (size_t j = 0; j < gf.size() && j < ref_gf.size(); ++j)
      check_close(gf[j], ref_gf[j], "partial_l2_backward grad_features[" + std::to_string(j) + "] " + tag);
  }
}

// A bad argument raises c10::Error (a ValueError in Python) naming the argument.
template <typename F>
void expect_error(F&& f, const std::string& needle, const std::string& what) {
  try {
    f();
    record(false, what, "no exception thrown");
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    record(msg.find(needle) != std::string::npos, what, "message lacks \"" + needle + "\": " + msg);
  } catch (const std::exception& e) {
    record(false, what, std::string("not a c10::Error: ") + e.what());
  }
}

void run_error_checks() {
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const std::vector<Tensor> features = {at::randn({2, 3, 4, 4}, opts), at::randn({2, 3, 4, 4}, opts)};
  const Tensor student = at::randn({2, 3, 4, 4}, opts);
  const Tensor bad_beta = at::randn({3}, opts);  // K = 2
  expect_error([&] { dfa_aggregate(features, bad_beta, std::nullopt); }, "'beta'", "aggregate rejects beta of length != K");
  expect_error([&] { dfa_bridge_st_loss(student, features, bad_beta, 1e-12); }, "'beta'",
               "bridge_st_loss rejects beta of length != K");
  expect_error([&] { dfa_partial_l2(student, features, bad_beta, std::nullopt); }, "'beta'",
               "partial_l2 rejects beta of length != K");
  const Tensor beta = at::randn({2}, opts);
  expect_error([&] { dfa_aggregate(features, beta, OptTensor(at::zeros({2, 4}, opts))); }, "'margins'",
               "aggregate rejects margins of the wrong shape");
  expect_error([&] { dfa_partial_l2(at::randn({2, 3, 4, 5}, opts), features, beta, std::nullopt); }, "'student'",
               "partial_l2 rejects a student of another shape");
}

}  // namespace

int main() {
  at::manual_seed(0);
  const auto CL = at::MemoryFormat::ChannelsLast;
  const auto CF = at::MemoryFormat::Contiguous;
  const std::vector<Case> cases = {
      {{2, 3, 5, 7}, 1, CF, false},  {{2, 3, 5, 7}, 3, CF, false},  {{2, 3, 5, 7}, 3, CF, true},
      {{2, 3, 5, 7}, 3, CL, false},  {{2, 3, 5, 7}, 3, CL, true},   {{3, 4, 9}, 2, CF, true},
      {{4, 6}, 4, CF, true},
      // More than one 16384-element chunk per sample, so the per-chunk partial sums are combined.
      {{2, 8, 48, 48}, 3, CF, true}, {{2, 8, 48, 48}, 3, CL, true}, {{2, 8, 48, 48}, 2, CL, false},
  };
  for (const auto& c : cases) {
    try {
      run_case(c);
    } catch (const std::exception& e) {
      record(false, "case " + c.name(), std::string("threw: ") + e.what());
    }
  }
  try {
    run_error_checks();
  } catch (const std::exception& e) {
    record(false, "error checks", std::string("threw: ") + e.what());
  }
  return report("cpp_tests");
}

// Runs the CUDA backend (csrc/cuda/dfa_cuda.cu and its kernels, compiled for the host) on CPU
// tensors through cuda_emulation.h, and compares every op and gradient with the CPU kernels: the
// CUDA code's indexing, 16-byte vector and scalar paths, channel lookup, chunking, reductions and
// finishing kernels are checked without a GPU.  Also checks bitwise run-to-run determinism.
#include "cuda_emulation.h"  // must come first: defines the CUDA built-ins the kernels use

#include "../csrc/cuda/dfa_cuda.cu"
#include "test_support.h"

namespace {

using namespace dfa_test;
using Emulated = dfa::cuda::CudaBackend;

struct Case {
  std::vector<int64_t> shape;
  int K;
  at::ScalarType dtype;
  at::MemoryFormat format;
  bool margins;
  bool misaligned;  // maps viewed at a storage offset of one element: forces the scalar path

  std::string name() const {
    std::ostringstream os;
    os << at::IntArrayRef(shape) << " K=" << K << " " << dtype << (format == at::MemoryFormat::ChannelsLast ? " cl" : "")
       << (margins ? " margins" : "") << (misaligned ? " misaligned" : "");
    return os.str();
  }
};

Tensor make_map(const Case& c, const at::TensorOptions& opts) {
  const int64_t numel = c10::multiply_integers(c.shape);
  if (c.misaligned) return at::randn({numel + 1}, opts).narrow(0, 1, numel).view(c.shape);
  return at::randn(c.shape, opts).contiguous(c.format);
}

// float64: rounding-level agreement; float32: reductions in another order; 16-bit: rounding of
// the outputs (the two backends accumulate in float32 alike).
std::pair<double, double> tolerance(at::ScalarType t) {
  if (t == at::kDouble) return {1e-10, 1e-10};
  if (t == at::kFloat) return {1e-4, 1e-4};
  return {2e-2, 2e-2};
}

void compare(const Tensor& emu, const Tensor& cpu, const std::string& what, at::ScalarType dtype) {
  const auto [rtol, atol] = tolerance(dtype);
  check_close(emu.to(at::kDouble), cpu.to(at::kDouble), what, rtol, atol);
}

void compare_all(const std::vector<Tensor>& emu, const std::vector<Tensor>& cpu, const std::string& what,
                 at::ScalarType dtype) {
  DFA_CHECK(emu.size() == cpu.size(), what + " count");
  for (size_t j = 0; j < std::min(emu.size(), cpu.size()); ++j)
    compare(emu[j], cpu[j], what + "[" + std::to_string(j) + "]", dtype);
}

void bitwise_equal(const Tensor& a, const Tensor& b, const std::string& what) {
  DFA_CHECK(a.sizes() == b.sizes() && at::equal(a, b), what + " is bitwise reproducible");
}

void run_case(const Case& c) {
  const std::string n = c.name();
  const auto opts = at::TensorOptions().dtype(c.dtype);
  std::vector<Tensor> features;
  for (int j = 0; j < c.K; ++j) features.push_back(make_map(c, opts));
  const Tensor student = make_map(c, opts);
  const Tensor grad_map = make_map(c, opts);
  const Tensor beta = at::randn({c.K}, at::kFloat);  // float32 beta with 16-bit maps, as under autocast
  // Margins on both sides of zero, so sigma changes values and positive targets appear.
  const OptTensor margins = c.margins ? OptTensor(at::randn({c.K, c.shape[1]}, at::kFloat) * 0.5) : std::nullopt;
  const auto loss_type = c.dtype == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor grad_loss = at::rand({c.shape[0]}, loss_type);

  // aggregate
  const Tensor agg = dfa::aggregate_entry<Emulated>(features, beta, margins);
  compare(agg, dfa_aggregate(features, beta, margins), n + ": aggregate", c.dtype);
  bitwise_equal(agg, dfa::aggregate_entry<Emulated>(features, beta, margins), n + ": aggregate");
  for (std::array<bool, 2> mask : {std::array<bool, 2>{true, true}, std::array<bool, 2>{true, false}}) {
    auto [gb, gf] = dfa::aggregate_backward_entry<Emulated>(grad_map, features, beta, margins, mask);
    auto [cgb, cgf] = dfa_aggregate_backward(grad_map, features, beta, margins, mask);
    compare(gb, cgb, n + ": aggregate grad_beta", at::kFloat);
    compare_all(gf, cgf, n + ": aggregate grad_features", c.dtype);
  }

  // bridge_st_loss (no margins)
  auto [loss, stats] = dfa::bridge_st_loss_forward_entry<Emulated>(student, features, beta, 1e-12);
  auto [closs, cstats] = dfa_bridge_st_loss_forward(student, features, beta, 1e-12);
  compare(loss, closs, n + ": bridge loss", c.dtype == at::kDouble ? at::kDouble : at::kFloat);
  compare(stats, cstats, n + ": bridge stats", c.dtype == at::kDouble ? at::kDouble : at::kFloat);
  bitwise_equal(loss, std::get<0>(dfa::bridge_st_loss_forward_entry<Emulated>(student, features, beta, 1e-12)),
                n + ": bridge loss");
  for (std::array<bool, 3> mask : {std::array<bool, 3>{true, true, true}, std::array<bool, 3>{false, true, false},
                                   std::array<bool, 3>{true, false, false}}) {
    auto [gs, gb, gf] = dfa::bridge_st_loss_backward_entry<Emulated>(grad_loss, student, features, beta, cstats,
                                                                      1e-12, mask);
    auto [cgs, cgb, cgf] = dfa_bridge_st_loss_backward(grad_loss, student, features, beta, cstats, 1e-12, mask);
    compare(gs, cgs, n + ": bridge grad_student", c.dtype);
    compare(gb, cgb, n + ": bridge grad_beta", at::kFloat);
    compare_all(gf, cgf, n + ": bridge grad_features", c.dtype);
  }

  // partial_l2
  const Tensor pl = dfa::partial_l2_entry<Emulated>(student, features, beta, margins);
  compare(pl, dfa_partial_l2(student, features, beta, margins), n + ": partial_l2",
          c.dtype == at::kDouble ? at::kDouble : at::kFloat);
  bitwise_equal(pl, dfa::partial_l2_entry<Emulated>(student, features, beta, margins), n + ": partial_l2");
  for (std::array<bool, 3> mask : {std::array<bool, 3>{true, true, true}, std::array<bool, 3>{false, true, false}}) {
    auto [gs, gb, gf] = dfa::partial_l2_backward_entry<Emulated>(grad_loss, student, features, beta, margins, mask);
    auto [cgs, cgb, cgf] = dfa_partial_l2_backward(grad_loss, student, features, beta, margins, mask);
    compare(gs, cgs, n + ": partial_l2 grad_student", c.dtype);
    compare(gb, cgb, n + ": partial_l2 grad_beta", at::kFloat);
    compare_all(gf, cgf, n + ": partial_l2 grad_features", c.dtype);
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  const auto CF = at::MemoryFormat::Contiguous;
  const auto CL = at::MemoryFormat::ChannelsLast;
  // Each emulated block runs 256 host threads, so the shapes stay small; together they cover the
  // vector path of every dtype, the scalar path (odd sizes, misaligned views), channels_last,
  // 2-D maps, several 4096-element chunks per sample and a partial last chunk.
  const std::vector<Case> cases = {
      {{2, 4, 8, 8}, 3, at::kFloat, CF, true, false},     {{2, 4, 8, 8}, 3, at::kFloat, CF, false, false},
      {{2, 3, 5, 7}, 2, at::kFloat, CF, true, false},     {{2, 4, 8, 8}, 3, at::kFloat, CF, true, true},
      {{2, 6, 4, 4}, 3, at::kFloat, CL, true, false},     {{2, 3, 5, 5}, 2, at::kFloat, CL, true, false},
      {{3, 10}, 4, at::kFloat, CF, true, false},          {{2, 3, 40, 40}, 2, at::kFloat, CF, true, false},
      {{2, 4, 8, 8}, 1, at::kDouble, CF, true, false},    {{2, 3, 5, 7}, 3, at::kDouble, CF, true, false},
      {{2, 8, 4, 4}, 2, at::kBFloat16, CF, true, false},  {{2, 8, 4, 4}, 2, at::kHalf, CL, true, false},
      {{2, 3, 5, 3}, 2, at::kBFloat16, CF, false, false},
  };
  for (const auto& c : cases) {
    try {
      run_case(c);
    } catch (const std::exception& e) {
      record(false, "case " + c.name(), std::string("threw: ") + e.what());
    }
  }
  return report("cuda_emulation_tests");
}

// Runs the CUDA backend (csrc/cuda/dfa_cuda.cu and its kernels, compiled for the host) on CPU
// tensors through cuda_emulation.h, and compares every op and gradient with the CPU kernels: the
// CUDA code's indexing, 16-byte vector and scalar paths, channel lookup, chunking, reductions and
// finishing kernels are checked without a GPU, for both kernel sets (the default one and the old one
// kept for A/B runs, old/map_kernels_v1.cuh).  Also checks bitwise run-to-run determinism, the
// edge cases of the CUDA path (K = 64 maps, samples without elements, NaN inputs, too many maps)
// and the finishing reduction over more rows than it has threads.
#include "cuda_emulation.h"  // must come first: defines the CUDA built-ins the kernels use

#include "../csrc/cuda/dfa_cuda.cu"
#include "../csrc/cuda/old/map_kernels_v1.cuh"
#include "test_support.h"

#include <limits>

namespace {

using namespace dfa_test;
using New = dfa::cuda::CudaBackend<dfa::cuda::Kernels>;
using Old = dfa::cuda::CudaBackend<dfa::cuda::v1::Kernels>;

struct Case {
  std::vector<int64_t> shape;
  int K;
  at::ScalarType dtype;
  at::MemoryFormat format;
  bool margins;
  bool misaligned;  // maps viewed at a storage offset of one element: forces the scalar path
  enum class NaN { kNone, kFeature, kStudent } nan = NaN::kNone;  // one NaN element in features[1] / the student

  std::string name() const {
    std::ostringstream os;
    os << at::IntArrayRef(shape) << " K=" << K << " " << dtype << (format == at::MemoryFormat::ChannelsLast ? " cl" : "")
       << (margins ? " margins" : "") << (misaligned ? " misaligned" : "")
       << (nan == NaN::kFeature ? " nan_feature" : nan == NaN::kStudent ? " nan_student" : "");
    return os.str();
  }
};

Tensor make_map(const Case& c, const at::TensorOptions& opts) {
  const int64_t numel = c10::multiply_integers(c.shape);
  if (c.misaligned) return at::randn({numel + 1}, opts).narrow(0, 1, numel).view(c.shape);
  return at::randn(c.shape, opts).contiguous(c.format);
}

// Tolerances (python_tests/rounding.py states the same rules).  float64: the two backends reduce in
// another order, (n - 1) u sum|t| with u = 1.1e-16: 1e-10.  16-bit results: both backends round a
// float32 accumulation to the format once, so they differ by at most an ulp (2**-7 of the value for
// bfloat16, 2**-10 for float16) plus float32 rounding: 2e-2 is 2.5 ulp of bfloat16.  float32 results
// are not compared with a fixed tolerance (it would hold one CPU's rounding): see Float32Checks.
std::pair<double, double> tolerance(at::ScalarType t) {
  if (t == at::kDouble) return {1e-10, 1e-10};
  return {2e-2, 2e-2};
}

// NaN as 0, so NaN positions can be checked apart from the values.
Tensor without_nan(const Tensor& t) { return at::where(t.isnan(), at::zeros_like(t), t); }

// NaN exactly where the CPU kernels give NaN, the other values within the tolerance.
void compare(const Tensor& emu, const Tensor& cpu, const std::string& what, at::ScalarType dtype) {
  const auto [rtol, atol] = tolerance(dtype);
  if (emu.defined() && emu.sizes() == cpu.sizes())
    DFA_CHECK(at::equal(emu.isnan(), cpu.isnan()), what + ": NaN where the CPU kernels give NaN");
  check_close(without_nan(emu.to(at::kDouble)), without_nan(cpu.to(at::kDouble)), what, rtol, atol);
}

// float32 results of one case, calibrated in the same run (python_tests/rounding.py states the same
// rule): each emulated result must be as close to its float64 value (the CPU kernels on the same
// inputs in float64) as the float32 CPU kernels' result is, within kFactor, where the CPU kernels'
// error counts as at least kFloor (~sqrt(n) roundings of the largest entry for sums of n ~ 1e3 terms).  Errors are relative to a
// tensor's largest entry (rounding is relative to a sum's terms, not to an entry that cancels).
// Measured: the emulated CUDA results are 0.3x..5.4x as far as the CPU kernels'.  The negative
// control: the bound must stay below 2e-3, so that a result 1 % off fails by >= 5x (checked).
class Float32Checks {
 public:
  void add(const Tensor& emu, const Tensor& cpu, const Tensor& exact, const std::string& what) {
    if (emu.defined() && emu.sizes() == cpu.sizes())
      DFA_CHECK(at::equal(emu.isnan(), cpu.isnan()), what + ": NaN where the CPU kernels give NaN");
    DFA_CHECK(emu.defined() && emu.sizes() == cpu.sizes() && cpu.sizes() == exact.sizes() &&
                  emu.scalar_type() == cpu.scalar_type(),
              what + ": shape and dtype of the CPU kernels' result");
    if (emu.defined() && emu.sizes() == exact.sizes()) entries_.push_back({emu, cpu, exact, what});
  }
  void add_all(const std::vector<Tensor>& emu, const std::vector<Tensor>& cpu, const std::vector<Tensor>& exact,
               const std::string& what) {
    DFA_CHECK(emu.size() == cpu.size() && cpu.size() == exact.size(), what + " count");
    for (size_t j = 0; j < std::min({emu.size(), cpu.size(), exact.size()}); ++j)
      add(emu[j], cpu[j], exact[j], what + "[" + std::to_string(j) + "]");
  }
  // Checks every result added against its calibrated bound.
  void finish() const {
    for (const auto& e : entries_) {
      const double control = std::max(relative_error(e.cpu, e.exact), kFloor), bound = kFactor * control;
      record(bound < 2e-3, e.what + ": float32 control close enough to float64 for a 1 % error to show",
             "control " + std::to_string(control));
      const double error = relative_error(e.emu, e.exact);
      record(error <= bound, e.what, "error " + std::to_string(error) + " > bound " + std::to_string(bound));
    }
  }

 private:
  static constexpr double kU32 = 5.9604644775390625e-08;  // 2**-24
  static constexpr double kFactor = 30.0, kFloor = 32 * kU32;  // as rounding.py: ~sqrt(n) u for n ~ 1e3
  struct Entry {
    Tensor emu, cpu, exact;
    std::string what;
  };
  static double relative_error(const Tensor& actual, const Tensor& exact) {
    if (exact.numel() == 0) return 0.0;
    const Tensor e = without_nan(exact.to(at::kDouble));
    const double scale = std::max(e.abs().max().item<double>(), double(std::numeric_limits<float>::min()));
    return (without_nan(actual.to(at::kDouble)) - e).abs().max().item<double>() / scale;
  }
  std::vector<Entry> entries_;
};

void compare_all(const std::vector<Tensor>& emu, const std::vector<Tensor>& cpu, const std::string& what,
                 at::ScalarType dtype) {
  DFA_CHECK(emu.size() == cpu.size(), what + " count");
  for (size_t j = 0; j < std::min(emu.size(), cpu.size()); ++j)
    compare(emu[j], cpu[j], what + "[" + std::to_string(j) + "]", dtype);
}

void bitwise_equal(const Tensor& a, const Tensor& b, const std::string& what) {
  DFA_CHECK(a.sizes() == b.sizes() && at::equal(a.isnan(), b.isnan()) && at::equal(without_nan(a), without_nan(b)),
            what + " is bitwise reproducible");
}

// A NaN at the middle element of the last sample (works on views: writes through to the storage).
void poison(const Tensor& t) {
  if (t.numel() == 0) return;
  Tensor e = t.select(0, t.size(0) - 1);
  while (e.dim() > 0) e = e.select(0, e.size(0) / 2);
  e.fill_(std::numeric_limits<double>::quiet_NaN());
}

template <class Emulated>
void run_case(const Case& c, const std::string& set) {
  const std::string n = set + " " + c.name();
  const auto opts = at::TensorOptions().dtype(c.dtype);
  std::vector<Tensor> features;
  for (int j = 0; j < c.K; ++j) features.push_back(make_map(c, opts));
  const Tensor student = make_map(c, opts);
  const Tensor grad_map = make_map(c, opts);
  if (c.nan == Case::NaN::kFeature) poison(features[1]);
  if (c.nan == Case::NaN::kStudent) poison(student);
  // Run-to-run repeats and the partial output masks only for small K: every emulated finishing
  // block costs 128 host threads, and with K = 64 the bridge's column sums alone are 129 such
  // blocks per sample, the beta gradient's 64 per call.  Neither determinism nor the masks depend on K.
  const bool full = c.K <= 8;
  const Tensor beta = at::randn({c.K}, at::kFloat);  // float32 beta with 16-bit maps, as under autocast
  // Margins on both sides of zero, so sigma changes values and positive targets appear.
  const OptTensor margins = c.margins ? OptTensor(at::randn({c.K, c.shape[1]}, at::kFloat) * 0.5) : std::nullopt;
  const auto loss_type = c.dtype == at::kDouble ? at::kDouble : at::kFloat;  // and the beta gradient's dtype
  const Tensor grad_loss = at::rand({c.shape[0]}, loss_type);
  // The same inputs in float64 (exact): the CPU kernels on them give the values float32 results
  // are calibrated against (Float32Checks).
  const auto up = [](const Tensor& t) { return t.to(at::kDouble); };
  std::vector<Tensor> features64;
  for (const auto& f : features) features64.push_back(up(f));
  const Tensor student64 = up(student), grad_map64 = up(grad_map), beta64 = up(beta), grad_loss64 = up(grad_loss);
  const OptTensor margins64 = margins ? OptTensor(up(*margins)) : std::nullopt;
  Float32Checks float32;
  // A result of dtype `dtype`: float32 ones calibrated, the others within tolerance(dtype).
  const auto check = [&](const Tensor& emu, const Tensor& cpu, const Tensor& exact, const std::string& what,
                         at::ScalarType dtype) {
    if (dtype == at::kFloat)
      float32.add(emu, cpu, exact, what);
    else
      compare(emu, cpu, what, dtype);
  };
  const auto check_all = [&](const std::vector<Tensor>& emu, const std::vector<Tensor>& cpu,
                             const std::vector<Tensor>& exact, const std::string& what, at::ScalarType dtype) {
    if (dtype == at::kFloat)
      float32.add_all(emu, cpu, exact, what);
    else
      compare_all(emu, cpu, what, dtype);
  };

  // aggregate
  const Tensor agg = dfa::aggregate_entry<Emulated>(features, beta, margins);
  check(agg, dfa_aggregate(features, beta, margins), dfa_aggregate(features64, beta64, margins64),
        n + ": aggregate", c.dtype);
  if (full) bitwise_equal(agg, dfa::aggregate_entry<Emulated>(features, beta, margins), n + ": aggregate");
  std::vector<std::array<bool, 2>> aggregate_masks = {{true, true}};
  if (full) aggregate_masks.push_back({true, false});
  for (const auto& mask : aggregate_masks) {
    auto [gb, gf] = dfa::aggregate_backward_entry<Emulated>(grad_map, features, beta, margins, mask);
    auto [cgb, cgf] = dfa_aggregate_backward(grad_map, features, beta, margins, mask);
    auto [xgb, xgf] = dfa_aggregate_backward(grad_map64, features64, beta64, margins64, mask);
    check(gb, cgb, xgb, n + ": aggregate grad_beta", loss_type);
    check_all(gf, cgf, xgf, n + ": aggregate grad_features", c.dtype);
  }

  // bridge_st_loss (no margins)
  auto [loss, stats] = dfa::bridge_st_loss_forward_entry<Emulated>(student, features, beta, 1e-12);
  auto [closs, cstats] = dfa_bridge_st_loss_forward(student, features, beta, 1e-12);
  auto [xloss, xstats] = dfa_bridge_st_loss_forward(student64, features64, beta64, 1e-12);
  check(loss, closs, xloss, n + ": bridge loss", loss_type);
  check(stats, cstats, xstats, n + ": bridge stats", loss_type);
  if (full)
    bitwise_equal(loss, std::get<0>(dfa::bridge_st_loss_forward_entry<Emulated>(student, features, beta, 1e-12)),
                  n + ": bridge loss");
  std::vector<std::array<bool, 3>> bridge_masks = {{true, true, true}};
  if (full) bridge_masks.insert(bridge_masks.end(), {{false, true, false}, {true, false, false}});
  for (const auto& mask : bridge_masks) {
    auto [gs, gb, gf] = dfa::bridge_st_loss_backward_entry<Emulated>(grad_loss, student, features, beta, cstats,
                                                                      1e-12, mask);
    auto [cgs, cgb, cgf] = dfa_bridge_st_loss_backward(grad_loss, student, features, beta, cstats, 1e-12, mask);
    auto [xgs, xgb, xgf] = dfa_bridge_st_loss_backward(grad_loss64, student64, features64, beta64, xstats, 1e-12,
                                                       mask);
    check(gs, cgs, xgs, n + ": bridge grad_student", c.dtype);
    check(gb, cgb, xgb, n + ": bridge grad_beta", loss_type);
    check_all(gf, cgf, xgf, n + ": bridge grad_features", c.dtype);
  }

  // partial_l2
  const Tensor pl = dfa::partial_l2_entry<Emulated>(student, features, beta, margins);
  check(pl, dfa_partial_l2(student, features, beta, margins), dfa_partial_l2(student64, features64, beta64, margins64),
        n + ": partial_l2", loss_type);
  if (full) bitwise_equal(pl, dfa::partial_l2_entry<Emulated>(student, features, beta, margins), n + ": partial_l2");
  std::vector<std::array<bool, 3>> partial_l2_masks = {{true, true, true}};
  if (full) partial_l2_masks.push_back({false, true, false});
  for (const auto& mask : partial_l2_masks) {
    auto [gs, gb, gf] = dfa::partial_l2_backward_entry<Emulated>(grad_loss, student, features, beta, margins, mask);
    auto [cgs, cgb, cgf] = dfa_partial_l2_backward(grad_loss, student, features, beta, margins, mask);
    auto [xgs, xgb, xgf] = dfa_partial_l2_backward(grad_loss64, student64, features64, beta64, margins64, mask);
    check(gs, cgs, xgs, n + ": partial_l2 grad_student", c.dtype);
    check(gb, cgb, xgb, n + ": partial_l2 grad_beta", loss_type);
    check_all(gf, cgf, xgf, n + ": partial_l2 grad_features", c.dtype);
  }
  float32.finish();
}

// K = 65 maps: every CUDA entry point raises the ValueError naming the 64-map limit (its map
// pointers are passed to the kernels by value), before any kernel runs.
template <class Emulated>
void check_too_many_maps() {
  const int K = dfa::cuda::kMaxK + 1;
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  std::vector<Tensor> features;
  for (int j = 0; j < K; ++j) features.push_back(at::randn({2, 3, 4}, opts));
  const Tensor student = at::randn({2, 3, 4}, opts), grad_map = at::randn({2, 3, 4}, opts);
  const Tensor beta = at::randn({K}, opts), grad_loss = at::rand({2}, opts), stats = at::rand({2, 2 * K + 1}, opts);
  const OptTensor margins = at::randn({K, 3}, opts);
  const std::vector<std::pair<std::string, std::function<void()>>> calls = {
      {"aggregate", [&] { dfa::aggregate_entry<Emulated>(features, beta, margins); }},
      {"aggregate_backward",
       [&] { dfa::aggregate_backward_entry<Emulated>(grad_map, features, beta, margins, {true, true}); }},
      {"bridge_st_loss_forward", [&] { dfa::bridge_st_loss_forward_entry<Emulated>(student, features, beta, 1e-12); }},
      {"bridge_st_loss_backward",
       [&] {
         dfa::bridge_st_loss_backward_entry<Emulated>(grad_loss, student, features, beta, stats, 1e-12,
                                                      {true, true, true});
       }},
      {"partial_l2", [&] { dfa::partial_l2_entry<Emulated>(student, features, beta, margins); }},
      {"partial_l2_backward",
       [&] { dfa::partial_l2_backward_entry<Emulated>(grad_loss, student, features, beta, margins, {true, true, true}); }},
  };
  for (const auto& [op_name, call] : calls) {
    std::string message = "(no exception)";
    try {
      call();
    } catch (const c10::ValueError& e) {
      message = e.what();
    } catch (const std::exception& e) {
      message = std::string("not a ValueError: ") + e.what();
    }
    record(message.find("at most 64 feature maps per call, got 65") != std::string::npos,
           op_name + " with K = 65 raises the 64-map ValueError", message.substr(0, 200));
  }
}

// A kernel set's finishing reduction over more rows than a block has threads (the default set then
// also sums several splits per segment), with a row weight per period of rows and a sign: the
// partial_l2 beta gradient over B x chunks blocks.  Compared with the same sums in float64 on the host.
template <class Kernels>
void check_column_sums_over_many_rows(const std::string& set) {
  for (const int width : {1, 3, 17}) {
    const int64_t segments = 2, rows = 5000 + 7 * width, period = 3;
    const Tensor x = at::randn({segments * rows, width}, at::kFloat);
    const Tensor w = at::randn({(segments * rows + period - 1) / period}, at::kFloat);
    Tensor out = at::empty({segments, width}, at::kDouble);
    Tensor scratch = at::empty({Kernels::column_sums_scratch(segments, rows, width)}, at::kDouble);
    Kernels::column_sums(nullptr, x.const_data_ptr<float>(), segments, rows, width, w.const_data_ptr<float>(), period,
                         -1.0, out.mutable_data_ptr<double>(), scratch.mutable_data_ptr<double>());
    const Tensor row_w = w.to(at::kDouble).repeat_interleave(period).narrow(0, 0, segments * rows).unsqueeze(1);
    const Tensor expected = -(x.to(at::kDouble) * row_w).view({segments, rows, width}).sum(1);
    check_close(out, expected, set + " column sums over " + std::to_string(rows) + " rows, width " +
                std::to_string(width), 1e-12, 1e-12);
  }
}

// bridge_st_loss's beta gradient alone (no map kernels) for B = 300 samples: the per-sample
// finishing kernel runs 3 blocks (the last one partly past B) and the column sums 300 rows.
template <class Emulated>
void check_bridge_beta_grad_many_samples() {
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const int K = 5;
  std::vector<Tensor> features;
  for (int j = 0; j < K; ++j) features.push_back(at::randn({300, 2, 4}, opts));
  const Tensor student = at::randn({300, 2, 4}, opts), beta = at::randn({K}, opts), grad_loss = at::rand({300}, opts);
  const Tensor stats = std::get<1>(dfa_bridge_st_loss_forward(student, features, beta, 1e-12));
  auto [gs, gb, gf] = dfa::bridge_st_loss_backward_entry<Emulated>(grad_loss, student, features, beta, stats, 1e-12,
                                                                    {false, true, false});
  auto [cgs, cgb, cgf] = dfa_bridge_st_loss_backward(grad_loss, student, features, beta, stats, 1e-12,
                                                     {false, true, false});
  std::vector<Tensor> features64;
  for (const auto& f : features) features64.push_back(f.to(at::kDouble));
  const Tensor student64 = student.to(at::kDouble), beta64 = beta.to(at::kDouble);
  const Tensor stats64 = std::get<1>(dfa_bridge_st_loss_forward(student64, features64, beta64, 1e-12));
  auto [xgs, xgb, xgf] = dfa_bridge_st_loss_backward(grad_loss.to(at::kDouble), student64, features64, beta64,
                                                     stats64, 1e-12, {false, true, false});
  Float32Checks float32;
  float32.add(gb, cgb, xgb, "B=300: bridge grad_beta");
  float32.finish();
  DFA_CHECK(gs.numel() == 0 && gf.empty(), "B=300: bridge gradients not asked for are empty");
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
      // The default set's margin layouts: channels_last with C % VEC == 0 (a vector of margins per
      // vector), NCHW whose inner size is not a multiple of VEC (the scalar path), and a 16-bit sample
      // of two 8192-element chunks, the second one ragged.
      {{2, 8, 4, 4}, 3, at::kFloat, CL, true, false},     {{2, 4, 3, 3}, 2, at::kFloat, CF, true, false},
      {{1, 4, 48, 48}, 2, at::kBFloat16, CF, true, false},
      // The most maps per call (kMaxK sizes the map pointers of MapArgs / MapOutPtrs, alpha in shared
      // memory, the bridge's 2K + 1 = 129 per-warp sums and the finishing kernels' K-sized arrays).
      // The kernels have no other path that depends on K (each loops over j < K), so no K between
      // 5 and 63; one sample, as the finishing kernels alone run 129 + 3 x 64 emulated blocks.
      {{1, 4, 3, 4}, 64, at::kFloat, CL, true, false},
      // Samples without elements (no blocks at all) in a non-empty batch: N = 0 and C = 0.
      {{2, 3, 0, 4}, 3, at::kFloat, CF, true, false},     {{2, 0, 4, 4}, 3, at::kDouble, CF, true, false},
      {{2, 0}, 2, at::kFloat, CF, false, false},
      // One NaN in a map (through the margin ReLU) or in the student (through the partial-L2 mask;
      // scalar path): NaN exactly where the CPU kernels give NaN, the same values elsewhere.
      {{2, 4, 8, 8}, 3, at::kFloat, CF, true, false, Case::NaN::kFeature},
      {{2, 6, 4, 4}, 2, at::kDouble, CF, true, true, Case::NaN::kStudent},
  };
  for (const auto& c : cases) {
    try {
      run_case<New>(c, "new");
      run_case<Old>(c, "old");
    } catch (const std::exception& e) {
      record(false, "case " + c.name(), std::string("threw: ") + e.what());
    }
  }
  const std::vector<std::pair<std::string, void (*)()>> checks = {
      {"new too many maps", check_too_many_maps<New>},
      {"old too many maps", check_too_many_maps<Old>},
      {"new column sums", [] { check_column_sums_over_many_rows<dfa::cuda::Kernels>("new"); }},
      {"old column sums", [] { check_column_sums_over_many_rows<dfa::cuda::v1::Kernels>("old"); }},
      {"new bridge beta grad", check_bridge_beta_grad_many_samples<New>},
      {"old bridge beta grad", check_bridge_beta_grad_many_samples<Old>},
  };
  for (const auto& [name, check] : checks) {
    try {
      check();
    } catch (const std::exception& e) {
      record(false, "check " + name, std::string("threw: ") + e.what());
    }
  }
  return report("cuda_emulation_tests");
}

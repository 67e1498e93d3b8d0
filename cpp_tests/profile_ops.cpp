// Runs one dfa:: CPU op repeatedly on random maps, for profilers (perf, callgrind):
//   dfa_profile_ops OP [B C H W K] [repeats] [dtype]      OP: aggregate | aggregate_backward |
//   bridge_forward | bridge_backward | partial_l2 | partial_l2_backward | all (each once);  dtype: float32 (default)
//   | bfloat16 | float16 | float64
// e.g. valgrind --tool=callgrind --toggle-collect='*isa_avx2*' build/cmake/dfa_profile_ops bridge_forward
#include <cstdlib>
#include <cstring>

#include "test_support.h"

using namespace dfa_test;

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s OP [B C H W K] [repeats]\n", argv[0]);
    return 2;
  }
  const std::string name = argv[1];
  const auto arg = [&](int i, int64_t fallback) { return argc > i ? std::atoll(argv[i]) : fallback; };
  const int64_t B = arg(2, 64), C = arg(3, 64), H = arg(4, 16), W = arg(5, 16), K = arg(6, 6), repeats = arg(7, 10);
  const std::string dtype_name = argc > 8 ? argv[8] : "float32";
  const at::ScalarType dtype = dtype_name == "bfloat16" ? at::kBFloat16
                               : dtype_name == "float16" ? at::kHalf
                               : dtype_name == "float64" ? at::kDouble
                                                         : at::kFloat;
  at::manual_seed(0);
  std::vector<Tensor> features;
  for (int64_t j = 0; j < K; ++j) features.push_back(at::randn({B, C, H, W}).to(dtype));
  const Tensor student = at::randn({B, C, H, W}).to(dtype), grad_map = at::randn({B, C, H, W}).to(dtype);
  const Tensor beta = at::randn({K}), margins = -at::rand({K, C}), grad_loss = at::rand({B});
  const Tensor stats = std::get<1>(dfa_bridge_st_loss_forward(student, features, beta, 1e-12));
  const auto run = [&](const std::string& op) {
    if (op == "aggregate") dfa_aggregate(features, beta, margins);
    else if (op == "aggregate_backward") dfa_aggregate_backward(grad_map, features, beta, margins, {true, false});
    else if (op == "bridge_forward") dfa_bridge_st_loss_forward(student, features, beta, 1e-12);
    else if (op == "bridge_backward") dfa_bridge_st_loss_backward(grad_loss, student, features, beta, stats, 1e-12, {true, true, false});
    else if (op == "partial_l2") dfa_partial_l2(student, features, beta, margins);
    else if (op == "partial_l2_backward") dfa_partial_l2_backward(grad_loss, student, features, beta, margins, {true, true, false});
    else return false;
    return true;
  };
  const std::vector<std::string> all = {"aggregate",  "aggregate_backward", "bridge_forward",
                                        "bridge_backward", "partial_l2", "partial_l2_backward"};
  for (int64_t r = 0; r < repeats; ++r) {
    for (const auto& op : name == "all" ? all : std::vector<std::string>{name}) {
      if (!run(op)) {
        std::fprintf(stderr, "unknown op '%s'\n", op.c_str());
        return 2;
      }
    }
  }
  return 0;
}

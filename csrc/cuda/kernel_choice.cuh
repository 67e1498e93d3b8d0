// Which CUDA kernel set runs: the default one (map_kernels.cuh), or, in a build with
// DFA_CUDA_OLD_KERNELS=1, the set before issue 25 (old/), so that one GPU run can time both on the
// same inputs.  The choice starts from the environment variable DFA_CUDA_KERNELS (new|old, read at
// the first CUDA op call) and can be changed at any time with torch.ops.dfa.cuda_kernels("old"),
// which also reports it: torch.ops.dfa.cuda_kernels() -> "new" or "old".
#pragma once

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <utility>

namespace dfa {
namespace cuda {

#ifdef DFA_CUDA_OLD_KERNELS
constexpr bool kOldKernelsBuilt = true;
#else
constexpr bool kOldKernelsBuilt = false;
#endif

// true for "old", false for "new"; anything else, or "old" in a build without them, is refused.
inline bool parse_kernel_set(const std::string& name, const char* source) {
  TORCH_CHECK_VALUE(name == "new" || name == "old", "dfa: ", source, " must be 'new' or 'old', got '", name, "'");
  TORCH_CHECK_VALUE(name == "new" || kOldKernelsBuilt, "dfa: ", source,
                    "='old' needs the old CUDA kernels, which this build does not have: rebuild with "
                    "DFA_CUDA_OLD_KERNELS=1 (see bench/gpu_check.sh)");
  return name == "old";
}

inline std::atomic<bool>& old_kernels_selected() {
  static std::atomic<bool> selected{[] {
    const char* env = std::getenv("DFA_CUDA_KERNELS");
    return env != nullptr && *env != '\0' && parse_kernel_set(env, "DFA_CUDA_KERNELS");
  }()};
  return selected;
}

// torch.ops.dfa.cuda_kernels(select=""): selects "new" or "old" when given; returns the set in use.
inline std::string cuda_kernels(c10::string_view select) {
  if (!select.empty()) old_kernels_selected() = parse_kernel_set(std::string(select), "cuda_kernels");
  return old_kernels_selected() ? "old" : "new";
}

// A backend that sends each call to New or Old as selected at that moment.
template <class New, class Old>
struct SwitchedBackend {
#define DFA_SWITCHED(op)                                                                                 \
  template <typename... Args>                                                                            \
  static auto op(Args&&... args) {                                                                       \
    return old_kernels_selected() ? Old::op(std::forward<Args>(args)...) : New::op(std::forward<Args>(args)...); \
  }
  DFA_SWITCHED(aggregate_forward)
  DFA_SWITCHED(aggregate_backward)
  DFA_SWITCHED(bridge_forward)
  DFA_SWITCHED(bridge_backward)
  DFA_SWITCHED(partial_l2_forward)
  DFA_SWITCHED(partial_l2_backward)
#undef DFA_SWITCHED
};

}  // namespace cuda
}  // namespace dfa

#include "map_job.h"

#include <ATen/Version.h>
#include <torch/library.h>

#include <string>

namespace dfa {
namespace cpu {

namespace {

// The AVX2 kernels run when the CPU has AVX2 + FMA *and* ATen runs its own vectorised kernels:
// ATEN_CPU_CAPABILITY=default (ATen's baseline kernels, as on a CPU without AVX2) selects the
// baseline build here too, so one machine can run, and test, what a lesser CPU runs.
bool use_avx2() {
  static const bool use = isa_avx2::supported() && at::get_cpu_capability() != "DEFAULT";
  return use;
}

std::string cpu_kernel_isa() { return use_avx2() ? "avx2" : "default"; }

}  // namespace

template <typename scalar_t>
const KernelTable<scalar_t>& kernels() {
  static const KernelTable<scalar_t> table =
      use_avx2() ? isa_avx2::make_table<scalar_t>() : isa_default::make_table<scalar_t>();
  return table;
}

template const KernelTable<float>& kernels<float>();
template const KernelTable<double>& kernels<double>();
template const KernelTable<c10::Half>& kernels<c10::Half>();
template const KernelTable<c10::BFloat16>& kernels<c10::BFloat16>();

}  // namespace cpu
}  // namespace dfa

// torch.ops.dfa.cpu_kernel_isa(): which build of the CPU kernels this process runs ("avx2" or
// "default"); dfa_ext.kernels() reports it.
TORCH_LIBRARY_FRAGMENT(dfa, m) {
  m.def("cpu_kernel_isa() -> str", &dfa::cpu::cpu_kernel_isa);
}

#include "map_job.h"

namespace dfa {
namespace cpu {

template <typename scalar_t>
const KernelTable<scalar_t>& kernels() {
  static const KernelTable<scalar_t> table =
      isa_avx2::supported() ? isa_avx2::make_table<scalar_t>() : isa_default::make_table<scalar_t>();
  return table;
}

template const KernelTable<float>& kernels<float>();
template const KernelTable<double>& kernels<double>();
template const KernelTable<c10::Half>& kernels<c10::Half>();
template const KernelTable<c10::BFloat16>& kernels<c10::BFloat16>();

}  // namespace cpu
}  // namespace dfa

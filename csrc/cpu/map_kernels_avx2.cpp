// The DFA CPU kernels compiled for AVX2 + FMA, chosen at run time when the CPU has them, so one
// binary is both portable and vectorised 8 floats wide.
// Everything shared with the baseline build is included before the target pragma, so no inline
// function outside this file is ever compiled for AVX2 (that could leak into baseline code).
#include "../common/dfa_math.h"
#include "map_job.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>  // declared for every target; callable from the AVX2 code below

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define DFA_CPU_ISA isa_avx2
#define DFA_CPU_AVX2 1  // the #pragma target does not define __AVX2__
#include "map_kernels.h"
#pragma GCC pop_options

namespace dfa::cpu::isa_avx2 {
bool supported() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
}  // namespace dfa::cpu::isa_avx2

#else  // other compilers / architectures: only the baseline build exists
namespace dfa::cpu::isa_avx2 {
bool supported() { return false; }
template <typename scalar_t>
KernelTable<scalar_t> make_table() { return isa_default::make_table<scalar_t>(); }
template KernelTable<float> make_table<float>();
template KernelTable<double> make_table<double>();
template KernelTable<c10::Half> make_table<c10::Half>();
template KernelTable<c10::BFloat16> make_table<c10::BFloat16>();
}  // namespace dfa::cpu::isa_avx2
#endif

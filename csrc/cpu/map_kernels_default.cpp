// The DFA CPU kernels for the baseline instruction set of the build target.
#define DFA_CPU_ISA isa_default
#include "map_kernels.h"

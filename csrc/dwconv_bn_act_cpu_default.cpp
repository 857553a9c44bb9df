// The CPU kernels at the baseline ISA (any x86-64, or any other architecture).
#include "dwconv_bn_act_cpu.h"

#define FASTDW_CPU_NS isa_default
#include "dwconv_bn_act_cpu_kernels.inc"

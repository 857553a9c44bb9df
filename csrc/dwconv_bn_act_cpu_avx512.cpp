// The CPU kernels for x86-64-v4 (AVX-512 F, BW, DQ, VL): picked at run time when the processor
// has them (dwconv_bn_act_cpu.cpp). Only the kernels are under the target pragma.
#include "dwconv_bn_act_cpu.h"

#if FASTDW_CPU_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define FASTDW_CPU_NS isa_avx512
#include "dwconv_bn_act_cpu_kernels.inc"
#pragma GCC pop_options
#endif

// The CPU kernels for x86-64-v3 (AVX2, FMA, F16C, BMI2): picked at run time when the processor
// has them (dwconv_bn_act_cpu.cpp). Only the kernels are under the target pragma.
#include "dwconv_bn_act_cpu.h"

#if FASTDW_CPU_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define FASTDW_CPU_NS isa_avx2
#include "dwconv_bn_act_cpu_kernels.inc"
#pragma GCC pop_options
#endif

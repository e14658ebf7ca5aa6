// AVX-512F instantiation of the CPU kernel; this TU alone is compiled with -mavx512f (build.py
// picks flags by the file suffix) and only runs after the dispatcher saw avx512f at run time.
#if defined(__x86_64__) || defined(_M_X64)
#define FLASH_EXPORT_ISA_NAMESPACE avx512
#include "flash_attention_cpu_avx512_vec.h"
#include "flash_attention_cpu_kernel.h"

namespace flash_export {
namespace cpu {

Kernel kernel_avx512() {
  return Kernel{Isa::kAvx512,      avx512::V::kW, 96,      &avx512::pack_rows,
                &avx512::run_item, nullptr,       nullptr, &avx512::run_rows};
}

}  // namespace cpu
}  // namespace flash_export
#endif

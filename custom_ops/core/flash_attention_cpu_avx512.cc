// AVX-512F instantiation of the CPU kernel; this TU alone is compiled with -mavx512f (build.py
// picks flags by the file suffix) and only runs after the dispatcher saw avx512f at run time.
#if defined(__x86_64__) || defined(_M_X64)
// GCC 12's intrinsics headers initialise "undefined" vectors from themselves, which trips
// -W(maybe-)uninitialized once inlined (GCC bug 105593); nothing in this file is uninitialised.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include <cstdint>

#include "flash_attention_cpu_internal.h"

namespace flash_export {
namespace cpu {
namespace avx512 {
namespace {

#include "flash_attention_cpu_avx512_vec.h"  // NOLINT(build/include): V, inside this namespace

}  // namespace
}  // namespace avx512
}  // namespace cpu
}  // namespace flash_export

#define FLASH_EXPORT_ISA_NAMESPACE avx512
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

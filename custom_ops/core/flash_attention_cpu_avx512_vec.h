// The AVX-512F vector abstraction `V` of the CPU kernel (flash_attention_cpu_kernel.h), shared by
// the TUs compiled with AVX-512 flags (flash_attention_cpu_avx512.cc, flash_attention_cpu_amx.cc).
// Each defines FLASH_EXPORT_ISA_NAMESPACE first and gets its own copy, in that namespace's
// anonymous namespace (internal linkage: see flash_attention_cpu_kernel.h).
#ifndef FLASH_EXPORT_CORE_FLASH_ATTENTION_CPU_AVX512_VEC_H_
#define FLASH_EXPORT_CORE_FLASH_ATTENTION_CPU_AVX512_VEC_H_

#ifndef FLASH_EXPORT_ISA_NAMESPACE
#error "define FLASH_EXPORT_ISA_NAMESPACE before including flash_attention_cpu_avx512_vec.h"
#endif

// GCC 12's intrinsics headers initialise "undefined" vectors from themselves, which trips
// -W(maybe-)uninitialized once inlined (GCC bug 105593); nothing in these TUs is uninitialised.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include <cstdint>

#include "flash_attention_cpu_internal.h"

namespace flash_export {
namespace cpu {
namespace FLASH_EXPORT_ISA_NAMESPACE {
namespace {

struct V {
  using Reg = __m512;
  static constexpr int kW = 16;
  static constexpr int kSR = 8, kSC = 3;  // 24 accumulators of 32 registers
  static constexpr int kOR = 6, kOC = 4;
  static Reg zero() { return _mm512_setzero_ps(); }
  static Reg set1(float x) { return _mm512_set1_ps(x); }
  static Reg load(const float* p) { return _mm512_loadu_ps(p); }
  static Reg loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, Reg x) { _mm512_storeu_ps(p, x); }
  static void storeu(float* p, Reg x) { _mm512_storeu_ps(p, x); }
  static Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
  static Reg sub(Reg a, Reg b) { return _mm512_sub_ps(a, b); }
  static Reg mul(Reg a, Reg b) { return _mm512_mul_ps(a, b); }
  static Reg div(Reg a, Reg b) { return _mm512_div_ps(a, b); }
  static float reduce_add(Reg a) { return _mm512_reduce_add_ps(a); }
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static Reg max(Reg a, Reg b) { return _mm512_max_ps(a, b); }
  static Reg zero_where_equal(Reg a, Reg b) {
    return _mm512_mask_mov_ps(a, _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ), _mm512_setzero_ps());
  }
  // 2^x: degree-6 polynomial on the fraction (minimax for relative error, 1e-7 in float32, as the
  // degree-7 one it replaced), scalef for the exponent. x < -126 (-inf included, whose fraction is
  // NaN) gives exactly 0; a NaN x stays NaN (the unordered compare keeps it).
  static Reg exp2(Reg x) {
    const Reg n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const Reg f = _mm512_sub_ps(x, n);
    Reg p = _mm512_set1_ps(1.5345794998021224e-04f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3399931626711912e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618489025058387e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550328776051091e-02f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022646889961946e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472057376166e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000000005542629f));
    const Reg r = _mm512_scalef_ps(p, n);
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ), r);
  }
  static Reg load_half(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static void store_half(uint16_t* p, Reg x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

}  // namespace
}  // namespace FLASH_EXPORT_ISA_NAMESPACE
}  // namespace cpu
}  // namespace flash_export

#endif  // FLASH_EXPORT_CORE_FLASH_ATTENTION_CPU_AVX512_VEC_H_

// AVX2+FMA+F16C instantiation of the CPU kernel; this TU alone is compiled with -mavx2 -mfma
// -mf16c (build.py picks flags by the file suffix) and only runs after the dispatcher saw those
// features at run time.
#if defined(__x86_64__) || defined(_M_X64)
// GCC 12's intrinsics headers initialise "undefined" vectors from themselves, which trips
// -Wmaybe-uninitialized once inlined (GCC bug 105593); nothing in this file is uninitialised.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <cstdint>

#include "flash_attention_cpu_internal.h"

namespace flash_export {
namespace cpu {
namespace avx2 {
namespace {

struct V {
  using Reg = __m256;
  static constexpr int kW = 8;
  static constexpr int kSR = 4, kSC = 3;  // 12 accumulators of 16 registers
  static constexpr int kOR = 3, kOC = 4;
  static Reg zero() { return _mm256_setzero_ps(); }
  static Reg set1(float x) { return _mm256_set1_ps(x); }
  static Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static Reg loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, Reg x) { _mm256_storeu_ps(p, x); }
  static void storeu(float* p, Reg x) { _mm256_storeu_ps(p, x); }
  static Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  static Reg sub(Reg a, Reg b) { return _mm256_sub_ps(a, b); }
  static Reg mul(Reg a, Reg b) { return _mm256_mul_ps(a, b); }
  static Reg div(Reg a, Reg b) { return _mm256_div_ps(a, b); }
  static float reduce_add(Reg a) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
  }
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static Reg max(Reg a, Reg b) { return _mm256_max_ps(a, b); }
  static Reg zero_where_equal(Reg a, Reg b) {
    return _mm256_andnot_ps(_mm256_cmp_ps(a, b, _CMP_EQ_OQ), a);
  }
  // 2^x: degree-7 polynomial on the fraction, exponent built in the integer unit. NaN stays NaN
  // (max/min keep their second operand when one is NaN); x < -126 (including -inf) gives 0.
  static Reg exp2(Reg x) {
    const Reg xc = _mm256_min_ps(_mm256_set1_ps(127.0f), _mm256_max_ps(_mm256_set1_ps(-127.0f), x));
    const Reg n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const Reg f = _mm256_sub_ps(xc, n);
    Reg p = _mm256_set1_ps(1.525273380405984e-05f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.5403530393381606e-04f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-03f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618129107628477e-03f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550410866482158e-02f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402265069591007e-01f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931471805599453e-01f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i e =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const Reg r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_and_ps(r, _mm256_cmp_ps(x, _mm256_set1_ps(-126.0f), _CMP_NLT_UQ));
  }
  static Reg load_half(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static void store_half(uint16_t* p, Reg x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

}  // namespace
}  // namespace avx2
}  // namespace cpu
}  // namespace flash_export

#define FLASH_EXPORT_ISA_NAMESPACE avx2
#include "flash_attention_cpu_kernel.h"

namespace flash_export {
namespace cpu {

Kernel kernel_avx2() {
  return Kernel{Isa::kAvx2,      avx2::V::kW, 96,      &avx2::pack_rows,
                &avx2::run_item, nullptr,     nullptr, &avx2::run_rows};
}

}  // namespace cpu
}  // namespace flash_export
#endif

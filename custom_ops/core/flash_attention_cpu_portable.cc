// Portable (scalar, any architecture) instantiation of the CPU kernel.
#include <cstdint>

#include "flash_attention_cpu_internal.h"

namespace flash_export {
namespace cpu {
namespace portable {
namespace {

// Scalar "vectors": the compiler may still auto-vectorise with the baseline ISA.
struct V {
  using Reg = float;
  static constexpr int kW = 1;
  static constexpr int kSR = 4, kSC = 4;  // S tile: keys x query columns
  static constexpr int kOR = 4, kOC = 4;  // O tile: query rows x head-dim columns
  static Reg zero() { return 0.0f; }
  static Reg set1(float x) { return x; }
  static Reg load(const float* p) { return *p; }
  static Reg loadu(const float* p) { return *p; }
  static void store(float* p, Reg x) { *p = x; }
  static void storeu(float* p, Reg x) { *p = x; }
  static Reg add(Reg a, Reg b) { return a + b; }
  static Reg sub(Reg a, Reg b) { return a - b; }
  static Reg mul(Reg a, Reg b) { return a * b; }
  static Reg div(Reg a, Reg b) { return a / b; }
  static float reduce_add(Reg a) { return a; }
  static Reg fmadd(Reg a, Reg b, Reg c) { return a * b + c; }
  // Keeps the second operand when the first is NaN, like the x86 max instructions (NaN still
  // reaches the output through exp2 and the sum).
  static Reg max(Reg a, Reg b) { return a > b ? a : b; }
  static Reg zero_where_equal(Reg a, Reg b) { return a == b ? 0.0f : a; }
  static Reg exp2(Reg x) { return __builtin_exp2f(x); }
  static Reg load_half(const uint16_t*) { return 0.0f; }  // unused: kW == 1 takes the scalar path
  static void store_half(uint16_t*, Reg) {}
};

}  // namespace
}  // namespace portable
}  // namespace cpu
}  // namespace flash_export

#define FLASH_EXPORT_ISA_NAMESPACE portable
#include "flash_attention_cpu_kernel.h"

namespace flash_export {
namespace cpu {

Kernel kernel_portable() {
  return Kernel{Isa::kPortable,      portable::V::kW, 32,      &portable::pack_rows,
                &portable::run_item, nullptr,         nullptr, &portable::run_rows};
}

}  // namespace cpu
}  // namespace flash_export

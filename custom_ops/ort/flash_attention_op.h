// The FlashAttention custom op: its node contract, stated once on the C++ side, and the op
// descriptions the adapter registers (CPU, and CUDA when built with nvcc).
//
// flash_export/contract.py states the same contract for Python; tests/test_native_op.py checks
// that the two agree (through flash_export_build_info and by running nodes in this domain).
//
// Node com.flash_export::FlashAttention, version 1:
//   inputs   query (B, Lq, E), key (B, Lk, E), value (B, Lk, E): float32 or float16, all alike;
//            mask (optional): bool, broadcastable (numpy rules, right-aligned) to
//            (B, num_heads, Lq, Lk); true = attend
//   output   (B, Lq, E) in query's element type
//   attrs    num_heads, chunk_size, causal, scale: each one's rule below, quoted by the error
//            that refuses a node breaking it (at session creation)
// E must be divisible by num_heads; head_dim = E / num_heads.
#ifndef FLASH_EXPORT_ORT_FLASH_ATTENTION_OP_H_
#define FLASH_EXPORT_ORT_FLASH_ATTENTION_OP_H_

#include "ort_abi.h"

namespace flash_export {
namespace ort {

constexpr const char* kDomain = "com.flash_export";
constexpr const char* kOpName = "FlashAttention";
constexpr int kOpVersion = 1;

constexpr const char* kNumHeadsRule = "an INT >= 1 (required)";
// Keys per online-softmax block: changes only the float32 rounding, never the result's meaning.
constexpr const char* kChunkSizeRule = "an INT >= 1 (default 64)";
// 1: bottom-right aligned causal mask, query i sees key j iff j <= i + (Lk - Lq).
constexpr const char* kCausalRule = "an INT 0 or 1 (default 0)";
// Any finite scale but 0 is well defined and computed alike by every backend, a negative one
// included (it attends most to the least similar keys). 0 is refused: it would silently average
// the values whatever the query, and onnxruntime's com.microsoft attention operators read a scale
// of 0 as "the default", so a graph written for them would mean something else here.
constexpr const char* kScaleRule = "a finite FLOAT other than 0 (default 1/sqrt(head_dim))";

// Process-lifetime op descriptions; flash_attention_cuda_op() is nullptr without CUDA.
const ort_abi::OrtCustomOp* flash_attention_cpu_op();
const ort_abi::OrtCustomOp* flash_attention_cuda_op();

// The OrtApi table RegisterCustomOps obtained (kApiVersion); valid once an op is registered.
const ort_abi::OrtApi* registered_api();

}  // namespace ort
}  // namespace flash_export

#endif  // FLASH_EXPORT_ORT_FLASH_ATTENTION_OP_H_

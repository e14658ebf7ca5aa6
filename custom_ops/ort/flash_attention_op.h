// The FlashAttention custom op: its node contract, stated once on the C++ side, and the op
// descriptions the adapter registers (CPU, and CUDA when built with nvcc).
//
// flash_export/contract.py states the same contract for Python; tests/test_native_op.py checks
// that the two agree (through flash_export_build_info and by running nodes in this domain).
//
// Node com.flash_export::FlashAttention. Version 2 (contract v2) is version 1 plus optional
// attributes and inputs whose defaults keep version 1's meaning, so a version-1 node means the
// same under either:
//   inputs   query (B, Lq, num_heads*D) or head-major (B, num_heads, Lq, D);
//            key (B, Lk, kv_num_heads*D) or (B, kv_num_heads, Lk, D);
//            value (B, Lk, kv_num_heads*Dv) or (B, kv_num_heads, Lk, Dv): each says its layout by
//            its rank; float32 or float16 (version 2: or bfloat16), all alike;
//            mask (optional): bool, broadcastable (numpy rules, right-aligned) to
//            (B, num_heads, Lq, Lk); true = attend;
//            version 2: seqlens_k (optional): int32 (B,), sequence b's keys are
//            [0, seqlens_k[b]] (onnxruntime GroupQueryAttention's convention), the queries its
//            last Lq positions; bias (optional): query's type, broadcastable to
//            (B, num_heads, Lq, Lk), added to the logits
//   output   (B, Lq, num_heads*Dv), or (B, num_heads, Lq, Dv) with output_layout 1, in query's
//            element type
//   attrs    num_heads, chunk_size, causal, scale; version 2: kv_num_heads, window_size,
//            softcap, output_layout: each one's rule below, quoted by the error that refuses a
//            node breaking it (at session creation).
// One op description (per device) serves every version: onnxruntime merges one op name into one
// schema, so the kernel cannot see its model's version. A version-1 model that uses a version-2
// attribute or input runs with it here; flash_export's structural check (safety.py) refuses it.
// flash_export.h states the semantics (which keys each query row sees, and how the logits are
// formed).
#ifndef FLASH_EXPORT_ORT_FLASH_ATTENTION_OP_H_
#define FLASH_EXPORT_ORT_FLASH_ATTENTION_OP_H_

#include "ort_abi.h"

namespace flash_export {
namespace ort {

constexpr const char* kDomain = "com.flash_export";
constexpr const char* kOpName = "FlashAttention";
constexpr int kOpVersion = 2;  // the newest; the op serves versions 1 and up

constexpr const char* kNumHeadsRule = "an INT >= 1 (required)";
// Keys per online-softmax block: changes only the float32 rounding, never the result's meaning.
constexpr const char* kChunkSizeRule = "an INT >= 1 (default 64)";
// 1: bottom-right aligned causal mask, query i sees key j iff j <= i + (L_b - Lq).
constexpr const char* kCausalRule = "an INT 0 or 1 (default 0)";
// Any finite scale but 0 is well defined and computed alike by every backend, a negative one
// included (it attends most to the least similar keys). 0 is refused: it would silently average
// the values whatever the query, and onnxruntime's com.microsoft attention operators read a scale
// of 0 as "the default", so a graph written for them would mean something else here.
constexpr const char* kScaleRule = "a finite FLOAT other than 0 (default 1/sqrt(head_dim))";
// Version 2. Grouped-query attention: query head h reads key/value head h / (num_heads /
// kv_num_heads).
constexpr const char* kKvNumHeadsRule = "an INT >= 1 dividing num_heads (default num_heads)";
// A query at position p sees key j only if |p - j| < window_size (with causal: the last
// window_size keys up to its own, as transformers' sliding_window).
constexpr const char* kWindowSizeRule = "an INT >= 0 (default 0: no window)";
// Logits become softcap * tanh(logits / softcap) before the bias (Gemma 2).
constexpr const char* kSoftcapRule = "a finite FLOAT >= 0 (default 0: none)";
constexpr const char* kOutputLayoutRule =
    "an INT 0 (B, Lq, num_heads*Dv) or 1 (B, num_heads, Lq, Dv) (default 0)";

// Process-lifetime op descriptions; flash_attention_cuda_op() is nullptr without CUDA.
const ort_abi::OrtCustomOp* flash_attention_cpu_op();
const ort_abi::OrtCustomOp* flash_attention_cuda_op();

// The OrtApi table RegisterCustomOps obtained (kApiVersion); valid once an op is registered.
const ort_abi::OrtApi* registered_api();

}  // namespace ort
}  // namespace flash_export

#endif  // FLASH_EXPORT_ORT_FLASH_ATTENTION_OP_H_

// Framework-free FlashAttention forward: the one kernel core behind every adapter.
//
// Knows nothing of torch or onnxruntime. Tensors arrive as raw pointers with element strides;
// adapters validate shapes, fill AttentionParams and map the returned Status to their own errors.
#ifndef FLASH_EXPORT_CORE_FLASH_ATTENTION_H_
#define FLASH_EXPORT_CORE_FLASH_ATTENTION_H_

#include <cstddef>
#include <cstdint>

namespace flash_export {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

enum class Status : int32_t {
  kOk = 0,
  kInvalidArgument = 1,  // a size, stride or attribute the core cannot honour
  kUnsupported = 2,      // a dtype or feature this build does not implement
  kDeviceError = 3,      // a CUDA launch or runtime error
  kOutOfMemory = 4,      // scratch memory could not be allocated
};

// One attention forward. Q is (B, Lq, H*D), K and V are (B, Lk, H*D), O is (B, Lq, H*D), all of
// `dtype`; element (b, l, h, d) of a tensor X lives at
//   X + b * x_batch_stride + l * x_row_stride + h * x_head_stride + d   (element units).
// Accumulation is float32 whatever the input dtype.
struct AttentionParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;

  int64_t batch = 0;     // B
  int64_t heads = 0;     // H
  int64_t head_dim = 0;  // D
  int64_t seq_q = 0;     // Lq (may be 0: nothing to do)
  int64_t seq_k = 0;     // Lk (may be 0: every output row is zero)

  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;

  // Optional boolean mask (one byte per element, nonzero = attend), broadcast to (B, H, Lq, Lk)
  // through its strides: a broadcast dimension has stride 0. nullptr means no mask.
  const uint8_t* mask = nullptr;
  int64_t mask_batch_stride = 0, mask_head_stride = 0, mask_q_stride = 0, mask_k_stride = 0;

  int64_t chunk_size = 64;  // keys per online-softmax block (>= 1)
  float scale = 1.0f;       // logits = scale * q . k
  // Bottom-right aligned causal mask: query i sees key j iff j <= i + (Lk - Lq).
  bool causal = false;
  DType dtype = DType::kFloat32;
};

// Masking decides visibility, values decide numbers. A query row that sees no key (all masked,
// causal with Lq > Lk, or Lk == 0) is written as zeros. A row that sees at least one key but whose
// every visible logit is -inf has no defined softmax and is written as NaN, as the float64
// reference computes it (so is a row with a +inf or NaN logit); the same keys hidden by the mask
// or the causal rule give zeros.

// Sizes the kernels refuse (Status::kInvalidArgument, or kUnsupported for the CUDA head dim).
// Adapters check them first, so that their errors can name the size, the limit and the value.
constexpr int64_t kCpuMaxHeadDim = int64_t{1} << 20;  // keeps the CPU scratch arithmetic in range
constexpr int64_t kCudaMaxHeadDim = 512;              // the simple kernel's registers per lane
constexpr int64_t kCudaMaxSeqLen = 2147483647 - 256;  // rows are int-indexed, tiles of 128 past it
constexpr int64_t kCudaMaxGridDim = 65535;            // batch and heads ride on grid.z and grid.y

// Runs fn(data, i) for every i in [0, total) and returns when all have run; the CPU kernel hands
// its work items to this (a few calls per forward: packing a group of heads' keys and values, then
// one item per (batch, head, query block) of that group), so an adapter can use its runtime's
// thread pool. `context` is the adapter's own pointer, passed back untouched.
using ParallelForFn = void (*)(void* context, void (*fn)(void* data, size_t index), size_t total,
                               void* data);

// CPU forward. parallel_for may be nullptr: the work then runs serially on the calling thread.
Status attention_forward_cpu(const AttentionParams& params, ParallelForFn parallel_for,
                             void* parallel_context);

// Human-readable name of the vector path the CPU kernel picked at run time: "amx" (float16 on the
// AMX tile unit, the rest on AVX-512), "avx512", "avx2" or "portable".
const char* cpu_kernel_isa();

// CUDA forward (defined in flash_attention_cuda.cu when built with nvcc; float16 and bfloat16,
// float32 where the build supports it). `stream` is a cudaStream_t; the kernel launches only there.
Status attention_forward_cuda(const AttentionParams& params, void* stream);

}  // namespace flash_export

#endif  // FLASH_EXPORT_CORE_FLASH_ATTENTION_H_

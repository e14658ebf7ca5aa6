// Framework-free FlashAttention forward: the one kernel core behind every adapter, its C++ API.
//
// Knows nothing of torch or onnxruntime. Tensors arrive as raw pointers with element strides;
// adapters describe their tensors, have flash_export_attention_params (attention_params.cc) check
// the call and fill AttentionParams, and map the returned Status to their own errors. The C entry
// points over it are declared in flash_export.h and defined in c_api.cc and attention_params.cc.
#ifndef FLASH_EXPORT_CORE_FLASH_ATTENTION_H_
#define FLASH_EXPORT_CORE_FLASH_ATTENTION_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "flash_export.h"

namespace flash_export {

// The C ABI's struct (flash_export.h documents every field and the row semantics); DType is
// declared there too, as the type of its dtype field.
using AttentionParams = FlashExportAttentionParams;

enum class Status : int32_t {
  kOk = FLASH_EXPORT_OK,
  kInvalidArgument = FLASH_EXPORT_INVALID_ARGUMENT,
  kUnsupported = FLASH_EXPORT_UNSUPPORTED,
  kDeviceError = FLASH_EXPORT_DEVICE_ERROR,
  kOutOfMemory = FLASH_EXPORT_OUT_OF_MEMORY,
};

// Sizes the kernels refuse (Status::kInvalidArgument, or kUnsupported for the CUDA head dim).
// Adapters check them first, so that their errors can name the size, the limit and the value.
constexpr int64_t kCpuMaxHeadDim = int64_t{1} << 20;  // keeps the CPU scratch arithmetic in range
constexpr int64_t kCudaMaxHeadDim = 512;              // the simple kernel's registers per lane
constexpr int64_t kCudaMaxSeqLen = 2147483647 - 256;  // rows are int-indexed, tiles of 128 past it
constexpr int64_t kCudaMaxGridDim = 65535;            // batch and heads ride on grid.z and grid.y

// Whether `scale` is a logit scale the op admits: finite and, rounded to float32 (the kernels'
// type), finite and not 0. flash_export_attention_params and the onnxruntime node's attribute
// check both ask this.
bool scale_is_valid(double scale);

// Runs fn(data, i) for every i in [0, total) and returns when all have run; the C ABI's type
// (flash_export.h). The CPU kernel hands its work items to this (one call per forward, an item per
// (batch, head), for decode and for many small heads; otherwise two calls per group of heads:
// packing the group's keys and values, then an item per (batch, head, query block) of it), so an
// adapter can use its runtime's thread pool. `context` is the adapter's own pointer, passed back
// untouched.
using ParallelForFn = FlashExportParallelFor;

// CPU forward. parallel_for may be nullptr: the work then runs serially on the calling thread.
// `threads` is how many items parallel_for may run at once, for the plan (0: unknown, taken as the
// machine's hardware threads); results do not depend on it.
Status attention_forward_cpu(const AttentionParams& params, ParallelForFn parallel_for,
                             void* parallel_context, int threads = 0);

// The plan the CPU forward would run `params` with on `threads` threads (as above), as a JSON
// object: the kernel path (isa), the regime ("rows", "heads" or "shared"), the query block (bq,
// q_blocks), the key block (bc), one head's packed bytes, and for the shared regime the packing
// groups and heads per group; {"error": ...} for a call with nothing to plan.
std::string describe_cpu_plan(const AttentionParams& params, int threads);

// Human-readable name of the vector path the CPU kernel picked at run time: "amx" (float16 on the
// AMX tile unit, the rest on AVX-512), "avx512", "avx2" or "portable".
const char* cpu_kernel_isa();

// nullptr when FLASH_EXPORT_CPU_ISA is unset, empty or names a path ("portable", "avx2",
// "avx512", "amx"); otherwise why the setting is refused. A forced path this CPU cannot run is
// not an error: the kernel falls back to the best path it can.
const char* cpu_isa_setting_error();

// CUDA forward (defined in flash_attention_cuda.cu when built with nvcc; float16 and bfloat16,
// float32 where the build supports it). `stream` is a cudaStream_t; the kernel launches only there.
Status attention_forward_cuda(const AttentionParams& params, void* stream);

}  // namespace flash_export

#endif  // FLASH_EXPORT_CORE_FLASH_ATTENTION_H_

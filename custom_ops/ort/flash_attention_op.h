// The FlashAttention custom ops (CPU, and CUDA when built with nvcc) and the API table they use.
#ifndef FLASH_EXPORT_ORT_FLASH_ATTENTION_OP_H_
#define FLASH_EXPORT_ORT_FLASH_ATTENTION_OP_H_

#include "ort_abi.h"

namespace flash_export {
namespace ort {

// Process-lifetime op descriptions; flash_attention_cuda_op() is nullptr without CUDA.
const ort_abi::OrtCustomOp* flash_attention_cpu_op();
const ort_abi::OrtCustomOp* flash_attention_cuda_op();

// The OrtApi table RegisterCustomOps obtained (kApiVersion); valid once an op is registered.
const ort_abi::OrtApi* registered_api();

}  // namespace ort
}  // namespace flash_export

#endif  // FLASH_EXPORT_ORT_FLASH_ATTENTION_OP_H_

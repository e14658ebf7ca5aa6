// Compile-time check of ort_abi.h against the official onnxruntime_c_api.h. Built only by
// tests/test_native_abi.py (g++ -fsyntax-only -DFLASH_EXPORT_OFFICIAL_ORT_HEADER -I<official>);
// in the library build it is an empty translation unit.
#ifdef FLASH_EXPORT_OFFICIAL_ORT_HEADER
#include <onnxruntime_c_api.h>

#include <cstddef>

#include "ort_abi.h"

namespace abi = flash_export::ort_abi;

#define FE_CHECK_INDEX(name)                                            \
  static_assert(offsetof(OrtApi, name) / sizeof(void*) == abi::k##name, \
                "OrtApi index of " #name " differs from ort_abi.h")

FE_CHECK_INDEX(CreateStatus);
FE_CHECK_INDEX(GetErrorCode);
FE_CHECK_INDEX(GetErrorMessage);
FE_CHECK_INDEX(CreateCustomOpDomain);
FE_CHECK_INDEX(CustomOpDomain_Add);
FE_CHECK_INDEX(AddCustomOpDomain);
FE_CHECK_INDEX(GetTensorMutableData);
FE_CHECK_INDEX(CreateTensorTypeAndShapeInfo);
FE_CHECK_INDEX(SetTensorElementType);
FE_CHECK_INDEX(SetDimensions);
FE_CHECK_INDEX(GetTensorElementType);
FE_CHECK_INDEX(GetDimensionsCount);
FE_CHECK_INDEX(GetDimensions);
FE_CHECK_INDEX(GetSymbolicDimensions);
FE_CHECK_INDEX(GetTensorTypeAndShape);
FE_CHECK_INDEX(GetAllocatorWithDefaultOptions);
FE_CHECK_INDEX(KernelInfoGetAttribute_float);
FE_CHECK_INDEX(KernelInfoGetAttribute_int64);
FE_CHECK_INDEX(KernelInfoGetAttribute_string);
FE_CHECK_INDEX(KernelContext_GetInputCount);
FE_CHECK_INDEX(KernelContext_GetOutputCount);
FE_CHECK_INDEX(KernelContext_GetInput);
FE_CHECK_INDEX(KernelContext_GetOutput);
FE_CHECK_INDEX(ReleaseStatus);
FE_CHECK_INDEX(ReleaseValue);
FE_CHECK_INDEX(ReleaseTensorTypeAndShapeInfo);
FE_CHECK_INDEX(KernelInfoGetAttributeArray_float);
FE_CHECK_INDEX(KernelInfoGetAttributeArray_int64);
FE_CHECK_INDEX(KernelContext_GetGPUComputeStream);
FE_CHECK_INDEX(KernelInfoGetAttribute_tensor);
FE_CHECK_INDEX(ShapeInferContext_GetInputCount);
FE_CHECK_INDEX(ShapeInferContext_GetInputTypeShape);
FE_CHECK_INDEX(ShapeInferContext_GetAttribute);
FE_CHECK_INDEX(ReadOpAttr);
FE_CHECK_INDEX(ShapeInferContext_SetOutputTypeShape);
FE_CHECK_INDEX(SetSymbolicDimensions);
FE_CHECK_INDEX(KernelContext_ParallelFor);

#define FE_CHECK_FIELD(name)                                                       \
  static_assert(offsetof(::OrtCustomOp, name) == offsetof(abi::OrtCustomOp, name), \
                "OrtCustomOp::" #name " offset differs from ort_abi.h")

FE_CHECK_FIELD(version);
FE_CHECK_FIELD(CreateKernel);
FE_CHECK_FIELD(GetName);
FE_CHECK_FIELD(GetExecutionProviderType);
FE_CHECK_FIELD(GetInputType);
FE_CHECK_FIELD(GetInputTypeCount);
FE_CHECK_FIELD(GetOutputType);
FE_CHECK_FIELD(GetOutputTypeCount);
FE_CHECK_FIELD(KernelCompute);
FE_CHECK_FIELD(KernelDestroy);
FE_CHECK_FIELD(GetInputCharacteristic);
FE_CHECK_FIELD(GetOutputCharacteristic);
FE_CHECK_FIELD(GetInputMemoryType);
FE_CHECK_FIELD(GetVariadicInputMinArity);
FE_CHECK_FIELD(GetVariadicInputHomogeneity);
FE_CHECK_FIELD(GetVariadicOutputMinArity);
FE_CHECK_FIELD(GetVariadicOutputHomogeneity);
FE_CHECK_FIELD(CreateKernelV2);
FE_CHECK_FIELD(KernelComputeV2);
FE_CHECK_FIELD(InferOutputShapeFn);
FE_CHECK_FIELD(GetStartVersion);
FE_CHECK_FIELD(GetEndVersion);
FE_CHECK_FIELD(GetMayInplace);
FE_CHECK_FIELD(ReleaseMayInplace);
FE_CHECK_FIELD(GetAliasMap);
FE_CHECK_FIELD(ReleaseAliasMap);
static_assert(sizeof(::OrtCustomOp) == sizeof(abi::OrtCustomOp), "OrtCustomOp size differs");
static_assert(sizeof(::OrtApiBase) == sizeof(abi::OrtApiBase), "OrtApiBase size differs");
static_assert(offsetof(::OrtApiBase, GetVersionString) ==
                  offsetof(abi::OrtApiBase, GetVersionString),
              "OrtApiBase layout differs");

// Enum values the adapter passes across the boundary.
#define FE_CHECK_VALUE(name) \
  static_assert(name == static_cast<int>(abi::name), #name " differs from ort_abi.h")
FE_CHECK_VALUE(ORT_INVALID_ARGUMENT);
FE_CHECK_VALUE(ORT_FAIL);
FE_CHECK_VALUE(ORT_RUNTIME_EXCEPTION);
FE_CHECK_VALUE(ORT_NOT_IMPLEMENTED);
FE_CHECK_VALUE(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
FE_CHECK_VALUE(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
FE_CHECK_VALUE(ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL);
FE_CHECK_VALUE(ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32);
FE_CHECK_VALUE(ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16);
FE_CHECK_VALUE(ORT_OP_ATTR_INT);
FE_CHECK_VALUE(INPUT_OUTPUT_OPTIONAL);
FE_CHECK_VALUE(OrtMemTypeDefault);
static_assert(ORT_API_VERSION >= abi::kApiVersion, "official header older than the API we ask");
#endif  // FLASH_EXPORT_OFFICIAL_ORT_HEADER

// The subset of the onnxruntime C ABI this library uses, declared here because the onnxruntime
// wheels ship no headers (see /work/shared/ORT_ABI.md). The ABI is append-only, so a table index or
// struct layout never changes once released; abi_check.cc static_asserts every declaration below
// against the official onnxruntime_c_api.h (tests/test_native_abi.py compiles it).
//
// Everything lives in namespace flash_export::ort_abi so it can sit beside the official header.
#ifndef FLASH_EXPORT_ORT_ORT_ABI_H_
#define FLASH_EXPORT_ORT_ORT_ABI_H_

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace flash_export {
namespace ort_abi {

// The OrtApi version this library asks for, stated here only: the lowest that has every function
// below (KernelContext_ParallelFor and the shape-inference context arrived in 1.17).
constexpr uint32_t kApiVersion = 17;

struct OrtApi;  // a table of function pointers, read by index (Api below)
struct OrtStatus;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtValue;
struct OrtTensorTypeAndShapeInfo;
struct OrtShapeInferContext;
struct OrtAllocator;
struct OrtOpAttr;

enum OrtOpAttrType : int {  // C enum: int-sized
  ORT_OP_ATTR_UNDEFINED = 0,
  ORT_OP_ATTR_INT = 1,
};

struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};

enum OrtErrorCode : int {  // C enum: int-sized
  ORT_OK = 0,
  ORT_FAIL = 1,
  ORT_INVALID_ARGUMENT = 2,
  ORT_RUNTIME_EXCEPTION = 6,
  ORT_NOT_IMPLEMENTED = 9,
};

enum ONNXTensorElementDataType : int {
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED = 0,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT = 1,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 = 6,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL = 9,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 = 10,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16 = 16,
};

enum OrtMemType : int { OrtMemTypeDefault = 0 };

enum OrtCustomOpInputOutputCharacteristic : int {
  INPUT_OUTPUT_REQUIRED = 0,
  INPUT_OUTPUT_OPTIONAL = 1,
  INPUT_OUTPUT_VARIADIC = 2,
};

// OrtCustomOp: a version followed by callbacks; onnxruntime reads only the fields its `version`
// allows. Declared whole so the layout matches every runtime.
struct OrtCustomOp {
  uint32_t version;
  void* (*CreateKernel)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);
  const char* (*GetName)(const OrtCustomOp* op);
  const char* (*GetExecutionProviderType)(const OrtCustomOp* op);
  ONNXTensorElementDataType (*GetInputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetInputTypeCount)(const OrtCustomOp* op);
  ONNXTensorElementDataType (*GetOutputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetOutputTypeCount)(const OrtCustomOp* op);
  void (*KernelCompute)(void* op_kernel, OrtKernelContext* context);
  void (*KernelDestroy)(void* op_kernel);
  OrtCustomOpInputOutputCharacteristic (*GetInputCharacteristic)(const OrtCustomOp* op,
                                                                 size_t index);
  OrtCustomOpInputOutputCharacteristic (*GetOutputCharacteristic)(const OrtCustomOp* op,
                                                                  size_t index);
  OrtMemType (*GetInputMemoryType)(const OrtCustomOp* op, size_t index);
  int (*GetVariadicInputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicInputHomogeneity)(const OrtCustomOp* op);
  int (*GetVariadicOutputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicOutputHomogeneity)(const OrtCustomOp* op);
  OrtStatus* (*CreateKernelV2)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                               void** kernel);
  OrtStatus* (*KernelComputeV2)(void* op_kernel, OrtKernelContext* context);
  OrtStatus* (*InferOutputShapeFn)(const OrtCustomOp* op, OrtShapeInferContext* context);
  int (*GetStartVersion)(const OrtCustomOp* op);
  int (*GetEndVersion)(const OrtCustomOp* op);
  size_t (*GetMayInplace)(int** input_index, int** output_index);
  void (*ReleaseMayInplace)(int* input_index, int* output_index);
  size_t (*GetAliasMap)(int** input_index, int** output_index);
  void (*ReleaseAliasMap)(int* input_index, int* output_index);
};

// Slot of each OrtApi function used, = offsetof(OrtApi, F) / sizeof(void*) (checked by
// abi_check.cc). The table never reorders, so these hold for every API version >= the one that
// introduced the function.
enum ApiIndex : size_t {
  kCreateStatus = 0,
  kGetErrorCode = 1,
  kGetErrorMessage = 2,
  kCreateCustomOpDomain = 26,
  kCustomOpDomain_Add = 27,
  kAddCustomOpDomain = 28,
  kGetTensorMutableData = 51,
  kCreateTensorTypeAndShapeInfo = 57,
  kSetTensorElementType = 58,
  kSetDimensions = 59,
  kGetTensorElementType = 60,
  kGetDimensionsCount = 61,
  kGetDimensions = 62,
  kGetSymbolicDimensions = 63,
  kGetTensorTypeAndShape = 65,
  kGetAllocatorWithDefaultOptions = 78,
  kKernelInfoGetAttribute_float = 85,
  kKernelInfoGetAttribute_int64 = 86,
  kKernelInfoGetAttribute_string = 87,
  kKernelContext_GetInputCount = 88,
  kKernelContext_GetOutputCount = 89,
  kKernelContext_GetInput = 90,
  kKernelContext_GetOutput = 91,
  kReleaseStatus = 93,
  kReleaseValue = 96,
  kReleaseTensorTypeAndShapeInfo = 99,
  kKernelInfoGetAttributeArray_float = 162,
  kKernelInfoGetAttributeArray_int64 = 163,
  kKernelContext_GetGPUComputeStream = 193,
  kKernelInfoGetAttribute_tensor = 236,
  kShapeInferContext_GetInputCount = 267,
  kShapeInferContext_GetInputTypeShape = 268,
  kShapeInferContext_GetAttribute = 269,
  kShapeInferContext_SetOutputTypeShape = 270,
  kSetSymbolicDimensions = 271,
  kReadOpAttr = 272,
  kKernelContext_ParallelFor = 274,
};

// Typed calls through the table.
class Api {
 public:
  explicit Api(const OrtApi* table) : table_(table) {}
  const OrtApi* table() const { return table_; }

  OrtStatus* CreateStatus(OrtErrorCode code, const char* msg) const {
    return fn<OrtStatus* (*)(OrtErrorCode, const char*)>(kCreateStatus)(code, msg);
  }
  OrtErrorCode GetErrorCode(const OrtStatus* s) const {
    return fn<OrtErrorCode (*)(const OrtStatus*)>(kGetErrorCode)(s);
  }
  const char* GetErrorMessage(const OrtStatus* s) const {
    return fn<const char* (*)(const OrtStatus*)>(kGetErrorMessage)(s);
  }
  OrtStatus* CreateCustomOpDomain(const char* domain, OrtCustomOpDomain** out) const {
    return fn<OrtStatus* (*)(const char*, OrtCustomOpDomain**)>(kCreateCustomOpDomain)(domain, out);
  }
  OrtStatus* CustomOpDomain_Add(OrtCustomOpDomain* domain, const OrtCustomOp* op) const {
    return fn<OrtStatus* (*)(OrtCustomOpDomain*, const OrtCustomOp*)>(kCustomOpDomain_Add)(domain,
                                                                                           op);
  }
  OrtStatus* AddCustomOpDomain(OrtSessionOptions* options, OrtCustomOpDomain* domain) const {
    return fn<OrtStatus* (*)(OrtSessionOptions*, OrtCustomOpDomain*)>(kAddCustomOpDomain)(options,
                                                                                          domain);
  }
  OrtStatus* GetTensorMutableData(OrtValue* value, void** out) const {
    return fn<OrtStatus* (*)(OrtValue*, void**)>(kGetTensorMutableData)(value, out);
  }
  OrtStatus* CreateTensorTypeAndShapeInfo(OrtTensorTypeAndShapeInfo** out) const {
    return fn<OrtStatus* (*)(OrtTensorTypeAndShapeInfo**)>(kCreateTensorTypeAndShapeInfo)(out);
  }
  OrtStatus* SetTensorElementType(OrtTensorTypeAndShapeInfo* info,
                                  ONNXTensorElementDataType type) const {
    return fn<OrtStatus* (*)(OrtTensorTypeAndShapeInfo*, ONNXTensorElementDataType)>(
        kSetTensorElementType)(info, type);
  }
  OrtStatus* SetDimensions(OrtTensorTypeAndShapeInfo* info, const int64_t* dims,
                           size_t count) const {
    return fn<OrtStatus* (*)(OrtTensorTypeAndShapeInfo*, const int64_t*, size_t)>(kSetDimensions)(
        info, dims, count);
  }
  OrtStatus* SetSymbolicDimensions(OrtTensorTypeAndShapeInfo* info, const char* dim_params[],
                                   size_t count) const {
    return fn<OrtStatus* (*)(OrtTensorTypeAndShapeInfo*, const char*[], size_t)>(
        kSetSymbolicDimensions)(info, dim_params, count);
  }
  OrtStatus* GetTensorElementType(const OrtTensorTypeAndShapeInfo* info,
                                  ONNXTensorElementDataType* out) const {
    return fn<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, ONNXTensorElementDataType*)>(
        kGetTensorElementType)(info, out);
  }
  OrtStatus* GetDimensionsCount(const OrtTensorTypeAndShapeInfo* info, size_t* out) const {
    return fn<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, size_t*)>(kGetDimensionsCount)(info,
                                                                                              out);
  }
  OrtStatus* GetDimensions(const OrtTensorTypeAndShapeInfo* info, int64_t* dims,
                           size_t count) const {
    return fn<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t)>(kGetDimensions)(
        info, dims, count);
  }
  // The names point into `info`; an empty name is a dimension without one.
  OrtStatus* GetSymbolicDimensions(const OrtTensorTypeAndShapeInfo* info, const char* names[],
                                   size_t count) const {
    return fn<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, const char*[], size_t)>(
        kGetSymbolicDimensions)(info, names, count);
  }
  OrtStatus* GetTensorTypeAndShape(const OrtValue* value, OrtTensorTypeAndShapeInfo** out) const {
    return fn<OrtStatus* (*)(const OrtValue*, OrtTensorTypeAndShapeInfo**)>(kGetTensorTypeAndShape)(
        value, out);
  }
  OrtStatus* KernelInfoGetAttribute_float(const OrtKernelInfo* info, const char* name,
                                          float* out) const {
    return fn<OrtStatus* (*)(const OrtKernelInfo*, const char*, float*)>(
        kKernelInfoGetAttribute_float)(info, name, out);
  }
  OrtStatus* KernelInfoGetAttribute_int64(const OrtKernelInfo* info, const char* name,
                                          int64_t* out) const {
    return fn<OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*)>(
        kKernelInfoGetAttribute_int64)(info, name, out);
  }
  // The string and array getters: with out == nullptr they only report *size (the string's
  // length plus its terminator, the array's element count).
  OrtStatus* KernelInfoGetAttribute_string(const OrtKernelInfo* info, const char* name, char* out,
                                           size_t* size) const {
    return fn<OrtStatus* (*)(const OrtKernelInfo*, const char*, char*, size_t*)>(
        kKernelInfoGetAttribute_string)(info, name, out, size);
  }
  OrtStatus* KernelInfoGetAttributeArray_float(const OrtKernelInfo* info, const char* name,
                                               float* out, size_t* size) const {
    return fn<OrtStatus* (*)(const OrtKernelInfo*, const char*, float*, size_t*)>(
        kKernelInfoGetAttributeArray_float)(info, name, out, size);
  }
  OrtStatus* KernelInfoGetAttributeArray_int64(const OrtKernelInfo* info, const char* name,
                                               int64_t* out, size_t* size) const {
    return fn<OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*, size_t*)>(
        kKernelInfoGetAttributeArray_int64)(info, name, out, size);
  }
  // *out is a new value: release it with ReleaseValue.
  OrtStatus* KernelInfoGetAttribute_tensor(const OrtKernelInfo* info, const char* name,
                                           OrtAllocator* allocator, OrtValue** out) const {
    return fn<OrtStatus* (*)(const OrtKernelInfo*, const char*, OrtAllocator*, OrtValue**)>(
        kKernelInfoGetAttribute_tensor)(info, name, allocator, out);
  }
  // The allocator belongs to onnxruntime: never release it.
  OrtStatus* GetAllocatorWithDefaultOptions(OrtAllocator** out) const {
    return fn<OrtStatus* (*)(OrtAllocator**)>(kGetAllocatorWithDefaultOptions)(out);
  }
  void ReleaseValue(OrtValue* value) const { fn<void (*)(OrtValue*)>(kReleaseValue)(value); }
  OrtStatus* KernelContext_GetInputCount(const OrtKernelContext* context, size_t* out) const {
    return fn<OrtStatus* (*)(const OrtKernelContext*, size_t*)>(kKernelContext_GetInputCount)(
        context, out);
  }
  OrtStatus* KernelContext_GetInput(const OrtKernelContext* context, size_t index,
                                    const OrtValue** out) const {
    return fn<OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**)>(
        kKernelContext_GetInput)(context, index, out);
  }
  OrtStatus* KernelContext_GetOutput(OrtKernelContext* context, size_t index, const int64_t* dims,
                                     size_t count, OrtValue** out) const {
    return fn<OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**)>(
        kKernelContext_GetOutput)(context, index, dims, count, out);
  }
  void ReleaseStatus(OrtStatus* s) const { fn<void (*)(OrtStatus*)>(kReleaseStatus)(s); }
  void ReleaseTensorTypeAndShapeInfo(OrtTensorTypeAndShapeInfo* info) const {
    fn<void (*)(OrtTensorTypeAndShapeInfo*)>(kReleaseTensorTypeAndShapeInfo)(info);
  }
  OrtStatus* KernelContext_GetGPUComputeStream(const OrtKernelContext* context, void** out) const {
    return fn<OrtStatus* (*)(const OrtKernelContext*, void**)>(kKernelContext_GetGPUComputeStream)(
        context, out);
  }
  OrtStatus* ShapeInferContext_GetInputCount(const OrtShapeInferContext* context,
                                             size_t* out) const {
    return fn<OrtStatus* (*)(const OrtShapeInferContext*, size_t*)>(
        kShapeInferContext_GetInputCount)(context, out);
  }
  // The returned info belongs to the context: do not release it.
  OrtStatus* ShapeInferContext_GetInputTypeShape(const OrtShapeInferContext* context, size_t index,
                                                 OrtTensorTypeAndShapeInfo** out) const {
    return fn<OrtStatus* (*)(const OrtShapeInferContext*, size_t, OrtTensorTypeAndShapeInfo**)>(
        kShapeInferContext_GetInputTypeShape)(context, index, out);
  }
  // The attribute belongs to the context: do not release it. Fails for an absent name.
  OrtStatus* ShapeInferContext_GetAttribute(const OrtShapeInferContext* context, const char* name,
                                            const OrtOpAttr** out) const {
    return fn<OrtStatus* (*)(const OrtShapeInferContext*, const char*, const OrtOpAttr**)>(
        kShapeInferContext_GetAttribute)(context, name, out);
  }
  OrtStatus* ReadOpAttr(const OrtOpAttr* attr, OrtOpAttrType type, void* data, size_t len,
                        size_t* out) const {
    return fn<OrtStatus* (*)(const OrtOpAttr*, OrtOpAttrType, void*, size_t, size_t*)>(kReadOpAttr)(
        attr, type, data, len, out);
  }
  OrtStatus* ShapeInferContext_SetOutputTypeShape(const OrtShapeInferContext* context, size_t index,
                                                  const OrtTensorTypeAndShapeInfo* info) const {
    return fn<OrtStatus* (*)(const OrtShapeInferContext*, size_t,
                             const OrtTensorTypeAndShapeInfo*)>(
        kShapeInferContext_SetOutputTypeShape)(context, index, info);
  }
  OrtStatus* KernelContext_ParallelFor(const OrtKernelContext* context, void (*fn_)(void*, size_t),
                                       size_t total, size_t num_batch, void* data) const {
    return fn<OrtStatus* (*)(const OrtKernelContext*, void (*)(void*, size_t), size_t, size_t,
                             void*)>(kKernelContext_ParallelFor)(context, fn_, total, num_batch,
                                                                 data);
  }

 private:
  template <typename F>
  F fn(size_t index) const {
    F f;
    std::memcpy(&f, reinterpret_cast<const char*>(table_) + index * sizeof(void*), sizeof(f));
    return f;
  }
  const OrtApi* table_;
};

}  // namespace ort_abi
}  // namespace flash_export

#endif  // FLASH_EXPORT_ORT_ORT_ABI_H_

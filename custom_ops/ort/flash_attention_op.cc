// onnxruntime adapter for the node flash_attention_op.h describes: reads the attributes once per
// kernel; per run reads the inputs, has the core's params filler (flash_export_attention_params)
// check them and fill AttentionParams, and runs the core on the session's intra-op thread pool
// (CPU) or on the stream onnxruntime hands out (CUDA).
#include "flash_attention_op.h"

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <new>
#include <string>

#include "attributes.h"
#include "flash_attention.h"
#include "flash_export.h"
#include "ort_abi.h"

namespace flash_export {
namespace ort {
namespace {

using namespace ort_abi;  // NOLINT(build/namespaces): the adapter speaks this ABI throughout

constexpr size_t kQuery = 0, kKey = 1, kValue = 2, kMask = 3;

struct Attributes {
  int64_t num_heads = 0;
  int64_t chunk_size = 64;
  int64_t causal = 0;
  float scale = 0.0f;
  bool has_scale = false;
};

// Immutable after creation: concurrent Run() calls share it.
struct Kernel {
  const OrtApi* api;
  Attributes attrs;
};

OrtStatus* invalid(const Api& api, const std::string& message) {
  return api.CreateStatus(ORT_INVALID_ARGUMENT, ("FlashAttention: " + message).c_str());
}

const char* type_name(ONNXTensorElementDataType type) {
  switch (static_cast<int>(type)) {
    case 1:
      return "float32";
    case 2:
      return "uint8";
    case 3:
      return "int8";
    case 4:
      return "uint16";
    case 5:
      return "int16";
    case 6:
      return "int32";
    case 7:
      return "int64";
    case 8:
      return "string";
    case 9:
      return "bool";
    case 10:
      return "float16";
    case 11:
      return "float64";
    case 12:
      return "uint32";
    case 13:
      return "uint64";
    case 16:
      return "bfloat16";
    default:
      return "an unsupported element type";
  }
}

// No C++ exception may cross into onnxruntime through its C ABI: whatever `fn` throws (bad_alloc
// while building a message, say) comes back as an error status.
template <typename Fn>
OrtStatus* no_throw(const Api& api, Fn&& fn) noexcept {
  try {
    return fn();
  } catch (const std::bad_alloc&) {
    return api.CreateStatus(ORT_FAIL, "FlashAttention: out of memory");
  } catch (const std::exception& e) {
    char message[256];
    std::snprintf(message, sizeof(message), "FlashAttention: internal error: %s", e.what());
    return api.CreateStatus(ORT_RUNTIME_EXCEPTION, message);
  } catch (...) {
    return api.CreateStatus(ORT_RUNTIME_EXCEPTION, "FlashAttention: internal error");
  }
}

// Every attribute is checked once, at session creation (kernel creation happens then): a wrong
// type or an out-of-range value is an error naming the attribute, what it must be (its rule in
// flash_attention_op.h) and what it is, never a silent default.
OrtStatus* attribute_error(const Api& api, const char* name, const std::string& is,
                           const char* rule) {
  return invalid(api, std::string("attribute ") + name + " is " + is + ", expected " + rule);
}

// Reads an INT attribute into *value (left as is when absent and optional); checks its type and
// that it lies in [low, high].
OrtStatus* read_int(const Api& api, const OrtKernelInfo* info, const char* name, bool required,
                    int64_t low, int64_t high, const char* rule, int64_t* value) {
  const Attribute a = read_attribute(api, info, name);
  if (a.kind == Attribute::Kind::kAbsent && !required) return nullptr;
  if (a.kind != Attribute::Kind::kInt) return attribute_error(api, name, describe(a), rule);
  if (a.i < low || a.i > high) return attribute_error(api, name, a.shown, rule);
  *value = a.i;
  return nullptr;
}

OrtStatus* create_kernel_checked(const Api& api, const OrtApi* table, const OrtKernelInfo* info,
                                 void** kernel) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  Attributes a;
  if (OrtStatus* s = read_int(api, info, "num_heads", true, 1, kMax, kNumHeadsRule, &a.num_heads)) {
    return s;
  }
  if (OrtStatus* s =
          read_int(api, info, "chunk_size", false, 1, kMax, kChunkSizeRule, &a.chunk_size)) {
    return s;
  }
  if (OrtStatus* s = read_int(api, info, "causal", false, 0, 1, kCausalRule, &a.causal)) return s;
  const Attribute scale = read_attribute(api, info, "scale");
  if (scale.kind != Attribute::Kind::kAbsent) {
    if (scale.kind != Attribute::Kind::kFloat) {
      return attribute_error(api, "scale", describe(scale), kScaleRule);
    }
    if (!scale_is_valid(scale.f)) {
      return attribute_error(api, "scale", scale.shown, kScaleRule);
    }
    a.scale = scale.f;
    a.has_scale = true;
  }
  *kernel = new Kernel{table, a};
  return nullptr;
}

OrtStatus* create_kernel(const OrtCustomOp*, const OrtApi* table, const OrtKernelInfo* info,
                         void** kernel) {
  const Api api(table);
  return no_throw(api, [&] { return create_kernel_checked(api, table, info, kernel); });
}

void destroy_kernel(void* kernel) { delete static_cast<Kernel*>(kernel); }

struct TensorInfo {
  const OrtValue* value = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  size_t rank = 0;
  int64_t dims[8] = {};  // only ranks up to 8 are described; the core refuses larger ranks by rank
};

OrtStatus* describe(const Api& api, const OrtValue* value, TensorInfo* out) {
  out->value = value;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* s = api.GetTensorTypeAndShape(value, &info)) return s;
  OrtStatus* s = api.GetTensorElementType(info, &out->type);
  if (s == nullptr) s = api.GetDimensionsCount(info, &out->rank);
  if (s == nullptr && out->rank <= 8) s = api.GetDimensions(info, out->dims, out->rank);
  api.ReleaseTensorTypeAndShapeInfo(info);
  return s;
}

// The node's inputs as onnxruntime hands them (query, key, value and the optional mask).
struct Inputs {
  TensorInfo t[4];
  void* data[4] = {nullptr, nullptr, nullptr, nullptr};
  bool has_mask = false;
};

// Read: which inputs are present, their element types, shapes and data.
OrtStatus* read_inputs(const Api& api, OrtKernelContext* context, Inputs* in) {
  size_t input_count = 0;
  if (OrtStatus* s = api.KernelContext_GetInputCount(context, &input_count)) return s;
  if (input_count < 3 || input_count > 4) {
    return invalid(api, "got " + std::to_string(input_count) +
                            " inputs, expected 3 or 4 (query, key, value[, mask])");
  }
  const char* names[4] = {"query", "key", "value", "mask"};
  for (size_t i = 0; i < input_count; ++i) {
    const OrtValue* value = nullptr;
    if (OrtStatus* s = api.KernelContext_GetInput(context, i, &value)) return s;
    if (value == nullptr) {
      if (i == kMask) continue;  // optional input left empty
      return invalid(api, std::string(names[i]) + " is missing");
    }
    if (OrtStatus* s = describe(api, value, &in->t[i])) return s;
    if (OrtStatus* s = api.GetTensorMutableData(const_cast<OrtValue*>(value), &in->data[i])) {
      return s;
    }
    if (i == kMask) in->has_mask = true;
  }
  return nullptr;
}

// onnxruntime's element type as the core's descriptor states it.
int32_t core_dtype(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
      return FLASH_EXPORT_FLOAT32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
      return FLASH_EXPORT_FLOAT16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16:
      return FLASH_EXPORT_BFLOAT16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL:
      return FLASH_EXPORT_BOOL;
    default:
      return FLASH_EXPORT_OTHER_TYPE;
  }
}

// Fill: the core checks the inputs against the node's contract (float32 or float16, onnxruntime's
// dense row-major tensors) and fills the params; its refusal becomes the node's error.
template <bool kCuda>
OrtStatus* fill_params(const Api& api, const Attributes& a, const Inputs& in, AttentionParams* p) {
  const int32_t device = kCuda ? FLASH_EXPORT_DEVICE_CUDA : FLASH_EXPORT_DEVICE_CPU;
  FlashExportTensor d[4] = {};
  for (size_t i = 0; i < 4; ++i) {
    d[i].data = in.data[i];
    d[i].sizes = in.t[i].dims;
    d[i].rank = static_cast<int32_t>(in.t[i].rank);
    d[i].dtype = core_dtype(in.t[i].type);
    d[i].type_name = type_name(in.t[i].type);
    d[i].device = device;
  }
  FlashExportAttentionOptions o{};
  o.num_heads = a.num_heads;
  o.chunk_size = a.chunk_size;
  o.scale = a.scale;
  o.has_scale = a.has_scale;
  o.causal = a.causal != 0;
  o.device = device;
  o.dtypes = (1u << FLASH_EXPORT_FLOAT32) | (1u << FLASH_EXPORT_FLOAT16);
  char error[FLASH_EXPORT_ERROR_SIZE];
  if (flash_export_attention_params(&d[kQuery], &d[kKey], &d[kValue],
                                    in.has_mask ? &d[kMask] : nullptr, nullptr, &o, p, error,
                                    sizeof(error)) != FLASH_EXPORT_OK) {
    return invalid(api, error);
  }
  return nullptr;
}

// The ORT side of ParallelForFn: runs the core's items on the session's intra-op pool.
struct PoolContext {
  const Api* api;
  const OrtKernelContext* context;
  OrtStatus* status;
};

void ort_parallel_for(void* ctx, void (*fn)(void*, size_t), size_t total, void* data) {
  PoolContext& pool = *static_cast<PoolContext*>(ctx);
  // The core calls this several times per forward; after a failure the later phases are skipped
  // (their output is discarded) and the first error is the one reported.
  if (pool.status != nullptr) return;
  pool.status = pool.api->KernelContext_ParallelFor(pool.context, fn, total, 0, data);
}

// The core's status as an error; the params filler checked every size the kernels refuse first,
// so the generic messages here are a last resort.
OrtStatus* core_status(const Api& api, Status status, const char* device) {
  switch (status) {
    case Status::kOk:
      return nullptr;
    case Status::kInvalidArgument:
      return invalid(api, std::string("the ") + device + " kernel rejected its parameters");
    case Status::kUnsupported:
      return api.CreateStatus(ORT_NOT_IMPLEMENTED,
                              (std::string("FlashAttention: the ") + device +
                               " kernel of this build does not support this dtype or feature")
                                  .c_str());
    case Status::kOutOfMemory:
      return api.CreateStatus(ORT_FAIL, "FlashAttention: out of memory for kernel scratch");
    default:
      return api.CreateStatus(
          ORT_RUNTIME_EXCEPTION,
          (std::string("FlashAttention: ") + device + " kernel failed").c_str());
  }
}

// Dispatch: the output, (B, Lq, E) like query, then the forward on the session's intra-op pool
// (CPU) or on the stream onnxruntime hands out (CUDA).
template <bool kCuda>
OrtStatus* dispatch(const Api& api, OrtKernelContext* context, const TensorInfo& query,
                    AttentionParams& p) {
  OrtValue* out = nullptr;
  if (OrtStatus* s = api.KernelContext_GetOutput(context, 0, query.dims, 3, &out)) return s;
  if (OrtStatus* s = api.GetTensorMutableData(out, &p.out)) return s;
  if constexpr (kCuda) {
    void* stream = nullptr;
    if (OrtStatus* s = api.KernelContext_GetGPUComputeStream(context, &stream)) return s;
    return core_status(api, attention_forward_cuda(p, stream), "CUDA");
  } else {
    PoolContext pool{&api, context, nullptr};
    const Status status = attention_forward_cpu(p, &ort_parallel_for, &pool);
    if (pool.status != nullptr) return pool.status;
    return core_status(api, status, "CPU");
  }
}

template <bool kCuda>
OrtStatus* compute_checked(const Api& api, const Attributes& a, OrtKernelContext* context) {
  Inputs in;
  if (OrtStatus* s = read_inputs(api, context, &in)) return s;
  AttentionParams p;
  if (OrtStatus* s = fill_params<kCuda>(api, a, in, &p)) return s;
  return dispatch<kCuda>(api, context, in.t[kQuery], p);
}

template <bool kCuda>
OrtStatus* compute(void* kernel_ptr, OrtKernelContext* context) {
  const Kernel& kernel = *static_cast<const Kernel*>(kernel_ptr);
  const Api api(kernel.api);
  return no_throw(api, [&] { return compute_checked<kCuda>(api, kernel.attrs, context); });
}

OrtStatus* compute_cpu(void* kernel, OrtKernelContext* context) {
  return compute<false>(kernel, context);
}

// Output 0 has query's element type and shape (B, Lq, E), symbolic dims included. This function
// validates nothing: onnxruntime discards its status. Faults are the kernel's to report, at run,
// with its own messages. What matters here is to always state query's type: onnxruntime first
// types the output after the last dynamically typed input, and a dtype fault there would fail the
// session with its generic type error instead of ours. (onnxruntime 1.31 takes the element type
// from this call; runtimes whose SetOutputTypeShape sets only the shape keep their type error.)
OrtStatus* infer_output_shape_checked(const Api& api, OrtShapeInferContext* context) {
  size_t count = 0;
  if (OrtStatus* s = api.ShapeInferContext_GetInputCount(context, &count)) return s;
  if (count == 0) return nullptr;
  // The info stays owned by the context (releasing it is a double free).
  OrtTensorTypeAndShapeInfo* query = nullptr;
  if (OrtStatus* s = api.ShapeInferContext_GetInputTypeShape(context, kQuery, &query)) return s;
  ONNXTensorElementDataType qt = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  if (OrtStatus* s = api.GetTensorElementType(query, &qt)) return s;
  if (qt == ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED) return nullptr;
  size_t rank = 0;
  if (OrtStatus* s = api.GetDimensionsCount(query, &rank)) return s;
  if (rank == 3) return api.ShapeInferContext_SetOutputTypeShape(context, 0, query);
  // Query's shape is unknown here (or wrong, which the kernel rejects at run time): state the
  // type and rank 3 with fresh symbolic dims (a plain -1 would be taken as a literal size), rather
  // than let onnxruntime guess the type from another input.
  static std::atomic<uint64_t> counter{0};
  const std::string base = "flash_export_unk_" + std::to_string(counter.fetch_add(1)) + "_";
  const std::string dim_names[3] = {base + "0", base + "1", base + "2"};
  const char* symbolic[3] = {dim_names[0].c_str(), dim_names[1].c_str(), dim_names[2].c_str()};
  OrtTensorTypeAndShapeInfo* out = nullptr;
  if (OrtStatus* s = api.CreateTensorTypeAndShapeInfo(&out)) return s;
  const int64_t unknown[3] = {-1, -1, -1};
  OrtStatus* s = api.SetTensorElementType(out, qt);
  if (s == nullptr) s = api.SetDimensions(out, unknown, 3);
  if (s == nullptr) s = api.SetSymbolicDimensions(out, symbolic, 3);
  if (s == nullptr) s = api.ShapeInferContext_SetOutputTypeShape(context, 0, out);
  api.ReleaseTensorTypeAndShapeInfo(out);
  return s;
}

OrtStatus* infer_output_shape(const OrtCustomOp*, OrtShapeInferContext* context) {
  static const Api api = Api(registered_api());
  return no_throw(api, [&] { return infer_output_shape_checked(api, context); });
}

const char* op_name(const OrtCustomOp*) { return kOpName; }
const char* cpu_provider(const OrtCustomOp*) { return nullptr; }
// Inputs are dynamically typed so that a wrong dtype reaches our validation (and its message)
// instead of a generic schema error; the output's type comes from infer_output_shape.
ONNXTensorElementDataType any_type(const OrtCustomOp*, size_t) {
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}
size_t input_count(const OrtCustomOp*) { return 4; }
size_t output_count(const OrtCustomOp*) { return 1; }
OrtCustomOpInputOutputCharacteristic input_characteristic(const OrtCustomOp*, size_t index) {
  return index == kMask ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
OrtCustomOpInputOutputCharacteristic output_characteristic(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType default_memory(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int one(const OrtCustomOp*) { return 1; }
int start_version(const OrtCustomOp*) { return kOpVersion; }
int end_version(const OrtCustomOp*) { return 2147483647; }

OrtCustomOp make_op(const char* (*provider)(const OrtCustomOp*),
                    OrtStatus* (*compute_fn)(void*, OrtKernelContext*)) {
  OrtCustomOp op;
  std::memset(&op, 0, sizeof(op));
  op.version = kApiVersion;
  op.GetName = &op_name;
  op.GetExecutionProviderType = provider;
  op.GetInputType = &any_type;
  op.GetInputTypeCount = &input_count;
  op.GetOutputType = &any_type;
  op.GetOutputTypeCount = &output_count;
  op.KernelDestroy = &destroy_kernel;
  op.GetInputCharacteristic = &input_characteristic;
  op.GetOutputCharacteristic = &output_characteristic;
  op.GetInputMemoryType = &default_memory;
  op.GetVariadicInputMinArity = &one;
  op.GetVariadicInputHomogeneity = &one;
  op.GetVariadicOutputMinArity = &one;
  op.GetVariadicOutputHomogeneity = &one;
  op.CreateKernelV2 = &create_kernel;
  op.KernelComputeV2 = compute_fn;
  op.InferOutputShapeFn = &infer_output_shape;
  op.GetStartVersion = &start_version;
  op.GetEndVersion = &end_version;
  return op;
}

#ifdef FLASH_EXPORT_WITH_CUDA
OrtStatus* compute_cuda(void* kernel, OrtKernelContext* context) {
  return compute<true>(kernel, context);
}
const char* cuda_provider(const OrtCustomOp*) { return "CUDAExecutionProvider"; }
#endif

}  // namespace

const OrtCustomOp* flash_attention_cpu_op() {
  static const OrtCustomOp op = make_op(&cpu_provider, &compute_cpu);
  return &op;
}

const OrtCustomOp* flash_attention_cuda_op() {
#ifdef FLASH_EXPORT_WITH_CUDA
  static const OrtCustomOp op = make_op(&cuda_provider, &compute_cuda);
  return &op;
#else
  return nullptr;
#endif
}

}  // namespace ort
}  // namespace flash_export

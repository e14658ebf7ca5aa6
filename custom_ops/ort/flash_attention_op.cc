// onnxruntime adapter for the node flash_attention_op.h describes: reads the attributes once per
// kernel, validates every input, fills AttentionParams and runs the core on the session's
// intra-op thread pool (CPU) or on the stream onnxruntime hands out (CUDA).
#include "flash_attention_op.h"

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <new>
#include <string>

#include "attributes.h"
#include "flash_attention.h"
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
    if (!std::isfinite(scale.f) || scale.f == 0.0f) {
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
  int64_t dims[8] = {};  // only ranks up to 8 are described; larger ranks are rejected by rank
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

std::string rank_error(const char* name, const TensorInfo& t, const char* expected) {
  return std::string(name) + " has rank " + std::to_string(t.rank) + ", expected " + expected;
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

// The core's status as an error; the adapter checked every size the core refuses first, so the
// generic messages here are a last resort.
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

// The sizes the core refuses (flash_attention.h), checked here so the error says which and why
// instead of the core's bare status. Checked whether or not the call has work to do: the same
// graph would fail on the next non-empty input.
template <bool kCuda>
OrtStatus* check_core_limits(const Api& api, int64_t batch, int64_t heads, int64_t seq_q,
                             int64_t seq_k, int64_t embed, int64_t head_dim) {
  const char* device = kCuda ? "the CUDA kernel" : "the CPU kernel";
  const int64_t max_head_dim = kCuda ? kCudaMaxHeadDim : kCpuMaxHeadDim;
  if (head_dim > max_head_dim) {
    return invalid(api, "head dim " + std::to_string(head_dim) + " (embed " +
                            std::to_string(embed) + " / num_heads " + std::to_string(heads) +
                            ") is over " + device + "'s limit, expected at most " +
                            std::to_string(max_head_dim));
  }
  if constexpr (kCuda) {
    const struct {
      const char* what;
      int64_t value, limit;
    } sizes[] = {{"batch", batch, kCudaMaxGridDim},
                 {"num_heads", heads, kCudaMaxGridDim},
                 {"query sequence length", seq_q, kCudaMaxSeqLen},
                 {"key sequence length", seq_k, kCudaMaxSeqLen}};
    for (const auto& size : sizes) {
      if (size.value > size.limit) {
        return invalid(api, std::string(size.what) + " " + std::to_string(size.value) +
                                " is over " + device + "'s limit, expected at most " +
                                std::to_string(size.limit));
      }
    }
  }
  return nullptr;
}

template <bool kCuda>
OrtStatus* compute_checked(const Api& api, const Attributes& a, OrtKernelContext* context) {
  size_t input_count = 0;
  if (OrtStatus* s = api.KernelContext_GetInputCount(context, &input_count)) return s;
  if (input_count < 3 || input_count > 4) {
    return invalid(api, "got " + std::to_string(input_count) +
                            " inputs, expected 3 or 4 (query, key, value[, mask])");
  }
  TensorInfo t[4];
  const char* names[4] = {"query", "key", "value", "mask"};
  bool has_mask = false;
  for (size_t i = 0; i < input_count; ++i) {
    const OrtValue* value = nullptr;
    if (OrtStatus* s = api.KernelContext_GetInput(context, i, &value)) return s;
    if (value == nullptr) {
      if (i == kMask) continue;  // optional input left empty
      return invalid(api, std::string(names[i]) + " is missing");
    }
    if (OrtStatus* s = describe(api, value, &t[i])) return s;
    if (i == kMask) has_mask = true;
  }
  const TensorInfo& q = t[kQuery];
  const TensorInfo& k = t[kKey];
  const TensorInfo& v = t[kValue];
  for (size_t i = 0; i < 3; ++i) {
    if (t[i].rank != 3)
      return invalid(api, rank_error(names[i], t[i], "3 (batch, sequence, embed)"));
  }
  if (q.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT &&
      q.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
    return invalid(api, std::string("query has element type ") + type_name(q.type) +
                            ", expected float32 or float16");
  }
  for (size_t i = kKey; i <= kValue; ++i) {
    if (t[i].type != q.type) {
      return invalid(api, std::string(names[i]) + " has element type " + type_name(t[i].type) +
                              ", expected " + type_name(q.type) + " (query's element type)");
    }
    if (t[i].dims[0] != q.dims[0]) {
      return invalid(api, std::string(names[i]) + " has batch " + std::to_string(t[i].dims[0]) +
                              ", expected " + std::to_string(q.dims[0]) + " (query's batch)");
    }
    if (t[i].dims[2] != q.dims[2]) {
      return invalid(api, std::string(names[i]) + " has embed " + std::to_string(t[i].dims[2]) +
                              ", expected " + std::to_string(q.dims[2]) + " (query's embed)");
    }
  }
  if (v.dims[1] != k.dims[1]) {
    return invalid(api, "value has sequence length " + std::to_string(v.dims[1]) + ", expected " +
                            std::to_string(k.dims[1]) + " (key's sequence length)");
  }
  const int64_t batch = q.dims[0], seq_q = q.dims[1], seq_k = k.dims[1], embed = q.dims[2];
  if (embed % a.num_heads != 0) {
    return invalid(api, "embed " + std::to_string(embed) + " is not divisible by num_heads " +
                            std::to_string(a.num_heads));
  }
  const int64_t head_dim = embed / a.num_heads;
  if (OrtStatus* s =
          check_core_limits<kCuda>(api, batch, a.num_heads, seq_q, seq_k, embed, head_dim)) {
    return s;
  }

  // Mask: right-aligned numpy broadcasting onto (B, H, Lq, Lk); broadcast dims get stride 0.
  int64_t mask_strides[4] = {0, 0, 0, 0};
  if (has_mask) {
    const TensorInfo& m = t[kMask];
    if (m.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL) {
      return invalid(api,
                     std::string("mask has element type ") + type_name(m.type) + ", expected bool");
    }
    if (m.rank > 4) return invalid(api, rank_error("mask", m, "at most 4"));
    const int64_t target[4] = {batch, a.num_heads, seq_q, seq_k};
    const char* target_names[4] = {"batch", "num_heads", "Lq", "Lk"};
    int64_t stride = 1;
    for (size_t i = 0; i < m.rank; ++i) {
      const size_t axis = m.rank - 1 - i;  // mask axis, counted from the left
      const size_t dim = 3 - i;            // target axis it aligns with
      const int64_t n = m.dims[axis];
      if (n != 1 && n != target[dim]) {
        return invalid(api, "mask dimension " + std::to_string(axis) + " is " + std::to_string(n) +
                                ", expected 1 or " + std::to_string(target[dim]) + " (" +
                                target_names[dim] + ") to broadcast to (B, num_heads, Lq, Lk)");
      }
      mask_strides[dim] = n == 1 ? 0 : stride;
      stride *= n;
    }
  }

  const int64_t out_dims[3] = {batch, seq_q, embed};
  OrtValue* out = nullptr;
  if (OrtStatus* s = api.KernelContext_GetOutput(context, 0, out_dims, 3, &out)) return s;

  AttentionParams p{};  // no mask until one is set below
  void* data[4] = {nullptr, nullptr, nullptr, nullptr};
  for (size_t i = 0; i < 4; ++i) {
    if (i == kMask && !has_mask) continue;
    if (OrtStatus* s = api.GetTensorMutableData(const_cast<OrtValue*>(t[i].value), &data[i])) {
      return s;
    }
  }
  if (OrtStatus* s = api.GetTensorMutableData(out, &p.out)) return s;
  p.q = data[kQuery];
  p.k = data[kKey];
  p.v = data[kValue];
  p.batch = batch;
  p.heads = a.num_heads;
  p.head_dim = head_dim;
  p.seq_q = seq_q;
  p.seq_k = seq_k;
  p.q_batch_stride = p.o_batch_stride = seq_q * embed;
  p.k_batch_stride = p.v_batch_stride = seq_k * embed;
  p.q_row_stride = p.k_row_stride = p.v_row_stride = p.o_row_stride = embed;
  p.q_head_stride = p.k_head_stride = p.v_head_stride = p.o_head_stride = head_dim;
  if (has_mask) {
    p.mask = static_cast<const uint8_t*>(data[kMask]);
    p.mask_batch_stride = mask_strides[0];
    p.mask_head_stride = mask_strides[1];
    p.mask_q_stride = mask_strides[2];
    p.mask_k_stride = mask_strides[3];
  }
  p.chunk_size = a.chunk_size;
  p.scale = a.has_scale ? a.scale
                        : (head_dim > 0 ? 1.0f / std::sqrt(static_cast<float>(head_dim)) : 1.0f);
  p.causal = a.causal != 0;
  p.dtype = q.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? DType::kFloat16 : DType::kFloat32;

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

// flash_export_attention_params (flash_export.h): the one params filler. Every adapter (the
// onnxruntime node, the libtorch shim, the ctypes binding) describes its framework's tensors as
// FlashExportTensor and calls it, so a call is checked against the op's contract, and the
// kernel's params filled, in this file only (as flash-attention's set_params_fprop serves its
// every entry point). Checks run once per call, allocate nothing and dereference nothing but the
// descriptors; a refusal is one line naming the argument, what it must be and what it is.
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <limits>

#include "flash_attention.h"
#include "flash_export.h"

namespace flash_export {
namespace {

using Tensor = FlashExportTensor;
using Options = FlashExportAttentionOptions;

constexpr int32_t kOk = FLASH_EXPORT_OK;
constexpr int32_t kInvalid = FLASH_EXPORT_INVALID_ARGUMENT;
// The kernels' element types, as FlashExportAttentionOptions.dtypes bits.
constexpr uint32_t kKernelTypes =
    (1u << FLASH_EXPORT_FLOAT32) | (1u << FLASH_EXPORT_FLOAT16) | (1u << FLASH_EXPORT_BFLOAT16);

// Writes the refusal into the caller's buffer (cut to its size) and gives the status to return.
class Refuse {
 public:
  Refuse(char* buffer, size_t size) : buffer_(buffer), size_(size) {}
  int32_t operator()(const char* format, ...) const __attribute__((format(printf, 2, 3))) {
    if (buffer_ != nullptr && size_ > 0) {
      va_list args;
      va_start(args, format);
      std::vsnprintf(buffer_, size_, format, args);
      va_end(args);
    }
    return kInvalid;
  }

 private:
  char* buffer_;
  size_t size_;
};

long long ll(int64_t v) { return static_cast<long long>(v); }

const char* core_type_name(int32_t dtype) {
  switch (dtype) {
    case FLASH_EXPORT_FLOAT32:
      return "float32";
    case FLASH_EXPORT_FLOAT16:
      return "float16";
    case FLASH_EXPORT_BFLOAT16:
      return "bfloat16";
    case FLASH_EXPORT_BOOL:
      return "bool";
    default:
      return "another element type";
  }
}

const char* type_name(const Tensor& t) {
  return t.type_name != nullptr ? t.type_name : core_type_name(t.dtype);
}

const char* core_device_name(int32_t device) {
  switch (device) {
    case FLASH_EXPORT_DEVICE_CPU:
      return "cpu";
    case FLASH_EXPORT_DEVICE_CUDA:
      return "cuda";
    default:
      return "another device";
  }
}

const char* device_name(const Tensor& t) {
  return t.device_name != nullptr ? t.device_name : core_device_name(t.device);
}

// "float32 or float16", "float32, float16 or bfloat16": the admitted query types, in words.
void admitted_names(uint32_t admitted, char* out, size_t size) {
  const int32_t types[3] = {FLASH_EXPORT_FLOAT32, FLASH_EXPORT_FLOAT16, FLASH_EXPORT_BFLOAT16};
  int count = 0, total = 0;
  for (int32_t t : types) total += (admitted >> t) & 1u;
  size_t used = 0;
  out[0] = '\0';
  for (int32_t t : types) {
    if (((admitted >> t) & 1u) == 0 || used >= size) continue;
    const char* sep = count == 0 ? "" : count == total - 1 ? " or " : ", ";
    used +=
        static_cast<size_t>(std::snprintf(out + used, size - used, "%s%s", sep, core_type_name(t)));
    ++count;
  }
}

int64_t stride_of(const Tensor& t, int32_t axis) {
  if (t.strides != nullptr) return t.strides[axis];
  int64_t stride = 1;
  for (int32_t i = t.rank - 1; i > axis; --i) stride *= t.sizes[i];
  return stride;
}

bool empty(const Tensor& t) {
  for (int32_t i = 0; i < t.rank; ++i) {
    if (t.sizes[i] == 0) return true;
  }
  return false;
}

int32_t check_options(const Options& o, const Refuse& refuse) {
  if (o.device != FLASH_EXPORT_DEVICE_CPU && o.device != FLASH_EXPORT_DEVICE_CUDA) {
    return refuse("the forward's device is %d, expected FLASH_EXPORT_DEVICE_CPU or _CUDA",
                  o.device);
  }
  if (o.device == FLASH_EXPORT_DEVICE_CPU) {
    if (const char* setting = cpu_isa_setting_error()) return refuse("%s", setting);
  }
  if (o.num_heads < 1) return refuse("num_heads is %lld, expected at least 1", ll(o.num_heads));
  if (o.chunk_size < 1) return refuse("chunk_size is %lld, expected at least 1", ll(o.chunk_size));
  if (o.has_scale && !scale_is_valid(o.scale)) {
    return refuse("scale is %g, expected a finite float32 other than 0", o.scale);
  }
  if ((o.dtypes & ~kKernelTypes) != 0) {
    return refuse(
        "options admit element types 0x%x, expected bits of float32, float16 and "
        "bfloat16 only",
        o.dtypes);
  }
  return kOk;
}

// Descriptors that can be read, then every tensor on the forward's device: query first,
// then the others on query's.
int32_t check_descriptors(const Tensor* const tensors[5], const char* const names[5],
                          int32_t device, const Refuse& refuse) {
  for (int i = 0; i < 5; ++i) {
    const Tensor* t = tensors[i];
    if (t != nullptr && t->rank < 0) return refuse("%s has rank %d", names[i], t->rank);
    if (t != nullptr && t->rank > 0 && t->sizes == nullptr) {
      return refuse("%s has rank %d and no sizes (NULL)", names[i], t->rank);
    }
  }
  const Tensor& q = *tensors[0];
  if (q.device != device) {
    return refuse("query is on %s, expected %s (the forward's device)", device_name(q),
                  core_device_name(device));
  }
  for (int i = 1; i < 5; ++i) {
    if (tensors[i] != nullptr && tensors[i]->device != device) {
      return refuse("%s is on %s, expected %s (query's device)", names[i], device_name(*tensors[i]),
                    device_name(q));
    }
  }
  return kOk;
}

// Ranks and sizes of query, key and value, and their element types (admitted, one for all).
int32_t check_qkv(const Tensor* const t[3], const char* const names[3], uint32_t admitted,
                  const Refuse& refuse) {
  for (int i = 0; i < 3; ++i) {
    if (t[i]->rank != 3) {
      return refuse("%s has rank %d, expected 3 (batch, sequence, embed)", names[i], t[i]->rank);
    }
    for (int32_t d = 0; d < 3; ++d) {
      if (t[i]->sizes[d] < 0) {
        return refuse("%s dimension %d is %lld, expected at least 0", names[i], d,
                      ll(t[i]->sizes[d]));
      }
    }
  }
  const Tensor& q = *t[0];
  if (q.dtype < 0 || q.dtype > 31 || ((admitted >> q.dtype) & 1u) == 0) {
    char expected[64];
    admitted_names(admitted, expected, sizeof(expected));
    return refuse("query has element type %s, expected %s", type_name(q), expected);
  }
  for (int i = 1; i < 3; ++i) {
    if (t[i]->dtype != q.dtype) {
      return refuse("%s has element type %s, expected %s (query's element type)", names[i],
                    type_name(*t[i]), type_name(q));
    }
    if (t[i]->sizes[0] != q.sizes[0]) {
      return refuse("%s has batch %lld, expected %lld (query's batch)", names[i],
                    ll(t[i]->sizes[0]), ll(q.sizes[0]));
    }
    if (t[i]->sizes[2] != q.sizes[2]) {
      return refuse("%s has embed %lld, expected %lld (query's embed)", names[i],
                    ll(t[i]->sizes[2]), ll(q.sizes[2]));
    }
  }
  if (t[2]->sizes[1] != t[1]->sizes[1]) {
    return refuse("value has sequence length %lld, expected %lld (key's sequence length)",
                  ll(t[2]->sizes[1]), ll(t[1]->sizes[1]));
  }
  return kOk;
}

// The sizes the forward's kernel refuses (flash_attention.h), named with their limit.
int32_t check_limits(const AttentionParams& p, int64_t embed, int32_t device,
                     const Refuse& refuse) {
  const bool cuda = device == FLASH_EXPORT_DEVICE_CUDA;
  const char* kernel = cuda ? "the CUDA kernel" : "the CPU kernel";
  const int64_t max_head_dim = cuda ? kCudaMaxHeadDim : kCpuMaxHeadDim;
  if (p.head_dim > max_head_dim) {
    return refuse(
        "head dim %lld (embed %lld / num_heads %lld) is over %s's limit, expected at "
        "most %lld",
        ll(p.head_dim), ll(embed), ll(p.heads), kernel, ll(max_head_dim));
  }
  if (!cuda) return kOk;
  const struct {
    const char* what;
    int64_t value, limit;
  } sizes[] = {{"batch", p.batch, kCudaMaxGridDim},
               {"num_heads", p.heads, kCudaMaxGridDim},
               {"query sequence length", p.seq_q, kCudaMaxSeqLen},
               {"key sequence length", p.seq_k, kCudaMaxSeqLen}};
  for (const auto& size : sizes) {
    if (size.value > size.limit) {
      return refuse("%s %lld is over %s's limit, expected at most %lld", size.what, ll(size.value),
                    kernel, ll(size.limit));
    }
  }
  return kOk;
}

// The kernels read each row's E elements in a run; batch and row strides are free.
int32_t check_rows(const Tensor& t, const char* name, const Refuse& refuse) {
  const int64_t stride = stride_of(t, 2);
  if (t.sizes[2] > 1 && stride != 1 && !empty(t)) {
    return refuse(
        "%s's last dimension has stride %lld, expected 1 (each row's E elements in a "
        "run)",
        name, ll(stride));
  }
  return kOk;
}

int32_t check_out(const Tensor& out, const Tensor& q, const Refuse& refuse) {
  if (out.rank != 3) {
    return refuse("out has rank %d, expected 3 (batch, sequence, embed)", out.rank);
  }
  if (out.dtype != q.dtype) {
    return refuse("out has element type %s, expected %s (query's element type)", type_name(out),
                  type_name(q));
  }
  for (int32_t d = 0; d < 3; ++d) {
    if (out.sizes[d] != q.sizes[d]) {
      return refuse("out has sizes (%lld, %lld, %lld), expected (%lld, %lld, %lld) (query's)",
                    ll(out.sizes[0]), ll(out.sizes[1]), ll(out.sizes[2]), ll(q.sizes[0]),
                    ll(q.sizes[1]), ll(q.sizes[2]));
    }
  }
  return check_rows(out, "out", refuse);
}

// The mask's right-aligned numpy broadcast onto (B, H, Lq, Lk): its strides there, 0 for every
// dimension it broadcasts over.
int32_t check_mask(const Tensor& m, const int64_t target[4], int64_t strides[4],
                   const Refuse& refuse) {
  if (m.dtype != FLASH_EXPORT_BOOL) {
    return refuse("mask has element type %s, expected bool", type_name(m));
  }
  if (m.rank > 4) return refuse("mask has rank %d, expected at most 4", m.rank);
  static const char* const kTargetNames[4] = {"batch", "num_heads", "Lq", "Lk"};
  for (int32_t i = 0; i < m.rank; ++i) {
    const int32_t axis = m.rank - 1 - i;  // mask axis, counted from the left
    const int32_t dim = 3 - i;            // target axis it aligns with
    const int64_t n = m.sizes[axis];
    if (n != 1 && n != target[dim]) {
      return refuse(
          "mask dimension %d is %lld, expected 1 or %lld (%s) to broadcast to (B, "
          "num_heads, Lq, Lk)",
          axis, ll(n), ll(target[dim]), kTargetNames[dim]);
    }
    strides[dim] = n == 1 ? 0 : stride_of(m, axis);
  }
  return kOk;
}

// Pointers, strides and attributes of a call that passed every check.
void set_layout(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor* out,
                const Options& o, AttentionParams& p) {
  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.q_batch_stride = stride_of(q, 0);
  p.q_row_stride = stride_of(q, 1);
  p.k_batch_stride = stride_of(k, 0);
  p.k_row_stride = stride_of(k, 1);
  p.v_batch_stride = stride_of(v, 0);
  p.v_row_stride = stride_of(v, 1);
  const int64_t embed = p.heads * p.head_dim;
  if (out != nullptr) {
    p.out = out->data;
    p.o_batch_stride = stride_of(*out, 0);
    p.o_row_stride = stride_of(*out, 1);
  } else {  // the contiguous (B, Lq, E) output the caller allocates next
    p.o_batch_stride = p.seq_q * embed;
    p.o_row_stride = embed;
  }
  p.q_head_stride = p.k_head_stride = p.v_head_stride = p.o_head_stride = p.head_dim;
  p.chunk_size = o.chunk_size;
  p.scale = o.has_scale
                ? static_cast<float>(o.scale)
                : (p.head_dim > 0 ? 1.0f / std::sqrt(static_cast<float>(p.head_dim)) : 1.0f);
  p.causal = o.causal;
  p.dtype = static_cast<DType>(q.dtype);
}

int32_t fill(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor* mask,
             const Tensor* out, const Options& o, AttentionParams& p, const Refuse& refuse) {
  const Tensor* const tensors[5] = {&q, &k, &v, mask, out};
  const char* const names[5] = {"query", "key", "value", "mask", "out"};
  if (int32_t s = check_options(o, refuse)) return s;
  if (int32_t s = check_descriptors(tensors, names, o.device, refuse)) return s;
  if (int32_t s = check_qkv(tensors, names, o.dtypes == 0 ? kKernelTypes : o.dtypes, refuse)) {
    return s;
  }
  const int64_t embed = q.sizes[2];
  if (embed % o.num_heads != 0) {
    return refuse("embed %lld is not divisible by num_heads %lld", ll(embed), ll(o.num_heads));
  }
  p.batch = q.sizes[0];
  p.heads = o.num_heads;
  p.head_dim = embed / o.num_heads;
  p.seq_q = q.sizes[1];
  p.seq_k = k.sizes[1];
  if (int32_t s = check_limits(p, embed, o.device, refuse)) return s;
  for (int i = 0; i < 3; ++i) {
    if (int32_t s = check_rows(*tensors[i], names[i], refuse)) return s;
  }
  if (out != nullptr) {
    if (int32_t s = check_out(*out, q, refuse)) return s;
  }
  if (mask != nullptr) {
    const int64_t target[4] = {p.batch, p.heads, p.seq_q, p.seq_k};
    int64_t strides[4] = {0, 0, 0, 0};
    if (int32_t s = check_mask(*mask, target, strides, refuse)) return s;
    p.mask = static_cast<const uint8_t*>(mask->data);
    p.mask_batch_stride = strides[0];
    p.mask_head_stride = strides[1];
    p.mask_q_stride = strides[2];
    p.mask_k_stride = strides[3];
  }
  set_layout(q, k, v, out, o, p);
  return kOk;
}

}  // namespace

bool scale_is_valid(double scale) {
  // Range first: converting a double past float's range to float is undefined behaviour.
  if (!std::isfinite(scale) || std::fabs(scale) > std::numeric_limits<float>::max()) return false;
  return static_cast<float>(scale) != 0.0f;
}

}  // namespace flash_export

extern "C" size_t flash_export_tensor_size(void) { return sizeof(FlashExportTensor); }

extern "C" size_t flash_export_options_size(void) { return sizeof(FlashExportAttentionOptions); }

extern "C" int32_t flash_export_attention_params(
    const FlashExportTensor* query, const FlashExportTensor* key, const FlashExportTensor* value,
    const FlashExportTensor* mask, const FlashExportTensor* out,
    const FlashExportAttentionOptions* options, FlashExportAttentionParams* params, char* error,
    size_t error_size) {
  const flash_export::Refuse refuse(error, error_size);
  if (params == nullptr) return refuse("params is NULL");
  *params = FlashExportAttentionParams{};
  if (query == nullptr || key == nullptr || value == nullptr || options == nullptr) {
    return refuse("query, key, value and options must not be NULL");
  }
  const int32_t status =
      flash_export::fill(*query, *key, *value, mask, out, *options, *params, refuse);
  if (status != FLASH_EXPORT_OK) *params = FlashExportAttentionParams{};
  return status;
}

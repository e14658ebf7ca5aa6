// flash_export_attention_params (flash_export.h): the one params filler. Every adapter (the
// onnxruntime node, the libtorch shim, the ctypes binding) describes its framework's tensors as
// FlashExportTensor and calls it, so a call is checked against the op's contract, and the
// kernel's params filled, in this file only (as flash-attention's set_params_fprop serves its
// every entry point). Checks run once per call, allocate nothing and dereference nothing but the
// descriptors; a refusal is one line naming the argument, what it must be and what it is.
#include <cmath>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
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

// The words a refusal uses for the ABI's element type and device codes.
struct Named {
  int32_t code;
  const char* name;
};
constexpr Named kTypeNames[] = {{FLASH_EXPORT_FLOAT32, "float32"},
                                {FLASH_EXPORT_FLOAT16, "float16"},
                                {FLASH_EXPORT_BFLOAT16, "bfloat16"},
                                {FLASH_EXPORT_BOOL, "bool"}};
constexpr Named kDeviceNames[] = {{FLASH_EXPORT_DEVICE_CPU, "cpu"},
                                  {FLASH_EXPORT_DEVICE_CUDA, "cuda"}};

template <size_t N>
const char* name_of(const Named (&table)[N], int32_t code, const char* other) {
  for (const Named& named : table) {
    if (named.code == code) return named.name;
  }
  return other;
}

const char* core_type_name(int32_t dtype) {
  return name_of(kTypeNames, dtype, "another element type");
}

const char* type_name(const Tensor& t) {
  return t.type_name != nullptr ? t.type_name : core_type_name(t.dtype);
}

const char* core_device_name(int32_t device) {
  return name_of(kDeviceNames, device, "another device");
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
  if (o.kv_num_heads < 0 || (o.kv_num_heads > 0 && o.num_heads % o.kv_num_heads != 0)) {
    return refuse("kv_num_heads is %lld, expected a divisor of num_heads %lld", ll(o.kv_num_heads),
                  ll(o.num_heads));
  }
  if (o.chunk_size < 1) return refuse("chunk_size is %lld, expected at least 1", ll(o.chunk_size));
  if (o.has_scale && !scale_is_valid(o.scale)) {
    return refuse("scale is %g, expected a finite float32 other than 0", o.scale);
  }
  if (o.window_size < 0) {
    return refuse("window_size is %lld, expected at least 0 (0: no window)", ll(o.window_size));
  }
  if (!softcap_is_valid(o.softcap)) {
    return refuse("softcap is %g, expected a finite float32 of at least 0 (0: none)", o.softcap);
  }
  if (o.output_layout != FLASH_EXPORT_LAYOUT_ROWS && o.output_layout != FLASH_EXPORT_LAYOUT_HEADS) {
    return refuse("output_layout is %d, expected 0 (B, Lq, H*Dv) or 1 (B, H, Lq, Dv)",
                  o.output_layout);
  }
  if ((o.dtypes & ~kKernelTypes) != 0) {
    return refuse(
        "options admit element types 0x%x, expected bits of float32, float16 and "
        "bfloat16 only",
        o.dtypes);
  }
  return kOk;
}

// The tensors of a call, in the order messages and descriptors checks walk them.
enum Slot { kQuery = 0, kKey, kValue, kMask, kSeqlens, kBias, kOut, kSlots };
const char* const kNames[kSlots] = {"query", "key", "value", "mask", "seqlens_k", "bias", "out"};

// Descriptors that can be read, then every tensor on the forward's device: query first,
// then the others on query's.
int32_t check_descriptors(const Tensor* const tensors[kSlots], int32_t device,
                          const Refuse& refuse) {
  for (int i = 0; i < kSlots; ++i) {
    const Tensor* t = tensors[i];
    if (t != nullptr && t->rank < 0) return refuse("%s has rank %d", kNames[i], t->rank);
    if (t != nullptr && t->rank > 0 && t->sizes == nullptr) {
      return refuse("%s has rank %d and no sizes (NULL)", kNames[i], t->rank);
    }
  }
  const Tensor& q = *tensors[kQuery];
  if (q.device != device) {
    return refuse("query is on %s, expected %s (the forward's device)", device_name(q),
                  core_device_name(device));
  }
  for (int i = 1; i < kSlots; ++i) {
    if (tensors[i] != nullptr && tensors[i]->device != device) {
      return refuse("%s is on %s, expected %s (query's device)", kNames[i],
                    device_name(*tensors[i]), device_name(q));
    }
  }
  return kOk;
}

// One of query, key and value as the kernels read it: (B, L, heads, dim) with its strides,
// whichever layout its rank says.
struct Operand {
  int64_t batch = 0, length = 0, heads = 0, dim = 0;
  int64_t batch_stride = 0, row_stride = 0, head_stride = 0, last_stride = 1;
};

// Reads one of query, key and value: rank 3 is (B, L, heads * dim), dim from `heads` (the
// attribute); rank 4 is (B, heads, L, dim), its dimension 1 checked against `heads`.
int32_t read_operand(const Tensor& t, const char* name, int64_t heads, const char* heads_name,
                     Operand* out, const Refuse& refuse) {
  if (t.rank != 3 && t.rank != 4) {
    return refuse(
        "%s has rank %d, expected 3 (batch, sequence, heads * head dim) or 4 (batch, heads, "
        "sequence, head dim)",
        name, t.rank);
  }
  for (int32_t d = 0; d < t.rank; ++d) {
    if (t.sizes[d] < 0) {
      return refuse("%s dimension %d is %lld, expected at least 0", name, d, ll(t.sizes[d]));
    }
  }
  Operand& o = *out;
  o.batch = t.sizes[0];
  o.batch_stride = stride_of(t, 0);
  o.heads = heads;
  if (t.rank == 3) {
    if (t.sizes[2] % heads != 0) {
      return refuse("%s has embed %lld, not divisible by %s %lld", name, ll(t.sizes[2]), heads_name,
                    ll(heads));
    }
    o.length = t.sizes[1];
    o.dim = t.sizes[2] / heads;
    o.row_stride = stride_of(t, 1);
    o.head_stride = o.dim * stride_of(t, 2);
    o.last_stride = stride_of(t, 2);
  } else {
    if (t.sizes[1] != heads) {
      return refuse("%s has %lld heads (dimension 1), expected %lld (%s)", name, ll(t.sizes[1]),
                    ll(heads), heads_name);
    }
    o.length = t.sizes[2];
    o.dim = t.sizes[3];
    o.head_stride = stride_of(t, 1);
    o.row_stride = stride_of(t, 2);
    o.last_stride = stride_of(t, 3);
  }
  // The kernels read each row's D elements of a head in a run; every other stride is free.
  if (o.dim > 1 && o.last_stride != 1 && !empty(t)) {
    return refuse(
        "%s's last dimension has stride %lld, expected 1 (each head's elements of a row in a "
        "run)",
        name, ll(o.last_stride));
  }
  return kOk;
}

// Element types of query, key and value: admitted, one for all.
int32_t check_types(const Tensor* const t[kSlots], uint32_t admitted, const Refuse& refuse) {
  const Tensor& q = *t[kQuery];
  if (q.dtype < 0 || q.dtype > 31 || ((admitted >> q.dtype) & 1u) == 0) {
    char expected[64];
    admitted_names(admitted, expected, sizeof(expected));
    return refuse("query has element type %s, expected %s", type_name(q), expected);
  }
  for (int i = kKey; i <= kValue; ++i) {
    if (t[i]->dtype != q.dtype) {
      return refuse("%s has element type %s, expected %s (query's element type)", kNames[i],
                    type_name(*t[i]), type_name(q));
    }
  }
  return kOk;
}

// Query, key and value against each other: batch, sequence lengths and head dims.
int32_t check_operands(const Operand ops[3], const Refuse& refuse) {
  const Operand &q = ops[0], &k = ops[1], &v = ops[2];
  for (int i = 1; i < 3; ++i) {
    if (ops[i].batch != q.batch) {
      return refuse("%s has batch %lld, expected %lld (query's batch)", kNames[i], ll(ops[i].batch),
                    ll(q.batch));
    }
  }
  if (k.dim != q.dim) {
    return refuse("key has head dim %lld, expected %lld (query's head dim)", ll(k.dim), ll(q.dim));
  }
  if (v.length != k.length) {
    return refuse("value has sequence length %lld, expected %lld (key's sequence length)",
                  ll(v.length), ll(k.length));
  }
  return kOk;
}

// The sizes and features the forward's kernel refuses (flash_attention.h), named with their limit.
int32_t check_limits(const AttentionParams& p, int32_t device, const Refuse& refuse) {
  const bool cuda = device == FLASH_EXPORT_DEVICE_CUDA;
  const char* kernel = cuda ? "the CUDA kernel" : "the CPU kernel";
  const int64_t max_head_dim = cuda ? kCudaMaxHeadDim : kCpuMaxHeadDim;
  const struct {
    const char* what;
    int64_t value;
  } dims[] = {{"head dim", p.head_dim}, {"value head dim", p.head_dim_v}};
  for (const auto& dim : dims) {
    if (dim.value > max_head_dim) {
      return refuse("%s %lld is over %s's limit, expected at most %lld", dim.what, ll(dim.value),
                    kernel, ll(max_head_dim));
    }
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
  // Contract v2 features the CUDA kernels do not implement: refused by name, never ignored.
  const char* missing = p.seqlens_k != nullptr       ? "seqlens_k"
                        : p.bias != nullptr          ? "bias"
                        : p.window_size > 0          ? "window_size"
                        : p.softcap > 0.0f           ? "softcap"
                        : p.head_dim_v != p.head_dim ? "a value head dim other than the key's"
                                                     : nullptr;
  if (missing != nullptr) {
    return refuse("%s is not supported by the CUDA kernel of this build; run the call on the CPU",
                  missing);
  }
  return kOk;
}

// The output's shape in `layout`, as message text and sizes.
void output_shape(const AttentionParams& p, int32_t layout, int64_t shape[4], int32_t* rank) {
  if (layout == FLASH_EXPORT_LAYOUT_HEADS) {
    *rank = 4;
    shape[0] = p.batch, shape[1] = p.heads, shape[2] = p.seq_q, shape[3] = p.head_dim_v;
  } else {
    *rank = 3;
    shape[0] = p.batch, shape[1] = p.seq_q, shape[2] = p.heads * p.head_dim_v, shape[3] = 0;
  }
}

// `out` against the output's shape and type; its strides then place the rows.
int32_t check_out(const Tensor& out, const Tensor& q, const AttentionParams& p, int32_t layout,
                  const Refuse& refuse) {
  int64_t shape[4];
  int32_t rank = 0;
  output_shape(p, layout, shape, &rank);
  if (out.dtype != q.dtype) {
    return refuse("out has element type %s, expected %s (query's element type)", type_name(out),
                  type_name(q));
  }
  bool same = out.rank == rank;
  for (int32_t d = 0; same && d < rank; ++d) same = out.sizes[d] == shape[d];
  if (!same) {
    char got[96] = "", want[96] = "";
    for (int32_t d = 0, used = 0; d < out.rank && d < 8; ++d) {
      used +=
          std::snprintf(got + used, sizeof(got) - used, "%s%lld", d ? ", " : "", ll(out.sizes[d]));
      if (used >= static_cast<int32_t>(sizeof(got))) break;
    }
    for (int32_t d = 0, used = 0; d < rank; ++d) {
      used +=
          std::snprintf(want + used, sizeof(want) - used, "%s%lld", d ? ", " : "", ll(shape[d]));
    }
    return refuse("out has sizes (%s), expected (%s) (the output in output_layout %d)", got, want,
                  layout);
  }
  const int64_t last = stride_of(out, rank - 1);
  if (p.head_dim_v > 1 && last != 1 && !empty(out)) {
    return refuse(
        "out's last dimension has stride %lld, expected 1 (each head's elements of a "
        "row in a run)",
        ll(last));
  }
  return kOk;
}

// The right-aligned numpy broadcast of the mask or the bias onto (B, H, Lq, Lk): its strides
// there, 0 for every dimension it broadcasts over.
int32_t check_broadcast(const Tensor& m, const char* name, const int64_t target[4],
                        int64_t strides[4], const Refuse& refuse) {
  if (m.rank > 4) return refuse("%s has rank %d, expected at most 4", name, m.rank);
  static const char* const kTargetNames[4] = {"batch", "num_heads", "Lq", "Lk"};
  for (int32_t i = 0; i < m.rank; ++i) {
    const int32_t axis = m.rank - 1 - i;  // axis of the tensor, counted from the left
    const int32_t dim = 3 - i;            // target axis it aligns with
    const int64_t n = m.sizes[axis];
    if (n != 1 && n != target[dim]) {
      return refuse(
          "%s dimension %d is %lld, expected 1 or %lld (%s) to broadcast to (B, "
          "num_heads, Lq, Lk)",
          name, axis, ll(n), ll(target[dim]), kTargetNames[dim]);
    }
    strides[dim] = n == 1 ? 0 : stride_of(m, axis);
  }
  return kOk;
}

// seqlens_k: int32 (B,), contiguous; on the CPU each value in [-1, Lk - 1] (read here, so that
// no forward reads past a key tensor; a CUDA forward's values are on the device).
int32_t check_seqlens(const Tensor& s, const AttentionParams& p, int32_t device,
                      const Refuse& refuse) {
  if (s.dtype != FLASH_EXPORT_INT32) {
    return refuse("seqlens_k has element type %s, expected int32", type_name(s));
  }
  if (s.rank != 1 || s.sizes[0] != p.batch) {
    const long long n = s.rank >= 1 ? ll(s.sizes[0]) : -1;
    if (s.rank != 1) return refuse("seqlens_k has rank %d, expected 1 (batch,)", s.rank);
    return refuse("seqlens_k has %lld values, expected %lld (query's batch)", n, ll(p.batch));
  }
  if (p.batch > 1 && stride_of(s, 0) != 1) {
    return refuse("seqlens_k has stride %lld, expected 1 (contiguous)", ll(stride_of(s, 0)));
  }
  if (device != FLASH_EXPORT_DEVICE_CPU) return kOk;
  const int32_t* values = static_cast<const int32_t*>(s.data);
  for (int64_t b = 0; b < p.batch; ++b) {
    if (values[b] < -1 || values[b] > p.seq_k - 1) {
      return refuse(
          "seqlens_k[%lld] is %d, expected -1 to %lld (the valid keys of a sequence minus "
          "one, below key's sequence length %lld)",
          ll(b), values[b], ll(p.seq_k - 1), ll(p.seq_k));
    }
  }
  return kOk;
}

// Pointers, strides and attributes of a call that passed every check.
void set_layout(const Operand ops[3], const Tensor* const t[kSlots], const Options& o,
                AttentionParams& p) {
  const Operand &q = ops[0], &k = ops[1], &v = ops[2];
  p.q = t[kQuery]->data;
  p.k = t[kKey]->data;
  p.v = t[kValue]->data;
  p.q_batch_stride = q.batch_stride, p.q_row_stride = q.row_stride, p.q_head_stride = q.head_stride;
  p.k_batch_stride = k.batch_stride, p.k_row_stride = k.row_stride, p.k_head_stride = k.head_stride;
  p.v_batch_stride = v.batch_stride, p.v_row_stride = v.row_stride, p.v_head_stride = v.head_stride;
  const bool heads_first = o.output_layout == FLASH_EXPORT_LAYOUT_HEADS;
  if (const Tensor* out = t[kOut]) {
    p.out = out->data;
    p.o_batch_stride = stride_of(*out, 0);
    if (heads_first) {
      p.o_head_stride = stride_of(*out, 1);
      p.o_row_stride = stride_of(*out, 2);
    } else {
      p.o_row_stride = stride_of(*out, 1);
      p.o_head_stride = p.head_dim_v * stride_of(*out, 2);
    }
  } else if (heads_first) {  // the contiguous (B, H, Lq, Dv) output the caller allocates next
    p.o_batch_stride = p.heads * p.seq_q * p.head_dim_v;
    p.o_head_stride = p.seq_q * p.head_dim_v;
    p.o_row_stride = p.head_dim_v;
  } else {  // the contiguous (B, Lq, H*Dv) output the caller allocates next
    p.o_batch_stride = p.seq_q * p.heads * p.head_dim_v;
    p.o_row_stride = p.heads * p.head_dim_v;
    p.o_head_stride = p.head_dim_v;
  }
  p.chunk_size = o.chunk_size;
  p.scale = o.has_scale
                ? static_cast<float>(o.scale)
                : (p.head_dim > 0 ? 1.0f / std::sqrt(static_cast<float>(p.head_dim)) : 1.0f);
  p.causal = o.causal;
  p.dtype = static_cast<DType>(t[kQuery]->dtype);
  p.window_size = o.window_size;
  p.softcap = static_cast<float>(o.softcap);
}

int32_t fill(const Tensor* const t[kSlots], const Options& o, AttentionParams& p,
             const Refuse& refuse) {
  if (int32_t s = check_options(o, refuse)) return s;
  if (int32_t s = check_descriptors(t, o.device, refuse)) return s;
  const int64_t kv_heads = o.kv_num_heads > 0 ? o.kv_num_heads : o.num_heads;
  Operand ops[3];
  if (int32_t s = read_operand(*t[kQuery], "query", o.num_heads, "num_heads", &ops[0], refuse)) {
    return s;
  }
  const char* kv_name = o.kv_num_heads > 0 ? "kv_num_heads" : "num_heads";
  if (int32_t s = read_operand(*t[kKey], "key", kv_heads, kv_name, &ops[1], refuse)) return s;
  if (int32_t s = read_operand(*t[kValue], "value", kv_heads, kv_name, &ops[2], refuse)) return s;
  if (int32_t s = check_types(t, o.dtypes == 0 ? kKernelTypes : o.dtypes, refuse)) return s;
  if (int32_t s = check_operands(ops, refuse)) return s;
  p.batch = ops[0].batch;
  p.heads = o.num_heads;
  p.kv_heads = kv_heads;
  p.head_dim = ops[0].dim;
  p.head_dim_v = ops[2].dim;
  p.seq_q = ops[0].length;
  p.seq_k = ops[1].length;
  if (const Tensor* s = t[kSeqlens]) p.seqlens_k = static_cast<const int32_t*>(s->data);
  if (const Tensor* b = t[kBias]) p.bias = b->data;
  p.window_size = o.window_size;
  p.softcap = static_cast<float>(o.softcap);
  if (int32_t s = check_limits(p, o.device, refuse)) return s;
  if (const Tensor* out = t[kOut]) {
    if (int32_t s = check_out(*out, *t[kQuery], p, o.output_layout, refuse)) return s;
  }
  const int64_t target[4] = {p.batch, p.heads, p.seq_q, p.seq_k};
  if (const Tensor* m = t[kMask]) {
    if (m->dtype != FLASH_EXPORT_BOOL) {
      return refuse("mask has element type %s, expected bool", type_name(*m));
    }
    int64_t strides[4] = {0, 0, 0, 0};
    if (int32_t s = check_broadcast(*m, "mask", target, strides, refuse)) return s;
    p.mask = static_cast<const uint8_t*>(m->data);
    p.mask_batch_stride = strides[0];
    p.mask_head_stride = strides[1];
    p.mask_q_stride = strides[2];
    p.mask_k_stride = strides[3];
  }
  if (const Tensor* s = t[kSeqlens]) {
    if (int32_t r = check_seqlens(*s, p, o.device, refuse)) return r;
  }
  if (const Tensor* b = t[kBias]) {
    if (b->dtype != t[kQuery]->dtype) {
      return refuse("bias has element type %s, expected %s (query's element type)", type_name(*b),
                    type_name(*t[kQuery]));
    }
    int64_t strides[4] = {0, 0, 0, 0};
    if (int32_t s = check_broadcast(*b, "bias", target, strides, refuse)) return s;
    p.bias_batch_stride = strides[0];
    p.bias_head_stride = strides[1];
    p.bias_q_stride = strides[2];
    p.bias_k_stride = strides[3];
  }
  set_layout(ops, t, o, p);
  return kOk;
}

// The filler behind both entry points: *params zeroed, filled, and zeroed again on a refusal.
int32_t fill_params(const FlashExportAttentionInputs& in, const Options& options,
                    AttentionParams* params, const Refuse& refuse) {
  *params = FlashExportAttentionParams{};
  if (in.query == nullptr || in.key == nullptr || in.value == nullptr) {
    return refuse("query, key, value and options must not be NULL");
  }
  const Tensor* const tensors[kSlots] = {in.query,     in.key,  in.value, in.mask,
                                         in.seqlens_k, in.bias, in.out};
  const int32_t status = fill(tensors, options, *params, refuse);
  if (status != kOk) *params = FlashExportAttentionParams{};
  return status;
}

}  // namespace

bool scale_is_valid(double scale) {
  // Range first: converting a double past float's range to float is undefined behaviour.
  if (!std::isfinite(scale) || std::fabs(scale) > std::numeric_limits<float>::max()) return false;
  return static_cast<float>(scale) != 0.0f;
}

bool softcap_is_valid(double softcap) {
  return std::isfinite(softcap) && softcap >= 0.0 && softcap <= std::numeric_limits<float>::max();
}

}  // namespace flash_export

extern "C" size_t flash_export_tensor_size(void) { return sizeof(FlashExportTensor); }

extern "C" size_t flash_export_options_size(void) { return sizeof(FlashExportAttentionOptions); }

extern "C" size_t flash_export_inputs_size(void) { return sizeof(FlashExportAttentionInputs); }

extern "C" int32_t flash_export_attention_params_v2(const FlashExportAttentionInputs* inputs,
                                                    const FlashExportAttentionOptions* options,
                                                    FlashExportAttentionParams* params, char* error,
                                                    size_t error_size) {
  const flash_export::Refuse refuse(error, error_size);
  if (params == nullptr) return refuse("params is NULL");
  *params = FlashExportAttentionParams{};
  if (inputs == nullptr || options == nullptr) {
    return refuse("query, key, value and options must not be NULL");
  }
  return flash_export::fill_params(*inputs, *options, params, refuse);
}

extern "C" int32_t flash_export_attention_params(
    const FlashExportTensor* query, const FlashExportTensor* key, const FlashExportTensor* value,
    const FlashExportTensor* mask, const FlashExportTensor* out,
    const FlashExportAttentionOptions* options, FlashExportAttentionParams* params, char* error,
    size_t error_size) {
  const flash_export::Refuse refuse(error, error_size);
  if (params == nullptr) return refuse("params is NULL");
  *params = FlashExportAttentionParams{};
  if (options == nullptr) return refuse("query, key, value and options must not be NULL");
  // Only the v1 fields are read: a caller built against the v1 header passes a smaller struct.
  FlashExportAttentionOptions v1{};
  std::memcpy(&v1, options, offsetof(FlashExportAttentionOptions, kv_num_heads));
  FlashExportAttentionInputs inputs{};
  inputs.query = query, inputs.key = key, inputs.value = value, inputs.mask = mask;
  inputs.out = out;
  return flash_export::fill_params(inputs, v1, params, refuse);
}

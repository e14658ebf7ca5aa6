// The libtorch shim: registers flash_export::attention for C++ processes (torch::jit::load of a
// TorchScript-native artifact, AOTIModelPackageLoader of a .pt2 package). Its CPU kernel is an
// adapter over the kernel core's public C ABI (flash_export.h), the one the ctypes binding behind
// the Python registration (flash_export/torch_op.py) calls: it validates every dimension, fills
// the params struct, runs the core's items on ATen's intra-op pool and maps the status to an
// error. The schema string is the Python one, character for character (a test compares them).
//
// Load it before the model: link it (with --no-as-needed) or dlopen it with RTLD_GLOBAL. A Python
// process never needs it: `import flash_export` registers the op there, and this library then
// refuses to load (the schema would be defined twice).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <string>

#include "flash_export.h"

namespace flash_export {
namespace {

constexpr const char* kName = "flash_export::attention";

int32_t dtype_code(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return FLASH_EXPORT_FLOAT32;
    case at::kHalf:
      return FLASH_EXPORT_FLOAT16;
    case at::kBFloat16:
      return FLASH_EXPORT_BFLOAT16;
    default:
      TORCH_CHECK(false, kName, ": the CPU kernel runs float32, float16 or bfloat16, got ", type);
  }
}

const char* status_name(int32_t status) {
  switch (status) {
    case FLASH_EXPORT_INVALID_ARGUMENT:
      return "invalid_argument";
    case FLASH_EXPORT_UNSUPPORTED:
      return "unsupported";
    case FLASH_EXPORT_DEVICE_ERROR:
      return "device_error";
    case FLASH_EXPORT_OUT_OF_MEMORY:
      return "out_of_memory";
    default:
      return "?";
  }
}

#ifdef _OPENMP
// The core's parallel_for on ATen's intra-op pool: the team that just ran the projections, whose
// threads are still spinning for work, runs the items (threads of the kernel's own would contend
// with them). One task per thread, each pulling item indices from a counter, so uneven items
// (causal rows) balance. ATen's OpenMP parallel_for is header code: it needs this file compiled
// with OpenMP (CMakeLists.txt), or it runs serially.
void aten_parallel_for(void*, void (*fn)(void*, size_t), size_t total, void* data) {
  std::atomic<size_t> next{0};
  const int64_t team = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(total));
  at::parallel_for(0, team, 1, [&](int64_t, int64_t) {
    for (size_t i = next.fetch_add(1); i < total; i = next.fetch_add(1)) fn(data, i);
  });
}
#endif

// The forward on ATen's pool where this build has one, else on threads of the kernel's own.
int32_t forward(const FlashExportAttentionParams& p) {
  const int32_t threads = static_cast<int32_t>(at::get_num_threads());
#ifdef _OPENMP
  return flash_export_attention_forward_cpu_pool(&p, &aten_parallel_for, nullptr, threads);
#else
  return flash_export_attention_forward_cpu_threads(&p, threads);
#endif
}

// query (B, Lq, E), key and value (B, Lk, E); mask bool broadcastable to (B, H, Lq, Lk).
at::Tensor attention_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                         const std::optional<at::Tensor>& mask, int64_t num_heads,
                         int64_t chunk_size, bool causal, double scale) {
  for (const at::Tensor* t : {&query, &key, &value}) {
    TORCH_CHECK(t->dim() == 3, kName, ": query, key and value must be (B, L, E), got rank ",
                t->dim());
    TORCH_CHECK(t->scalar_type() == query.scalar_type(), kName, ": key and value must be ",
                query.scalar_type(), " like query, got ", t->scalar_type());
  }
  const int64_t batch = query.size(0), seq_q = query.size(1), embed = query.size(2);
  const int64_t seq_k = key.size(1);
  TORCH_CHECK(key.sizes() == at::IntArrayRef({batch, seq_k, embed}) && value.sizes() == key.sizes(),
              kName, ": key and value must be (B, Lk, E) = (", batch, ", ", seq_k, ", ", embed,
              ") for query ", query.sizes(), ", got ", key.sizes(), " and ", value.sizes());
  TORCH_CHECK(num_heads >= 1 && embed % num_heads == 0, kName,
              ": num_heads must be >= 1 and divide E = ", embed, ", got ", num_heads);
  TORCH_CHECK(chunk_size >= 1, kName, ": chunk_size must be >= 1, got ", chunk_size);
  const char* isa_error = flash_export_cpu_isa_error();
  TORCH_CHECK(isa_error == nullptr, kName, ": ", isa_error == nullptr ? "" : isa_error);

  // The core reads any batch and row strides, but each row's E elements in a run.
  auto rows = [](const at::Tensor& t) { return t.stride(2) == 1 ? t : t.contiguous(); };
  const at::Tensor q = rows(query), k = rows(key), v = rows(value);
  at::Tensor out = at::empty({batch, seq_q, embed}, query.options());  // (B, Lq, E)
  FlashExportAttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.batch = batch;
  p.heads = num_heads;
  p.head_dim = embed / num_heads;
  p.seq_q = seq_q;
  p.seq_k = seq_k;
  p.q_batch_stride = q.stride(0);
  p.q_row_stride = q.stride(1);
  p.k_batch_stride = k.stride(0);
  p.k_row_stride = k.stride(1);
  p.v_batch_stride = v.stride(0);
  p.v_row_stride = v.stride(1);
  p.o_batch_stride = out.stride(0);
  p.o_row_stride = out.stride(1);
  p.q_head_stride = p.k_head_stride = p.v_head_stride = p.o_head_stride = p.head_dim;
  at::Tensor allowed;  // (B, H, Lq, Lk), broadcast dimensions of stride 0
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, kName,
                ": mask must be bool (True = attend), got ", mask->scalar_type());
    TORCH_CHECK(mask->dim() <= 4, kName, ": mask must broadcast to (B, H, Lq, Lk), got rank ",
                mask->dim());
    const std::vector<int64_t> target = {batch, num_heads, seq_q, seq_k};
    const int64_t offset = 4 - mask->dim();
    for (int64_t i = 0; i < mask->dim(); ++i) {
      TORCH_CHECK(mask->size(i) == 1 || mask->size(i) == target[offset + i], kName,
                  ": mask of shape ", mask->sizes(),
                  " does not broadcast to (B, H, Lq, Lk) = ", at::IntArrayRef(target));
    }
    allowed = mask->expand(target);
    p.mask = static_cast<const uint8_t*>(allowed.data_ptr());
    p.mask_batch_stride = allowed.stride(0);
    p.mask_head_stride = allowed.stride(1);
    p.mask_q_stride = allowed.stride(2);
    p.mask_k_stride = allowed.stride(3);
  }
  p.chunk_size = chunk_size;
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.dtype = static_cast<FlashExportDType>(dtype_code(query.scalar_type()));
  const int32_t status = forward(p);
  TORCH_CHECK(status == FLASH_EXPORT_OK, kName, ": the CPU forward returned status ", status, " (",
              status_name(status), ")");
  return out;
}

}  // namespace
}  // namespace flash_export

TORCH_LIBRARY(flash_export, m) {
  m.def(
      "attention(Tensor query, Tensor key, Tensor value, Tensor? mask, int num_heads, "
      "int chunk_size, bool causal, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(flash_export, CPU, m) { m.impl("attention", &flash_export::attention_cpu); }

// The libtorch shim: registers flash_export::attention for C++ processes (torch::jit::load of a
// TorchScript-native artifact, AOTIModelPackageLoader of a .pt2 package). Its CPU kernel is an
// adapter over the kernel core's public C entry point (flash_export.h), the one the ctypes binding
// behind the Python registration (flash_export/torch_op.py) calls: it validates every dimension,
// fills the params struct and maps the status to an error. The schema string is the Python one,
// character for character (a test compares them).
//
// Load it before the model: link it (with --no-as-needed) or dlopen it with RTLD_GLOBAL. A Python
// process never needs it: `import flash_export` registers the op there, and this library then
// refuses to load (the schema would be defined twice).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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
  const int32_t status =
      flash_export_attention_forward_cpu_threads(&p, static_cast<int32_t>(at::get_num_threads()));
  TORCH_CHECK(status == FLASH_EXPORT_OK, kName, ": flash_export_attention_forward_cpu_threads ",
              "returned status ", status, " (", status_name(status), ")");
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

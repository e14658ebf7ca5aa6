// The libtorch shim: registers flash_export::attention for C++ processes (torch::jit::load of a
// TorchScript-native artifact, AOTIModelPackageLoader of a .pt2 package). Its CPU kernel is an
// adapter over the kernel core's public C ABI (flash_export.h), the one the ctypes binding behind
// the Python registration (flash_export/torch_op.py) calls: it describes the tensors to the core's
// params filler (flash_export_attention_params), which checks the call and fills the params, runs
// the core's items on ATen's intra-op pool and maps the status to an error. The schema string is
// the Python one, character for character (a test compares them).
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

// A tensor as the core's params filler reads it, with the names its messages quote (the
// descriptor points into these strings and into the tensor's sizes and strides).
struct Described {
  FlashExportTensor tensor{};
  std::string type_name, device_name;
};

void describe(const at::Tensor& t, Described* d) {
  d->type_name = std::string(c10::getDtypeNames(t.scalar_type()).first);  // "float32", "bool"
  d->device_name = t.device().str();                                      // "cpu", "meta"
  FlashExportTensor& x = d->tensor;
  x.data = t.data_ptr();
  x.sizes = t.sizes().data();
  x.strides = t.strides().data();
  x.type_name = d->type_name.c_str();
  x.device_name = d->device_name.c_str();
  x.rank = static_cast<int32_t>(t.dim());
  switch (t.scalar_type()) {
    case at::kFloat:
      x.dtype = FLASH_EXPORT_FLOAT32;
      break;
    case at::kHalf:
      x.dtype = FLASH_EXPORT_FLOAT16;
      break;
    case at::kBFloat16:
      x.dtype = FLASH_EXPORT_BFLOAT16;
      break;
    case at::kBool:
      x.dtype = FLASH_EXPORT_BOOL;
      break;
    default:
      x.dtype = FLASH_EXPORT_OTHER_TYPE;
  }
  x.device = t.device().is_cpu()    ? FLASH_EXPORT_DEVICE_CPU
             : t.device().is_cuda() ? FLASH_EXPORT_DEVICE_CUDA
                                    : FLASH_EXPORT_DEVICE_OTHER;
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

// query (B, Lq, E), key and value (B, Lk, E); mask bool broadcastable to (B, H, Lq, Lk). The
// core's params filler checks the call (devices, dtypes, sizes, mask, attributes) before anything
// runs and fills the params.
at::Tensor attention_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                         const std::optional<at::Tensor>& mask, int64_t num_heads,
                         int64_t chunk_size, bool causal, double scale) {
  // The core reads any batch and row strides, but each row's E elements in a run.
  auto rows = [](const at::Tensor& t) {
    return t.dim() == 3 && t.stride(2) != 1 ? t.contiguous() : t;
  };
  const at::Tensor q = rows(query), k = rows(key), v = rows(value);
  Described d[4];
  describe(q, &d[0]);
  describe(k, &d[1]);
  describe(v, &d[2]);
  if (mask.has_value()) describe(*mask, &d[3]);
  FlashExportAttentionOptions options{};
  options.num_heads = num_heads;
  options.chunk_size = chunk_size;
  options.scale = scale;
  options.has_scale = true;
  options.causal = causal;
  options.device = FLASH_EXPORT_DEVICE_CPU;
  FlashExportAttentionParams p{};
  char error[FLASH_EXPORT_ERROR_SIZE];
  const int32_t filled = flash_export_attention_params(&d[0].tensor, &d[1].tensor, &d[2].tensor,
                                                       mask.has_value() ? &d[3].tensor : nullptr,
                                                       nullptr, &options, &p, error, sizeof(error));
  TORCH_CHECK(filled == FLASH_EXPORT_OK, kName, ": ", error);
  at::Tensor out = at::empty(q.sizes(), q.options());
  p.out = out.data_ptr();  // (B, Lq, E), contiguous as the params say
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

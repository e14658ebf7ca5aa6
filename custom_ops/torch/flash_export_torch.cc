// The libtorch shim: registers flash_export::attention for C++ processes (torch::jit::load of a
// TorchScript-native artifact, AOTIModelPackageLoader of a .pt2 package). Its CPU kernel is an
// adapter over the kernel core's public C ABI (flash_export.h), the one the ctypes binding behind
// the Python registration (flash_export/torch_op.py) calls: it describes the tensors to the core's
// params filler (flash_export_attention_params_v2), which checks the call and fills the params,
// runs the core's items on ATen's intra-op pool and maps the status to an error. Both overloads
// (the default one of contract v1, which artifacts written before v2 call, and `v2`) are one
// kernel. The schema strings are the Python ones, character for character (a test compares them).
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
#include <utility>
#include <vector>

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

// The ABI's element type codes of the ATen types, and the words for its error statuses.
constexpr std::pair<at::ScalarType, int32_t> kElementCodes[] = {
    {at::kFloat, FLASH_EXPORT_FLOAT32},
    {at::kHalf, FLASH_EXPORT_FLOAT16},
    {at::kBFloat16, FLASH_EXPORT_BFLOAT16},
    {at::kBool, FLASH_EXPORT_BOOL},
    {at::kInt, FLASH_EXPORT_INT32}};
constexpr std::pair<int32_t, const char*> kStatusNames[] = {
    {FLASH_EXPORT_INVALID_ARGUMENT, "invalid_argument"},
    {FLASH_EXPORT_UNSUPPORTED, "unsupported"},
    {FLASH_EXPORT_DEVICE_ERROR, "device_error"},
    {FLASH_EXPORT_OUT_OF_MEMORY, "out_of_memory"}};

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
  x.dtype = FLASH_EXPORT_OTHER_TYPE;
  for (const auto& [scalar_type, code] : kElementCodes) {
    if (t.scalar_type() == scalar_type) x.dtype = code;
  }
  x.device = t.device().is_cpu()    ? FLASH_EXPORT_DEVICE_CPU
             : t.device().is_cuda() ? FLASH_EXPORT_DEVICE_CUDA
                                    : FLASH_EXPORT_DEVICE_OTHER;
}

const char* status_name(int32_t status) {
  for (const auto& [code, name] : kStatusNames) {
    if (status == code) return name;
  }
  return "?";
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

// Both overloads: query, key and value in either layout (rank 3 (B, L, heads*D), rank 4
// (B, heads, L, D), read through their strides); the optional mask, seqlens_k and bias; the
// output in output_layout. The core's params filler checks the call (devices, dtypes, sizes,
// mask, attributes) before anything runs and fills the params.
at::Tensor attention_v2(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                        const std::optional<at::Tensor>& mask,
                        const std::optional<at::Tensor>& seqlens_k,
                        const std::optional<at::Tensor>& bias, int64_t num_heads,
                        int64_t kv_num_heads, int64_t chunk_size, bool causal,
                        std::optional<double> scale, int64_t window_size, double softcap,
                        int64_t output_layout) {
  // The core reads any strides but the last: each head's D elements of a row in a run.
  auto rows = [](const at::Tensor& t) {
    return (t.dim() == 3 || t.dim() == 4) && t.stride(-1) != 1 && t.numel() > 1 ? t.contiguous()
                                                                                : t;
  };
  const at::Tensor q = rows(query), k = rows(key), v = rows(value);
  std::optional<at::Tensor> lengths = seqlens_k;
  if (lengths.has_value() && lengths->dim() == 1 && lengths->stride(0) != 1) {
    lengths = lengths->contiguous();
  }
  Described d[6];
  describe(q, &d[0]);
  describe(k, &d[1]);
  describe(v, &d[2]);
  if (mask.has_value()) describe(*mask, &d[3]);
  if (lengths.has_value()) describe(*lengths, &d[4]);
  if (bias.has_value()) describe(*bias, &d[5]);
  FlashExportAttentionInputs inputs{};
  inputs.query = &d[0].tensor;
  inputs.key = &d[1].tensor;
  inputs.value = &d[2].tensor;
  inputs.mask = mask.has_value() ? &d[3].tensor : nullptr;
  inputs.seqlens_k = lengths.has_value() ? &d[4].tensor : nullptr;
  inputs.bias = bias.has_value() ? &d[5].tensor : nullptr;
  FlashExportAttentionOptions options{};
  options.num_heads = num_heads;
  options.chunk_size = chunk_size;
  options.scale = scale.value_or(0.0);
  options.has_scale = scale.has_value();
  options.causal = causal;
  options.device = FLASH_EXPORT_DEVICE_CPU;
  options.kv_num_heads = kv_num_heads;
  options.window_size = window_size;
  options.softcap = softcap;
  options.output_layout = static_cast<int32_t>(output_layout);
  FlashExportAttentionParams p{};
  char error[FLASH_EXPORT_ERROR_SIZE];
  const int32_t filled =
      flash_export_attention_params_v2(&inputs, &options, &p, error, sizeof(error));
  TORCH_CHECK(filled == FLASH_EXPORT_OK, kName, ": ", error);
  const std::vector<int64_t> shape =
      output_layout == FLASH_EXPORT_LAYOUT_HEADS
          ? std::vector<int64_t>{p.batch, p.heads, p.seq_q, p.head_dim_v}
          : std::vector<int64_t>{p.batch, p.seq_q, p.heads * p.head_dim_v};
  at::Tensor out = at::empty(shape, q.options());
  p.out = out.data_ptr();  // contiguous in output_layout, as the params say
  const int32_t status = forward(p);
  TORCH_CHECK(status == FLASH_EXPORT_OK, kName, ": the CPU forward returned status ", status, " (",
              status_name(status), ")");
  return out;
}

// The default overload (contract v1): the v2 kernel with v2's defaults.
at::Tensor attention_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                         const std::optional<at::Tensor>& mask, int64_t num_heads,
                         int64_t chunk_size, bool causal, double scale) {
  return attention_v2(query, key, value, mask, std::nullopt, std::nullopt, num_heads, 0, chunk_size,
                      causal, scale, 0, 0.0, FLASH_EXPORT_LAYOUT_ROWS);
}

}  // namespace
}  // namespace flash_export

TORCH_LIBRARY(flash_export, m) {
  m.def(
      "attention(Tensor query, Tensor key, Tensor value, Tensor? mask, int num_heads, "
      "int chunk_size, bool causal, float scale) -> Tensor");
  m.def(
      "attention.v2(Tensor query, Tensor key, Tensor value, Tensor? mask=None, "
      "Tensor? seqlens_k=None, Tensor? bias=None, *, int num_heads, int kv_num_heads=0, "
      "int chunk_size=64, bool causal=False, float? scale=None, int window_size=0, "
      "float softcap=0.0, int output_layout=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(flash_export, CPU, m) {
  m.impl("attention", &flash_export::attention_cpu);
  m.impl("attention.v2", &flash_export::attention_v2);
}

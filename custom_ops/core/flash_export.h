/* The C ABI of libflash_export.so: every symbol it exports except RegisterCustomOps, whose
 * signature is onnxruntime's (custom_ops/ort/register.cc). For callers without onnxruntime: C and
 * C++ programs, and ctypes (flash_export/runtime/native_abi.py mirrors this file). Valid C99 and
 * C++17; knows nothing of torch or onnxruntime.
 *
 * FlashExportAttentionParams is the params struct of the kernel core itself (flash_attention.h
 * names it flash_export::AttentionParams), so there is no second layout to keep in step on this
 * side. An adapter fills it with flash_export_attention_params_v2, which checks the call against
 * the op's contract first (every adapter: the onnxruntime node, the libtorch shim, the ctypes
 * binding); a caller that fills it by hand zeroes it (`= {0}` in C, `{}` in C++) and vouches for
 * every field.
 *
 * Contract versions. The op's contract v2 (the ONNX node com.flash_export::FlashAttention at domain
 * version 2, flash_export/core/contract.py) added grouped-query heads, head-major layouts,
 * seqlens_k, a sliding window, an additive bias, a softcap and Dv != D. This header grew with it
 * only by additions: new fields at the ends of the structs (their zeros keep the v1 behaviour), new
 * entry points (flash_export_attention_params_v2, flash_export_inputs_size) and FLASH_EXPORT_INT32;
 * the v1 filler and every v1 field keep their meaning, so a v1 caller runs unchanged.
 */
#ifndef FLASH_EXPORT_CORE_FLASH_EXPORT_H_
#define FLASH_EXPORT_CORE_FLASH_EXPORT_H_

#include <stddef.h>
#include <stdint.h>
#ifndef __cplusplus
#include <stdbool.h>
#endif

#define FLASH_EXPORT_API __attribute__((visibility("default")))

/* Element types of q, k, v and out. */
#define FLASH_EXPORT_FLOAT32 0
#define FLASH_EXPORT_FLOAT16 1
#define FLASH_EXPORT_BFLOAT16 2

/* Element types a FlashExportTensor may have besides the three above (never a params dtype). */
#define FLASH_EXPORT_BOOL 3       /* one byte per element, 0 or 1: the mask's type */
#define FLASH_EXPORT_OTHER_TYPE 4 /* any other: FlashExportTensor.type_name says which */
#define FLASH_EXPORT_INT32 5      /* seqlens_k's type (contract v2; additive) */

/* Where a FlashExportTensor lives, and which device a forward runs on. */
#define FLASH_EXPORT_DEVICE_CPU 0
#define FLASH_EXPORT_DEVICE_CUDA 1
#define FLASH_EXPORT_DEVICE_OTHER 2 /* any other (torch's meta, ...): no forward runs there */

/* A buffer of this many bytes holds any message flash_export_attention_params writes (longer
 * ones, from long framework names, are cut). */
#define FLASH_EXPORT_ERROR_SIZE 512

/* What the entry points return. */
#define FLASH_EXPORT_OK 0
#define FLASH_EXPORT_INVALID_ARGUMENT 1 /* a size, stride or attribute the core cannot honour */
#define FLASH_EXPORT_UNSUPPORTED 2      /* a dtype or feature this build does not implement */
#define FLASH_EXPORT_DEVICE_ERROR 3     /* a CUDA launch or runtime error */
#define FLASH_EXPORT_OUT_OF_MEMORY 4    /* scratch memory could not be allocated */

#ifdef __cplusplus
namespace flash_export {
/* The element type as C++ reads it: the same 32-bit value. */
enum class DType : int32_t {
  kFloat32 = FLASH_EXPORT_FLOAT32,
  kFloat16 = FLASH_EXPORT_FLOAT16,
  kBFloat16 = FLASH_EXPORT_BFLOAT16,
};
}  // namespace flash_export
typedef flash_export::DType FlashExportDType;
#else
typedef int32_t FlashExportDType; /* one of FLASH_EXPORT_FLOAT32, _FLOAT16, _BFLOAT16 */
#endif

/* One attention forward. Query head h of H reads key/value head h / G of H_kv = H / G (G = 1:
 * every head its own; grouped-query attention when G > 1). Element (b, l, h, d) of a tensor X
 * lives at
 *   X + b * x_batch_stride + l * x_row_stride + h * x_head_stride + d   (element units),
 * so (B, L, H*D) and head-major (B, H, L, D) tensors, and the output in either layout, are all
 * strides. Q and K have head dim D, V and O head dim Dv; Q is (B, Lq, H, D), K (B, Lk, H_kv, D),
 * V (B, Lk, H_kv, Dv), O (B, Lq, H, Dv), all of `dtype`. Accumulation is float32 whatever the
 * input dtype.
 *
 * Which keys a query row sees. Batch entry b has L_b keys: seqlens_k[b] + 1 when seqlens_k is set
 * (onnxruntime GroupQueryAttention's convention), else Lk; keys past L_b are never read. Query i
 * sits at position p = i + L_b - Lq (bottom-right aligned: the queries are the last Lq positions
 * of the sequence). Key j < L_b is visible to it unless the causal rule (j > p), the window
 * (|p - j| >= window_size) or the mask hides it. The logit of a visible key is
 *   s = scale * q . k,  then softcap * tanh(s / softcap) when softcap > 0,  then + bias,
 * and the output row is the softmax of the visible logits times their values.
 *
 * Masking decides visibility, values decide numbers. A query row that sees no key (all masked,
 * causal with p < 0, L_b == 0, ...) is written as zeros. A row that sees at least one key but
 * whose every visible logit is -inf has no defined softmax and is written as NaN, as the float64
 * reference computes it (so is a row with a +inf or NaN logit); the same keys hidden by the mask
 * or the causal rule give zeros.
 *
 * The fields after `dtype` were added by contract v2 (additive: flash_export_params_size grew).
 * Each one's zero keeps the v1 behaviour, so params zeroed and filled with the v1 fields only run
 * as before. */
typedef struct FlashExportAttentionParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;

  int64_t batch;    /* B */
  int64_t heads;    /* H, query heads */
  int64_t head_dim; /* D, of the query and the key */
  int64_t seq_q;    /* Lq (may be 0: nothing to do) */
  int64_t seq_k;    /* Lk (may be 0: every output row is zero) */

  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;

  /* Optional boolean mask (one byte per element, nonzero = attend), broadcast to (B, H, Lq, Lk)
   * through its strides: a broadcast dimension has stride 0. NULL means no mask. */
  const uint8_t* mask;
  int64_t mask_batch_stride, mask_head_stride, mask_q_stride, mask_k_stride;

  int64_t chunk_size; /* keys per online-softmax block (>= 1) */
  float scale;        /* logits = scale * q . k */
  /* Bottom-right aligned causal mask: query i sees key j iff j <= i + (L_b - Lq). */
  bool causal;
  FlashExportDType dtype;

  /* --- contract v2 --- */
  int64_t kv_heads;   /* H_kv, dividing H; 0: H */
  int64_t head_dim_v; /* Dv, of the value and the output; 0: D */
  /* Optional (B,) valid key counts minus one, on the forward's device: L_b = seqlens_k[b] + 1,
   * -1 <= seqlens_k[b] < Lk. NULL: every L_b is Lk. */
  const int32_t* seqlens_k;
  int64_t window_size; /* query at position p sees key j only if |p - j| < window_size; 0: none */
  /* Optional additive logit bias of `dtype`, broadcast to (B, H, Lq, Lk) through its strides (a
   * broadcast dimension has stride 0); NULL: none. */
  const void* bias;
  int64_t bias_batch_stride, bias_head_stride, bias_q_stride, bias_k_stride;
  float softcap; /* > 0: logits become softcap * tanh(logits / softcap) before the bias; 0: none */
} FlashExportAttentionParams;

/* One tensor of a call as an adapter hands it to flash_export_attention_params: where its
 * elements live and what its framework says they are. Element (i0, i1, ...) lives at
 *   data + i0 * strides[0] + i1 * strides[1] + ...   (element units). */
typedef struct FlashExportTensor {
  void* data;              /* the first element; q, k, v and the mask are only read */
  const int64_t* sizes;    /* `rank` sizes */
  const int64_t* strides;  /* `rank` strides in elements; NULL: contiguous (row-major) */
  const char* type_name;   /* the framework's name of the element type, for messages (NULL: the
                              core's name of `dtype`) */
  const char* device_name; /* the framework's name of the device, for messages (NULL: "cpu",
                              "cuda" or "another device") */
  int32_t rank;
  int32_t dtype;  /* FLASH_EXPORT_FLOAT32, _FLOAT16, _BFLOAT16, _BOOL, _INT32 or _OTHER_TYPE */
  int32_t device; /* FLASH_EXPORT_DEVICE_CPU, _CUDA or _OTHER */
} FlashExportTensor;

/* The op's attributes, and the forward the params are for. The fields after `dtypes` were added by
 * contract v2; each one's zero keeps the v1 behaviour. */
typedef struct FlashExportAttentionOptions {
  int64_t num_heads;  /* H: at least 1; divides query's E, or is query's dimension 1 */
  int64_t chunk_size; /* keys per online-softmax block: at least 1 */
  double scale;       /* when has_scale: finite and not 0 once rounded to float32 */
  bool has_scale;     /* false: 1/sqrt(head_dim) */
  bool causal;
  int32_t device; /* the forward's: FLASH_EXPORT_DEVICE_CPU or _CUDA */
  /* The query element types the caller's contract admits, as bits (1u << FLASH_EXPORT_FLOAT32)
   * | ...; 0: every type the kernels run (float32, float16, bfloat16). */
  uint32_t dtypes;

  /* --- contract v2 --- */
  int64_t kv_num_heads; /* H_kv: at least 1, dividing num_heads; 0: num_heads */
  int64_t window_size;  /* at least 0; 0: no window */
  double softcap;       /* finite, at least 0 once rounded to float32; 0: none */
  /* FLASH_EXPORT_LAYOUT_ROWS: the output is (B, Lq, H*Dv); _HEADS: (B, H, Lq, Dv). */
  int32_t output_layout;
} FlashExportAttentionOptions;

/* FlashExportAttentionOptions.output_layout. Inputs say theirs by their rank: 3 is (B, L, H*D),
 * 4 is head-major (B, H, L, D). */
#define FLASH_EXPORT_LAYOUT_ROWS 0
#define FLASH_EXPORT_LAYOUT_HEADS 1

/* The tensors of one call (contract v2), as flash_export_attention_params_v2 reads them. NULL for
 * an optional one that is absent. */
typedef struct FlashExportAttentionInputs {
  const FlashExportTensor* query;     /* (B, Lq, H*D) or (B, H, Lq, D) */
  const FlashExportTensor* key;       /* (B, Lk, H_kv*D) or (B, H_kv, Lk, D) */
  const FlashExportTensor* value;     /* (B, Lk, H_kv*Dv) or (B, H_kv, Lk, Dv) */
  const FlashExportTensor* mask;      /* optional bool, broadcastable to (B, H, Lq, Lk) */
  const FlashExportTensor* seqlens_k; /* optional int32 (B,), contiguous */
  const FlashExportTensor* bias;      /* optional, query's type, broadcastable to (B, H, Lq, Lk) */
  const FlashExportTensor* out;       /* optional: the output tensor, see the filler */
} FlashExportAttentionInputs;

#ifdef __cplusplus
extern "C" {
#endif

/* sizeof(FlashExportAttentionParams) as this library was compiled: a binding checks its mirror
 * against it before the first call. */
FLASH_EXPORT_API size_t flash_export_params_size(void);

/* sizeof(FlashExportTensor) and sizeof(FlashExportAttentionOptions), for the same check. Added
 * after the first release of this header (additive). */
FLASH_EXPORT_API size_t flash_export_tensor_size(void);
FLASH_EXPORT_API size_t flash_export_options_size(void);
/* sizeof(FlashExportAttentionInputs), likewise (contract v2, additive). */
FLASH_EXPORT_API size_t flash_export_inputs_size(void);

/* The one params filler: checks a call against the op's contract, then fills every field of
 * *params for the forward on options->device. The contract (v2): query (B, Lq, E) with
 * E = num_heads * D, or head-major (B, num_heads, Lq, D); key (B, Lk, kv_num_heads * D) or
 * (B, kv_num_heads, Lk, D); value (B, Lk, kv_num_heads * Dv) or (B, kv_num_heads, Lk, Dv); each
 * in either layout by its rank, all of one element type the caller admits (options->dtypes), all
 * on the forward's device, each row's D (Dv) elements in a run (last stride 1; every other stride
 * is free); mask (NULL: none) bool, any strides, broadcastable (numpy rules, right-aligned) to
 * (B, H, Lq, Lk); seqlens_k (NULL: none) int32 (B,), contiguous, each value in [-1, Lk - 1] (read
 * here when the forward is on the CPU); bias (NULL: none) of query's type, any strides,
 * broadcastable to (B, H, Lq, Lk); the attributes as FlashExportAttentionOptions states them;
 * and the sizes and features the forward's kernel refuses (flash_attention.h). `out` NULL: the
 * output is a contiguous tensor in options->output_layout, (B, Lq, H*Dv) or (B, H, Lq, Dv), of
 * query's type and device, that the caller allocates after this call and sets as params->out;
 * otherwise `out` is checked against that shape and used with its strides. Nothing runs, and no
 * pointer is dereferenced but the descriptors and a CPU forward's seqlens_k.
 *
 * Returns FLASH_EXPORT_OK, or FLASH_EXPORT_INVALID_ARGUMENT with *params zeroed and a one-line
 * message in `error` (NUL-terminated, cut to error_size bytes; NULL: none) that names the
 * argument, what it must be and what it is, e.g. "key has element type float16, expected
 * float32 (query's element type)". Added with contract v2 (additive). */
FLASH_EXPORT_API int32_t flash_export_attention_params_v2(
    const FlashExportAttentionInputs* inputs, const FlashExportAttentionOptions* options,
    FlashExportAttentionParams* params, char* error, size_t error_size);

/* The v1 filler, kept for its callers: flash_export_attention_params_v2 with no seqlens_k and no
 * bias, reading only the v1 fields of *options (those before kv_num_heads; the rest are taken as
 * zero), so a caller compiled against the v1 header passes its smaller struct safely. */
FLASH_EXPORT_API int32_t flash_export_attention_params(
    const FlashExportTensor* query, const FlashExportTensor* key, const FlashExportTensor* value,
    const FlashExportTensor* mask, const FlashExportTensor* out,
    const FlashExportAttentionOptions* options, FlashExportAttentionParams* params, char* error,
    size_t error_size);

/* Serial CPU forward. */
FLASH_EXPORT_API int32_t
flash_export_attention_forward_cpu(const FlashExportAttentionParams* params);

/* CPU forward on `threads` std::threads (the caller's thread included); threads <= 1 is serial. */
FLASH_EXPORT_API int32_t flash_export_attention_forward_cpu_threads(
    const FlashExportAttentionParams* params, int32_t threads);

/* Runs fn(data, i) for every i in [0, total) and returns when all have run: a host framework's
 * thread pool, handed to the forward below. `context` is the host's pointer, passed back
 * untouched. fn does not throw and may run on any thread, in any order. */
typedef void (*FlashExportParallelFor)(void* context, void (*fn)(void* data, size_t index),
                                       size_t total, void* data);

/* CPU forward whose work items run on the host's thread pool: `parallel_for` is called one or more
 * times per forward (NULL: serial on the calling thread); `threads` is how many items it runs at
 * once, for the plan. A framework that just ran its own parallel work (the projections before the
 * attention) keeps its threads awake for a while: running the items on those threads, instead of
 * starting others, is what keeps them from contending. Added after the first release of this
 * header (additive). */
FLASH_EXPORT_API int32_t flash_export_attention_forward_cpu_pool(
    const FlashExportAttentionParams* params, FlashExportParallelFor parallel_for, void* context,
    int32_t threads);

/* CPU forward on the calling thread's OpenMP team, for a host that cannot pass a C function
 * (PyTorch from Python): `gomp_parallel` is the address of the `GOMP_parallel` entry point,
 * void GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags), of the
 * OpenMP runtime the host runs on (GNU libgomp, or LLVM libomp's GNU-compatible entry), and
 * `threads` the team size the host uses. NULL gomp_parallel runs on std::threads like the
 * `_threads` forward. Added after the first release of this header (additive). */
FLASH_EXPORT_API int32_t flash_export_attention_forward_cpu_openmp(
    const FlashExportAttentionParams* params, void* gomp_parallel, int32_t threads);

/* CUDA forward on `stream` (a cudaStream_t; 0 is the legacy default stream), asynchronous like any
 * launch. Exported only by a library built with nvcc. */
FLASH_EXPORT_API int32_t
flash_export_attention_forward_cuda(const FlashExportAttentionParams* params, void* stream);

/* How the CPU forward would cut the work of `params` on `threads` threads (0: this machine's
 * hardware threads), as a JSON object: the kernel path ("isa"), the regime ("rows": decode, one
 * item per batch and head, nothing packed; "heads": one item per batch and head, each packing its
 * own head; "shared": heads packed in groups into a shared buffer, items per head and query
 * block), the query block ("bq", "q_blocks"), the key block ("bc"), one head's packed bytes
 * ("head_bytes") and, for "shared", "groups" and "heads_per_group". For tests and diagnostics;
 * runs nothing. The string stays valid until this thread's next call. Added after the first
 * release of this header (additive: nothing above changed). */
FLASH_EXPORT_API const char* flash_export_cpu_plan(const FlashExportAttentionParams* params,
                                                   int32_t threads);

/* The vector path the CPU kernel runs on this machine: "amx", "avx512", "avx2" or "portable". */
FLASH_EXPORT_API const char* flash_export_cpu_isa(void);

/* NULL when FLASH_EXPORT_CPU_ISA is unset, empty or names a path ("portable", "avx2", "avx512",
 * "amx"); otherwise a message saying why the setting is refused. onnxruntime sessions then refuse
 * to register the op with that message; callers of the forwards above should check it first. */
FLASH_EXPORT_API const char* flash_export_cpu_isa_error(void);

/* A JSON object describing this build: the op it registers in onnxruntime (op_domain, op_name,
 * op_version), the OrtApi version it asks for (ort_api_version), cuda, cuda_archs, cpu_isa and
 * sanitizer. Defined by the onnxruntime adapter, which owns those facts (ort/build_info.cc). The
 * string lives for the life of the process. */
FLASH_EXPORT_API const char* flash_export_build_info(void);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* FLASH_EXPORT_CORE_FLASH_EXPORT_H_ */

// Private interface between the CPU dispatcher (flash_attention_cpu.cc) and the per-ISA kernel
// translation units (flash_attention_cpu_amx.cc, _avx512.cc, _avx2.cc, _portable.cc).
#ifndef FLASH_EXPORT_CORE_FLASH_ATTENTION_CPU_INTERNAL_H_
#define FLASH_EXPORT_CORE_FLASH_ATTENTION_CPU_INTERNAL_H_

#include <cstddef>
#include <cstdint>

#include "flash_attention.h"

namespace flash_export {
namespace cpu {
namespace {  // internal linkage: every ISA TU compiles its own copy with its own flags

// x rounded up to a multiple of m.
constexpr size_t round_up(size_t x, size_t m) { return (x + m - 1) / m * m; }

// Hands out consecutive scratch regions (offsets in floats), each rounded up to 16 floats so
// every region stays 64-byte aligned.
struct Regions {
  size_t end = 0;
  size_t take(size_t floats) {
    const size_t at = end;
    end += round_up(floats, 16);
    return at;
  }
};

// Work is cut per key/value head: the G = H / H_kv query heads that share one are its rows, row
// t being query t / G of head kvh * G + t % G (query-major, so the rows of one query position are
// adjacent and every causal and window cut stays a prefix or a suffix of a block's rows).
inline int64_t group_of(const AttentionParams& p) { return p.heads / kv_heads_of(p); }
inline int64_t rows_per_kv_head(const AttentionParams& p) { return p.seq_q * group_of(p); }

// L_b: the keys batch entry b has (seqlens_k[b] + 1, clamped into [0, Lk]; Lk without seqlens_k).
inline int64_t keys_of(const AttentionParams& p, int64_t b) {
  if (p.seqlens_k == nullptr) return p.seq_k;
  const int64_t n = int64_t{p.seqlens_k[b]} + 1;
  return n < 0 ? 0 : n > p.seq_k ? p.seq_k : n;
}

// The window as the kernels use it: 0 for none, else at most one past every distance a call can
// have (so that position arithmetic never overflows, whatever the attribute said).
inline int64_t window_of(const AttentionParams& p) {
  const int64_t cap = p.seq_k + 2 * p.seq_q + 1;
  return p.window_size <= 0 ? 0 : p.window_size < cap ? p.window_size : cap;
}

// Keys [begin, end) of batch entry b that some query row sees: everything past L_b is never
// read, and a window leaves out the keys before the first query's.
struct KeySpan {
  int64_t begin, end;
};
inline KeySpan keys_read(const AttentionParams& p, int64_t b) {
  const int64_t end = keys_of(p, b), w = window_of(p);
  const int64_t begin = w > 0 ? end - p.seq_q - w + 1 : 0;  // query 0 sits at L_b - Lq
  return {begin < 0 ? 0 : begin > end ? end : begin, end};
}

}  // namespace

// Keys per packing item: enough work to be worth a dispatch slot, small enough to spread. Every
// item starts on a multiple of it.
constexpr int64_t kPackRows = 256;

// Calls of at most this many rows per key/value head (G x Lq: decode) run in the rows regime on
// the FMA paths: one item per (batch, key/value head), keys and values read in place, a dot
// product per (row, key) along the head dim. A query block of a vector's width would spend 15 of
// 16 lanes of every product on padding.
constexpr int64_t kRowsMaxQueries = 8;

// How one call's work is cut (flash_attention_cpu.cc chooses, per call); a "head" here is a
// key/value head with its G query heads' rows:
//   kRows    G x Lq <= kRowsMaxQueries: one item per (batch, head), nothing packed.
//   kHeads   enough heads to fill the threads and one head's packed keys and values fit
//            kHeadPackBytes: one item per (batch, head), which packs that head into its own
//            thread's scratch and runs all its query blocks; one parallel_for, no shared buffer.
//   kShared  otherwise (long keys, or a few heads): heads in groups whose packed keys and values
//            fit a shared buffer; per group one parallel_for packs, one runs every (head, query
//            block) item, the threads walking one head's blocks together.
enum class Regime : int { kRows = 0, kHeads = 1, kShared = 2 };
constexpr size_t kHeadPackBytes = size_t{1} << 20;

// Sizes shared by every work item of one call; computed once by the dispatcher.
struct Plan {
  Regime regime = Regime::kShared;
  int64_t bq = 0;        // rows per work item
  int64_t bq_pad = 0;    // bq rounded up to the vector width
  int64_t bc = 0;        // keys per online-softmax block (FMA: see fma_plan; AMX: 64)
  int64_t d_pad = 0;     // the value head dim Dv rounded up to the vector width
  int64_t dk_pad = 0;    // the query and key head dim D rounded up likewise (rows regime)
  int64_t q_blocks = 0;  // ceil(G x Lq / bq)
  // Scratch layout, offsets in floats (each a multiple of 16 so every region is 64-byte aligned):
  size_t off_qt = 0;     // (D, bq_pad): query block, transposed (rows regime: (bq, dk_pad))
  size_t off_o = 0;      // (bq, d_pad): float32 output accumulator
  size_t off_s = 0;      // (bc, bq_pad): logits, then probabilities, transposed
  size_t off_m = 0;      // (bq_pad): running max of the scaled logits
  size_t off_l = 0;      // (bq_pad): running sum
  size_t off_alpha = 0;  // (bq_pad): rescale factor of the current block
  size_t off_mx = 0;     // (bq_pad): running max including the current block
  size_t off_kb = 0;     // rows regime: (bc, dk_pad) keys of a block, when not read in place
  size_t off_vb = 0;     // rows regime: (bc, d_pad) values of a block, likewise
  size_t off_rows = 0;   // (2, bq_pad) int64: each row's mask and bias offsets (b, h, i)
  size_t off_btmp = 0;   // (bc): one row of the bias block, as float32
  size_t scratch_floats = 0;
  // Packed keys and values of one key/value head, in floats, and where its values start.
  size_t head_floats = 0;
  size_t v_offset = 0;
  // AMX only (flash_attention_cpu_amx.cc): Lk rounded up to 32, D rounded up to 32 and to 16,
  // and the scratch regions of the query's and the probabilities' parts, of a block's last 32
  // values, and of the transposed output accumulator.
  int64_t k_rows = 0;
  int64_t d_k = 0;
  int64_t d_v = 0;
  size_t off_qv = 0;
  size_t off_pv = 0;
  size_t off_vtail = 0;
  size_t off_ot = 0;
};

// One head's keys and values, packed contiguously once per call (FMA paths: float32 K (Lk, D) and
// V (Lk, d_pad), the padding zero; AMX: see flash_attention_cpu_amx.cc). Rows of the caller's
// tensors sit H*D apart, so walking them once per query block aliased in the caches; packed rows
// stream.
struct PackedHead {
  const float* k;
  const float* v;
};

// Packs rows [j0, j0 + n) of key/value head (b, h) into `dst` (the head's packed keys and values;
// FMA paths: K, then V at dst + Lk * D); the chunks start on multiples of kPackRows, clipped to
// keys_read (v1 calls: every key). Returns false when this path cannot take the call after all
// (the dispatcher then reruns it on the next path down).
using PackRowsFn = bool (*)(const AttentionParams& p, const Plan& plan, int64_t b, int64_t h,
                            int64_t j0, int64_t n, float* dst);

// One (batch, key/value head, block of rows) work item over the head's packed keys and values;
// `scratch` holds Plan::scratch_floats floats, 64-byte aligned.
using RunItemFn = void (*)(const AttentionParams& p, const Plan& plan, int64_t b, int64_t h,
                           int64_t q_block, PackedHead kv, float* scratch);

// One (batch, key/value head) of the rows regime (FMA paths), keys and values read from the
// caller's tensors; `scratch` as for RunItemFn.
using RunRowsFn = void (*)(const AttentionParams& p, const Plan& plan, int64_t b, int64_t h,
                           float* scratch);

// Fills a kernel's own Plan for `p` (AMX); false when the sizes overflow. Null for the FMA paths,
// whose plan the dispatcher computes.
using PlanFn = bool (*)(const AttentionParams& p, Plan* plan);
// Whether a kernel takes these params; null: it takes every call.
using AcceptsFn = bool (*)(const AttentionParams& p);

// The CPU vector paths, the lowest first, and their names: the one table of them (the values
// FLASH_EXPORT_CPU_ISA takes, cpu_kernel_isa()'s answers, the plan's "isa";
// flash_export/runtime/native_abi.py's CPU_ISAS is checked against it by tests/test_native_abi.py).
enum class Isa : int { kPortable, kAvx2, kAvx512, kAmx };
constexpr const char* kIsaNames[] = {"portable", "avx2", "avx512", "amx"};
constexpr const char* isa_name(Isa isa) { return kIsaNames[static_cast<int>(isa)]; }

struct Kernel {
  Isa isa;
  int width;   // floats per vector
  int64_t bq;  // query rows per work item
  PackRowsFn pack_rows;
  RunItemFn run_item;
  PlanFn plan = nullptr;
  AcceptsFn accepts = nullptr;   // calls it refuses go to the next path down
  RunRowsFn run_rows = nullptr;  // the rows regime; null: the kernel never gets one (AMX)
};

Kernel kernel_portable();
#if defined(__x86_64__) || defined(_M_X64)
Kernel kernel_avx2();
Kernel kernel_avx512();
#ifndef FLASH_EXPORT_NO_AMX
Kernel kernel_amx();
// Whether the CPU has AMX-BF16 and AVX-512 BW/DQ and Linux grants the tile state (asks it; call
// once per process).
bool amx_usable();
#endif
#endif

}  // namespace cpu
}  // namespace flash_export

#endif  // FLASH_EXPORT_CORE_FLASH_ATTENTION_CPU_INTERNAL_H_

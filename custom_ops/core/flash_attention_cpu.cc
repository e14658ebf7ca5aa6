// CPU FlashAttention: validates the params, picks the kernel for this CPU once per process (AMX,
// AVX-512, AVX2 or portable) and, per call, a plan from (B, H, Lq, Lk, D, dtype, threads): the
// regime (cpu::Regime: rows for decode, heads for many small heads, shared for the rest), the
// query block and the packing groups; then hands the caller's parallel_for the work items.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <utility>

#include "flash_attention.h"
#include "flash_attention_cpu_internal.h"

namespace flash_export {
namespace {

using cpu::Isa;
using cpu::Kernel;
using cpu::kPackRows;
using cpu::Plan;
using cpu::Regions;
using cpu::round_up;

// The path for this CPU and, for the calls it does not take, the one below it.
struct Kernels {
  Kernel best;
  Kernel wide;
};

// FLASH_EXPORT_CPU_ISA=portable|avx2|avx512|amx forces a path (tests use it to cover every path on
// one machine); a path the CPU (or, for AMX, the OS) cannot run is never chosen, whatever the
// variable says.
Kernels select_kernels() {
  const char* forced = std::getenv("FLASH_EXPORT_CPU_ISA");
  const bool force = forced != nullptr && forced[0] != '\0';
  auto is = [&](Isa isa) { return force && std::strcmp(forced, cpu::isa_name(isa)) == 0; };
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c");
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f");
  if (is(Isa::kPortable)) return {cpu::kernel_portable(), cpu::kernel_portable()};
  if (is(Isa::kAvx2) && has_avx2) return {cpu::kernel_avx2(), cpu::kernel_avx2()};
#ifndef FLASH_EXPORT_NO_AMX
  if (has_avx512 && !is(Isa::kAvx512) && cpu::amx_usable()) {
    return {cpu::kernel_amx(), cpu::kernel_avx512()};
  }
#endif
  if (has_avx512) return {cpu::kernel_avx512(), cpu::kernel_avx512()};
  if (has_avx2) return {cpu::kernel_avx2(), cpu::kernel_avx2()};
#endif
  return {cpu::kernel_portable(), cpu::kernel_portable()};
}

const Kernels& kernels() {
  static const Kernels k = select_kernels();
  return k;
}

// Per-thread scratch, grown (never per chunk) when a call needs more than it holds.
struct Scratch {
  float* data = nullptr;
  size_t capacity = 0;
  ~Scratch() { release(); }
  void release() {
    if (data != nullptr) ::operator delete(data, std::align_val_t(64));
    data = nullptr;
    capacity = 0;
  }
  float* get(size_t floats) {
    if (floats > capacity) {
      release();
      data = static_cast<float*>(
          ::operator new(floats * sizeof(float), std::align_val_t(64), std::nothrow));
      if (data != nullptr) capacity = floats;
    }
    return data;
  }
};

// Upper bound of the packed K/V buffer; heads are packed and run in groups that fit it (at least
// one head per group). 8 MiB keeps one head of Lk = 16384, D = 64 within a quarter of that
// call's output.
constexpr size_t kPackBudgetBytes = size_t{8} << 20;

// The packing buffer outlives the call that allocated it, for the next call: a fresh multi-MiB
// allocation comes back from the OS on every call, and faulting its pages in costs more than the
// packing at N = 1024. One buffer is kept (at most kPackBudgetBytes); concurrent calls allocate.
class PackCache {
 public:
  ~PackCache() { free_buffer(data_); }
  // A buffer of at least `floats` floats (its size in *capacity), or nullptr when out of memory.
  float* acquire(size_t floats, size_t* capacity) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (data_ != nullptr && capacity_ >= floats) {
        float* data = data_;
        *capacity = capacity_;
        data_ = nullptr;
        capacity_ = 0;
        return data;
      }
    }
    *capacity = floats;
    return static_cast<float*>(
        ::operator new(floats * sizeof(float), std::align_val_t(64), std::nothrow));
  }
  void release(float* data, size_t capacity) {
    if (capacity * sizeof(float) <= kPackBudgetBytes) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (capacity > capacity_) {
        std::swap(data, data_);
        capacity_ = capacity;
      }
    }
    free_buffer(data);
  }

 private:
  static void free_buffer(float* data) {
    if (data != nullptr) ::operator delete(data, std::align_val_t(64));
  }
  std::mutex mutex_;
  float* data_ = nullptr;
  size_t capacity_ = 0;
};

PackCache& pack_cache() {
  static PackCache cache;
  return cache;
}

// The calling thread's scratch: every item kind takes its floats from this one buffer.
float* thread_scratch(size_t floats) {
  thread_local Scratch scratch;
  return scratch.get(floats);
}

// One call's state; each parallel_for runs one phase (pack or attend) over one group of heads.
struct Job {
  const AttentionParams* params;
  const Plan* plan;
  cpu::PackRowsFn pack_rows;
  cpu::RunItemFn run_item;
  cpu::RunRowsFn run_rows;
  float* packed;       // group heads x head_floats
  size_t head_floats;  // packed K and V of one head
  int64_t first_bh;    // first (batch * H + head) of the group
  int64_t group;       // heads in the group
  std::atomic<bool> out_of_memory{false};
  std::atomic<bool> refused{false};  // a packing item found the call is not this path's
};

// Packs keys [j0, j0 + kPackRows) of key/value head (b, h), clipped to the keys some row reads
// (cpu::keys_read: past L_b nothing is read, before a window nothing is needed). False when the
// kernel's packing handed the call back.
bool pack_chunk(const Job& job, int64_t b, int64_t h, int64_t j0, float* dst) {
  const AttentionParams& p = *job.params;
  const cpu::KeySpan span = cpu::keys_read(p, b);
  const int64_t begin = j0 > span.begin ? j0 : span.begin;
  const int64_t end = j0 + kPackRows < span.end ? j0 + kPackRows : span.end;
  if (end <= begin) return true;
  return job.pack_rows(p, *job.plan, b, h, begin, end - begin, dst);
}

void pack_job_item(void* data, size_t index) {
  Job& job = *static_cast<Job*>(data);
  const AttentionParams& p = *job.params;
  const int64_t kv_heads = kv_heads_of(p);
  const int64_t local = static_cast<int64_t>(index) % job.group;
  const int64_t j0 = static_cast<int64_t>(index) / job.group * kPackRows;
  const int64_t bh = job.first_bh + local;
  if (!pack_chunk(job, bh / kv_heads, bh % kv_heads, j0,
                  job.packed + static_cast<size_t>(local) * job.head_floats)) {
    job.refused.store(true, std::memory_order_relaxed);
  }
}

void run_job_item(void* data, size_t index) {
  Job& job = *static_cast<Job*>(data);
  const AttentionParams& p = *job.params;
  const Plan& plan = *job.plan;
  float* buffer = thread_scratch(plan.scratch_floats);
  if (buffer == nullptr) {
    job.out_of_memory.store(true, std::memory_order_relaxed);
    return;
  }
  // Head-major: the threads walk one head's query blocks together, so its packed keys and values
  // stay in cache between items.
  const int64_t local = static_cast<int64_t>(index) / plan.q_blocks;
  const int64_t rank = static_cast<int64_t>(index) % plan.q_blocks;
  // Causal blocks lower down see more keys: hand out the heaviest first so the pool balances.
  const int64_t q_block = p.causal ? plan.q_blocks - 1 - rank : rank;
  const int64_t bh = job.first_bh + local;
  const float* head = job.packed + static_cast<size_t>(local) * job.head_floats;
  const cpu::PackedHead kv{head, head + plan.v_offset};
  const int64_t kv_heads = kv_heads_of(p);
  job.run_item(p, plan, bh / kv_heads, bh % kv_heads, q_block, kv, buffer);
}

// Heads regime: item `index` is key/value head (b, h) = index / H_kv, index % H_kv; it packs the
// head's keys and values into its own thread's scratch, after the item scratch, then runs every
// block of its rows.
void run_head_item(void* data, size_t index) {
  Job& job = *static_cast<Job*>(data);
  const AttentionParams& p = *job.params;
  const Plan& plan = *job.plan;
  float* buffer = thread_scratch(plan.scratch_floats + plan.head_floats);
  if (buffer == nullptr) {
    job.out_of_memory.store(true, std::memory_order_relaxed);
    return;
  }
  const int64_t kv_heads = kv_heads_of(p);
  const int64_t b = static_cast<int64_t>(index) / kv_heads,
                h = static_cast<int64_t>(index) % kv_heads;
  float* head = buffer + plan.scratch_floats;  // scratch_floats is a multiple of 16: aligned
  for (int64_t j0 = 0; j0 < p.seq_k; j0 += kPackRows) {
    if (!pack_chunk(job, b, h, j0, head)) {
      job.refused.store(true, std::memory_order_relaxed);
      return;
    }
  }
  const cpu::PackedHead kv{head, head + plan.v_offset};
  for (int64_t q_block = 0; q_block < plan.q_blocks; ++q_block) {
    job.run_item(p, plan, b, h, q_block, kv, buffer);
  }
}

// Rows regime: item `index` is key/value head (b, h), read in place.
void run_rows_item(void* data, size_t index) {
  Job& job = *static_cast<Job*>(data);
  const AttentionParams& p = *job.params;
  float* buffer = thread_scratch(job.plan->scratch_floats);
  if (buffer == nullptr) {
    job.out_of_memory.store(true, std::memory_order_relaxed);
    return;
  }
  const int64_t kv_heads = kv_heads_of(p);
  job.run_rows(p, *job.plan, static_cast<int64_t>(index) / kv_heads,
               static_cast<int64_t>(index) % kv_heads, buffer);
}

bool valid_dtype(DType d) {
  return d == DType::kFloat32 || d == DType::kFloat16 || d == DType::kBFloat16;
}

// Most keys per online-softmax block on the FMA paths. A block's logits take bc x bq_pad floats
// of every thread's scratch: without a cap, chunk_size >= Lk made that 384 bytes per key (150 MB
// at Lk = 400,000, kept by the thread). Blocks of 512 keys already amortise the per-block rescale;
// a larger chunk_size changes only the float32 rounding, as any chunk size does.
constexpr int64_t kMaxBlockKeys = 512;

// Most query rows per item of a causal call on the FMA paths. A block computes its rows against
// every key up to its last row's, so it wastes about bq / 2 keys per row on the diagonal (at
// N = 256 and 96 rows, a third more than the causal work); 48 rows (one S tile of three vectors
// on AVX-512, two on AVX2) halve that at the same tile shapes.
constexpr int64_t kCausalBlockRows = 48;

// The regime for a call on kernel k (cpu::Regime); `threads` is how many threads the caller's
// parallel_for may run at once (0: unknown, taken as this machine's hardware threads).
bool takes_rows(const AttentionParams& p, const Kernel& k) {
  return k.run_rows != nullptr && cpu::rows_per_kv_head(p) <= cpu::kRowsMaxQueries;
}

cpu::Regime choose_regime(const AttentionParams& p, const Kernel& k, size_t head_floats,
                          int threads) {
  if (takes_rows(p, k)) return cpu::Regime::kRows;
  const int64_t workers =
      threads > 0 ? threads : static_cast<int64_t>(std::thread::hardware_concurrency());
  const bool fits = head_floats * sizeof(float) <= cpu::kHeadPackBytes;
  if (fits && p.batch * kv_heads_of(p) >= 2 * (workers > 0 ? workers : 1)) {
    return cpu::Regime::kHeads;
  }
  return cpu::Regime::kShared;
}

// The FMA paths' plan. Blocks of at most k.bq rows (of the G x Lq rows of a key/value head), as
// even as the vector width allows (Lq = 128 takes two blocks of 64, not 96 and a padded 32); key
// blocks of chunk_size keys (at most kMaxBlockKeys). The rows regime takes every row in one block.
Status fma_plan(const AttentionParams& p, const Kernel& k, bool rows, Plan* out) {
  // Bound every size so the scratch arithmetic below cannot overflow (the adapter says so first).
  if (p.head_dim > kCpuMaxHeadDim || head_dim_v_of(p) > kCpuMaxHeadDim) {
    return Status::kInvalidArgument;
  }
  const size_t w = static_cast<size_t>(k.width);
  const int64_t total = cpu::rows_per_kv_head(p);
  Plan& plan = *out;
  if (rows) {
    plan.bq = total;
  } else {
    const int64_t most = p.causal && kCausalBlockRows < k.bq ? kCausalBlockRows : k.bq;
    const int64_t blocks = (total + most - 1) / most;
    plan.bq = static_cast<int64_t>(round_up(static_cast<size_t>((total + blocks - 1) / blocks), w));
    if (plan.bq > most) plan.bq = most;
  }
  plan.bq_pad = static_cast<int64_t>(round_up(static_cast<size_t>(plan.bq), w));
  plan.bc = p.chunk_size < kMaxBlockKeys ? p.chunk_size : kMaxBlockKeys;
  if (plan.bc > p.seq_k) plan.bc = p.seq_k > 0 ? p.seq_k : 1;
  plan.d_pad = static_cast<int64_t>(round_up(static_cast<size_t>(head_dim_v_of(p)), w));
  plan.dk_pad = static_cast<int64_t>(round_up(static_cast<size_t>(p.head_dim), w));
  plan.q_blocks = (total + plan.bq - 1) / plan.bq;
  const size_t dim = static_cast<size_t>(p.head_dim), bq_pad = static_cast<size_t>(plan.bq_pad);
  const size_t bc = static_cast<size_t>(plan.bc), d_pad = static_cast<size_t>(plan.d_pad);
  const size_t dk_pad = static_cast<size_t>(plan.dk_pad);
  Regions region;
  plan.off_qt = region.take(rows ? static_cast<size_t>(plan.bq) * dk_pad : dim * bq_pad);
  plan.off_o = region.take(static_cast<size_t>(plan.bq) * d_pad);
  plan.off_s = region.take(bc * bq_pad);
  plan.off_m = region.take(bq_pad);
  plan.off_l = region.take(bq_pad);
  plan.off_alpha = region.take(bq_pad);
  plan.off_mx = region.take(bq_pad);
  plan.off_rows = region.take(4 * bq_pad);  // (2, bq_pad) int64
  plan.off_btmp = region.take(bc);
  if (rows) {
    plan.off_kb = region.take(bc * dk_pad);
    plan.off_vb = region.take(bc * d_pad);
  }
  plan.scratch_floats = region.end;
  if (rows) return Status::kOk;  // nothing packed
  const size_t seq_k = static_cast<size_t>(p.seq_k);
  if (seq_k > (SIZE_MAX / sizeof(float) / 2) / (dim + d_pad)) return Status::kOutOfMemory;
  plan.head_floats = round_up(seq_k * (dim + d_pad), 16);
  plan.v_offset = seq_k * dim;
  return Status::kOk;
}

// The whole plan of one call on kernel k: Plan, regime, and for the shared regime the heads per
// packing group.
struct CallPlan {
  Plan plan;
  int64_t group = 0;  // heads per group (shared regime)
};

Status make_plan(const Kernel& k, const AttentionParams& p, int threads, CallPlan* out) {
  Plan& plan = out->plan;
  const bool rows = takes_rows(p, k);
  if (k.plan != nullptr) {
    if (!k.plan(p, &plan)) return Status::kOutOfMemory;
  } else {
    const Status planned = fma_plan(p, k, rows, &plan);
    if (planned != Status::kOk) return planned;
  }
  plan.regime = choose_regime(p, k, plan.head_floats, threads);
  const int64_t bh_total = p.batch * kv_heads_of(p);
  const size_t head_floats = plan.head_floats;
  const size_t fit = kPackBudgetBytes / sizeof(float) / (head_floats > 0 ? head_floats : 1);
  out->group = fit < 1                               ? 1
               : fit > static_cast<size_t>(bh_total) ? bh_total
                                                     : static_cast<int64_t>(fit);
  return Status::kOk;
}

// One forward on kernel k (params already validated); *refused is set when k's packing handed the
// call back, in which case some outputs may be written and the caller reruns it elsewhere.
Status forward_with(const Kernel& k, const AttentionParams& p, ParallelForFn parallel_for,
                    void* parallel_context, int threads, bool* refused) {
  CallPlan call;
  const Status planned = make_plan(k, p, threads, &call);
  if (planned != Status::kOk) return planned;
  const Plan& plan = call.plan;
  Job job;
  job.params = &p;
  job.plan = &plan;
  job.pack_rows = k.pack_rows;
  job.run_item = k.run_item;
  job.run_rows = k.run_rows;
  job.packed = nullptr;
  job.head_floats = plan.head_floats;
  auto run = [&](void (*fn)(void*, size_t), size_t total) {
    if (total == 0) return;
    if (parallel_for != nullptr) {
      parallel_for(parallel_context, fn, total, &job);
    } else {
      for (size_t i = 0; i < total; ++i) fn(&job, i);
    }
  };
  const int64_t bh_total = p.batch * kv_heads_of(p);  // the items' (batch, key/value head) pairs
  if (plan.regime != cpu::Regime::kShared) {
    run(plan.regime == cpu::Regime::kRows ? &run_rows_item : &run_head_item,
        static_cast<size_t>(bh_total));
    *refused = job.refused.load();
    return job.out_of_memory.load() ? Status::kOutOfMemory : Status::kOk;
  }

  const size_t seq_k = static_cast<size_t>(p.seq_k);
  const size_t head_floats = plan.head_floats;
  const int64_t group = call.group;
  size_t packed_capacity = 0;
  if (head_floats > 0) {
    job.packed = pack_cache().acquire(static_cast<size_t>(group) * head_floats, &packed_capacity);
    if (job.packed == nullptr) return Status::kOutOfMemory;
  }
  const size_t pack_chunks = (seq_k + kPackRows - 1) / kPackRows;
  for (int64_t g = 0; g < bh_total; g += group) {
    job.first_bh = g;
    job.group = bh_total - g < group ? bh_total - g : group;
    const size_t heads_in_group = static_cast<size_t>(job.group);
    run(&pack_job_item, heads_in_group * pack_chunks);
    if (job.refused.load()) break;
    run(&run_job_item, heads_in_group * static_cast<size_t>(plan.q_blocks));
  }
  if (job.packed != nullptr) pack_cache().release(job.packed, packed_capacity);
  *refused = job.refused.load();
  return job.out_of_memory.load() ? Status::kOutOfMemory : Status::kOk;
}

// The kernel that takes a call: this CPU's best path unless it refuses the call.
const Kernel& kernel_for(const AttentionParams& p) {
  const Kernels& paths = kernels();
  const bool best = paths.best.accepts == nullptr || paths.best.accepts(p);
  return best ? paths.best : paths.wide;
}

const char* regime_name(cpu::Regime r) {
  switch (r) {
    case cpu::Regime::kRows:
      return "rows";
    case cpu::Regime::kHeads:
      return "heads";
    case cpu::Regime::kShared:
      return "shared";
  }
  return "?";
}

}  // namespace

const char* cpu_kernel_isa() { return cpu::isa_name(kernels().best.isa); }

const char* cpu_isa_setting_error() {
  static const std::string message = [] {
    const char* forced = std::getenv("FLASH_EXPORT_CPU_ISA");
    if (forced == nullptr || forced[0] == '\0') return std::string();
    std::string known;  // "portable, avx2, avx512 or amx"
    const size_t count = sizeof(cpu::kIsaNames) / sizeof(cpu::kIsaNames[0]);
    for (size_t i = 0; i < count; ++i) {
      if (std::strcmp(forced, cpu::kIsaNames[i]) == 0) return std::string();
      known += std::string(i == 0 ? "" : i + 1 == count ? " or " : ", ") + cpu::kIsaNames[i];
    }
    return "FLASH_EXPORT_CPU_ISA=" + std::string(forced) + " names no CPU kernel path: use " +
           known + ", or unset it";
  }();
  return message.empty() ? nullptr : message.c_str();
}

// Whether the params are ones the kernels can run (the filler checked them with messages; this
// guards hand-filled params).
bool valid_params(const AttentionParams& p) {
  if (p.batch < 0 || p.heads < 0 || p.head_dim < 0 || p.seq_q < 0 || p.seq_k < 0 ||
      p.chunk_size < 1 || !valid_dtype(p.dtype)) {
    return false;
  }
  if (p.kv_heads < 0 || p.head_dim_v < 0 || p.window_size < 0 || !(p.softcap >= 0.0f)) {
    return false;
  }
  return p.heads == 0 || p.heads % kv_heads_of(p) == 0;
}

Status attention_forward_cpu(const AttentionParams& p, ParallelForFn parallel_for,
                             void* parallel_context, int threads) {
  if (!valid_params(p)) return Status::kInvalidArgument;
  if (p.batch == 0 || p.heads == 0 || p.seq_q == 0 || head_dim_v_of(p) == 0) return Status::kOk;
  if (p.q == nullptr || p.out == nullptr || (p.seq_k > 0 && (p.k == nullptr || p.v == nullptr))) {
    return Status::kInvalidArgument;
  }
  bool refused = false;
  const Status status =
      forward_with(kernel_for(p), p, parallel_for, parallel_context, threads, &refused);
  if (!refused) return status;
  bool again = false;  // the next path down takes every call it is given
  return forward_with(kernels().wide, p, parallel_for, parallel_context, threads, &again);
}

std::string describe_cpu_plan(const AttentionParams& p, int threads) {
  if (!valid_params(p) || p.batch <= 0 || p.heads <= 0 || p.head_dim <= 0 || p.seq_q <= 0) {
    return "{\"error\": \"nothing to plan: an empty or invalid call\"}";
  }
  const Kernel& k = kernel_for(p);
  CallPlan call;
  if (make_plan(k, p, threads, &call) != Status::kOk) {
    return "{\"error\": \"the sizes overflow the plan\"}";
  }
  const Plan& plan = call.plan;
  const int64_t bh = p.batch * kv_heads_of(p);
  const bool shared = plan.regime == cpu::Regime::kShared;
  const int64_t groups = shared ? (bh + call.group - 1) / call.group : 0;
  return std::string("{\"isa\": \"") + cpu::isa_name(k.isa) + "\", \"regime\": \"" +
         regime_name(plan.regime) + "\", \"bq\": " + std::to_string(plan.bq) +
         ", \"q_blocks\": " + std::to_string(plan.q_blocks) +
         ", \"bc\": " + std::to_string(plan.bc) +
         ", \"head_bytes\": " + std::to_string(plan.head_floats * sizeof(float)) +
         ", \"groups\": " + std::to_string(groups) +
         ", \"heads_per_group\": " + std::to_string(shared ? call.group : 0) +
         ", \"kv_heads\": " + std::to_string(kv_heads_of(p)) +
         ", \"rows_per_kv_head\": " + std::to_string(cpu::rows_per_kv_head(p)) + "}";
}

}  // namespace flash_export

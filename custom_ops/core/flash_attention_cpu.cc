// CPU FlashAttention: validates the params, picks the vector kernel for this CPU once per process,
// and hands one work item per (batch, head, query block) to the caller's parallel_for.
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>

#include "flash_attention.h"
#include "flash_attention_cpu_internal.h"

namespace flash_export {
namespace {

using cpu::Kernel;
using cpu::Plan;

// FLASH_EXPORT_CPU_ISA=portable|avx2|avx512 forces a path (tests use it to cover every path on
// one machine); a path the CPU cannot run is never chosen, whatever the variable says.
Kernel select_kernel() {
  const char* forced = std::getenv("FLASH_EXPORT_CPU_ISA");
  const bool force = forced != nullptr && forced[0] != '\0';
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c");
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f");
  if (force && std::strcmp(forced, "portable") == 0) return cpu::kernel_portable();
  if (force && std::strcmp(forced, "avx2") == 0 && has_avx2) return cpu::kernel_avx2();
  if (has_avx512) return cpu::kernel_avx512();
  if (has_avx2) return cpu::kernel_avx2();
#endif
  return cpu::kernel_portable();
}

const Kernel& kernel() {
  static const Kernel k = select_kernel();
  return k;
}

size_t round_up(size_t x, size_t m) { return (x + m - 1) / m * m; }

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

struct Job {
  const AttentionParams* params;
  const Plan* plan;
  cpu::RunItemFn run_item;
  std::atomic<bool> out_of_memory{false};
};

void run_job_item(void* data, size_t index) {
  Job& job = *static_cast<Job*>(data);
  const AttentionParams& p = *job.params;
  const Plan& plan = *job.plan;
  thread_local Scratch scratch;
  float* buffer = scratch.get(plan.scratch_floats);
  if (buffer == nullptr) {
    job.out_of_memory.store(true, std::memory_order_relaxed);
    return;
  }
  const int64_t bh = static_cast<int64_t>(index) % (p.batch * p.heads);
  const int64_t rank = static_cast<int64_t>(index) / (p.batch * p.heads);
  // Causal blocks lower down see more keys: hand out the heaviest first so the pool balances.
  const int64_t q_block = p.causal ? plan.q_blocks - 1 - rank : rank;
  job.run_item(p, plan, bh / p.heads, bh % p.heads, q_block, buffer);
}

bool valid_dtype(DType d) {
  return d == DType::kFloat32 || d == DType::kFloat16 || d == DType::kBFloat16;
}

}  // namespace

const char* cpu_kernel_isa() { return kernel().isa; }

Status attention_forward_cpu(const AttentionParams& p, ParallelForFn parallel_for,
                             void* parallel_context) {
  if (p.batch < 0 || p.heads < 0 || p.head_dim < 0 || p.seq_q < 0 || p.seq_k < 0 ||
      p.chunk_size < 1 || !valid_dtype(p.dtype)) {
    return Status::kInvalidArgument;
  }
  if (p.batch == 0 || p.heads == 0 || p.seq_q == 0 || p.head_dim == 0) return Status::kOk;
  if (p.q == nullptr || p.out == nullptr || (p.seq_k > 0 && (p.k == nullptr || p.v == nullptr))) {
    return Status::kInvalidArgument;
  }
  const Kernel& k = kernel();
  const size_t w = static_cast<size_t>(k.width);
  // Bound every size so the scratch arithmetic below cannot overflow.
  constexpr int64_t kMaxDim = int64_t{1} << 20;
  if (p.head_dim > kMaxDim) return Status::kInvalidArgument;

  Plan plan;
  plan.bq = k.bq;
  plan.bq_pad = static_cast<int64_t>(round_up(static_cast<size_t>(k.bq), w));
  plan.bc = p.chunk_size < p.seq_k ? p.chunk_size : (p.seq_k > 0 ? p.seq_k : 1);
  plan.d_pad = static_cast<int64_t>(round_up(static_cast<size_t>(p.head_dim), w));
  plan.q_blocks = (p.seq_q + plan.bq - 1) / plan.bq;
  if (plan.bc > kMaxDim * 64) return Status::kInvalidArgument;
  const size_t dim = static_cast<size_t>(p.head_dim), bq_pad = static_cast<size_t>(plan.bq_pad);
  const size_t bc = static_cast<size_t>(plan.bc), d_pad = static_cast<size_t>(plan.d_pad);
  size_t off = 0;
  auto region = [&off](size_t floats) {
    const size_t at = off;
    off += round_up(floats, 16);
    return at;
  };
  plan.off_qt = region(dim * bq_pad);
  plan.off_o = region(static_cast<size_t>(plan.bq) * d_pad);
  plan.off_s = region(bc * bq_pad);
  plan.off_m = region(bq_pad);
  plan.off_l = region(bq_pad);
  plan.off_alpha = region(bq_pad);
  plan.off_mx = region(bq_pad);
  plan.off_k = region(p.dtype == DType::kFloat32 ? 0 : bc * dim);
  plan.off_v = region(bc * d_pad);
  plan.scratch_floats = off;

  Job job;
  job.params = &p;
  job.plan = &plan;
  job.run_item = k.run_item;
  const size_t total = static_cast<size_t>(p.batch * p.heads * plan.q_blocks);
  if (parallel_for != nullptr) {
    parallel_for(parallel_context, &run_job_item, total, &job);
  } else {
    for (size_t i = 0; i < total; ++i) run_job_item(&job, i);
  }
  return job.out_of_memory.load() ? Status::kOutOfMemory : Status::kOk;
}

}  // namespace flash_export

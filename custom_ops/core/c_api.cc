// Definitions of the entry points flash_export.h declares, all but the params filler and its
// struct sizes (attention_params.cc) and flash_export_build_info (the onnxruntime adapter's:
// ort/build_info.cc). The forwards return a Status code; no C++ exception leaves them. Everything
// else in the library has hidden visibility.
#include <atomic>
#include <cstdint>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include "flash_attention.h"
#include "flash_export.h"

namespace {

struct ThreadedFor {
  int32_t threads;
};

// parallel_for on plain std::threads: each thread pulls the next item index from a counter. If
// the system refuses a thread, the ones started (and the caller) do all the items: no exception
// leaves this C entry point.
void threaded_parallel_for(void* context, void (*fn)(void*, size_t), size_t total, void* data) {
  const size_t threads = static_cast<size_t>(static_cast<ThreadedFor*>(context)->threads);
  std::atomic<size_t> next{0};
  auto worker = [&]() {
    for (size_t i = next.fetch_add(1); i < total; i = next.fetch_add(1)) fn(data, i);
  };
  std::vector<std::thread> pool;
  try {
    pool.reserve(threads);
    for (size_t t = 1; t < threads && t < total; ++t) pool.emplace_back(worker);
  } catch (const std::exception&) {  // std::system_error or std::bad_alloc: run with fewer
  }
  worker();
  for (std::thread& t : pool) t.join();
}

// parallel_for on the host's OpenMP team: one GOMP_parallel region per call, whose threads pull
// item indices from a counter (no OpenMP thread numbering needed, so any team size works).
using GompParallel = void (*)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);

struct OpenMpFor {
  GompParallel parallel;
  unsigned threads;
};

struct OpenMpRegion {
  void (*fn)(void*, size_t);
  size_t total;
  void* data;
  std::atomic<size_t> next;
};

void openmp_region(void* region) {
  OpenMpRegion& r = *static_cast<OpenMpRegion*>(region);
  for (size_t i = r.next.fetch_add(1); i < r.total; i = r.next.fetch_add(1)) r.fn(r.data, i);
}

void openmp_parallel_for(void* context, void (*fn)(void*, size_t), size_t total, void* data) {
  const OpenMpFor& omp = *static_cast<OpenMpFor*>(context);
  OpenMpRegion region{fn, total, data, {0}};
  const unsigned team = total < omp.threads ? static_cast<unsigned>(total) : omp.threads;
  omp.parallel(&openmp_region, &region, team, 0);
}

}  // namespace

// `extern "C"` again on each definition: one whose signature drifted from its declaration would
// otherwise define a C++ overload quietly, and the symbol would be missing.
extern "C" size_t flash_export_params_size(void) { return sizeof(FlashExportAttentionParams); }

extern "C" int32_t flash_export_attention_forward_cpu(const FlashExportAttentionParams* p) {
  if (p == nullptr) return static_cast<int32_t>(flash_export::Status::kInvalidArgument);
  return static_cast<int32_t>(flash_export::attention_forward_cpu(*p, nullptr, nullptr, 1));
}

extern "C" int32_t flash_export_attention_forward_cpu_threads(const FlashExportAttentionParams* p,
                                                              int32_t threads) {
  if (p == nullptr) return static_cast<int32_t>(flash_export::Status::kInvalidArgument);
  if (threads <= 1) return flash_export_attention_forward_cpu(p);
  ThreadedFor context{threads};
  return static_cast<int32_t>(
      flash_export::attention_forward_cpu(*p, &threaded_parallel_for, &context, threads));
}

extern "C" int32_t flash_export_attention_forward_cpu_pool(const FlashExportAttentionParams* p,
                                                           FlashExportParallelFor parallel_for,
                                                           void* context, int32_t threads) {
  if (p == nullptr) return static_cast<int32_t>(flash_export::Status::kInvalidArgument);
  return static_cast<int32_t>(
      flash_export::attention_forward_cpu(*p, parallel_for, context, threads < 1 ? 1 : threads));
}

extern "C" int32_t flash_export_attention_forward_cpu_openmp(const FlashExportAttentionParams* p,
                                                             void* gomp_parallel, int32_t threads) {
  if (gomp_parallel == nullptr) return flash_export_attention_forward_cpu_threads(p, threads);
  if (p == nullptr) return static_cast<int32_t>(flash_export::Status::kInvalidArgument);
  if (threads <= 1) return flash_export_attention_forward_cpu(p);
  OpenMpFor context{reinterpret_cast<GompParallel>(gomp_parallel), static_cast<unsigned>(threads)};
  return static_cast<int32_t>(
      flash_export::attention_forward_cpu(*p, &openmp_parallel_for, &context, threads));
}

extern "C" const char* flash_export_cpu_plan(const FlashExportAttentionParams* p, int32_t threads) {
  thread_local std::string plan;
  try {
    plan = p == nullptr ? std::string("{\"error\": \"params is NULL\"}")
                        : flash_export::describe_cpu_plan(*p, threads);
  } catch (const std::exception&) {  // std::bad_alloc: no exception leaves a C entry point
    return "{\"error\": \"out of memory\"}";
  }
  return plan.c_str();
}

#ifdef FLASH_EXPORT_WITH_CUDA
extern "C" int32_t flash_export_attention_forward_cuda(const FlashExportAttentionParams* p,
                                                       void* stream) {
  if (p == nullptr) return static_cast<int32_t>(flash_export::Status::kInvalidArgument);
  return static_cast<int32_t>(flash_export::attention_forward_cuda(*p, stream));
}
#endif

extern "C" const char* flash_export_cpu_isa(void) { return flash_export::cpu_kernel_isa(); }

extern "C" const char* flash_export_cpu_isa_error(void) {
  return flash_export::cpu_isa_setting_error();
}

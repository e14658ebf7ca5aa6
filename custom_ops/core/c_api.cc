// extern "C" entry points of libflash_export.so for callers without onnxruntime (ctypes tests,
// benchmarks) and the build report. Everything else in the library has hidden visibility.
#include <atomic>
#include <cstdint>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include "flash_attention.h"

#define FLASH_EXPORT_API extern "C" __attribute__((visibility("default")))

#ifndef FLASH_EXPORT_ORT_API_VERSION
#define FLASH_EXPORT_ORT_API_VERSION 17
#endif
#ifndef FLASH_EXPORT_CUDA_ARCHS
#define FLASH_EXPORT_CUDA_ARCHS ""
#endif
#ifndef FLASH_EXPORT_SANITIZER
#define FLASH_EXPORT_SANITIZER "none"
#endif

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

std::string build_info_json() {
  std::string archs;
  const std::string list = FLASH_EXPORT_CUDA_ARCHS;
  size_t start = 0;
  while (start < list.size()) {
    size_t end = list.find(',', start);
    if (end == std::string::npos) end = list.size();
    if (!archs.empty()) archs += ", ";
    archs += "\"" + list.substr(start, end - start) + "\"";
    start = end + 1;
  }
#ifdef FLASH_EXPORT_WITH_CUDA
  const char* cuda = "true";
#else
  const char* cuda = "false";
#endif
  return std::string("{\"op_domain\": \"com.flash_export\", \"op_version\": 1, ") +
         "\"ort_api_version\": " + std::to_string(FLASH_EXPORT_ORT_API_VERSION) + ", " +
         "\"cuda\": " + cuda + ", \"cuda_archs\": [" + archs + "], " +
         "\"cpu_isa\": \"" + flash_export::cpu_kernel_isa() + "\", " +
         "\"sanitizer\": \"" + FLASH_EXPORT_SANITIZER + "\"}";
}

}  // namespace

// Serial CPU forward; returns a flash_export::Status code.
FLASH_EXPORT_API int32_t flash_export_attention_forward_cpu(const flash_export::AttentionParams* p) {
  if (p == nullptr) return static_cast<int32_t>(flash_export::Status::kInvalidArgument);
  return static_cast<int32_t>(flash_export::attention_forward_cpu(*p, nullptr, nullptr));
}

// CPU forward on `threads` std::threads (the caller's thread included); threads <= 1 is serial.
FLASH_EXPORT_API int32_t flash_export_attention_forward_cpu_threads(
    const flash_export::AttentionParams* p, int32_t threads) {
  if (p == nullptr) return static_cast<int32_t>(flash_export::Status::kInvalidArgument);
  if (threads <= 1) return flash_export_attention_forward_cpu(p);
  ThreadedFor context{threads};
  return static_cast<int32_t>(
      flash_export::attention_forward_cpu(*p, &threaded_parallel_for, &context));
}

// The vector path the CPU kernel runs on this machine: "amx", "avx512", "avx2" or "portable".
FLASH_EXPORT_API const char* flash_export_cpu_isa(void) { return flash_export::cpu_kernel_isa(); }

// A small JSON object describing this build (op domain, ORT API version, CUDA, CPU ISA,
// sanitizer). The string lives for the life of the process.
FLASH_EXPORT_API const char* flash_export_build_info(void) {
  static const std::string info = build_info_json();
  return info.c_str();
}

// flash_export_build_info (declared in flash_export.h): here, beside the onnxruntime facts it
// reports (the op's domain, name and version, the OrtApi version), which the core does not know.
#include <string>

#include "flash_attention.h"
#include "flash_attention_op.h"
#include "flash_export.h"
#include "ort_abi.h"

#ifndef FLASH_EXPORT_CUDA_ARCHS
#define FLASH_EXPORT_CUDA_ARCHS ""
#endif
#ifndef FLASH_EXPORT_SANITIZER
#define FLASH_EXPORT_SANITIZER "none"
#endif

namespace flash_export {
namespace ort {
namespace {

std::string quoted(const std::string& s) { return "\"" + s + "\""; }

std::string build_info_json() {
  std::string archs;
  const std::string list = FLASH_EXPORT_CUDA_ARCHS;
  size_t start = 0;
  while (start < list.size()) {
    size_t end = list.find(',', start);
    if (end == std::string::npos) end = list.size();
    if (!archs.empty()) archs += ", ";
    archs += quoted(list.substr(start, end - start));
    start = end + 1;
  }
#ifdef FLASH_EXPORT_WITH_CUDA
  const char* cuda = "true";
#else
  const char* cuda = "false";
#endif
  return "{\"op_domain\": " + quoted(kDomain) + ", \"op_name\": " + quoted(kOpName) +
         ", \"op_version\": " + std::to_string(kOpVersion) +
         ", \"ort_api_version\": " + std::to_string(ort_abi::kApiVersion) + ", \"cuda\": " + cuda +
         ", \"cuda_archs\": [" + archs + "], \"cpu_isa\": " + quoted(cpu_kernel_isa()) +
         ", \"sanitizer\": " + quoted(FLASH_EXPORT_SANITIZER) + "}";
}

}  // namespace
}  // namespace ort
}  // namespace flash_export

extern "C" const char* flash_export_build_info(void) {
  static const std::string info = flash_export::ort::build_info_json();
  return info.c_str();
}

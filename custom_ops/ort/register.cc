// RegisterCustomOps: the one entry point onnxruntime calls (once per SessionOptions) when a session
// loads this library. The domain and its ops are created once per process and live as long as it.
#include <atomic>
#include <mutex>
#include <string>

#include "flash_attention.h"
#include "flash_attention_op.h"
#include "ort_abi.h"

namespace flash_export {
namespace ort {
namespace {

using ort_abi::Api;

std::atomic<const ort_abi::OrtApi*> g_api{nullptr};
std::once_flag g_once;
ort_abi::OrtCustomOpDomain* g_domain = nullptr;
std::string g_error;  // set when creating the domain failed; reported on every call

void create_domain(const Api& api) {
  if (const char* setting = cpu_isa_setting_error()) {  // a typo must not pass silently
    g_error = std::string("flash_export: ") + setting;
    return;
  }
  ort_abi::OrtStatus* status = api.CreateCustomOpDomain(kDomain, &g_domain);
  if (status == nullptr) status = api.CustomOpDomain_Add(g_domain, flash_attention_cpu_op());
  if (status == nullptr && flash_attention_cuda_op() != nullptr) {
    status = api.CustomOpDomain_Add(g_domain, flash_attention_cuda_op());
  }
  if (status != nullptr) {
    g_error = std::string("flash_export: registering ") + kDomain +
              " failed: " + api.GetErrorMessage(status);
    api.ReleaseStatus(status);
  }
}

}  // namespace

const ort_abi::OrtApi* registered_api() { return g_api.load(); }

}  // namespace ort
}  // namespace flash_export

extern "C" __attribute__((visibility("default"))) flash_export::ort_abi::OrtStatus*
RegisterCustomOps(flash_export::ort_abi::OrtSessionOptions* options,
                  const flash_export::ort_abi::OrtApiBase* api_base) {
  namespace fe = flash_export::ort;
  using flash_export::ort_abi::Api;
  const flash_export::ort_abi::OrtApi* table = api_base->GetApi(flash_export::ort_abi::kApiVersion);
  if (table == nullptr) {
    const flash_export::ort_abi::OrtApi* v1 = api_base->GetApi(1);
    // onnxruntime 1.N serves OrtApi versions up to N.
    const std::string version = std::to_string(flash_export::ort_abi::kApiVersion);
    const std::string message = "flash_export needs onnxruntime >= 1." + version + " (OrtApi " +
                                version + "); this onnxruntime is " + api_base->GetVersionString();
    return v1 == nullptr ? nullptr
                         : Api(v1).CreateStatus(flash_export::ort_abi::ORT_FAIL, message.c_str());
  }
  const Api api(table);
  fe::g_api.store(table);
  std::call_once(fe::g_once, [&api] { fe::create_domain(api); });
  if (!fe::g_error.empty()) {
    return api.CreateStatus(flash_export::ort_abi::ORT_FAIL, fe::g_error.c_str());
  }
  return api.AddCustomOpDomain(options, fe::g_domain);
}

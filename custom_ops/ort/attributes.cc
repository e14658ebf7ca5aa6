// Node attributes read by type (see attributes.h).
#include "attributes.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace flash_export {
namespace ort {
namespace {

using namespace ort_abi;  // NOLINT(build/namespaces): this file speaks the ABI throughout

// Whether a getter succeeded; releases the status of one that did not.
bool ok(const Api& api, OrtStatus* status) {
  if (status == nullptr) return true;
  api.ReleaseStatus(status);
  return false;
}

// A string attribute as a message shows it: quoted, printable ASCII only, at most 32 characters
// (it comes from a model file, and goes into a one-line error).
std::string show_string(const std::string& text) {
  constexpr size_t kShown = 32;
  std::string out = "\"";
  for (size_t i = 0; i < text.size() && i < kShown; ++i) {
    const char c = text[i];
    out += c >= 0x20 && c < 0x7f && c != '"' && c != '\\' ? c : '?';
  }
  if (text.size() > kShown) out += "...";
  return out + "\"";
}

// A list attribute as a message shows it: its first values, and its length when longer.
template <typename T, typename Show>
std::string show_list(const std::vector<T>& values, Show show) {
  constexpr size_t kShown = 4;
  std::string out = "[";
  for (size_t i = 0; i < values.size() && i < kShown; ++i) {
    if (i > 0) out += ", ";
    out += show(values[i]);
  }
  if (values.size() > kShown) out += ", ... " + std::to_string(values.size()) + " values";
  return out + "]";
}

// Reads a list attribute through `getter` (size first, then the values) into *shown. Returns
// whether the getter answered, and sets *count. onnxruntime's list getters do not check the
// attribute's type: for an attribute of any type they answer with its list of their element type,
// empty unless it is that list, and they fail only for an absent name. So an empty answer proves
// presence, not type. Lists longer than kMaxRead are only counted: a message shows four values,
// and the model may hold millions.
template <typename T, typename Getter>
bool read_list(const Api& api, const OrtKernelInfo* info, const char* name, Getter getter,
               size_t* count, std::string* shown) {
  constexpr size_t kMaxRead = 4096;
  size_t size = 0;
  if (!ok(api, (api.*getter)(info, name, nullptr, &size))) return false;
  *count = size;
  if (size == 0) return true;
  if (size > kMaxRead) {
    *shown = "[" + std::to_string(size) + " values]";
    return true;
  }
  std::vector<T> values(size);
  if (!ok(api, (api.*getter)(info, name, values.data(), &size))) return false;
  if constexpr (sizeof(T) == sizeof(int64_t)) {
    *shown = show_list(values, [](int64_t v) { return std::to_string(v); });
  } else {
    *shown = show_list(values, [](float v) { return format_float(v); });
  }
  return true;
}

}  // namespace

std::string format_float(float value) {
  if (!std::isfinite(value)) return std::isnan(value) ? "nan" : value > 0 ? "inf" : "-inf";
  // As Python's repr writes it: the fewest significant digits that read back as the same float,
  // in fixed notation unless the exponent is below -4 or above 15.
  char text[48];
  int digits = 1;
  for (; digits < 9; ++digits) {
    std::snprintf(text, sizeof(text), "%.*e", digits - 1, static_cast<double>(value));
    if (std::strtof(text, nullptr) == value) break;
  }
  std::snprintf(text, sizeof(text), "%.*e", digits - 1, static_cast<double>(value));
  const int exponent = std::atoi(std::strchr(text, 'e') + 1);
  if (exponent < -4 || exponent > 15) return text;
  const int decimals = digits - 1 - exponent > 1 ? digits - 1 - exponent : 1;
  std::snprintf(text, sizeof(text), "%.*f", decimals, static_cast<double>(value));
  return text;
}

Attribute read_attribute(const Api& api, const OrtKernelInfo* info, const char* name) {
  using Kind = Attribute::Kind;
  Attribute a;
  // The scalar and tensor getters check the type; a failure alone cannot tell a wrong type from
  // an absent name.
  OrtStatus* as_int = api.KernelInfoGetAttribute_int64(info, name, &a.i);
  if (as_int == nullptr) {
    a.kind = Kind::kInt;
    a.shown = std::to_string(a.i);
    return a;
  }
  const std::string int_error = api.GetErrorMessage(as_int);
  api.ReleaseStatus(as_int);
  if (ok(api, api.KernelInfoGetAttribute_float(info, name, &a.f))) {
    a.kind = Kind::kFloat;
    a.shown = format_float(a.f);
    return a;
  }
  size_t size = 0;
  if (ok(api, api.KernelInfoGetAttribute_string(info, name, nullptr, &size))) {
    a.kind = Kind::kString;
    std::string text(size, '\0');
    if (size > 0 && ok(api, api.KernelInfoGetAttribute_string(info, name, &text[0], &size))) {
      text.resize(std::strlen(text.c_str()));
    }
    a.shown = show_string(text);
    return a;
  }
  size_t floats = 0, ints = 0;
  const bool has_floats =
      read_list<float>(api, info, name, &Api::KernelInfoGetAttributeArray_float, &floats, &a.shown);
  if (has_floats && floats > 0) {
    a.kind = Kind::kFloats;
    return a;
  }
  const bool has_ints =
      read_list<int64_t>(api, info, name, &Api::KernelInfoGetAttributeArray_int64, &ints, &a.shown);
  if (has_ints && ints > 0) {
    a.kind = Kind::kInts;
    return a;
  }
  OrtAllocator* allocator = nullptr;
  OrtValue* tensor = nullptr;
  if (ok(api, api.GetAllocatorWithDefaultOptions(&allocator)) &&
      ok(api, api.KernelInfoGetAttribute_tensor(info, name, allocator, &tensor))) {
    api.ReleaseValue(tensor);
    a.kind = Kind::kTensor;
    return a;
  }
  // Present, and neither INT, FLOAT, STRING, a non-empty list nor a TENSOR (an empty list, STRINGS,
  // a GRAPH, ...). Should a future onnxruntime make the list getters check types, onnxruntime's
  // wording of a type mismatch ("Attribute name and type don't match", where an absent name reads
  // "No attribute with name ...") still tells the two apart.
  if (has_floats || has_ints || int_error.find("type") != std::string::npos) a.kind = Kind::kOther;
  return a;
}

std::string describe(const Attribute& a) {
  using Kind = Attribute::Kind;
  switch (a.kind) {
    case Kind::kAbsent:
      return "missing";
    case Kind::kInt:
      return "an INT (" + a.shown + ")";
    case Kind::kFloat:
      return "a FLOAT (" + a.shown + ")";
    case Kind::kString:
      return "a STRING (" + a.shown + ")";
    case Kind::kInts:
      return "an INTS (" + a.shown + ")";
    case Kind::kFloats:
      return "a FLOATS (" + a.shown + ")";
    case Kind::kTensor:
      return "a TENSOR";
    case Kind::kOther:
      break;
  }
  return "of another type (an empty list, STRINGS, a GRAPH, ...)";
}

}  // namespace ort
}  // namespace flash_export

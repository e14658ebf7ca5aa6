// Node attributes read by type: what a FlashAttention node actually carries under a name, so that
// a wrong type is an error naming it instead of a silent default.
//
// onnxruntime's custom-op ABI reads attributes by name and type only (KernelInfoGetAttribute_*):
// a scalar getter of the wrong type fails like one for an absent name, and nothing lists a node's
// attribute names (so a misspelt name cannot be seen here at all). read_attribute therefore asks
// every getter in turn.
#ifndef FLASH_EXPORT_ORT_ATTRIBUTES_H_
#define FLASH_EXPORT_ORT_ATTRIBUTES_H_

#include <cstdint>
#include <string>

#include "ort_abi.h"

namespace flash_export {
namespace ort {

struct Attribute {
  enum class Kind { kAbsent, kInt, kFloat, kString, kInts, kFloats, kTensor, kOther };
  Kind kind = Kind::kAbsent;
  int64_t i = 0;      // kInt
  float f = 0.0f;     // kFloat
  std::string shown;  // the value as an error message shows it (not for kAbsent, kTensor, kOther)
};

// Reads attribute `name` of the node, whatever its type. May throw std::bad_alloc (the caller
// turns it into a status).
Attribute read_attribute(const ort_abi::Api& api, const ort_abi::OrtKernelInfo* info,
                         const char* name);

// "an INT (2)", "a FLOAT (1.0)", "a STRING (\"1\")", "an INTS ([1])", "a TENSOR", ...
std::string describe(const Attribute& attribute);

// A float as an error message shows it: "1.0", "0.125", "1e-30", "inf", "nan".
std::string format_float(float value);

}  // namespace ort
}  // namespace flash_export

#endif  // FLASH_EXPORT_ORT_ATTRIBUTES_H_

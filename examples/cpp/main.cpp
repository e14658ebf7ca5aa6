// Loads a flash-export TorchScript archive with torch::jit::load, or a .pt2 package with
// torch::inductor::AOTIModelPackageLoader, runs it on tensors read from files (in the forward's
// argument order) and writes the (first) output.
//
//   flash_attention_run [--library LIB.so] MODEL.pt|MODEL.pt2 OUT.bin INPUT.bin [INPUT.bin ...]
//
// --library loads a library before the model (dlopen, RTLD_GLOBAL): the libtorch shim
// libflash_export_torch.so (custom_ops/torch) that registers flash_export::attention, which
// TorchScript-native artifacts and .pt2 packages call. A portable .pt needs nothing.
//
// An attention model takes VALUES KEYS QUERIES [MASK]; a language model its token ids; any model
// its forward's tensors, as its IOSpec lists them. Tensor file format (little-endian), written by
// flash_export.artifacts.tensor_io: 8 bytes magic "FETENSOR", int64 dtype (0 = float32, 1 = bool,
// 2 = int64), int64 rank, int64 dims[rank], then the elements in row-major order.
#include <dlfcn.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr char kMagic[8] = {'F', 'E', 'T', 'E', 'N', 'S', 'O', 'R'};

torch::Tensor read_tensor(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  char magic[8];
  int64_t dtype = 0, rank = 0;
  in.read(magic, sizeof magic);
  in.read(reinterpret_cast<char*>(&dtype), sizeof dtype);
  in.read(reinterpret_cast<char*>(&rank), sizeof rank);
  if (!in || std::memcmp(magic, kMagic, sizeof kMagic) != 0) {
    throw std::runtime_error(path + " is not a flash-export tensor file");
  }
  if (rank < 0 || rank > 8) throw std::runtime_error(path + ": bad rank " + std::to_string(rank));
  std::vector<int64_t> dims(static_cast<size_t>(rank));
  in.read(reinterpret_cast<char*>(dims.data()), static_cast<std::streamsize>(rank * 8));
  for (int64_t d : dims) {
    if (d < 0) throw std::runtime_error(path + ": negative dimension");
  }
  if (dtype < 0 || dtype > 2) throw std::runtime_error(path + ": unknown dtype code");
  const auto type = dtype == 0 ? torch::kFloat32 : dtype == 1 ? torch::kBool : torch::kInt64;
  torch::Tensor t = torch::empty(dims, torch::TensorOptions().dtype(type));
  const auto bytes = static_cast<std::streamsize>(t.numel() * t.element_size());
  in.read(static_cast<char*>(t.data_ptr()), bytes);
  if (in.gcount() != bytes) throw std::runtime_error(path + ": truncated data");
  return t;
}

void write_tensor(const std::string& path, const torch::Tensor& tensor) {
  torch::Tensor t = tensor.contiguous().to(torch::kFloat32);
  std::ofstream out(path, std::ios::binary);
  if (!out) throw std::runtime_error("cannot write " + path);
  const int64_t dtype = 0, rank = t.dim();
  out.write(kMagic, sizeof kMagic);
  out.write(reinterpret_cast<const char*>(&dtype), sizeof dtype);
  out.write(reinterpret_cast<const char*>(&rank), sizeof rank);
  for (int64_t d : t.sizes()) out.write(reinterpret_cast<const char*>(&d), sizeof d);
  out.write(static_cast<const char*>(t.data_ptr()),
            static_cast<std::streamsize>(t.numel() * t.element_size()));
  if (!out) throw std::runtime_error("writing " + path + " failed");
}

// The first tensor of what forward returned: a tensor, a tuple or a list of them, or a dict.
torch::Tensor first_output(const torch::jit::IValue& value) {
  if (value.isTensor()) return value.toTensor();
  if (value.isTuple()) return first_output(value.toTupleRef().elements().at(0));
  if (value.isList()) return first_output(value.toListRef().at(0));
  if (value.isGenericDict()) return first_output(value.toGenericDict().begin()->value());
  throw std::runtime_error("the model returned no tensor");
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  std::string library;
  if (args.size() >= 2 && args[0] == "--library") {
    library = args[1];
    args.erase(args.begin(), args.begin() + 2);
  }
  if (args.size() < 3) {
    std::cerr << "usage: " << argv[0]
              << " [--library LIB.so] MODEL.pt|MODEL.pt2 OUT.bin INPUT.bin [INPUT.bin ...]\n";
    return 2;
  }
  try {
    if (!library.empty() && dlopen(library.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
      throw std::runtime_error(std::string("cannot load ") + library + ": " + dlerror());
    }
    std::vector<torch::Tensor> tensors;
    for (size_t i = 2; i < args.size(); ++i) tensors.push_back(read_tensor(args[i]));
    torch::NoGradGuard no_grad;
    torch::Tensor output;
    if (ends_with(args[0], ".pt2")) {
      // The package's inputs are the exported forward's tensors, flattened in order.
      torch::inductor::AOTIModelPackageLoader loader(args[0]);
      output = loader.run(tensors).at(0);
    } else {
      torch::jit::script::Module module = torch::jit::load(args[0]);
      module.eval();
      output = first_output(module.forward({tensors.begin(), tensors.end()}));
    }
    write_tensor(args[1], output);
    std::cout << "output " << output.sizes() << " -> " << args[1] << "\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}

// The Python module electra_fast._C. Kernels register themselves as torch.ops.electra_fast_cpp.* in their
// own csrc/<op>.cpp files; importing this module is what loads them.
#include <torch/extension.h>
#include <torch/version.h>

#include <string>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "electra_fast C++ CPU kernels (registered as torch.ops.electra_fast_cpp.*)";
  m.attr("TORCH_VERSION") = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH);
}

// Python module entry of resnext_kernels._C.
//
// Op schemas live in Python (resnext_kernels/ops.py); the C++ files register
// implementations with TORCH_LIBRARY_IMPL / TORCH_LIBRARY_FRAGMENT. This file
// only gives the module a PyInit and a few build facts.
#include <Python.h>
#include <torch/extension.h>

namespace resnext_kernels {

bool built_with_cuda() {
#ifdef RESNEXT_KERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace resnext_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "resnext_kernels compiled ops";
  m.def("built_with_cuda", &resnext_kernels::built_with_cuda,
        "True when the CUDA kernels were compiled into this module");
  m.def("torch_version", []() { return std::string(TORCH_VERSION); },
        "The torch version this module was compiled against");
}

// Python module entry of resnext_kernels._C.
//
// The public op resnext_kernels::bottleneck_inference is defined in Python
// (resnext_kernels/ops/inference.py); the fused CUDA kernel's inner ops are
// defined once in csrc/fused_block_ops.cpp and implemented in
// csrc/fused_block_cuda.cu. This file only gives the module a PyInit and a
// few build facts.
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

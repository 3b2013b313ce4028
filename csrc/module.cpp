// The Python extension module spectral_ext._C. Loading it runs the operator
// registrations (TORCH_LIBRARY in ops.cpp, TORCH_LIBRARY_IMPL per kernel file);
// it also reports what was compiled in, which only the build knows.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include <string>

#include "interrupt.h"

namespace py = pybind11;

// setup.py passes why it chose CUDA or CPU-only as a bare token (no quoting through ninja).
#define SPECTRAL_EXT_STR_(x) #x
#define SPECTRAL_EXT_STR(x) SPECTRAL_EXT_STR_(x)

namespace {
// Runs Python's signal handlers; a pending KeyboardInterrupt is cleared here and
// re-raised by the Python wrapper once the kernel has unwound.
bool python_interrupted() {
  const PyGILState_STATE state = PyGILState_Ensure();
  const bool hit = PyErr_CheckSignals() != 0;
  if (hit) PyErr_Clear();
  PyGILState_Release(state);
  return hit;
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  spectral_ext::interrupt_hook().store(&python_interrupted);
  m.doc() = "spectral_ext compiled operators (registered as torch.ops.spectral_ext.*)";
  m.def("compiled_info", [] {
    py::dict info;
#ifdef SPECTRAL_EXT_WITH_CUDA
    info["cuda_compiled"] = true;
#else
    info["cuda_compiled"] = false;
#endif
#ifdef SPECTRAL_EXT_BUILD_REASON
    info["build_reason"] = SPECTRAL_EXT_STR(SPECTRAL_EXT_BUILD_REASON);
#endif
    info["built_with_torch"] = std::to_string(TORCH_VERSION_MAJOR) + "." +
                               std::to_string(TORCH_VERSION_MINOR) + "." +
                               std::to_string(TORCH_VERSION_PATCH);
    return info;
  });
}

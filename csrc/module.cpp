// Python module init for tbfast._C and the build-information op.
//
// Importing tbfast._C loads this shared library; the ops themselves register through
// TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL static initialisers in the other csrc files.
#include <Python.h>

#include <torch/library.h>

#include <sstream>
#include <string>

#include "tbfast_parallel.h"

#ifndef TBFAST_TORCH_VERSION
#define TBFAST_TORCH_VERSION "unknown"
#endif

namespace {

// JSON object describing how this extension was built.
std::string build_info() {
  std::ostringstream out;
  out << "{\"torch_version\": \"" << TBFAST_TORCH_VERSION << "\"";
  out << ", \"openmp\": " << (tbfast::kBuiltWithOpenMP ? "true" : "false");
#ifdef _OPENMP
  out << ", \"openmp_version\": " << _OPENMP;
#endif
#if defined(__clang__)
  out << ", \"compiler\": \"clang " << __clang_major__ << "." << __clang_minor__ << "\"";
#elif defined(__GNUC__)
  out << ", \"compiler\": \"gcc " << __GNUC__ << "." << __GNUC_MINOR__ << "\"";
#endif
  out << ", \"cplusplus\": " << __cplusplus << "}";
  return out.str();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tbfast, m) {
  m.def("build_info() -> str", &build_info);
}

static struct PyModuleDef tbfast_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "tbfast compiled ops (registered under torch.ops.tbfast)", -1,
    nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&tbfast_c_module); }

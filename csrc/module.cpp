// Python module init for tbfast._C and its two plain info functions (build_info, lapack_info).
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

namespace tbfast {
std::string lapack_info();  // eig_cpu.cpp
}

namespace {

// The info functions are plain CPython functions, not torch ops: they must work (and be safe to
// call) whatever the torch build, since tbfast.backend_info() calls them first.
PyObject* py_build_info(PyObject*, PyObject*) {
  const std::string s = build_info();
  return PyUnicode_FromStringAndSize(s.data(), static_cast<Py_ssize_t>(s.size()));
}

PyObject* py_lapack_info(PyObject*, PyObject*) {
  const std::string s = tbfast::lapack_info();
  return PyUnicode_FromStringAndSize(s.data(), static_cast<Py_ssize_t>(s.size()));
}

PyMethodDef tbfast_c_methods[] = {
    {"build_info", py_build_info, METH_NOARGS, "JSON: how this extension was built"},
    {"lapack_info", py_lapack_info, METH_NOARGS, "JSON: where the LAPACK ?syevd symbols come from"},
    {nullptr, nullptr, 0, nullptr}};

struct PyModuleDef tbfast_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "tbfast compiled ops (registered under torch.ops.tbfast)", -1,
    tbfast_c_methods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&tbfast_c_module); }

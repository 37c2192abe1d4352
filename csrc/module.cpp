// Python module init for tbfast._C and its two plain info functions (build_info, lapack_info).
//
// Importing tbfast._C loads this shared library; the ops themselves register through
// TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL static initialisers in the other csrc files.
#include <Python.h>

#include <torch/library.h>

#include <string>

#include "tbfast_parallel.h"

#ifndef TBFAST_TORCH_VERSION
#define TBFAST_TORCH_VERSION "unknown"
#endif

namespace {

#define TBFAST_STR_(x) #x
#define TBFAST_STR(x) TBFAST_STR_(x)

#ifdef _OPENMP
#define TBFAST_OPENMP_JSON ", \"openmp\": true, \"openmp_version\": " TBFAST_STR(_OPENMP)
#else
#define TBFAST_OPENMP_JSON ", \"openmp\": false"
#endif
#if defined(__clang__)
#define TBFAST_COMPILER "clang " TBFAST_STR(__clang_major__) "." TBFAST_STR(__clang_minor__)
#elif defined(__GNUC__)
#define TBFAST_COMPILER "gcc " TBFAST_STR(__GNUC__) "." TBFAST_STR(__GNUC_MINOR__)
#else
#define TBFAST_COMPILER "unknown"
#endif

// JSON object describing how this extension was built: one string literal assembled by the
// preprocessor, so nothing is formatted at run time. (Formatting numbers with
// std::ostringstream here segfaulted on the GPU machine, torch 2.11+cu130 with its /opt/gcc g++.)
const char* build_info() {
  return "{\"torch_version\": \"" TBFAST_TORCH_VERSION "\"" TBFAST_OPENMP_JSON
         ", \"compiler\": \"" TBFAST_COMPILER "\", \"cplusplus\": \"" TBFAST_STR(__cplusplus) "\"}";
}

}  // namespace

namespace tbfast {
std::string lapack_info();  // eig_cpu.cpp
}

namespace {

// The info functions are plain CPython functions, not torch ops: they must work (and be safe to
// call) whatever the torch build, since tbfast.backend_info() calls them first.
PyObject* py_build_info(PyObject*, PyObject*) { return PyUnicode_FromString(build_info()); }

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

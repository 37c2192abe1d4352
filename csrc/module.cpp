// Python module init for tbfast._C and its plain (non-op) functions: build_info, lapack_info,
// cpu_features, cusolver_load, cusolver_status.
//
// Importing tbfast._C loads this shared library; the ops themselves register through the
// TBFAST_LIBRARY_FRAGMENT / TBFAST_LIBRARY_IMPL static initialisers in the other csrc files
// (tbfast_torch.h). This file uses Python's limited API only (the stable build is an abi3 module).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string>

#include "cusolver_runtime.h"
#include "secular_simd.h"
#include "tbfast_parallel.h"

// The ABI of tbfast._C: which op schemas and plain functions it defines. tbfast/_backend.py
// refuses to load an extension whose build_info() "abi" differs from its EXTENSION_ABI.
// Bump both whenever a schema, a kernel registration or a plain function changes.
#define TBFAST_ABI 5

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
// A stable-ABI build (tbfast_torch.h) runs on every torch >= the target version it was built for.
#ifdef TBFAST_STABLE_ABI
#define TBFAST_STABLE_JSON ", \"stable_abi\": true, \"torch_min\": \"" TBFAST_TORCH_MIN "\""
#else
#define TBFAST_STABLE_JSON ", \"stable_abi\": false"
#endif
#ifndef TBFAST_TORCH_MIN
#define TBFAST_TORCH_MIN "unknown"
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
  return "{\"abi\": " TBFAST_STR(TBFAST_ABI) ", \"torch_version\": \"" TBFAST_TORCH_VERSION "\"" TBFAST_STABLE_JSON
         TBFAST_OPENMP_JSON
         ", \"compiler\": \"" TBFAST_COMPILER "\", \"cplusplus\": \"" TBFAST_STR(__cplusplus) "\"}";
}

}  // namespace

namespace tbfast {
std::string lapack_info();    // eig_cpu.cpp
const char* digest_variant();  // digest_cpu.cpp
}

namespace {

// The info functions are plain CPython functions, not torch ops: they must work (and be safe to
// call) whatever the torch build, since tbfast.backend_info() calls them first.
PyObject* py_build_info(PyObject*, PyObject*) { return PyUnicode_FromString(build_info()); }

PyObject* py_lapack_info(PyObject*, PyObject*) {
  const std::string s = tbfast::lapack_info();
  return PyUnicode_FromStringAndSize(s.data(), static_cast<Py_ssize_t>(s.size()));
}

// cpu_features() -> JSON: which vector variants the secular kernel (tbfast::eigvalsh_update) and the
// digest kernel (tbfast::weight_digest) run.
PyObject* py_cpu_features(PyObject*, PyObject*) {
  namespace simd = tbfast::secular::simd;
  const std::string s = std::string("{\"avx512f\": ") + (simd::avx512_supported() ? "true" : "false") +
                        ", \"secular_simd\": \"" + simd::active_name() +
                        "\", \"digest_simd\": \"" + tbfast::digest_variant() + "\"}";
  return PyUnicode_FromStringAndSize(s.data(), static_cast<Py_ssize_t>(s.size()));
}

// cusolver_load(path: str) -> str: "" when libcusolver is (already) loaded, else why not.
PyObject* py_cusolver_load(PyObject*, PyObject* args) {
  const char* path = nullptr;
  if (!PyArg_ParseTuple(args, "s:cusolver_load", &path)) return nullptr;
  const std::string p(path);
  std::string err;
  std::string failure;
  Py_BEGIN_ALLOW_THREADS  // dlopen may take a while; the library state has its own mutex
  try {
    err = tbfast::cusolver_load(p);
  } catch (const std::exception& e) {
    failure = e.what();
    if (failure.empty()) failure = "cusolver_load failed";
  }
  Py_END_ALLOW_THREADS
  if (!failure.empty()) {
    PyErr_SetString(PyExc_RuntimeError, failure.c_str());
    return nullptr;
  }
  return PyUnicode_FromStringAndSize(err.data(), static_cast<Py_ssize_t>(err.size()));
}

// cusolver_status() -> (loaded: bool, path: str, version: int, last_error: str).
PyObject* py_cusolver_status(PyObject*, PyObject*) {
  const tbfast::CusolverStatus st = tbfast::cusolver_status();
  return Py_BuildValue("(Os#Ls#)", st.loaded ? Py_True : Py_False, st.path.data(),
                       static_cast<Py_ssize_t>(st.path.size()), static_cast<long long>(st.version),
                       st.last_error.data(), static_cast<Py_ssize_t>(st.last_error.size()));
}

PyMethodDef tbfast_c_methods[] = {
    {"build_info", py_build_info, METH_NOARGS, "JSON: how this extension was built"},
    {"lapack_info", py_lapack_info, METH_NOARGS, "JSON: where the LAPACK ?syevd symbols come from"},
    {"cpu_features", py_cpu_features, METH_NOARGS,
     "JSON: the CPU features the kernels use and the secular and digest kernels' active vector variants"},
    {"cusolver_load", py_cusolver_load, METH_VARARGS,
     "cusolver_load(path) -> str: dlopen libcusolver (\"\" tries the usual sonames); \"\" on success, else why not"},
    {"cusolver_status", py_cusolver_status, METH_NOARGS,
     "cusolver_status() -> (loaded, path, version, last_error) of the libcusolver this process holds"},
    {nullptr, nullptr, 0, nullptr}};

struct PyModuleDef tbfast_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "tbfast compiled ops (registered under torch.ops.tbfast)", -1,
    tbfast_c_methods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&tbfast_c_module); }

// The torch interface of tbfast's C++ kernels: one source, two builds.
//
//  * TBFAST_STABLE_ABI (setup.py's default with torch >= 2.10): torch's stable C++ interface
//    (torch/csrc/stable: the stable library / tensor / ops API over libtorch's C shim), compiled
//    with TORCH_TARGET_VERSION = 2.10 and Python's limited API (abi3). The compiled tbfast._C then
//    loads on every torch >= 2.10, whatever torch built it; its build_info() says "stable_abi".
//  * otherwise (torch 2.4 - 2.9, or TBFAST_STABLE_ABI=0): the regular ATen / c10 API. Such a
//    tbfast._C runs only on the torch release it was built with (tbfast/_backend.py checks).
//
// A kernel file uses only what this header names: tbfast::Tensor and its methods common to both
// APIs (dim, size, numel, is_cpu, is_cuda, is_contiguous, scalar_type, element_size,
// const_data_ptr<T>, mutable_data_ptr<T>, data_ptr), the dtype constants, new_empty / new_zeros,
// TBFAST_CHECK (a one-line RuntimeError in Python), the parallel helpers, and the registration
// macros TBFAST_LIBRARY_IMPL / TBFAST_LIBRARY_FRAGMENT with TBFAST_KERNEL(fn):
//
//     TBFAST_LIBRARY_IMPL(tbfast, CPU, m) { m.impl("my_op", TBFAST_KERNEL(tbfast::my_op_cpu)); }
//
// Kernel signatures: const Tensor& / double / int64_t / bool arguments, a Tensor or a std::tuple
// of Tensors returned (the stable boxing supports exactly these here).
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef TBFAST_STABLE_ABI
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

namespace tbfast {
using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
}  // namespace tbfast

#define TBFAST_LIBRARY_IMPL(ns, k, m) STABLE_TORCH_LIBRARY_IMPL(ns, k, m)
#define TBFAST_LIBRARY_FRAGMENT(ns, m) STABLE_TORCH_LIBRARY_FRAGMENT(ns, m)
#define TBFAST_KERNEL(fn) TORCH_BOX(fn)
#else
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace tbfast {
using Tensor = at::Tensor;
using ScalarType = at::ScalarType;
}  // namespace tbfast

#define TBFAST_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)
#define TBFAST_LIBRARY_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define TBFAST_KERNEL(fn) (&fn)
#endif

namespace tbfast {

constexpr ScalarType kFloat = ScalarType::Float;
constexpr ScalarType kDouble = ScalarType::Double;
constexpr ScalarType kLong = ScalarType::Long;
constexpr ScalarType kInt = ScalarType::Int;
constexpr ScalarType kByte = ScalarType::Byte;

namespace detail {
template <class... A>
std::string cat(const A&... a) {
  std::ostringstream out;
  ((out << a), ...);
  return out.str();
}
}  // namespace detail

// Throws the error a failed TBFAST_CHECK raises: a RuntimeError with exactly `msg` in Python.
[[noreturn]] inline void fail(const std::string& msg) {
#ifdef TBFAST_STABLE_ABI
  throw std::runtime_error(msg);
#else
  TORCH_CHECK(false, msg);
#endif
}

#define TBFAST_CHECK(cond, ...)                                   \
  do {                                                            \
    if (!(cond)) ::tbfast::fail(::tbfast::detail::cat(__VA_ARGS__)); \
  } while (0)

inline const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "Float";
    case ScalarType::Double: return "Double";
    case ScalarType::Half: return "Half";
    case ScalarType::BFloat16: return "BFloat16";
    case ScalarType::Long: return "Long";
    case ScalarType::Int: return "Int";
    case ScalarType::Short: return "Short";
    case ScalarType::Char: return "Char";
    case ScalarType::Byte: return "Byte";
    case ScalarType::Bool: return "Bool";
    default: return "another dtype";
  }
}

inline size_t dtype_size(ScalarType t) {
  switch (t) {
    case ScalarType::Double:
    case ScalarType::Long: return 8;
    case ScalarType::Float:
    case ScalarType::Int: return 4;
    case ScalarType::Half:
    case ScalarType::BFloat16:
    case ScalarType::Short: return 2;
    default: return 1;
  }
}

// "[2, 3]", as torch prints a shape.
inline std::string shape_of(const Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + "]";
}

inline std::string device_name(const Tensor& t) {
#ifdef TBFAST_STABLE_ABI
  if (t.is_cpu()) return "cpu";
  if (t.is_cuda()) return "cuda:" + std::to_string(static_cast<int>(t.get_device_index()));
  return "a device other than cpu and cuda";
#else
  return t.device().str();
#endif
}

// An uninitialised / zero tensor of `shape` and `dtype` on `like`'s device.
inline Tensor new_empty(const Tensor& like, const std::vector<int64_t>& shape, ScalarType dtype) {
#ifdef TBFAST_STABLE_ABI
  return torch::stable::new_empty(like, shape, dtype);
#else
  return at::empty(shape, like.options().dtype(dtype));
#endif
}

inline Tensor new_zeros(const Tensor& like, const std::vector<int64_t>& shape, ScalarType dtype) {
#ifdef TBFAST_STABLE_ABI
  return torch::stable::new_zeros(like, shape, dtype);
#else
  return at::zeros(shape, like.options().dtype(dtype));
#endif
}

// torch's intra-op thread count and parallel loop (at::parallel_for; f(begin, end) must not throw
// in the stable build, whose C shim would drop the message).
inline int64_t num_threads() {
#ifdef TBFAST_STABLE_ABI
  return static_cast<int64_t>(torch::stable::get_num_threads());
#else
  return at::get_num_threads();
#endif
}

template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
#ifdef TBFAST_STABLE_ABI
  torch::stable::parallel_for(begin, end, grain, f);
#else
  at::parallel_for(begin, end, grain, f);
#endif
}

// Inside a parallel region (torch's or OpenMP's): loops then run serially. The stable interface
// has no at::in_parallel_region(); with torch's OpenMP backend omp_in_parallel() answers the same.
inline bool in_parallel_region() {
#ifndef TBFAST_STABLE_ABI
  if (at::in_parallel_region()) return true;
#endif
#ifdef _OPENMP
  if (omp_in_parallel()) return true;
#endif
  return false;
}

}  // namespace tbfast

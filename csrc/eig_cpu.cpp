// Batched symmetric eigenvalues on the CPU: LAPACK ?syevd (jobz='N') per matrix, parallel over
// the batch.
//
// The LAPACK routines are not linked: ssyevd_/dsyevd_ are looked up at run time (they are
// exported by libtorch_cpu when torch is built with MKL). Where they are absent each matrix
// falls back to aten::linalg_eigvalsh inside the same parallel loop (through the dispatcher:
// torch's stable interface has no LAPACK of its own, see tbfast_torch.h).
//
// This file registers the CPU kernel of tbfast::eigvalsh_batched(Tensor G, int workspace_limit)
// -> (Tensor w, Tensor info). The schema, the CUDA kernel, the fake kernel and the torch reference
// are registered once, in tbfast/ops/eig.py; tbfast_testing::eigvalsh_batched_path is a test hook.
#include <dlfcn.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "tbfast_parallel.h"
#include "tbfast_torch.h"

namespace tbfast {
namespace {

using ssyevd_t = void (*)(const char* jobz, const char* uplo, const int* n, float* a, const int* lda,
                          float* w, float* work, const int* lwork, int* iwork, const int* liwork,
                          int* info);
using dsyevd_t = void (*)(const char* jobz, const char* uplo, const int* n, double* a,
                          const int* lda, double* w, double* work, const int* lwork, int* iwork,
                          const int* liwork, int* info);

struct Lapack {
  ssyevd_t ssyevd = nullptr;
  dsyevd_t dsyevd = nullptr;
  std::string source;  // where the symbols came from, or why they were not found
};

// Looks the symbol up in the global scope first, then in the library that holds libtorch's own
// code (python loads extensions and libtorch with RTLD_LOCAL, so RTLD_DEFAULT may miss it).
void* find_symbol(const char* name, std::string* where) {
  dlerror();
  if (void* p = dlsym(RTLD_DEFAULT, name)) {
    *where = "global scope";
    return p;
  }
  Dl_info info;
  // Any function defined in libtorch_cpu works as an anchor.
#ifdef TBFAST_STABLE_ABI
  auto anchor = reinterpret_cast<void*>(&aoti_torch_delete_tensor_object);  // the C shim
#else
  auto anchor = reinterpret_cast<void*>(
      static_cast<at::Tensor (*)(const at::Tensor&, c10::string_view)>(&at::linalg_eigvalsh));
#endif
  if (dladdr(anchor, &info) != 0 && info.dli_fname != nullptr) {
    void* handle = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    if (handle != nullptr) {
      void* p = dlsym(handle, name);
      dlclose(handle);
      if (p != nullptr) {
        *where = info.dli_fname;
        return p;
      }
    }
  }
  return nullptr;
}

const Lapack& lapack() {
  static const Lapack lib = [] {
    Lapack l;
    std::string where_s, where_d;
    l.ssyevd = reinterpret_cast<ssyevd_t>(find_symbol("ssyevd_", &where_s));
    l.dsyevd = reinterpret_cast<dsyevd_t>(find_symbol("dsyevd_", &where_d));
    if (l.ssyevd != nullptr && l.dsyevd != nullptr) {
      l.source = where_d;
    } else {
      l.ssyevd = nullptr;
      l.dsyevd = nullptr;
      l.source = "ssyevd_/dsyevd_ not found; using aten::linalg_eigvalsh per matrix";
    }
    return l;
  }();
  return lib;
}

inline void call_syevd(float* a, int n, float* w, float* work, int lwork, int* iwork, int liwork,
                       int* info) {
  const char jobz = 'N', uplo = 'U';  // row-major lower triangle == column-major upper
  lapack().ssyevd(&jobz, &uplo, &n, a, &n, w, work, &lwork, iwork, &liwork, info);
}
inline void call_syevd(double* a, int n, double* w, double* work, int lwork, int* iwork,
                       int liwork, int* info) {
  const char jobz = 'N', uplo = 'U';
  lapack().dsyevd(&jobz, &uplo, &n, a, &n, w, work, &lwork, iwork, &liwork, info);
}

// Optimal workspace sizes of ?syevd (jobz='N') for an n x n matrix.
template <class T>
void query_workspace(int n, int* lwork, int* liwork) {
  T work_q = 0, a_q = 0, w_q = 0;
  int iwork_q = 0, info = 0;
  const int minus_one = -1;
  call_syevd(&a_q, n, &w_q, &work_q, minus_one, &iwork_q, minus_one, &info);
  *lwork = std::max<int>(static_cast<int>(work_q), 2 * n + 1);
  *liwork = std::max<int>(iwork_q, 1);
}

template <class T>
void eig_lapack(const Tensor& G, Tensor& w, Tensor& info, int64_t workers) {
  const int64_t B = G.size(0);
  const int n = static_cast<int>(G.size(1));
  int lwork = 0, liwork = 0;
  query_workspace<T>(n, &lwork, &liwork);
  const T* g = G.const_data_ptr<T>();
  T* wp = w.mutable_data_ptr<T>();
  int* ip = info.mutable_data_ptr<int>();
  const int64_t nn = static_cast<int64_t>(n) * n;

  auto solve_range = [&](int64_t b0, int64_t b1) {
    std::vector<T> a(nn), work(lwork);
    std::vector<int> iwork(liwork);
    for (int64_t b = b0; b < b1; ++b) {
      std::copy(g + b * nn, g + (b + 1) * nn, a.begin());
      int inf = 0;
      call_syevd(a.data(), n, wp + b * n, work.data(), lwork, iwork.data(), liwork, &inf);
      ip[b] = inf;
      if (inf != 0) std::fill(wp + b * n, wp + (b + 1) * n, std::numeric_limits<T>::quiet_NaN());
    }
  };
  if (workers <= 1) {
    // One matrix at a time: LAPACK may use its own threads inside each call.
    solve_range(0, B);
  } else {
    // Several matrices at once, one per thread (LAPACK runs single-threaded inside).
    const int64_t per = (B + workers - 1) / workers;
    parallel_for(0, B, per, solve_range);
  }
}

// One matrix by aten::linalg_eigvalsh (lower triangle), called through the dispatcher; false
// when it raised (e.g. no convergence).
template <class T>
bool eigvalsh_one(const Tensor& G, int64_t b, T* out, int64_t n) {
#ifdef TBFAST_STABLE_ABI
  std::array<StableIValue, 2> stack{torch::stable::detail::from(torch::stable::select(G, 0, b)),
                                    torch::stable::detail::from(std::string("L"))};
  if (torch_call_dispatcher("aten::linalg_eigvalsh", "", stack.data(), TORCH_ABI_VERSION) != TORCH_SUCCESS) {
    return false;
  }
  const Tensor r = torch::stable::detail::to<Tensor>(stack[0]);
  const T* p = r.const_data_ptr<T>();
  std::copy(p, p + n, out);
  return true;
#else
  try {
    const at::Tensor r = at::linalg_eigvalsh(G[b], "L").contiguous();
    const T* p = r.const_data_ptr<T>();
    std::copy(p, p + n, out);
    return true;
  } catch (const c10::Error&) {
    return false;
  }
#endif
}

template <class T>
void eig_aten(const Tensor& G, Tensor& w, Tensor& info, int64_t workers) {
  const int64_t B = G.size(0), n = G.size(1);
  int* ip = info.mutable_data_ptr<int>();
  T* wp = w.mutable_data_ptr<T>();
  auto solve_range = [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const bool ok = eigvalsh_one<T>(G, b, wp + b * n, n);
      ip[b] = ok ? 0 : 1;
      if (!ok) std::fill(wp + b * n, wp + (b + 1) * n, std::numeric_limits<T>::quiet_NaN());
    }
  };
  if (workers <= 1) {
    solve_range(0, B);
  } else {
    parallel_for(0, B, (B + workers - 1) / workers, solve_range);
  }
}

void check_input(const Tensor& G, int64_t workspace_limit) {
  TBFAST_CHECK(G.is_cpu(), "tbfast::eigvalsh_batched (CPU): G must be a CPU tensor, got ", device_name(G));
  TBFAST_CHECK(G.dim() == 3 && G.size(1) == G.size(2),
               "tbfast::eigvalsh_batched: G must have shape (B, n, n), got ", shape_of(G));
  TBFAST_CHECK(G.scalar_type() == kFloat || G.scalar_type() == kDouble,
               "tbfast::eigvalsh_batched: G must be float32 or float64, got ", dtype_name(G.scalar_type()));
  TBFAST_CHECK(G.is_contiguous(), "tbfast::eigvalsh_batched: G must be contiguous (call .contiguous())");
  TBFAST_CHECK(workspace_limit >= 0, "tbfast::eigvalsh_batched: workspace_limit must be >= 0, got ",
               workspace_limit);
  TBFAST_CHECK(G.size(1) <= std::numeric_limits<int>::max() / 2,
               "tbfast::eigvalsh_batched: matrix size ", G.size(1), " too large for 32-bit LAPACK");
}

// Number of matrices solved at the same time: the torch thread count, capped by the batch and by
// workspace_limit (bytes of per-matrix copies held at once; 0 = no cap).
int64_t concurrent_workers(const Tensor& G, int64_t workspace_limit) {
  const int64_t B = G.size(0);
  const int64_t n = G.size(1);
  // Tiny matrices: a thread team costs more than the solves (about n^3 flops each).
  if (B * n * n * n < (int64_t{1} << 21)) return 1;
  int64_t workers = std::min<int64_t>(num_threads(), B);
  if (workspace_limit > 0) {
    const int64_t per = std::max<int64_t>(1, G.size(1) * G.size(1) * static_cast<int64_t>(G.element_size()));
    workers = std::min<int64_t>(workers, std::max<int64_t>(1, workspace_limit / per));
  }
  return std::max<int64_t>(workers, 1);
}

std::tuple<Tensor, Tensor> eigvalsh_impl(const Tensor& G, int64_t workspace_limit, bool use_lapack) {
  check_input(G, workspace_limit);
  const int64_t B = G.size(0), n = G.size(1);
  Tensor w = new_empty(G, {B, n}, G.scalar_type());
  Tensor info = new_zeros(G, {B}, kInt);
  if (B == 0 || n == 0) return {w, info};
  const int64_t workers = concurrent_workers(G, workspace_limit);
  const bool f32 = G.scalar_type() == kFloat;
  if (use_lapack && lapack().dsyevd != nullptr) {
    if (f32) {
      eig_lapack<float>(G, w, info, workers);
    } else {
      eig_lapack<double>(G, w, info, workers);
    }
  } else if (f32) {
    eig_aten<float>(G, w, info, workers);
  } else {
    eig_aten<double>(G, w, info, workers);
  }
  return {w, info};
}

std::tuple<Tensor, Tensor> eigvalsh_batched_cpu(const Tensor& G, int64_t workspace_limit) {
  return eigvalsh_impl(G, workspace_limit, /*use_lapack=*/true);
}

// Test hook: the same op with the LAPACK path switched off (exercises the aten fallback).
std::tuple<Tensor, Tensor> eigvalsh_batched_cpu_path(const Tensor& G, int64_t workspace_limit, bool use_lapack) {
  return eigvalsh_impl(G, workspace_limit, use_lapack);
}

}  // namespace

// JSON: where the ?syevd symbols were found (called by tbfast._C.lapack_info in module.cpp).
std::string lapack_info() {
  const Lapack& l = lapack();
  std::ostringstream out;
  out << "{\"syevd\": " << (l.dsyevd != nullptr ? "true" : "false") << ", \"source\": \"";
  for (char c : l.source) {
    if (c == '"' || c == '\\') out << '\\';
    out << c;
  }
  out << "\"}";
  return out.str();
}

}  // namespace tbfast

// The schema of tbfast::eigvalsh_batched is defined in tbfast/ops/eig.py (importing tbfast._C
// imports the tbfast package first); an impl registered before its def is legal in torch.library.
TBFAST_LIBRARY_IMPL(tbfast, CPU, m) {
  m.impl("eigvalsh_batched", TBFAST_KERNEL(tbfast::eigvalsh_batched_cpu));
}

TBFAST_LIBRARY_FRAGMENT(tbfast_testing, m) {
  m.def("eigvalsh_batched_path(Tensor G, int workspace_limit, bool use_lapack) -> (Tensor, Tensor)");
}

TBFAST_LIBRARY_IMPL(tbfast_testing, CPU, m) {
  m.impl("eigvalsh_batched_path", TBFAST_KERNEL(tbfast::eigvalsh_batched_cpu_path));
}

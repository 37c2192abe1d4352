// Batched symmetric eigenvalues on the CPU: LAPACK ?syevd (jobz='N') per matrix, parallel over
// the batch.
//
// The LAPACK routines are not linked: ssyevd_/dsyevd_ are looked up at run time (they are
// exported by libtorch_cpu when torch is built with MKL). Where they are absent each matrix
// falls back to at::linalg_eigvalsh inside the same parallel loop.
//
// This file registers the CPU kernel of tbfast::eigvalsh_batched(Tensor G, int workspace_limit)
// -> (Tensor w, Tensor info). The schema, the CUDA kernel, the fake kernel and the torch reference
// are registered once, in tbfast/ops/eig.py; tbfast_testing::eigvalsh_batched_path is a test hook.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "tbfast_parallel.h"

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
  auto anchor = reinterpret_cast<void*>(
      static_cast<at::Tensor (*)(const at::Tensor&, c10::string_view)>(&at::linalg_eigvalsh));
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
      l.source = "ssyevd_/dsyevd_ not found; using at::linalg_eigvalsh per matrix";
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
void eig_lapack(const at::Tensor& G, at::Tensor& w, at::Tensor& info, int64_t workers) {
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
    at::parallel_for(0, B, per, solve_range);
  }
}

void eig_aten(const at::Tensor& G, at::Tensor& w, at::Tensor& info, int64_t workers) {
  const int64_t B = G.size(0);
  int* ip = info.mutable_data_ptr<int>();
  auto solve_range = [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      try {
        w[b].copy_(at::linalg_eigvalsh(G[b], "L"));
        ip[b] = 0;
      } catch (const c10::Error&) {
        w[b].fill_(std::numeric_limits<double>::quiet_NaN());
        ip[b] = 1;
      }
    }
  };
  if (workers <= 1) {
    solve_range(0, B);
  } else {
    at::parallel_for(0, B, (B + workers - 1) / workers, solve_range);
  }
}

void check_input(const at::Tensor& G, int64_t workspace_limit) {
  TORCH_CHECK(G.device().is_cpu(), "tbfast::eigvalsh_batched (CPU): G must be a CPU tensor, got ",
              G.device());
  TORCH_CHECK(G.dim() == 3 && G.size(1) == G.size(2),
              "tbfast::eigvalsh_batched: G must have shape (B, n, n), got ", G.sizes());
  TORCH_CHECK(G.scalar_type() == at::kFloat || G.scalar_type() == at::kDouble,
              "tbfast::eigvalsh_batched: G must be float32 or float64, got ", G.scalar_type());
  TORCH_CHECK(G.is_contiguous(), "tbfast::eigvalsh_batched: G must be contiguous (call .contiguous())");
  TORCH_CHECK(workspace_limit >= 0, "tbfast::eigvalsh_batched: workspace_limit must be >= 0, got ",
              workspace_limit);
  TORCH_CHECK(G.size(1) <= std::numeric_limits<int>::max() / 2,
              "tbfast::eigvalsh_batched: matrix size ", G.size(1), " too large for 32-bit LAPACK");
}

// Number of matrices solved at the same time: the torch thread count, capped by the batch and by
// workspace_limit (bytes of per-matrix copies held at once; 0 = no cap).
int64_t concurrent_workers(const at::Tensor& G, int64_t workspace_limit) {
  const int64_t B = G.size(0);
  const int64_t n = G.size(1);
  // Tiny matrices: a thread team costs more than the solves (about n^3 flops each).
  if (B * n * n * n < (int64_t{1} << 21)) return 1;
  int64_t workers = std::min<int64_t>(at::get_num_threads(), B);
  if (workspace_limit > 0) {
    const int64_t per = std::max<int64_t>(1, G.size(1) * G.size(1) * G.element_size());
    workers = std::min<int64_t>(workers, std::max<int64_t>(1, workspace_limit / per));
  }
  return std::max<int64_t>(workers, 1);
}

std::tuple<at::Tensor, at::Tensor> eigvalsh_impl(const at::Tensor& G, int64_t workspace_limit,
                                                 bool use_lapack) {
  check_input(G, workspace_limit);
  const int64_t B = G.size(0), n = G.size(1);
  at::Tensor w = at::empty({B, n}, G.options());
  at::Tensor info = at::zeros({B}, G.options().dtype(at::kInt));
  if (B == 0 || n == 0) return {w, info};
  const int64_t workers = concurrent_workers(G, workspace_limit);
  if (use_lapack && lapack().dsyevd != nullptr) {
    if (G.scalar_type() == at::kFloat) {
      eig_lapack<float>(G, w, info, workers);
    } else {
      eig_lapack<double>(G, w, info, workers);
    }
  } else {
    eig_aten(G, w, info, workers);
  }
  return {w, info};
}

std::tuple<at::Tensor, at::Tensor> eigvalsh_batched_cpu(const at::Tensor& G,
                                                        int64_t workspace_limit) {
  return eigvalsh_impl(G, workspace_limit, /*use_lapack=*/true);
}

// Test hook: the same op with the LAPACK path switched off (exercises the at:: fallback).
std::tuple<at::Tensor, at::Tensor> eigvalsh_batched_cpu_path(const at::Tensor& G,
                                                             int64_t workspace_limit,
                                                             bool use_lapack) {
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
TORCH_LIBRARY_IMPL(tbfast, CPU, m) {
  m.impl("eigvalsh_batched", &tbfast::eigvalsh_batched_cpu);
}

TORCH_LIBRARY_FRAGMENT(tbfast_testing, m) {
  m.def("eigvalsh_batched_path(Tensor G, int workspace_limit, bool use_lapack) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tbfast_testing, CPU, m) {
  m.impl("eigvalsh_batched_path", &tbfast::eigvalsh_batched_cpu_path);
}

// Power-law fits over a ragged batch of ascending spectra (SPEC sections 3-5), CPU.
//
//   hill_fit(values, starts, ends, xmin_pos)        -> (alpha, D, index)   "median" fit
//   ks_scan(values, starts, ends, lo, hi)           -> (alpha, D, index)   goodness-of-fit / fix-finger
//   tbfast_testing::_ks_scan_exhaustive(...)       same result without pruning (test oracle)
//
// CPU kernels of the ops defined in tbfast/ops/fit.py (schemas, CUDA and fake kernels there).
// Layer l is values[starts[l]:ends[l]] (ascending, finite, >= 0); N = ends[l] - starts[l].
// NaN policy (all backends): a layer holding a NaN gets alpha = D = NaN, index = -1; any other
// invalid input (infinite, negative or unsorted values, bad ranges, bad tensors) raises.
// With xmin = x[i], n = N - i:
//   alpha_i = 1 + n / (sum_{j>=i} ln x[j] - n ln x[i])      (log sums in extended precision)
//   D_i     = max_{j<n} |1 - (x[i+j]/x[i])^(1-alpha_i) - j/n|
// The power is evaluated as exp((1-alpha) * (ln x[i+j] - ln x[i])) from logs computed once per
// layer; a zero log difference gives exactly 1 (as pow(1, y) does, also for alpha = inf).
//
// KS scan: candidates i = 0..N-2; those with x[i] < lo are skipped, the scan stops at the first
// with x[i] > hi; a visited candidate has D_i as above when alpha_i > 1, else 1; unvisited ones
// keep alpha 0, D 1. Result: the first argmin k of D_i.
//
// The scan is parallel over all (layer, candidate) pairs and prunes work without changing the
// result:
//  * Interval bound: F_j = 1 - (x[i+j]/x[i])^(1-alpha) is non-decreasing in j and so is j/n, so
//    on a block (ja, jb) every term is at most max(F_jb - (ja+1)/n, (jb-1)/n - F_ja). A block
//    whose bound is below the running maximum (by a margin far above rounding error) cannot
//    change D_i and is skipped: the D_i returned equals the full max bit for bit.
//  * Branch and bound over candidates: every finished candidate lowers the layer's best D (an
//    atomic). A candidate whose partial max is strictly greater than some finished candidate's
//    D cannot be the first argmin and is abandoned. The best D only ever holds values actually
//    attained, so the final first argmin over the finished candidates is the full scan's, no
//    matter how the threads interleave. Seed candidates spread over the window are visited
//    first so that the bound is tight early.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "tbfast_parallel.h"
#include "tbfast_torch.h"

namespace tbfast {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int64_t kCoarse = 8;      // first samples per candidate: kCoarse + 1 evenly spaced terms
constexpr int64_t kLeaf = 8;        // blocks this short are evaluated term by term
constexpr double kSlack = 1e-12;    // margin for rounding in the interval bound (terms are <= 1)
constexpr int64_t kSeeds = 24;      // seed candidates per layer visited first

// ---------------------------------------------------------------------------------------------
// Input checks

// starts / ends (int64) and lo / hi (float64): 1-D, one entry per layer, contiguous, on the CPU.
void check_layer_tensor(const char* op, const char* name, const Tensor& t, int64_t L, ScalarType dtype) {
  TBFAST_CHECK(t.is_cpu(), "tbfast::", op, " (CPU): ", name, " must be a CPU tensor, got ", device_name(t));
  TBFAST_CHECK(t.scalar_type() == dtype, "tbfast::", op, ": ", name, " must be ",
               dtype == kLong ? "int64" : "float64", ", got ", dtype_name(t.scalar_type()));
  TBFAST_CHECK(t.dim() == 1 && t.size(0) == L, "tbfast::", op, ": ", name,
               " must be 1-D with one entry per layer (", L, "), got shape ", shape_of(t));
  TBFAST_CHECK(t.is_contiguous(), "tbfast::", op, ": ", name, " must be contiguous");
}

void check_common(const char* op, const Tensor& values, const Tensor& starts, const Tensor& ends) {
  TBFAST_CHECK(values.is_cpu(), "tbfast::", op, " (CPU): values must be a CPU tensor, got ", device_name(values));
  TBFAST_CHECK(values.scalar_type() == kFloat || values.scalar_type() == kDouble,
               "tbfast::", op, ": values must be float32 or float64, got ", dtype_name(values.scalar_type()));
  TBFAST_CHECK(values.dim() == 1, "tbfast::", op, ": values must be 1-D (concatenated spectra), got shape ",
               shape_of(values));
  TBFAST_CHECK(values.is_contiguous(), "tbfast::", op, ": values must be contiguous");
  TBFAST_CHECK(starts.dim() == 1, "tbfast::", op, ": starts must be 1-D, got shape ", shape_of(starts));
  const int64_t L = starts.size(0);
  check_layer_tensor(op, "starts", starts, L, kLong);
  check_layer_tensor(op, "ends", ends, L, kLong);
  const int64_t* s = starts.const_data_ptr<int64_t>();
  const int64_t* e = ends.const_data_ptr<int64_t>();
  const int64_t total = values.size(0);
  for (int64_t l = 0; l < L; ++l) {
    TBFAST_CHECK(0 <= s[l] && s[l] <= e[l] && e[l] <= total, "tbfast::", op, ": layer ", l,
                " has an invalid range starts=", s[l], ", ends=", e[l], " for ", total, " values");
  }
}

// Checks every layer's slice. A layer holding a NaN is flagged (result alpha = D = NaN,
// index = -1; the NaN policy of the fit ops); any other layer must be finite, >= 0 and ascending,
// else this throws naming the first bad layer. Returns the per-layer NaN flags.
template <class T>
std::vector<uint8_t> check_values(const char* op, const T* x, const int64_t* s, const int64_t* e, int64_t L) {
  std::vector<uint8_t> has_nan(L, 0);
  std::vector<int8_t> bad(L, 0);
  std::vector<int64_t> where(L, 0);
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) total += e[l] - s[l];
  parallel_for_static(L, 8, total, [&](int64_t l0, int64_t l1) {
    for (int64_t l = l0; l < l1; ++l) {
      for (int64_t p = s[l]; p < e[l]; ++p) {
        const double v = static_cast<double>(x[p]);
        if (std::isnan(v)) {  // wins over any other defect of the layer
          has_nan[l] = 1;
          break;
        }
        if (bad[l] != 0) continue;  // keep looking for a NaN only
        int8_t code = 0;
        if (!std::isfinite(v)) code = 1;
        else if (v < 0) code = 2;
        else if (p > s[l] && v < static_cast<double>(x[p - 1])) code = 3;
        if (code != 0) {
          bad[l] = code;
          where[l] = p - s[l];
        }
      }
    }
  });
  for (int64_t l = 0; l < L; ++l) {
    if (bad[l] == 0 || has_nan[l]) continue;
    const int64_t j = where[l];
    const double v = static_cast<double>(x[s[l] + j]);
    TBFAST_CHECK(bad[l] != 1, "tbfast::", op, ": layer ", l, " has a non-finite eigenvalue (", v,
                " at position ", j, ")");
    TBFAST_CHECK(bad[l] != 2, "tbfast::", op, ": layer ", l, " has a negative eigenvalue (", v,
                " at position ", j, "); clamp round-off negatives to 0 first");
    TBFAST_CHECK(false, "tbfast::", op, ": layer ", l, " is not sorted ascending (position ", j,
                ": ", v, " < ", static_cast<double>(x[s[l] + j - 1]), ")");
  }
  return has_nan;
}

// ---------------------------------------------------------------------------------------------
// Per-candidate formulas (shared by the median fit and the scan, so both agree bit for bit)

// alpha = 1 + n / (S - n ln x[i]) with S = sum_{j>=i} ln x[j] accumulated from the top.
inline double hill_alpha(long double suffix_sum, double log_xmin, int64_t n) {
  const long double denom = suffix_sum - static_cast<long double>(n) * log_xmin;
  return static_cast<double>(1.0L + static_cast<long double>(n) / denom);
}

// F_j = 1 - (x[i+j]/x[i])^(1-alpha) from logs (Lt = logs of the tail, Lt[0] = ln xmin).
inline double fit_cdf(const double* Lt, int64_t j, double one_minus_alpha) {
  const double d = Lt[j] - Lt[0];
  return 1.0 - (d == 0.0 ? 1.0 : std::exp(one_minus_alpha * d));
}

inline double ks_term(double F, int64_t j, double n) { return std::fabs(F - static_cast<double>(j) / n); }

// Full KS distance over the tail (NaN propagates, as torch.max would).
double ks_distance_full(const double* Lt, int64_t n, double alpha) {
  const double a1 = 1.0 - alpha, nd = static_cast<double>(n);
  double D = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double t = ks_term(fit_cdf(Lt, j, a1), j, nd);
    if (std::isnan(t) || t > D) D = t;
  }
  return D;
}

// KS distance with the interval bound and abandonment once the partial max exceeds `best`.
// Starts from kCoarse + 1 evenly spaced samples, then refines only blocks whose bound can still
// raise the running max (bisection, the block with the larger bound first). Requires alpha > 1
// (no NaN terms) and n >= 2. Returns +inf when abandoned, else the exact max over all terms.
struct Block {
  int64_t ja, jb;  // terms at ja and jb are known; (ja, jb) open interval still to bound
  double Fa, Fb;
};

double ks_distance_pruned(const double* Lt, int64_t n, double alpha, const std::atomic<double>& best,
                          std::vector<Block>& stack) {
  const double a1 = 1.0 - alpha, nd = static_cast<double>(n);
  double M = 0.0;
  auto eval = [&](int64_t j) {
    const double F = fit_cdf(Lt, j, a1);
    M = std::max(M, ks_term(F, j, nd));
    return F;
  };
  // Upper bound of the terms strictly inside (ja, jb) from monotonicity of F_j and j/n.
  auto bound = [&](const Block& b) {
    return std::max(b.Fb - static_cast<double>(b.ja + 1) / nd, static_cast<double>(b.jb - 1) / nd - b.Fa);
  };
  auto abandoned = [&] { return M > best.load(std::memory_order_relaxed); };

  stack.clear();
  const int64_t pieces = std::min<int64_t>(kCoarse, n - 1);
  int64_t prev_j = 0;
  double prev_F = eval(0);
  for (int64_t k = 1; k <= pieces; ++k) {
    const int64_t j = (n - 1) * k / pieces;
    const double F = eval(j);
    if (j - prev_j > 1) stack.push_back({prev_j, j, prev_F, F});
    prev_j = j;
    prev_F = F;
  }
  if (abandoned()) return kInf;
  while (!stack.empty()) {
    const Block b = stack.back();
    stack.pop_back();
    if (bound(b) + kSlack < M) continue;  // no term inside can change the max
    if (b.jb - b.ja <= kLeaf) {
      for (int64_t j = b.ja + 1; j < b.jb; ++j) eval(j);
      if (abandoned()) return kInf;
      continue;
    }
    const int64_t mid = b.ja + (b.jb - b.ja) / 2;
    const double Fm = eval(mid);
    if (abandoned()) return kInf;
    const Block left{b.ja, mid, b.Fa, Fm}, right{mid, b.jb, Fm, b.Fb};
    // Pop the half with the larger bound first.
    if (bound(left) > bound(right)) {
      stack.push_back(right);
      stack.push_back(left);
    } else {
      stack.push_back(left);
      stack.push_back(right);
    }
  }
  return M;
}

inline void atomic_min(std::atomic<double>& a, double v) {
  double cur = a.load(std::memory_order_relaxed);
  while (v < cur && !a.compare_exchange_weak(cur, v, std::memory_order_relaxed)) {
  }
}

// ---------------------------------------------------------------------------------------------
// Median ("hill") fit

template <class T>
void hill_fit_kernel(const T* x, const int64_t* s, const int64_t* e, const uint8_t* has_nan, int64_t L,
                     double xmin_pos, double* alpha, double* D, int64_t* index) {
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) total += e[l] - s[l];
  parallel_for_static(L, 4, 8 * total, [&](int64_t l0, int64_t l1) {
    std::vector<double> Lt;
    for (int64_t l = l0; l < l1; ++l) {
      const int64_t N = e[l] - s[l];
      // i = int(N / xmin_pos) as in Python; checked as a double first (N / tiny is inf)
      const double q = std::floor(static_cast<double>(N) / xmin_pos);
      const int64_t i = q < static_cast<double>(N) ? static_cast<int64_t>(q) : N;
      if (N < 2 || i >= N || has_nan[l]) {
        alpha[l] = D[l] = kNaN;
        index[l] = -1;
        continue;
      }
      const int64_t n = N - i;
      Lt.resize(n);
      long double S = 0.0L;
      for (int64_t j = n - 1; j >= 0; --j) {
        Lt[j] = std::log(static_cast<double>(x[s[l] + i + j]));
        S += Lt[j];
      }
      const double a = hill_alpha(S, Lt[0], n);
      alpha[l] = a;
      D[l] = ks_distance_full(Lt.data(), n, a);
      index[l] = i;
    }
  });
}

// Calls body(T{}) with T = float or double, the dtype of `values` (checked before).
template <class Body>
void dispatch_float(const Tensor& values, const Body& body) {
  if (values.scalar_type() == kFloat) {
    body(float{});
  } else {
    body(double{});
  }
}

std::tuple<Tensor, Tensor, Tensor> hill_fit_cpu(const Tensor& values, const Tensor& starts, const Tensor& ends,
                                                double xmin_pos) {
  check_common("hill_fit", values, starts, ends);
  TBFAST_CHECK(std::isfinite(xmin_pos) && xmin_pos > 0, "tbfast::hill_fit: xmin_pos must be a positive number, got ",
               xmin_pos);
  const int64_t L = starts.size(0);
  Tensor alpha = new_empty(values, {L}, kDouble), D = new_empty(values, {L}, kDouble);
  Tensor index = new_empty(values, {L}, kLong);
  dispatch_float(values, [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* x = values.const_data_ptr<scalar_t>();
    const std::vector<uint8_t> has_nan =
        check_values("hill_fit", x, starts.const_data_ptr<int64_t>(), ends.const_data_ptr<int64_t>(), L);
    hill_fit_kernel(x, starts.const_data_ptr<int64_t>(), ends.const_data_ptr<int64_t>(), has_nan.data(), L, xmin_pos,
                    alpha.mutable_data_ptr<double>(), D.mutable_data_ptr<double>(),
                    index.mutable_data_ptr<int64_t>());
  });
  return {alpha, D, index};
}

// ---------------------------------------------------------------------------------------------
// KS scan

struct ScanLayer {
  int64_t N = 0;       // eigenvalues in the layer
  int64_t off = 0;     // offset of the layer in logs / suffix
  int64_t i_lo = 0;    // first visited candidate
  int64_t m = 0;       // visited candidates [i_lo, i_lo + m)
  int64_t stride = 1;  // seed spacing (1 = ascending order)
  int64_t seeds = 0;   // number of seeds
};

// r-th candidate (relative to i_lo) in visiting order: seeds 0, S, 2S, .. first, then the rest.
inline int64_t visit_order(const ScanLayer& ly, int64_t r) {
  if (ly.stride <= 1) return r;
  if (r < ly.seeds) return r * ly.stride;
  r -= ly.seeds;
  const int64_t per = ly.stride - 1;
  return (r / per) * ly.stride + 1 + (r % per);
}

template <class T, bool kPrune>
void ks_scan_kernel(const T* x, const int64_t* s, const int64_t* e, const uint8_t* has_nan, const double* lo,
                    const double* hi, int64_t L, double* alpha_out, double* D_out, int64_t* index_out) {
  // Layout, visited windows and seeds.
  std::vector<ScanLayer> layers(L);
  std::vector<int64_t> work_start(L + 1, 0);
  int64_t total_vals = 0;
  for (int64_t l = 0; l < L; ++l) {
    ScanLayer& ly = layers[l];
    ly.N = e[l] - s[l];
    ly.off = total_vals;
    total_vals += ly.N;
    if (ly.N >= 2 && !has_nan[l]) {  // a NaN layer visits no candidate
      const T* xl = x + s[l];
      const int64_t last = ly.N - 1;  // candidates are 0 .. N-2
      int64_t i = 0;
      while (i < last && static_cast<double>(xl[i]) < lo[l]) ++i;
      ly.i_lo = i;
      while (i < last && !(static_cast<double>(xl[i]) > hi[l])) ++i;
      ly.m = i - ly.i_lo;
      if (kPrune && ly.m >= 2 * kSeeds) {
        ly.stride = ly.m / kSeeds;
        ly.seeds = (ly.m + ly.stride - 1) / ly.stride;
      }
    }
    work_start[l + 1] = work_start[l] + ly.m;
  }
  const int64_t total_work = work_start[L];

  // Logs and suffix sums, once per layer.
  std::vector<double> logs(total_vals);
  std::vector<long double> suffix(total_vals);
  parallel_for_static(L, 4, total_vals, [&](int64_t l0, int64_t l1) {
    for (int64_t l = l0; l < l1; ++l) {
      const ScanLayer& ly = layers[l];
      long double acc = 0.0L;
      for (int64_t j = ly.N - 1; j >= 0; --j) {
        const double v = std::log(static_cast<double>(x[s[l] + j]));
        logs[ly.off + j] = v;
        acc += v;
        suffix[ly.off + j] = acc;
      }
    }
  });

  // Every visited (layer, candidate) pair.
  std::vector<double> cand_D(total_work, kInf);
  std::vector<std::atomic<double>> best(L);
  for (auto& b : best) b.store(kInf, std::memory_order_relaxed);
  // Cost estimate: a candidate evaluates at least kCoarse + 1 terms (each an exp and a division,
  // ~4 units), the exhaustive scan its whole tail.
  const int64_t per_candidate = kPrune ? 4 * (kCoarse + 1) : 2 * total_vals / std::max<int64_t>(L, 1);
  parallel_for_dynamic(total_work, 8, total_work * per_candidate, [&](int64_t t) {
    thread_local std::vector<Block> stack;
    if (stack.capacity() < 256) stack.reserve(256);  // depth <= kCoarse + 2 log2(n): no allocation
    const int64_t l = std::upper_bound(work_start.begin(), work_start.end(), t) - work_start.begin() - 1;
    const ScanLayer& ly = layers[l];
    const int64_t r = t - work_start[l];
    const int64_t i = ly.i_lo + visit_order(ly, r);
    const int64_t n = ly.N - i;
    const double* Lt = logs.data() + ly.off + i;
    const double a = hill_alpha(suffix[ly.off + i], Lt[0], n);
    double Di;
    if (!(a > 1.0)) {
      Di = 1.0;
    } else if (kPrune) {
      Di = ks_distance_pruned(Lt, n, a, best[l], stack);
    } else {
      Di = ks_distance_full(Lt, n, a);
    }
    cand_D[work_start[l] + (i - ly.i_lo)] = Di;
    if (kPrune && Di != kInf) atomic_min(best[l], Di);
  });

  // First argmin per layer (abandoned candidates hold +inf, above the attained minimum).
  for (int64_t l = 0; l < L; ++l) {
    const ScanLayer& ly = layers[l];
    if (ly.N < 2 || has_nan[l]) {
      alpha_out[l] = D_out[l] = kNaN;
      index_out[l] = -1;
      continue;
    }
    double Dmin = kInf;
    int64_t k = -1;
    for (int64_t i = 0; i < ly.N - 1; ++i) {
      const bool visited = i >= ly.i_lo && i < ly.i_lo + ly.m;
      const double Di = visited ? cand_D[work_start[l] + (i - ly.i_lo)] : 1.0;
      if (Di < Dmin) {
        Dmin = Di;
        k = i;
      }
    }
    const bool visited = k >= ly.i_lo && k < ly.i_lo + ly.m;
    alpha_out[l] = visited ? hill_alpha(suffix[ly.off + k], logs[ly.off + k], ly.N - k) : 0.0;
    D_out[l] = Dmin;
    index_out[l] = k;
  }
}

template <bool kPrune>
std::tuple<Tensor, Tensor, Tensor> ks_scan_cpu(const Tensor& values, const Tensor& starts, const Tensor& ends,
                                               const Tensor& lo, const Tensor& hi) {
  const char* op = kPrune ? "ks_scan" : "_ks_scan_exhaustive";
  check_common(op, values, starts, ends);
  const int64_t L = starts.size(0);
  check_layer_tensor(op, "lo", lo, L, kDouble);
  check_layer_tensor(op, "hi", hi, L, kDouble);
  Tensor alpha = new_empty(values, {L}, kDouble), D = new_empty(values, {L}, kDouble);
  Tensor index = new_empty(values, {L}, kLong);
  dispatch_float(values, [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* x = values.const_data_ptr<scalar_t>();
    const int64_t* s = starts.const_data_ptr<int64_t>();
    const int64_t* e = ends.const_data_ptr<int64_t>();
    const std::vector<uint8_t> has_nan = check_values(op, x, s, e, L);
    ks_scan_kernel<scalar_t, kPrune>(x, s, e, has_nan.data(), lo.const_data_ptr<double>(), hi.const_data_ptr<double>(), L,
                                     alpha.mutable_data_ptr<double>(), D.mutable_data_ptr<double>(),
                                     index.mutable_data_ptr<int64_t>());
  });
  return {alpha, D, index};
}

std::tuple<Tensor, Tensor, Tensor> ks_scan_pruned(const Tensor& values, const Tensor& starts, const Tensor& ends,
                                                  const Tensor& lo, const Tensor& hi) {
  return ks_scan_cpu<true>(values, starts, ends, lo, hi);
}

std::tuple<Tensor, Tensor, Tensor> ks_scan_exhaustive(const Tensor& values, const Tensor& starts, const Tensor& ends,
                                                      const Tensor& lo, const Tensor& hi) {
  return ks_scan_cpu<false>(values, starts, ends, lo, hi);
}

}  // namespace
}  // namespace tbfast

// CPU kernels only: the schemas are defined once, in tbfast/ops/fit.py (which says why).
TBFAST_LIBRARY_IMPL(tbfast, CPU, m) {
  m.impl("hill_fit", TBFAST_KERNEL(tbfast::hill_fit_cpu));
  m.impl("ks_scan", TBFAST_KERNEL(tbfast::ks_scan_pruned));
}

// Test-only: the scan without pruning, the oracle the pruned scan must equal bit for bit.
TBFAST_LIBRARY_FRAGMENT(tbfast_testing, m) {
  m.def("_ks_scan_exhaustive(Tensor values, Tensor starts, Tensor ends, Tensor lo, Tensor hi) -> (Tensor, Tensor, Tensor)");
}

TBFAST_LIBRARY_IMPL(tbfast_testing, CPU, m) {
  m.impl("_ks_scan_exhaustive", TBFAST_KERNEL(tbfast::ks_scan_exhaustive));
}

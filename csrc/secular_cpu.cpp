// Eigenvalues of a low-rank update of a diagonal matrix, diag(d) + Z C Z^T, on the CPU: the
// kernel of tbfast::eigvalsh_update(Tensor d, Tensor Z, Tensor C) -> (Tensor w, Tensor status).
//
// Method (written from the mathematics of the symmetric rank-one update; see docs/ARCHITECTURE.md):
//   C = Q diag(c) Q^T (cyclic Jacobi, C is k x k and small), Y = Z Q, so the matrix is
//   diag(d) + sum_t c_t y_t y_t^T. The k terms are added one at a time. For one term
//   diag(d) + rho z z^T (||z|| = 1, rho > 0 after a sign flip of the whole problem):
//   - deflation: a component with rho |z_j| <= tol keeps its eigenvalue d_j; two poles whose
//     2x2 rotation would leave an off-diagonal |(d_j - d_p) c s| <= tol are rotated so that one
//     z component vanishes (tol = 8 eps max(max|d|, rho));
//   - the K remaining roots of f(x) = 1 + sum_j rho z_j^2 / (d_j - x) lie one in each gap
//     (d_i, d_i+1) and one in (d_K, d_K + rho). Each is found relative to its nearer pole
//     (x = d_o + tau, so d_j - x = (d_j - d_o) - tau is exact) by a model of f that keeps the
//     kWindow nearest poles on each side exactly and the rest as one rational term per side
//     (secular_root); roots are solved in runs, each from the previous root's sums, so that
//     about one evaluation of f per root suffices; safeguarded by a bracket that is bisected
//     whenever a model step leaves it;
//   - z is recomputed from the roots (the Gu-Eisenstat formula
//     zhat_j^2 = prod_i (x_i - d_j) / (rho prod_{i != j} (d_i - d_j))), so the eigenvectors
//     v_i ~ zhat / (d - x_i) are numerically orthogonal;
//   - the remaining vectors y_{t+1..k} are carried into the new eigenbasis through these
//     Cauchy-structured vectors (O(K) per root and vector, parallel over roots).
// No step costs more than O(n^2 k) per layer; nothing is O(n^3).
//
// The math is plain C++ on raw double pointers (eigvalsh_update_layer); the torch binding at the
// end only checks tensors and hands out pointers.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "secular_simd.h"
#include "tbfast_parallel.h"
#include "tbfast_torch.h"

namespace tbfast {
namespace secular {

constexpr double kEps = std::numeric_limits<double>::epsilon() / 2;  // unit roundoff
constexpr int kMaxIter = 200;
constexpr double kStepStop = 1e-10;  // relative model step after which a root is accepted
// Below this many roots a loop runs on the calling thread: a parallel region per update costs a
// thread wake-up (and, on a busy machine, a wait for a descheduled thread) that small K never repays.
constexpr int64_t kMinParallelRoots = 512;

// Roots solved in sequence on one thread, each from its predecessor's sums (the first of a run
// evaluates f at the middle of its gap: one evaluation more).
constexpr int64_t kChainRoots = 32;

inline int64_t work_of(int64_t K, int64_t per) { return K >= kMinParallelRoots ? K * per : 0; }

// p rounded up to the next 64-byte boundary (a cache line: 512-bit loads that cross one cost two).
inline double* align64(double* p) {
  return reinterpret_cast<double*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63});
}

// Status codes of one layer (kept equal to tbfast/ops/secular.py).
constexpr int kOk = 0;
constexpr int kNotConverged = 1;
constexpr int kNonFinite = 2;

// Cyclic Jacobi eigendecomposition of the symmetric k x k matrix a (row-major, overwritten):
// eigenvalues in c, eigenvectors in the columns of q (row-major k x k).
void jacobi_eigh(int64_t k, std::vector<double>& a, std::vector<double>& c, std::vector<double>& q) {
  q.assign(k * k, 0.0);
  for (int64_t i = 0; i < k; ++i) q[i * k + i] = 1.0;
  // by a power of two so that the largest |entry| is about 1: the sums of squares below can neither
  // underflow (leaving a tiny C undiagonalised) nor overflow
  double amax = 0.0;
  for (double v : a) amax = std::max(amax, std::fabs(v));
  const int ea = amax > 0 ? std::ilogb(amax) : 0;
  for (double& v : a) v = std::ldexp(v, -ea);
  for (int sweep = 0; sweep < 100; ++sweep) {
    double off = 0.0, total = 0.0;
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j) {
        const double v = a[i * k + j] * a[i * k + j];
        total += v;
        if (i != j) off += v;
      }
    if (off <= 1e-34 * total || off == 0.0) break;
    for (int64_t p = 0; p < k; ++p)
      for (int64_t r = p + 1; r < k; ++r) {
        const double apr = a[p * k + r];
        if (apr == 0.0) continue;
        const double theta = (a[r * k + r] - a[p * k + p]) / (2.0 * apr);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1.0));
        const double cs = 1.0 / std::sqrt(t * t + 1.0), sn = t * cs;
        // a <- J^T a J with J the rotation in the (p, r) plane
        for (int64_t m = 0; m < k; ++m) {
          const double amp = a[m * k + p], amr = a[m * k + r];
          a[m * k + p] = cs * amp - sn * amr;
          a[m * k + r] = sn * amp + cs * amr;
        }
        for (int64_t m = 0; m < k; ++m) {
          const double apm = a[p * k + m], arm = a[r * k + m];
          a[p * k + m] = cs * apm - sn * arm;
          a[r * k + m] = sn * apm + cs * arm;
        }
        a[p * k + r] = a[r * k + p] = 0.0;
        for (int64_t m = 0; m < k; ++m) {
          const double qmp = q[m * k + p], qmr = q[m * k + r];
          q[m * k + p] = cs * qmp - sn * qmr;
          q[m * k + r] = sn * qmp + cs * qmr;
        }
      }
  }
  c.resize(k);
  for (int64_t i = 0; i < k; ++i) c[i] = std::ldexp(a[i * k + i], ea);
}

// The terms of the secular function at x = base + t, t_j = w_j / ((dd_j - base) - t), summed on
// each side of a root's gap ([0]: j <= i, [1]: j > i): s1 = sum t_j (f = 1 + s1[0] + s1[1]),
// s2 = sum t_j / x_j (f'), s3 = sum t_j / x_j^2 (f'' / 2), with x_j = (dd_j - base) - t.
struct SecularSums {
  double s1[2] = {0, 0}, s2[2] = {0, 0}, s3[2] = {0, 0};
  double f() const { return 1.0 + s1[0] + s1[1]; }
  double df() const { return s2[0] + s2[1]; }
  double aterms() const { return s1[1] - s1[0]; }  // sum |t_j|: s1[0] <= 0 <= s1[1] inside the gap
};

// The hot loops are compiled twice on x86-64 GCC (AVX2 and baseline) and picked at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define TBFAST_HOT_CLONES __attribute__((target_clones("avx2", "default"), noinline))
#else
#define TBFAST_HOT_CLONES
#endif

// One side of the sums (terms j0 <= j < j1); a SIMD reduction (OpenMP simd: the sums may be
// reassociated, as any summation order is as accurate for these same-sign terms).
TBFAST_HOT_CLONES void secular_part(const double* dd, const double* w, int64_t j0, int64_t j1, double base, double t,
                                    double* s1, double* s2, double* s3) {
  double a = 0, b = 0, c = 0;
#pragma omp simd reduction(+ : a, b, c)
  for (int64_t j = j0; j < j1; ++j) {
    const double inv = 1.0 / ((dd[j] - base) - t);
    const double term = w[j] * inv, q = term * inv;
    a += term;
    b += q;
    c += q * inv;
  }
  *s1 = a;
  *s2 = b;
  *s3 = c;
}

inline SecularSums secular_sums(int64_t K, const double* dd, const double* w, int64_t i, double base, double t,
                                bool wide) {
  SecularSums s;
  const auto part = wide ? simd::secular_part_avx512 : secular_part;
  part(dd, w, 0, i + 1, base, t, &s.s1[0], &s.s2[0], &s.s3[0]);
  part(dd, w, i + 1, K, base, t, &s.s1[1], &s.s2[1], &s.s3[1]);
  return s;
}

// Poles on each side of a root's gap that the root model keeps exactly (its window). The rest of
// f, the far field, is replaced by one rational term per side. With 16 poles per side, a first
// guess from the previous root's sums needs one evaluation of f to converge for about 98% of the
// roots of a 4096-pole Gram spectrum (8: 76%); see secular_root.
constexpr int64_t kWindow = 16;

// One side's far field as a function of the displacement v from the point where it was fitted:
// a + b / (c - v), whose value, slope and curvature there match those of the far terms (a single
// pole at c, a weighted mean of the far poles' positions, so beyond the window; exact when the far
// poles coincide), or the tangent a + b v when that fit does not exist. f2 and dmin (the far
// terms' slope and the distance to the nearest far pole) bound the model's error (error_bound).
struct FarSide {
  double a = 0, b = 0, c = 0, f2 = 0, dmin = 0;
  bool pole = false, present = false;
  double value(double v) const { return pole ? a + b / (c - v) : a + b * v; }
  double slope(double v) const {
    if (!pole) return b;
    const double r = 1.0 / (c - v);
    return b * r * r;
  }
  // A bound on |far terms - this model| after a displacement v (|v| < dmin): the third (rational)
  // or second (tangent) derivatives of both, bounded through f2 = sum w / x^2 and dmin.
  double error_bound(double v) const {
    if (!present) return 0.0;
    const double s = std::fabs(v), r = dmin - s;
    if (!(r > 0)) return std::numeric_limits<double>::infinity();
    // in ratios (q = dmin / r, u = s / r <= 1): no power of r that could over- or underflow
    const double q = dmin / r, u = s / r, fs = f2 * s;
    return pole ? 2 * fs * q * q * u * u : fs * q * q * u;
  }
};

// F1, F2, F3: the far terms' s1, s2, s3 at the fit point; side -1 (poles to the left) or +1.
FarSide fit_far(double F1, double F2, double F3, double dmin, int side, double slope_total) {
  FarSide f;
  f.present = true;
  f.dmin = dmin;
  // F2 is a difference (all terms minus the window's): bound it by its rounding error too
  f.f2 = std::max(F2, 0.0) + 8 * kEps * slope_total;
  f.a = F1;
  f.b = std::max(F2, 0.0);
  if (F2 > 0 && F3 != 0) {
    const double c = F2 / F3;
    if (std::isfinite(c) && side * c >= dmin) {
      f.c = c;
      f.b = F2 * c * c;
      f.a = F1 - F2 * c;
      f.pole = true;
    }
  }
  return f;
}

// The model of f near root i, in the frame of `base`: g(u) = 1 + sum over the window of
// w_j / ((dd_j - base) - u) + the far fields at (u - at). g increases between two window poles.
struct RootModel {
  int64_t m = 0;
  double x[2 * kWindow], wj[2 * kWindow];
  FarSide far[2];
  double at = 0;

  void eval(double u, double* g, double* dg) const {
    double s = 0, ds = 0;
#pragma omp simd reduction(+ : s, ds)
    for (int64_t k = 0; k < m; ++k) {
      const double inv = 1.0 / (x[k] - u), term = wj[k] * inv;
      s += term;
      ds += term * inv;
    }
    *g = 1.0 + s + far[0].value(u - at) + far[1].value(u - at);
    *dg = ds + far[0].slope(u - at) + far[1].slope(u - at);
  }
  double error_bound(double u) const { return far[0].error_bound(u - at) + far[1].error_bound(u - at); }
};

// The model of root i (window [j0, j1), frame base) with its far fields fitted to the sums S taken
// at the point fbase + ft, with the sides split after `split` (i, or i - 1 for the previous root's
// sums). The window's terms at that point are computed in its own frame (fbase, ft), as S was, so
// a point within an ulp of a pole of another frame cannot turn a term into w / 0.
void build_model(RootModel& M, int64_t K, const double* dd, const double* w, int64_t i, double base, double fbase,
                 double ft, const SecularSums& S, int64_t split) {
  const int64_t j0 = std::max<int64_t>(0, i - kWindow + 1), j1 = std::min<int64_t>(K, i + kWindow + 1);
  double win1[2] = {0, 0}, win2[2] = {0, 0}, win3[2] = {0, 0};
  double t1[2] = {S.s1[0], S.s1[1]}, t2[2] = {S.s2[0], S.s2[1]}, t3[2] = {S.s3[0], S.s3[1]};
  M.m = j1 - j0;
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t k = j - j0;
    M.x[k] = dd[j] - base;
    M.wj[k] = w[j];
    const double inv = 1.0 / ((dd[j] - fbase) - ft), term = w[j] * inv, q = term * inv;
    const int side = j <= i ? 0 : 1;
    win1[side] += term;
    win2[side] += q;
    win3[side] += q * inv;
    if (j > split && j <= i) {  // sums split after i - 1: pole i moves to the left side
      t1[0] += term, t1[1] -= term;
      t2[0] += q, t2[1] -= q;
      t3[0] += q * inv, t3[1] -= q * inv;
    }
  }
  M.at = (fbase - base) + ft;  // the fit point in the model's frame (exact when fbase == base)
  M.far[0] = j0 > 0 ? fit_far(t1[0] - win1[0], t2[0] - win2[0], t3[0] - win3[0], ft - (dd[j0 - 1] - fbase), -1, t2[0])
                    : FarSide{};
  M.far[1] = j1 < K ? fit_far(t1[1] - win1[1], t2[1] - win2[1], t3[1] - win3[1], (dd[j1] - fbase) - ft, 1, t2[1])
                    : FarSide{};
}

// The root of the model in (lo, hi) from u (where g, dg are the model's value and slope): Newton
// steps safeguarded by bisection, until a step below rel |u| or a bracket of a few ulps. The result
// always lies in the open bracket or is u itself.
double solve_model(const RootModel& M, double lo, double hi, double u, double g, double dg, double rel,
                   double* dg_out) {
  for (int it = 0; it < 100; ++it) {
    if (g == 0.0) break;
    if (g < 0) lo = std::max(lo, u); else hi = std::min(hi, u);
    const double step = g / dg;
    double un = u - step;
    const bool done = std::fabs(step) <= rel * std::fabs(u) ||
                      hi - lo <= 4 * kEps * std::max(std::fabs(lo), std::fabs(hi));
    // outside the open bracket (also NaN): bisect; when converged, keep u (the step was below an
    // ulp or two of u, which is an evaluated point inside the caller's bracket)
    if (!(un > lo && un < hi)) un = done ? u : lo + (hi - lo) / 2;
    u = un;
    M.eval(u, &g, &dg);
    if (done) break;
  }
  *dg_out = dg;
  return u;
}

// The previous root's last evaluation of f (its sums split after its index prev), kept so that the
// next root's model can be fitted without an evaluation of its own (secular_root).
struct Chain {
  bool valid = false;
  int64_t prev = -1, o = 0;
  double t = 0;
  SecularSums S;
};

// One root of f(x) = 1 + sum_j w_j / (dd_j - x), w_j > 0, dd strictly ascending (K values):
// the root in (dd_i, dd_i+1), or in (dd_K-1, dd_K-1 + sum w] for i = K - 1. Returns false when
// it did not converge. The root is dd[*origin] + *tau, measured from the nearer pole.
//
// First point: with the previous root's sums (chain), the root of this root's model fitted to
// them (its window exact, the far field moved by about one gap), a first guess without an
// evaluation of f of its own; else the middle of the gap, whose sign of f says which pole is
// nearer. Then: evaluate f (all K terms), fit the model there, step to its root. A step is the
// last when it is below kStepStop |t| (the model converges quadratically) or when the model's own
// error bound over the step (FarSide::error_bound) moves the root by less than about one unit
// roundoff of |t|: usually after the first evaluation. When the bracket shows the root to lie in
// the other half of the gap than the pole it is measured from (a first guess on the wrong side),
// it is measured from the other pole from then on.
bool secular_root(int64_t K, const double* dd, const double* w, double wsum, int64_t i, int64_t* origin,
                  double* tau, bool wide, Chain& chain, bool from_middle = false) {
  const bool last = (i == K - 1);
  // the last root lies in (dd_K-1, dd_K-1 + wsum], at its right end when K = 1
  const double gap = last ? wsum * (1 + 8 * kEps) : dd[i + 1] - dd[i];
  const double half = gap / 2, margin = 4 * kEps * gap;
  int64_t o = i;
  double lo = 0.0, hi = gap, t;
  SecularSums s;
  bool have = false;  // s holds f's sums at t
  RootModel M;
  if (!from_middle && chain.valid && chain.prev == i - 1) {
    build_model(M, K, dd, w, i, dd[i], dd[chain.o], chain.t, chain.S, i - 1);
    double g, dg;
    M.eval(half, &g, &dg);
    double u = solve_model(M, 0.0, gap, half, g, dg, 1e-8, &dg);
    if (!(u >= 0 && u <= gap)) u = half;  // NaN (a model poisoned by non-finite sums)
    if (!last && u > half) {
      o = i + 1;
      lo = -gap;
      hi = 0.0;
      t = std::min(u - gap, -gap * 1e-6);  // strictly inside: never at the pole itself
    } else {
      t = std::max(u, gap * 1e-6);
    }
  } else if (last) {
    t = half;
  } else {
    // the middle of the gap; its sign says which pole is nearer the root
    s = secular_sums(K, dd, w, i, dd[i], half, wide);
    have = true;
    if (s.f() >= 0) {
      hi = half;
      t = half;
    } else {
      o = i + 1;  // the same point, measured from the right pole: the sums do not change
      lo = -half;
      hi = 0.0;
      t = -half;
    }
  }
  bool converged = false;
  for (int it = 0; it < kMaxIter && !converged; ++it) {
    const double base = dd[o];
    if (!have) s = secular_sums(K, dd, w, i, base, t, wide);
    have = false;
    chain.valid = true;
    chain.prev = i;
    chain.o = o;
    chain.t = t;
    chain.S = s;
    const double f = s.f();
    if (!std::isfinite(f)) {
      chain.valid = false;
      return false;
    }
    if (std::fabs(f) <= 8 * kEps * (1.0 + s.aterms())) break;
    if (f < 0) lo = std::max(lo, t); else hi = std::min(hi, t);
    if (!last && o == i && lo >= half) {
      // the root lies in the right half: measure it from pole i+1 (shifts by the computed gap,
      // exact for these |values| in [gap/2, gap]; the margins cover the gap's own rounding)
      o = i + 1;
      lo = std::max(-half, lo - gap - margin);
      hi = std::min(0.0, hi - gap + margin);
      t = std::min(t - gap, -gap * 1e-6);
      if (!(t > lo && t < hi)) t = lo + (hi - lo) / 2;
      continue;
    }
    if (!last && o == i + 1 && hi <= -half) {  // the root lies in the left half: from pole i
      o = i;
      lo = std::max(0.0, lo + gap - margin);
      hi = std::min(half, hi + gap + margin);
      t = std::max(t + gap, gap * 1e-6);
      if (!(t > lo && t < hi)) t = lo + (hi - lo) / 2;
      continue;
    }
    if (hi - lo <= 4 * kEps * std::max(std::fabs(lo), std::fabs(hi))) break;
    build_model(M, K, dd, w, i, base, base, t, s, i);
    double dg;
    double tn = solve_model(M, lo, hi, t, f, s.df(), 1e-3 * kStepStop, &dg);
    if (std::fabs(tn - t) <= kStepStop * std::fabs(tn)) {
      converged = true;
    } else if (tn > lo && tn < hi) {
      // the root of f lies within about error_bound / f' of the model's root (f' ~ dg this close)
      converged = 2 * M.error_bound(tn) <= kEps * std::fabs(tn) * dg;
    } else {
      tn = lo + (hi - lo) / 2;  // a model root outside the bracket (also NaN): bisect
    }
    t = tn;
    if (!converged && it == kMaxIter - 1) {
      chain.valid = false;
      return false;
    }
  }
  // A root that converged in the other half than its pole (its bracket straddled the middle, so no
  // switch above) would have a tau that is not relatively accurate: solve it again from the middle
  // of the gap, whose bracket is the nearer half (at most once: from the middle, |t| <= gap / 2).
  if (!last && std::fabs(t) > half) {
    if (from_middle) {
      chain.valid = false;
      return false;
    }
    return secular_root(K, dd, w, wsum, i, origin, tau, wide, chain, true);
  }
  *origin = o;
  *tau = t;
  return true;
}

// prod_{i0 <= i < i1} ((dorg_i - dj) + tau_i) / (dd_i - dj): one side of the Gu-Eisenstat product
// (SIMD lanes keep partial products; the factors of one side are all below or all above 1 and
// telescope, so no partial product under- or overflows).
TBFAST_HOT_CLONES double ratio_product(const double* dorg, const double* tau, const double* dd, int64_t i0, int64_t i1,
                                       double dj) {
  double p = 1.0;
#pragma omp simd reduction(* : p)
  for (int64_t i = i0; i < i1; ++i) p *= ((dorg[i] - dj) + tau[i]) / (dd[i] - dj);
  return p;
}

// The portable carry (the AVX-512 one is simd::cauchy_products_group_avx512): for kPortableRoots
// roots, their eigenvectors v_r[j] = zh_j / ((dd_j - base_r) - t_r) and the products
// out[r][v] = v_r . sub_v / ||v_r|| with the nv rows of sub (K entries each). K is walked in chunks
// of kPortableChunk entries: the chunk of the four v (into vc, kPortableChunk apart; 16 KiB) stays
// in L1 while every row of sub meets it, so v never goes to L2 and back and sub streams from L2
// once per four roots. Each chunk's sums (SIMD reductions: any order is as accurate) are added
// into out, which is scaled by 1 / ||v_r|| at the end.
constexpr int kPortableRoots = 4;
constexpr int64_t kPortableChunk = 512;
TBFAST_HOT_CLONES void cauchy_products_group(int64_t K, int64_t nv, const double* dd, const double* zh,
                                             const double* base, const double* t, const double* sub, double* vc,
                                             double* const* out) {
  constexpr int64_t J = kPortableChunk;
  const double b0 = base[0], b1 = base[1], b2 = base[2], b3 = base[3];
  const double t0 = t[0], t1 = t[1], t2 = t[2], t3 = t[3];
  double* const v0 = vc;
  double* const v1 = vc + J;
  double* const v2 = vc + 2 * J;
  double* const v3 = vc + 3 * J;
  double nr[4] = {0, 0, 0, 0};
  for (int r = 0; r < kPortableRoots; ++r) std::fill(out[r], out[r] + nv, 0.0);
  for (int64_t j0 = 0; j0 < K; j0 += J) {
    const int64_t len = std::min(J, K - j0);
    const double* d = dd + j0;
    const double* z = zh + j0;
    // this chunk of the four eigenvectors and their squared norms
    double n0 = 0, n1 = 0, n2 = 0, n3 = 0;
#pragma omp simd reduction(+ : n0, n1, n2, n3)
    for (int64_t j = 0; j < len; ++j) {
      const double x0 = z[j] / ((d[j] - b0) - t0), x1 = z[j] / ((d[j] - b1) - t1);
      const double x2 = z[j] / ((d[j] - b2) - t2), x3 = z[j] / ((d[j] - b3) - t3);
      v0[j] = x0;
      v1[j] = x1;
      v2[j] = x2;
      v3[j] = x3;
      n0 += x0 * x0;
      n1 += x1 * x1;
      n2 += x2 * x2;
      n3 += x3 * x3;
    }
    nr[0] += n0;
    nr[1] += n1;
    nr[2] += n2;
    nr[3] += n3;
    // the same chunk of the rows of sub, two at a time (eight sums: each load of sub serves four
    // roots, each load of v two rows)
    int64_t v = 0;
    for (; v + 2 <= nv; v += 2) {
      const double* s0 = sub + v * K + j0;
      const double* s1 = s0 + K;
      double a00 = 0, a01 = 0, a10 = 0, a11 = 0, a20 = 0, a21 = 0, a30 = 0, a31 = 0;
#pragma omp simd reduction(+ : a00, a01, a10, a11, a20, a21, a30, a31)
      for (int64_t j = 0; j < len; ++j) {
        const double u0 = s0[j], u1 = s1[j];
        a00 += v0[j] * u0;
        a01 += v0[j] * u1;
        a10 += v1[j] * u0;
        a11 += v1[j] * u1;
        a20 += v2[j] * u0;
        a21 += v2[j] * u1;
        a30 += v3[j] * u0;
        a31 += v3[j] * u1;
      }
      out[0][v] += a00;
      out[0][v + 1] += a01;
      out[1][v] += a10;
      out[1][v + 1] += a11;
      out[2][v] += a20;
      out[2][v + 1] += a21;
      out[3][v] += a30;
      out[3][v + 1] += a31;
    }
    if (v < nv) {
      const double* s0 = sub + v * K + j0;
      double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (int64_t j = 0; j < len; ++j) {
        a0 += v0[j] * s0[j];
        a1 += v1[j] * s0[j];
        a2 += v2[j] * s0[j];
        a3 += v3[j] * s0[j];
      }
      out[0][v] += a0;
      out[1][v] += a1;
      out[2][v] += a2;
      out[3][v] += a3;
    }
  }
  for (int r = 0; r < kPortableRoots; ++r) {
    const double inv = 1.0 / std::sqrt(nr[r]);
    for (int64_t v = 0; v < nv; ++v) out[r][v] *= inv;
  }
}

// diag(d) + rho z z^T (rho > 0, ||z|| = 1, d ascending; n entries) replaces d by its eigenvalues
// (ascending) and carries the nv vectors ys[v] (length n each) into the new eigenbasis, in place.
bool rank_one_update(int64_t n, std::vector<double>& d, std::vector<double>& z, double rho,
                     std::vector<std::vector<double>>& ys, bool wide) {
  const int64_t nv = static_cast<int64_t>(ys.size());
  double dmax = 0.0;
  for (int64_t j = 0; j < n; ++j) dmax = std::max(dmax, std::fabs(d[j]));
  const double tol = 8 * 2 * kEps * std::max(dmax, rho);
  // deflation of small components, then of close poles (rotations)
  std::vector<int64_t> idx;
  idx.reserve(n);
  for (int64_t j = 0; j < n; ++j) {
    if (rho * std::fabs(z[j]) <= tol) continue;
    if (!idx.empty()) {
      const int64_t p = idx.back();
      const double r = std::hypot(z[p], z[j]);
      const double c = z[j] / r, s = -z[p] / r;
      if (std::fabs((d[j] - d[p]) * c * s) <= tol) {
        const double dp = c * c * d[p] + s * s * d[j], dj = s * s * d[p] + c * c * d[j];
        d[p] = dp;
        d[j] = dj;
        z[p] = 0.0;
        z[j] = r;
        for (auto& y : ys) {
          const double yp = y[p], yj = y[j];
          y[p] = c * yp + s * yj;
          y[j] = -s * yp + c * yj;
        }
        idx.back() = j;  // p is deflated; j carries the weight
        continue;
      }
    }
    idx.push_back(j);
  }
  const int64_t K = static_cast<int64_t>(idx.size());
  if (K > 0) {
    std::vector<double> dd(K), w(K);
    double wsum = 0.0;
    for (int64_t a = 0; a < K; ++a) {
      dd[a] = d[idx[a]];
      w[a] = rho * z[idx[a]] * z[idx[a]];
      wsum += w[a];
    }
    std::vector<int64_t> org(K);
    std::vector<double> tau(K);
    std::vector<char> ok(K, 1);
    // roots in runs of kChainRoots, each run on one thread so that a root starts from the sums of
    // the one before it (secular_root)
    parallel_for_dynamic((K + kChainRoots - 1) / kChainRoots, 1, work_of(K, K * 3), [&](int64_t run) {
      Chain chain;
      for (int64_t i = run * kChainRoots; i < std::min(K, (run + 1) * kChainRoots); ++i)
        ok[i] = secular_root(K, dd.data(), w.data(), wsum, i, &org[i], &tau[i], wide, chain) ? 1 : 0;
    });
    for (int64_t i = 0; i < K; ++i)
      if (!ok[i]) return false;
    // the remaining vectors in the new basis: y'_i = v_i . y / ||v_i||, v_i[j] = zh_j / (dd_j - x_i)
    // (the last term carries none: its eigenvectors, and so zh, are not needed)
    if (nv > 0) {
      // Gu-Eisenstat: the z for which the computed roots are exact
      std::vector<double> zh(K);
      std::vector<double> dorg(K);  // each root's pole, contiguous for the SIMD product
      for (int64_t i = 0; i < K; ++i) dorg[i] = dd[org[i]];
      const auto product = wide ? simd::ratio_product_avx512 : ratio_product;
      parallel_for_dynamic(K, 16, work_of(K, K), [&](int64_t j) {
        const double dj = dd[j];
        const double lo = product(dorg.data(), tau.data(), dd.data(), 0, j, dj);
        const double hi = product(dorg.data(), tau.data(), dd.data(), j + 1, K, dj);
        const double prod = (((dorg[j] - dj) + tau[j]) / rho) * (lo * hi);
        zh[j] = std::copysign(std::sqrt(std::fabs(prod)), z[idx[j]]);
      });
      // sub: the vectors' surviving entries, one row each (64-byte aligned: whole-line SIMD loads)
      std::vector<double> sub_store(nv * K + 8), out(K * nv);
      double* const sub = align64(sub_store.data());
      for (int64_t v = 0; v < nv; ++v)
        for (int64_t a = 0; a < K; ++a) sub[v * K + a] = ys[v][idx[a]];
      // R roots per group (a short last group repeats its last root into a scratch row)
      constexpr int kMaxRoots = std::max(simd::kCarryRoots, kPortableRoots);
      const int R = wide ? simd::kCarryRoots : kPortableRoots;
      parallel_for_dynamic((K + R - 1) / R, 2, work_of(K, K * (nv + 2)), [&](int64_t group) {
        thread_local std::vector<double> work, scratch;
        work.resize((wide ? simd::carry_work_size(nv) : kPortableRoots * kPortableChunk) + 8);
        scratch.resize(nv);
        double base[kMaxRoots], t[kMaxRoots];
        double* outs[kMaxRoots];
        for (int r = 0; r < R; ++r) {
          const int64_t i = std::min(R * group + r, K - 1);
          base[r] = dd[org[i]];
          t[r] = tau[i];
          outs[r] = R * group + r < K ? out.data() + i * nv : scratch.data();
        }
        double* const buf = align64(work.data());
        if (wide)
          simd::cauchy_products_group_avx512(K, nv, dd.data(), zh.data(), base, t, sub, buf, outs);
        else
          cauchy_products_group(K, nv, dd.data(), zh.data(), base, t, sub, buf, outs);
      });
      for (int64_t a = 0; a < K; ++a)
        for (int64_t v = 0; v < nv; ++v) ys[v][idx[a]] = out[a * nv + v];
    }
    for (int64_t a = 0; a < K; ++a) d[idx[a]] = dd[org[a]] + tau[a];
  }
  // back to ascending order
  std::vector<int64_t> perm(n);
  std::iota(perm.begin(), perm.end(), int64_t{0});
  std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) { return d[a] < d[b]; });
  std::vector<double> tmp(n);
  for (int64_t j = 0; j < n; ++j) tmp[j] = d[perm[j]];
  d.swap(tmp);
  for (auto& y : ys) {
    for (int64_t j = 0; j < n; ++j) tmp[j] = y[perm[j]];
    y.swap(tmp);
  }
  return true;
}

}  // namespace secular

// All eigenvalues (ascending, into w) of diag(d) + Z C Z^T: d (n), Z (n x k row-major), C (k x k
// row-major, symmetric; its lower triangle is read). Returns a status code (secular::kOk, ...).
int eigvalsh_update_layer(int64_t n, int64_t k, const double* d, const double* Z, const double* C, double* w) {
  using namespace secular;
  for (int64_t j = 0; j < n; ++j)
    if (!std::isfinite(d[j])) return kNonFinite;
  for (int64_t j = 0; j < n * k; ++j)
    if (!std::isfinite(Z[j])) return kNonFinite;
  for (int64_t j = 0; j < k * k; ++j)
    if (!std::isfinite(C[j])) return kNonFinite;
  const bool wide = simd::use_avx512();  // read per call: TBFAST_SECULAR_SIMD=portable switches it off
  // Powers of two (exact) so that |d| and |Z| are at most about 1 and C is scaled to match: the
  // eigenvalues scale by 2^e. Then no square in the kernel (of z, of a gap, of an eigenvector
  // entry zhat / (d - x)) over- or underflows at any input scale; unscaled at the end.
  double dmax = 0.0, zmax = 0.0;
  for (int64_t j = 0; j < n; ++j) dmax = std::max(dmax, std::fabs(d[j]));
  for (int64_t j = 0; j < n * k; ++j) zmax = std::max(zmax, std::fabs(Z[j]));
  const int ez = zmax > 0 ? std::ilogb(zmax) : 0;
  const int ed = dmax > 0 ? std::ilogb(dmax) : 0;
  std::vector<double> a(k * k), c, q;
  double cmax = 0.0;
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j <= i; ++j) cmax = std::max(cmax, std::fabs(C[i * k + j]));
  // the update's scale, C x Z^2, in exponents (no product that could overflow)
  const int eu = cmax > 0 ? std::ilogb(cmax) + 2 * ez : ed;
  const int e = dmax > 0 ? std::max(ed, eu) : eu;
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j <= i; ++j) a[i * k + j] = a[j * k + i] = std::ldexp(C[i * k + j], 2 * ez - e);
  jacobi_eigh(k, a, c, q);
  // order the terms by decreasing |c| (the large updates first)
  std::vector<int64_t> order(k);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return std::fabs(c[x]) > std::fabs(c[y]); });
  // d ascending, Y = Z Q with its rows in the same order
  std::vector<int64_t> perm(n);
  std::iota(perm.begin(), perm.end(), int64_t{0});
  std::stable_sort(perm.begin(), perm.end(), [&](int64_t x, int64_t y) { return d[x] < d[y]; });
  std::vector<double> dv(n);
  for (int64_t j = 0; j < n; ++j) dv[j] = std::ldexp(d[perm[j]], -e);
  std::vector<std::vector<double>> ys(k, std::vector<double>(n, 0.0));
  std::vector<double> cs(k);
  std::vector<double> zs(n * k);  // Z scaled by 2^-ez (once: ldexp is a library call)
  for (int64_t j = 0; j < n * k; ++j) zs[j] = std::ldexp(Z[j], -ez);
  for (int64_t t = 0; t < k; ++t) {
    const int64_t col = order[t];
    cs[t] = c[col];
    auto& y = ys[t];
    for (int64_t j = 0; j < n; ++j) {
      const double* zr = zs.data() + perm[j] * k;
      double s = 0.0;
      for (int64_t m = 0; m < k; ++m) s += zr[m] * q[m * k + col];
      y[j] = s;
    }
  }
  for (int64_t t = 0; t < k; ++t) {
    std::vector<double> z = std::move(ys.front());
    ys.erase(ys.begin());
    double nz = 0.0;
    for (double v : z) nz += v * v;
    const double rho = cs[t] * nz;
    if (rho == 0.0 || !std::isfinite(rho)) {
      if (!std::isfinite(rho)) return kNonFinite;
      continue;
    }
    const double inv = 1.0 / std::sqrt(nz);
    for (double& v : z) v *= inv;
    const bool flip = rho < 0;
    if (flip) {  // -(diag(-d) + |rho| z z^T), with -d ascending after a reversal
      std::reverse(dv.begin(), dv.end());
      for (double& v : dv) v = -v;
      std::reverse(z.begin(), z.end());
      for (auto& y : ys) std::reverse(y.begin(), y.end());
    }
    if (!rank_one_update(n, dv, z, std::fabs(rho), ys, wide)) return kNotConverged;
    if (flip) {
      std::reverse(dv.begin(), dv.end());
      for (double& v : dv) v = -v;
      for (auto& y : ys) std::reverse(y.begin(), y.end());
    }
  }
  for (int64_t j = 0; j < n; ++j) w[j] = std::ldexp(dv[j], e);
  return kOk;
}

namespace {

std::tuple<Tensor, Tensor> eigvalsh_update_cpu(const Tensor& d, const Tensor& Z, const Tensor& C) {
  TBFAST_CHECK(d.is_cpu() && Z.is_cpu() && C.is_cpu(), "tbfast::eigvalsh_update (CPU): d, Z and C must be CPU tensors");
  TBFAST_CHECK(d.dim() == 2, "tbfast::eigvalsh_update: d must have shape (L, n), got ", shape_of(d));
  const int64_t L = d.size(0), n = d.size(1);
  TBFAST_CHECK(Z.dim() == 3 && Z.size(0) == L && Z.size(1) == n,
               "tbfast::eigvalsh_update: Z must have shape (L, n, k) = (", L, ", ", n, ", k), got ", shape_of(Z));
  const int64_t k = Z.size(2);
  TBFAST_CHECK(C.dim() == 3 && C.size(0) == L && C.size(1) == k && C.size(2) == k,
               "tbfast::eigvalsh_update: C must have shape (L, k, k) = (", L, ", ", k, ", ", k, "), got ", shape_of(C));
  TBFAST_CHECK(d.scalar_type() == kDouble && Z.scalar_type() == kDouble && C.scalar_type() == kDouble,
               "tbfast::eigvalsh_update: d, Z and C must be float64");
  TBFAST_CHECK(d.is_contiguous() && Z.is_contiguous() && C.is_contiguous(),
               "tbfast::eigvalsh_update: d, Z and C must be contiguous");
  Tensor w = new_empty(d, {L, n}, kDouble);
  Tensor status = new_zeros(d, {L}, kInt);
  const double* dp = d.const_data_ptr<double>();
  const double* zp = Z.const_data_ptr<double>();
  const double* cp = C.const_data_ptr<double>();
  double* wp = w.mutable_data_ptr<double>();
  int* sp = status.mutable_data_ptr<int>();
  for (int64_t l = 0; l < L; ++l) {
    const int st = eigvalsh_update_layer(n, k, dp + l * n, zp + l * n * k, cp + l * k * k, wp + l * n);
    sp[l] = st;
    if (st != secular::kOk) std::fill(wp + l * n, wp + (l + 1) * n, std::numeric_limits<double>::quiet_NaN());
  }
  return {w, status};
}

}  // namespace
}  // namespace tbfast

// The schema is defined in tbfast/ops/secular.py (impl before def is legal in torch.library).
TBFAST_LIBRARY_IMPL(tbfast, CPU, m) {
  m.impl("eigvalsh_update", TBFAST_KERNEL(tbfast::eigvalsh_update_cpu));
}

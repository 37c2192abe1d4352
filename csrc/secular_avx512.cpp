// AVX-512 variants of the secular kernel's hot loops (see secular_simd.h for what and why).
// Compiled on x86-64 with GCC or Clang through the target attribute (the rest of the extension
// keeps its baseline flags); elsewhere avx512_supported() is false and these are never called.
#include "secular_simd.h"

#include <cstdlib>
#include <cstring>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define TBFAST_HAVE_AVX512 1
#include <immintrin.h>
#else
#define TBFAST_HAVE_AVX512 0
#endif

namespace tbfast {
namespace secular {
namespace simd {

#if TBFAST_HAVE_AVX512

#define TBFAST_AVX512 __attribute__((target("avx512f")))

bool avx512_supported() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return ok;
}

namespace {

// 1 / x to about one ulp: the 14-bit estimate and two Newton steps.
TBFAST_AVX512 inline __m512d recip(__m512d x) {
  const __m512d one = _mm512_set1_pd(1.0);
  __m512d r = _mm512_rcp14_pd(x);
  r = _mm512_fmadd_pd(r, _mm512_fnmadd_pd(x, r, one), r);
  r = _mm512_fmadd_pd(r, _mm512_fnmadd_pd(x, r, one), r);
  return r;
}

// ((dorg_i - dj) + tau_i) / (dd_i - dj) for the eight i from i.
TBFAST_AVX512 inline __m512d ratio_factor(const double* dorg, const double* tau, const double* dd, int64_t i,
                                          __m512d vj) {
  const __m512d num = _mm512_add_pd(_mm512_sub_pd(_mm512_loadu_pd(dorg + i), vj), _mm512_loadu_pd(tau + i));
  return _mm512_mul_pd(num, recip(_mm512_sub_pd(_mm512_loadu_pd(dd + i), vj)));
}

// The lanes of an 8-wide step with `left` elements still to go (all eight when left >= 8).
TBFAST_AVX512 inline __mmask8 lane_mask(int64_t left) {
  return left >= 8 ? static_cast<__mmask8>(0xFF) : static_cast<__mmask8>((1u << left) - 1u);
}

}  // namespace

TBFAST_AVX512 void secular_part_avx512(const double* dd, const double* w, int64_t j0, int64_t j1, double base,
                                       double t, double* sum1, double* sum2, double* sum3) {
  const __m512d vb = _mm512_set1_pd(base), vt = _mm512_set1_pd(t);
  __m512d a0 = _mm512_setzero_pd(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0;
  int64_t j = j0;
  for (; j + 16 <= j1; j += 16) {
    const __m512d r0 = recip(_mm512_sub_pd(_mm512_sub_pd(_mm512_loadu_pd(dd + j), vb), vt));
    const __m512d r1 = recip(_mm512_sub_pd(_mm512_sub_pd(_mm512_loadu_pd(dd + j + 8), vb), vt));
    const __m512d e0 = _mm512_mul_pd(_mm512_loadu_pd(w + j), r0);
    const __m512d e1 = _mm512_mul_pd(_mm512_loadu_pd(w + j + 8), r1);
    const __m512d q0 = _mm512_mul_pd(e0, r0), q1 = _mm512_mul_pd(e1, r1);
    a0 = _mm512_add_pd(a0, e0);
    a1 = _mm512_add_pd(a1, e1);
    b0 = _mm512_add_pd(b0, q0);
    b1 = _mm512_add_pd(b1, q1);
    c0 = _mm512_fmadd_pd(q0, r0, c0);
    c1 = _mm512_fmadd_pd(q1, r1, c1);
  }
  for (; j < j1; j += 8) {
    const __mmask8 m = lane_mask(j1 - j);
    const __m512d x = _mm512_sub_pd(_mm512_sub_pd(_mm512_maskz_loadu_pd(m, dd + j), vb), vt);
    const __m512d r = recip(x);
    const __m512d e = _mm512_mul_pd(_mm512_maskz_loadu_pd(m, w + j), r);
    const __m512d q = _mm512_maskz_mul_pd(m, e, r);
    a0 = _mm512_mask_add_pd(a0, m, a0, e);
    b0 = _mm512_add_pd(b0, q);
    c0 = _mm512_mask3_fmadd_pd(q, r, c0, m);
  }
  *sum1 = _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
  *sum2 = _mm512_reduce_add_pd(_mm512_add_pd(b0, b1));
  *sum3 = _mm512_reduce_add_pd(_mm512_add_pd(c0, c1));
}

TBFAST_AVX512 double ratio_product_avx512(const double* dorg, const double* tau, const double* dd, int64_t i0,
                                          int64_t i1, double dj) {
  const __m512d vj = _mm512_set1_pd(dj);
  // four independent partial products (a multiplication's latency, not its throughput, bounds one)
  __m512d p0 = _mm512_set1_pd(1.0), p1 = p0, p2 = p0, p3 = p0;
  int64_t i = i0;
  for (; i + 32 <= i1; i += 32) {
    p0 = _mm512_mul_pd(p0, ratio_factor(dorg, tau, dd, i, vj));
    p1 = _mm512_mul_pd(p1, ratio_factor(dorg, tau, dd, i + 8, vj));
    p2 = _mm512_mul_pd(p2, ratio_factor(dorg, tau, dd, i + 16, vj));
    p3 = _mm512_mul_pd(p3, ratio_factor(dorg, tau, dd, i + 24, vj));
  }
  for (; i < i1; i += 8) {
    const __mmask8 m = lane_mask(i1 - i);
    const __m512d num = _mm512_add_pd(_mm512_sub_pd(_mm512_maskz_loadu_pd(m, dorg + i), vj),
                                      _mm512_maskz_loadu_pd(m, tau + i));
    const __m512d den = _mm512_sub_pd(_mm512_maskz_loadu_pd(m, dd + i), vj);
    p0 = _mm512_mask_mul_pd(p0, m, p0, _mm512_mul_pd(num, recip(den)));
  }
  return _mm512_reduce_mul_pd(_mm512_mul_pd(_mm512_mul_pd(p0, p1), _mm512_mul_pd(p2, p3)));
}

TBFAST_AVX512 void cauchy_products_quad_avx512(int64_t K, int64_t nv, const double* dd, const double* zh,
                                               const double* base, const double* t, const double* sub, double* vp,
                                               double* const* out) {
  __m512d b[4], u[4], nr[4];
  for (int r = 0; r < 4; ++r) {
    b[r] = _mm512_set1_pd(base[r]);
    u[r] = _mm512_set1_pd(t[r]);
    nr[r] = _mm512_setzero_pd();
  }
  for (int64_t j = 0; j < K; j += 8) {
    const __mmask8 m = lane_mask(K - j);
    const __m512d d = _mm512_maskz_loadu_pd(m, dd + j), z = _mm512_maskz_loadu_pd(m, zh + j);
    for (int r = 0; r < 4; ++r) {
      const __m512d x = _mm512_maskz_mul_pd(m, z, recip(_mm512_sub_pd(_mm512_sub_pd(d, b[r]), u[r])));
      _mm512_mask_storeu_pd(vp + r * K + j, m, x);
      nr[r] = _mm512_fmadd_pd(x, x, nr[r]);
    }
  }
  double inv[4];
  for (int r = 0; r < 4; ++r) inv[r] = 1.0 / __builtin_sqrt(_mm512_reduce_add_pd(nr[r]));
  const double *v0 = vp, *v1 = vp + K, *v2 = vp + 2 * K, *v3 = vp + 3 * K;
  int64_t v = 0;
  // four rows of sub times four roots: sixteen accumulators; each load feeds four multiply-adds
  for (; v + 4 <= nv; v += 4) {
    const double* s = sub + v * K;
    __m512d a[4][4];
    for (int q = 0; q < 4; ++q)
      for (int r = 0; r < 4; ++r) a[q][r] = _mm512_setzero_pd();
    for (int64_t j = 0; j < K; j += 8) {
      const __mmask8 m = lane_mask(K - j);
      const __m512d x0 = _mm512_maskz_loadu_pd(m, v0 + j), x1 = _mm512_maskz_loadu_pd(m, v1 + j);
      const __m512d x2 = _mm512_maskz_loadu_pd(m, v2 + j), x3 = _mm512_maskz_loadu_pd(m, v3 + j);
      for (int q = 0; q < 4; ++q) {
        const __m512d w = _mm512_maskz_loadu_pd(m, s + q * K + j);
        a[q][0] = _mm512_fmadd_pd(x0, w, a[q][0]);
        a[q][1] = _mm512_fmadd_pd(x1, w, a[q][1]);
        a[q][2] = _mm512_fmadd_pd(x2, w, a[q][2]);
        a[q][3] = _mm512_fmadd_pd(x3, w, a[q][3]);
      }
    }
    for (int q = 0; q < 4; ++q)
      for (int r = 0; r < 4; ++r) out[r][v + q] = _mm512_reduce_add_pd(a[q][r]) * inv[r];
  }
  for (; v < nv; ++v) {
    const double* s = sub + v * K;
    __m512d a0 = _mm512_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < K; j += 8) {
      const __mmask8 m = lane_mask(K - j);
      const __m512d w = _mm512_maskz_loadu_pd(m, s + j);
      a0 = _mm512_fmadd_pd(_mm512_maskz_loadu_pd(m, v0 + j), w, a0);
      a1 = _mm512_fmadd_pd(_mm512_maskz_loadu_pd(m, v1 + j), w, a1);
      a2 = _mm512_fmadd_pd(_mm512_maskz_loadu_pd(m, v2 + j), w, a2);
      a3 = _mm512_fmadd_pd(_mm512_maskz_loadu_pd(m, v3 + j), w, a3);
    }
    out[0][v] = _mm512_reduce_add_pd(a0) * inv[0];
    out[1][v] = _mm512_reduce_add_pd(a1) * inv[1];
    out[2][v] = _mm512_reduce_add_pd(a2) * inv[2];
    out[3][v] = _mm512_reduce_add_pd(a3) * inv[3];
  }
}

#else  // no AVX-512 variants in this build

bool avx512_supported() { return false; }
void secular_part_avx512(const double*, const double*, int64_t, int64_t, double, double, double*, double*, double*) {}
double ratio_product_avx512(const double*, const double*, const double*, int64_t, int64_t, double) { return 0.0; }
void cauchy_products_quad_avx512(int64_t, int64_t, const double*, const double*, const double*, const double*,
                                 const double*, double*, double* const*) {}

#endif

bool use_avx512() {
  if (!avx512_supported()) return false;
  const char* env = std::getenv("TBFAST_SECULAR_SIMD");
  return env == nullptr || std::strcmp(env, "portable") != 0;
}

const char* active_name() { return use_avx512() ? "avx512" : "portable"; }

}  // namespace simd
}  // namespace secular
}  // namespace tbfast

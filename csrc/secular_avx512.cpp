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

// The carry's inner loop over one chunk of len entries, for Q consecutive rows of sub (s: the
// chunk of the first, rows ld apart; Q <= 3) and the kCarryRoots roots of a group (vc: their v over
// the chunk, kCarryChunk apart): acc[q][r] += v_r[j] * sub_q[j], lane by lane, for j in the chunk.
// The 3 x 8 accumulators live in registers for the whole chunk (taken from and put back into the
// L1 array acc once per chunk); each step's Q loads of sub and 8 loads of v feed 8 Q multiply-adds.
template <int Q>
TBFAST_AVX512 inline void carry_chunk_rows(int64_t len, const double* vc, const double* s, int64_t ld, double* acc) {
  constexpr int R = kCarryRoots;
  __m512d a[Q][R];
  for (int q = 0; q < Q; ++q)
    for (int r = 0; r < R; ++r) a[q][r] = _mm512_loadu_pd(acc + (q * R + r) * 8);
  for (int64_t jj = 0; jj < len; jj += 8) {
    const __mmask8 m = lane_mask(len - jj);  // v is zero past len; the mask keeps the loads of sub in bounds
    __m512d w[Q];
    for (int q = 0; q < Q; ++q) w[q] = _mm512_maskz_loadu_pd(m, s + q * ld + jj);
    for (int r = 0; r < R; ++r) {
      __m512d x = _mm512_loadu_pd(vc + r * kCarryChunk + jj);
      __asm__("" : "+v"(x));  // one load of v per step: GCC would otherwise fold a load into every FMA
      for (int q = 0; q < Q; ++q) a[q][r] = _mm512_fmadd_pd(x, w[q], a[q][r]);
    }
  }
  for (int q = 0; q < Q; ++q)
    for (int r = 0; r < R; ++r) _mm512_storeu_pd(acc + (q * R + r) * 8, a[q][r]);
}

TBFAST_AVX512 void cauchy_products_group_avx512(int64_t K, int64_t nv, const double* dd, const double* zh,
                                                const double* base, const double* t, const double* sub, double* work,
                                                double* const* out) {
  constexpr int R = kCarryRoots;
  constexpr int64_t J = kCarryChunk;
  // work: the group's v over the current chunk (R x J), then the accumulators (nv x R vectors of
  // 8 lanes). Both stay in L1 (16 KiB + 7.5 KiB at nv = 15), so v never goes to L2 and back, and
  // sub streams from L2 once per group of R roots.
  double* vc = work;
  double* acc = work + R * J;
  std::memset(acc, 0, sizeof(double) * 8 * R * nv);
  __m512d b[R], u[R], nr[R];
  for (int r = 0; r < R; ++r) {
    b[r] = _mm512_set1_pd(base[r]);
    u[r] = _mm512_set1_pd(t[r]);
    nr[r] = _mm512_setzero_pd();
  }
  for (int64_t j0 = 0; j0 < K; j0 += J) {
    const int64_t len = K - j0 < J ? K - j0 : J;
    // this chunk of each root's eigenvector, v_r[j] = zh_j / ((dd_j - base_r) - t_r) (zero past
    // len), and its squared norm; each load of dd and zh serves all R roots
    for (int64_t jj = 0; jj < len; jj += 8) {
      const __mmask8 m = lane_mask(len - jj);
      const __m512d d = _mm512_maskz_loadu_pd(m, dd + j0 + jj), z = _mm512_maskz_loadu_pd(m, zh + j0 + jj);
      for (int r = 0; r < R; ++r) {
        const __m512d x = _mm512_maskz_mul_pd(m, z, recip(_mm512_sub_pd(_mm512_sub_pd(d, b[r]), u[r])));
        _mm512_storeu_pd(vc + r * J + jj, x);
        nr[r] = _mm512_fmadd_pd(x, x, nr[r]);
      }
    }
    // the same chunk of every row of sub times the R roots' v, three rows at a time
    int64_t v = 0;
    for (; v + 3 <= nv; v += 3) carry_chunk_rows<3>(len, vc, sub + v * K + j0, K, acc + v * R * 8);
    if (nv - v == 2) carry_chunk_rows<2>(len, vc, sub + v * K + j0, K, acc + v * R * 8);
    if (nv - v == 1) carry_chunk_rows<1>(len, vc, sub + v * K + j0, K, acc + v * R * 8);
  }
  // out[r][v] = v_r . sub_v / ||v_r|| (the lanes summed in the same order as before the chunking)
  for (int r = 0; r < R; ++r) {
    const double inv = 1.0 / __builtin_sqrt(_mm512_reduce_add_pd(nr[r]));
    for (int64_t v = 0; v < nv; ++v) out[r][v] = _mm512_reduce_add_pd(_mm512_loadu_pd(acc + (v * R + r) * 8)) * inv;
  }
}

#else  // no AVX-512 variants in this build

bool avx512_supported() { return false; }
void secular_part_avx512(const double*, const double*, int64_t, int64_t, double, double, double*, double*, double*) {}
double ratio_product_avx512(const double*, const double*, const double*, int64_t, int64_t, double) { return 0.0; }
void cauchy_products_group_avx512(int64_t, int64_t, const double*, const double*, const double*, const double*,
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

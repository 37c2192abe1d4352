// AVX-512 variants of the hot loops of the secular-equation kernel (csrc/secular_cpu.cpp).
//
// The portable loops (OpenMP simd, compiled for AVX2 and baseline x86-64) spend most of their
// time in divisions, whose throughput per element does not improve with wider vectors. These
// variants replace each division by a reciprocal: the 14-bit hardware estimate (vrcp14pd)
// refined by two Newton steps (r <- r + r (1 - x r), error 2^-14 -> 2^-28 -> 2^-56 before
// rounding), so a reciprocal is within about one ulp of 1/x and costs five vector operations
// instead of a division. Every use is a sum or product of same-sign terms whose error analysis
// already allows a few ulps per term.
//
// Chosen at run time, per call: on a CPU with AVX-512F unless TBFAST_SECULAR_SIMD=portable is set
// in the environment (tests use it to check both paths against the same oracle).
#pragma once

#include <cstdint>

namespace tbfast {
namespace secular {
namespace simd {

// True when this build has the AVX-512 variants and the CPU (and OS) can run them.
bool avx512_supported();
// avx512_supported() and not switched off by TBFAST_SECULAR_SIMD=portable.
bool use_avx512();
// "avx512" or "portable": what use_avx512() picks now.
const char* active_name();

// With x_j = (dd_j - base) - t and t_j = w_j / x_j, over j0 <= j < j1: sum t_j into *sum1,
// sum t_j / x_j (the derivative) into *sum2 and sum t_j / x_j^2 (half the second derivative) into *sum3.
void secular_part_avx512(const double* dd, const double* w, int64_t j0, int64_t j1, double base, double t,
                         double* sum1, double* sum2, double* sum3);

// prod_{i0<=i<i1} ((dorg_i - dj) + tau_i) / (dd_i - dj).
double ratio_product_avx512(const double* dorg, const double* tau, const double* dd, int64_t i0, int64_t i1,
                            double dj);

// The carry (see rank_one_update) for kCarryRoots roots at once: their eigenvectors
// v_r = zh / ((dd - base_r) - t_r) and the normalized products v_r . sub_v / ||v_r|| with the nv
// rows of sub (K entries each, row v at sub + v K) into out[r][0..nv). K is taken in chunks of
// kCarryChunk entries so that the chunk of v and the accumulators stay in L1. work: scratch of
// carry_work_size(nv) doubles (64-byte aligned, as sub should be, for whole-line loads).
constexpr int kCarryRoots = 8;
constexpr int64_t kCarryChunk = 256;
inline int64_t carry_work_size(int64_t nv) { return kCarryRoots * (kCarryChunk + 8 * nv); }
void cauchy_products_group_avx512(int64_t K, int64_t nv, const double* dd, const double* zh, const double* base,
                                  const double* t, const double* sub, double* work, double* const* out);

}  // namespace simd
}  // namespace secular
}  // namespace tbfast

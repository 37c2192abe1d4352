// tbfast::weight_digest (CPU): a 128-bit content digest of a byte string, the base-weight check of
// the LoRA base-spectrum cache (tbfast/lora/cache.py). The definition is in tbfast/ops/digest.py:
//
//   words x_i (little-endian uint64 of the bytes, zero-padded to a multiple of 8), i = 0..N-1;
//   mix = the splitmix64 finalizer; S_c = sum_i mix(x_i ^ ((i + 1) K_c)) mod 2^64 for the two
//   keys K_0, K_1; H_c = mix(S_c ^ (L K_c)) with L the length in bytes.
//
// A sum mod 2^64 does not depend on how it is split, so the words are summed in parallel ranges
// (tbfast_parallel.h) whose partial sums are added. The word loop is compiled three times from
// one body: for AVX-512 (F + DQ: vpmullq does the 64-bit multiplies, 8 words per vector), AVX2
// (4 words per vector, the multiplies emulated) and the baseline; the variant is chosen per call
// from the CPU's features, capped by TBFAST_DIGEST_SIMD=avx2 | portable (tests run every variant).
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "tbfast_parallel.h"

namespace tbfast {
namespace digest {

constexpr uint64_t kKey0 = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kKey1 = 0xC2B2AE3D27D4EB4FULL;
// Words per parallel range: 512 KiB, so a 16 MiB weight already runs on every thread.
constexpr int64_t kGrainWords = int64_t{1} << 16;

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "weight_digest reads little-endian words");

inline uint64_t mix(uint64_t z) {
  z ^= z >> 30;
  z *= 0xBF58476D1CE4E5B9ULL;
  z ^= z >> 27;
  z *= 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return z;
}

// Words per block of the word loop, and how far ahead of its block the loop asks for the data:
// the mixing is long enough per word that the out-of-order core alone keeps too few cache-line
// reads in flight (measured: 3.4 GB/s per core from memory vs 9.5 from L2, AVX-512); prefetching
// 4 KiB ahead restores most of the difference.
constexpr int64_t kBlockWords = 256;
constexpr uintptr_t kPrefetchAhead = 4096;

// s[0], s[1] += the two lanes' terms of the n words at p, whose first word has index `first`.
// One body for every variant: inlined into each target-attributed function below and
// vectorized there with that target's instructions. The position keys (i + 1) K_c advance by
// K_c per word (an addition per vector instead of a 64-bit multiply).
__attribute__((always_inline)) inline void sum_words(const unsigned char* p, int64_t n, uint64_t first,
                                                     uint64_t* s) {
  uint64_t a = 0, b = 0;
  uint64_t k0 = (first + 1) * kKey0, k1 = (first + 1) * kKey1;
  for (int64_t j0 = 0; j0 < n; j0 += kBlockWords) {
    const int64_t j1 = n - j0 < kBlockWords ? n : j0 + kBlockWords;
    // prefetch never faults, so the lines past the end of the buffer may be asked for too
    const uintptr_t ahead = reinterpret_cast<uintptr_t>(p + 8 * j0) + kPrefetchAhead;
    for (uintptr_t q = 0; q < 8 * kBlockWords; q += 64) __builtin_prefetch(reinterpret_cast<const void*>(ahead + q));
    for (int64_t j = j0; j < j1; ++j) {
      uint64_t x;
      std::memcpy(&x, p + 8 * j, 8);
      a += mix(x ^ k0);
      b += mix(x ^ k1);
      k0 += kKey0;
      k1 += kKey1;
    }
  }
  s[0] += a;
  s[1] += b;
}

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define TBFAST_DIGEST_X86 1
__attribute__((target("avx512f,avx512dq"), noinline)) void sum_words_avx512(const unsigned char* p, int64_t n,
                                                                             uint64_t first, uint64_t* s) {
  sum_words(p, n, first, s);
}
__attribute__((target("avx2"), noinline)) void sum_words_avx2(const unsigned char* p, int64_t n, uint64_t first,
                                                              uint64_t* s) {
  sum_words(p, n, first, s);
}
#endif
__attribute__((noinline)) void sum_words_portable(const unsigned char* p, int64_t n, uint64_t first, uint64_t* s) {
  sum_words(p, n, first, s);
}

enum class Variant { kPortable, kAvx2, kAvx512 };

Variant best_supported() {
#ifdef TBFAST_DIGEST_X86
  static const Variant v = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) return Variant::kAvx512;
    if (__builtin_cpu_supports("avx2")) return Variant::kAvx2;
    return Variant::kPortable;
  }();
  return v;
#else
  return Variant::kPortable;
#endif
}

// The best supported variant, capped by TBFAST_DIGEST_SIMD ("avx2" or "portable"; read per call).
Variant active() {
  Variant v = best_supported();
  const char* env = std::getenv("TBFAST_DIGEST_SIMD");
  if (env != nullptr) {
    if (std::strcmp(env, "portable") == 0) v = Variant::kPortable;
    else if (std::strcmp(env, "avx2") == 0 && v == Variant::kAvx512) v = Variant::kAvx2;
  }
  return v;
}

const char* name(Variant v) {
  switch (v) {
    case Variant::kAvx512: return "avx512";
    case Variant::kAvx2: return "avx2";
    default: return "portable";
  }
}

void sum_range(Variant v, const unsigned char* p, int64_t n, uint64_t first, uint64_t* s) {
#ifdef TBFAST_DIGEST_X86
  if (v == Variant::kAvx512) return sum_words_avx512(p, n, first, s);
  if (v == Variant::kAvx2) return sum_words_avx2(p, n, first, s);
#else
  (void)v;
#endif
  sum_words_portable(p, n, first, s);
}

}  // namespace digest

// The active variant's name, for cpu_features() (module.cpp).
const char* digest_variant() { return digest::name(digest::active()); }

namespace {

Tensor weight_digest_cpu(const Tensor& bytes) {
  TBFAST_CHECK(bytes.is_cpu(), "tbfast::weight_digest (CPU): bytes must be a CPU tensor");
  TBFAST_CHECK(bytes.dim() == 1, "tbfast::weight_digest: bytes must be 1-D, got shape ", shape_of(bytes));
  TBFAST_CHECK(bytes.scalar_type() == kByte, "tbfast::weight_digest: bytes must be uint8, got ",
               dtype_name(bytes.scalar_type()));
  TBFAST_CHECK(bytes.is_contiguous(), "tbfast::weight_digest: bytes must be contiguous");
  const int64_t L = bytes.numel();
  const int64_t words = L / 8;
  const unsigned char* p = L ? static_cast<const unsigned char*>(bytes.data_ptr()) : nullptr;
  const digest::Variant v = digest::active();

  std::atomic<uint64_t> s0{0}, s1{0};  // fetch_add wraps mod 2^64
  parallel_for_static(words, digest::kGrainWords, words, [&](int64_t b, int64_t e) {
    uint64_t s[2] = {0, 0};
    digest::sum_range(v, p + 8 * b, e - b, static_cast<uint64_t>(b), s);
    s0.fetch_add(s[0], std::memory_order_relaxed);
    s1.fetch_add(s[1], std::memory_order_relaxed);
  });
  uint64_t s[2] = {s0.load(), s1.load()};
  if (const int64_t rem = L - 8 * words) {  // the last word, zero-padded
    unsigned char tail[8] = {0};
    std::memcpy(tail, p + 8 * words, static_cast<size_t>(rem));
    digest::sum_words_portable(tail, 1, static_cast<uint64_t>(words), s);
  }
  const uint64_t len = static_cast<uint64_t>(L);
  Tensor out = new_empty(bytes, {2}, kLong);
  int64_t* o = out.mutable_data_ptr<int64_t>();
  const uint64_t h0 = digest::mix(s[0] ^ (len * digest::kKey0));
  const uint64_t h1 = digest::mix(s[1] ^ (len * digest::kKey1));
  std::memcpy(o, &h0, 8);  // two's complement: the same 64 bits
  std::memcpy(o + 1, &h1, 8);
  return out;
}

}  // namespace
}  // namespace tbfast

// The schema is defined in tbfast/ops/digest.py (impl before def is legal in torch.library).
TBFAST_LIBRARY_IMPL(tbfast, CPU, m) {
  m.impl("weight_digest", TBFAST_KERNEL(tbfast::weight_digest_cpu));
}

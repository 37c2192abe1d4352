// Parallel loop helpers shared by tbfast's CPU kernels.
#pragma once

#include <atomic>
#include <cstdint>

#include "tbfast_torch.h"

namespace tbfast {

// True when this build's own loops use OpenMP (compiled with -fopenmp).
constexpr bool kBuiltWithOpenMP =
#ifdef _OPENMP
    true;
#else
    false;
#endif

// Below this much work (roughly: scalar operations) a loop runs on the calling thread: waking a
// thread team costs more than it saves, and on a busy machine every parallel region also waits
// for its slowest (possibly descheduled) thread.
constexpr int64_t kMinParallelWork = 1 << 15;

// Calls f(i) for every i in [0, n), handing out chunks of `chunk` indices dynamically so that
// items of very different cost (e.g. KS candidates with long and short tails) balance across
// threads. Runs serially inside another parallel region or with one thread. f must not throw.
// `work` estimates the loop's total cost; small loops run serially.
template <class F>
void parallel_for_dynamic(int64_t n, int64_t chunk, int64_t work, const F& f) {
  if (n <= 0) return;
  if (chunk < 1) chunk = 1;
#ifdef _OPENMP
  const int64_t nt = num_threads();
  if (nt > 1 && n > chunk && work >= kMinParallelWork && !in_parallel_region()) {
    std::atomic<int64_t> next{0};
    // No num_threads clause (see pytorch#32008); torch sets the OpenMP thread count.
#pragma omp parallel
    {
      for (;;) {
        const int64_t b = next.fetch_add(chunk, std::memory_order_relaxed);
        if (b >= n) break;
        const int64_t e = b + chunk < n ? b + chunk : n;
        for (int64_t i = b; i < e; ++i) f(i);
      }
    }
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) f(i);
}

// Static split of [0, n) into contiguous ranges (torch's parallel_for); f(begin, end) must not
// throw (see tbfast_torch.h).
// `work` estimates the loop's total cost; small loops run serially.
template <class F>
void parallel_for_static(int64_t n, int64_t grain, int64_t work, const F& f) {
  if (n <= 0) return;
  if (work < kMinParallelWork) {
    f(int64_t{0}, n);
    return;
  }
  parallel_for(0, n, grain < 1 ? 1 : grain, f);
}

}  // namespace tbfast

// A tiny parallel layer: the kernels call erasus::parallel_blocks and never OpenMP directly, so a
// build without OpenMP (or a single-threaded test build) only changes this header.
#pragma once
#include <algorithm>
#include <cstdint>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace erasus {

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Splits [0, n) into one contiguous block per thread and calls f(begin, end, thread_id).
// Contiguous blocks keep each thread's reads sequential, which is what the hardware prefetcher wants.
template <typename F>
inline void parallel_blocks(int64_t n, F&& f) {
#ifdef _OPENMP
  const int nt = static_cast<int>(std::min<int64_t>(max_threads(), std::max<int64_t>(n / 256, 1)));
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    const int t = omp_get_num_threads();
    const int64_t begin = n * tid / t;
    const int64_t end = n * (tid + 1) / t;
    f(begin, end, tid);
  }
#else
  f(int64_t{0}, n, 0);
#endif
}

// Calls f(i, thread_id) for every i in [0, n), handing out one index at a time (uneven work per index).
template <typename F>
inline void parallel_for_each(int64_t n, F&& f) {
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < n; ++i) f(i, omp_get_thread_num());
#else
  for (int64_t i = 0; i < n; ++i) f(i, 0);
#endif
}

}  // namespace erasus

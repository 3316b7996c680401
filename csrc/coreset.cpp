#include "coreset.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include <unistd.h>

#include "element.h"
#include "parallel.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define ERASUS_X86_KERNELS 1
#include <immintrin.h>
#define ERASUS_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace erasus {
namespace {

// ---------------------------------------------------------------------------------------------------------
// Squared distance of a row (times `scale`) to a float32 vector. One arithmetic order for every element type
// and both code paths below, so a 16-bit X gives bit for bit the result of its float32 widening:
//   32 partial sums p[0..32): blocks of 32 elements, element b+l goes to p[l] as p[l] = fma(diff, diff, p[l]);
//   up to three leftover blocks of 8 go to p[0..8), p[8..16), p[16..24) in turn;
//   reduce: q[l] = (p[l] + p[8+l]) + (p[16+l] + p[24+l]), then (q[l] + q[l+4]), then pairs (l, l+2), then
//   the two halves; the last d % 8 elements are fma'd onto that sum in order.
// diff = x - c, or (x * scale) - c when scale != 1 (scale is a power of two, so x * scale is exact).
// Rows are widened in registers (vcvtph2ps for fp16, a 16-bit shift for bf16): no scratch row is stored.

#if defined(__FMA__) || defined(FP_FAST_FMAF)
inline float fma_f(float a, float b, float c) { return std::fma(a, b, c); }
#else
// No fused multiply-add on this target: the portable path then rounds twice, and so does every element type.
inline float fma_f(float a, float b, float c) { return a * b + c; }
#endif

template <bool kScaled, typename T>
inline float portable_distance(const T* row, float scale, const float* centre, int64_t d) {
  float p[32] = {};
  float buffer[32];  // 16-bit blocks widened by the vectorised widen(): to_float per lane does not vectorise
  auto block = [&](int64_t t, int64_t size) -> const float* {
    if constexpr (std::is_same_v<T, float>) {
      return row + t;
    } else {
      widen(row + t, size, buffer);
      return buffer;
    }
  };
  int64_t t = 0;
  for (; t + 32 <= d; t += 32) {
    const float* v = block(t, 32);
    for (int l = 0; l < 32; ++l) {
      const float diff = (kScaled ? v[l] * scale : v[l]) - centre[t + l];
      p[l] = fma_f(diff, diff, p[l]);
    }
  }
  for (int b = 0; t + 8 <= d; t += 8, ++b) {
    const float* v = block(t, 8);
    for (int l = 0; l < 8; ++l) {
      const float diff = (kScaled ? v[l] * scale : v[l]) - centre[t + l];
      p[8 * b + l] = fma_f(diff, diff, p[8 * b + l]);
    }
  }
  float q[8];
  for (int l = 0; l < 8; ++l) q[l] = (p[l] + p[8 + l]) + (p[16 + l] + p[24 + l]);
  float h[4];
  for (int l = 0; l < 4; ++l) h[l] = q[l] + q[l + 4];
  const float g0 = h[0] + h[2], g1 = h[1] + h[3];
  float acc = g0 + g1;
  for (; t < d; ++t) {
    const float x = kScaled ? to_float(row[t]) * scale : to_float(row[t]);
    const float diff = x - centre[t];
    acc = fma_f(diff, diff, acc);
  }
  return acc;
}

// Distances of the listed rows of x to `centre`, written to out[0..count). The one place a kernel reads X.
template <typename T>
using RowDistances = void (*)(const T* x, int64_t d, float scale, const float* centre, const int64_t* rows,
                              int64_t count, float* out);

template <typename T>
void portable_distances(const T* x, int64_t d, float scale, const float* centre, const int64_t* rows,
                        int64_t count, float* out) {
  if (scale == 1.f) {  // the common case: no multiply in the hot loop
    for (int64_t i = 0; i < count; ++i) out[i] = portable_distance<false>(x + rows[i] * d, scale, centre, d);
  } else {
    for (int64_t i = 0; i < count; ++i) out[i] = portable_distance<true>(x + rows[i] * d, scale, centre, d);
  }
}

#ifdef ERASUS_X86_KERNELS
// Eight lanes of partial sums. float32 and fp16 rows fill one 256-bit register per 8 elements (a load, or
// vcvtph2ps); bf16 rows are widened by interleaving zero halves under each 16-bit value, which works on 128
// bits at a time, so bf16 keeps lanes 0-3 and 4-7 in two 128-bit registers: on Zen (where a 256-bit
// operation is two 128-bit ones anyway) this runs at 1.7x the 256-bit widening (zero-extend + shift). The
// lanes hold the same values either way, so the arithmetic is the same.
struct Lanes256 {
  __m256 v;
};
struct Lanes128x2 {
  __m128 lo, hi;
};
template <typename T>
struct LanesOf {
  using type = Lanes256;
};
template <>
struct LanesOf<bf16_bits> {
  using type = Lanes128x2;
};

ERASUS_TARGET_AVX2 inline void zero(Lanes256& p) { p.v = _mm256_setzero_ps(); }
ERASUS_TARGET_AVX2 inline void zero(Lanes128x2& p) { p.lo = p.hi = _mm_setzero_ps(); }

ERASUS_TARGET_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
ERASUS_TARGET_AVX2 inline __m256 load8(const half_bits* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// p[l] = fma(diff, diff, p[l]) for the 8 elements at row[0..8), diff = (x * scale) - c or x - c.
template <bool kScaled, typename T>
ERASUS_TARGET_AVX2 inline void accumulate8(Lanes256& p, const T* row, const float* c, __m256 scale) {
  const __m256 v = kScaled ? _mm256_mul_ps(load8(row), scale) : load8(row);
  const __m256 diff = _mm256_sub_ps(v, _mm256_loadu_ps(c));
  p.v = _mm256_fmadd_ps(diff, diff, p.v);
}

template <bool kScaled>
ERASUS_TARGET_AVX2 inline void accumulate8(Lanes128x2& p, const bf16_bits* row, const float* c, __m256 scale) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row)), zero = _mm_setzero_si128();
  __m128 lo = _mm_castsi128_ps(_mm_unpacklo_epi16(zero, bits));  // elements 0-3, each bf16 << 16
  __m128 hi = _mm_castsi128_ps(_mm_unpackhi_epi16(zero, bits));  // elements 4-7
  if (kScaled) {
    lo = _mm_mul_ps(lo, _mm256_castps256_ps128(scale));
    hi = _mm_mul_ps(hi, _mm256_castps256_ps128(scale));
  }
  const __m128 dlo = _mm_sub_ps(lo, _mm_loadu_ps(c)), dhi = _mm_sub_ps(hi, _mm_loadu_ps(c + 4));
  p.lo = _mm_fmadd_ps(dlo, dlo, p.lo);
  p.hi = _mm_fmadd_ps(dhi, dhi, p.hi);
}

// q[l] = (p0[l] + p1[l]) + (p2[l] + p3[l]), returned as q[l] + q[l + 4] for l < 4.
ERASUS_TARGET_AVX2 inline __m128 fold(const Lanes256& p0, const Lanes256& p1, const Lanes256& p2,
                                      const Lanes256& p3) {
  const __m256 q = _mm256_add_ps(_mm256_add_ps(p0.v, p1.v), _mm256_add_ps(p2.v, p3.v));
  return _mm_add_ps(_mm256_castps256_ps128(q), _mm256_extractf128_ps(q, 1));
}
ERASUS_TARGET_AVX2 inline __m128 fold(const Lanes128x2& p0, const Lanes128x2& p1, const Lanes128x2& p2,
                                      const Lanes128x2& p3) {
  const __m128 lo = _mm_add_ps(_mm_add_ps(p0.lo, p1.lo), _mm_add_ps(p2.lo, p3.lo));
  const __m128 hi = _mm_add_ps(_mm_add_ps(p0.hi, p1.hi), _mm_add_ps(p2.hi, p3.hi));
  return _mm_add_ps(lo, hi);
}

template <bool kScaled, typename T>
ERASUS_TARGET_AVX2 inline float avx2_distance(const T* row, __m256 vscale, float scale, const float* c, int64_t d) {
  typename LanesOf<T>::type p0, p1, p2, p3;
  zero(p0), zero(p1), zero(p2), zero(p3);
  int64_t t = 0;
  for (; t + 32 <= d; t += 32) {
    accumulate8<kScaled>(p0, row + t, c + t, vscale);
    accumulate8<kScaled>(p1, row + t + 8, c + t + 8, vscale);
    accumulate8<kScaled>(p2, row + t + 16, c + t + 16, vscale);
    accumulate8<kScaled>(p3, row + t + 24, c + t + 24, vscale);
  }
  if (t + 8 <= d) accumulate8<kScaled>(p0, row + t, c + t, vscale), t += 8;
  if (t + 8 <= d) accumulate8<kScaled>(p1, row + t, c + t, vscale), t += 8;
  if (t + 8 <= d) accumulate8<kScaled>(p2, row + t, c + t, vscale), t += 8;
  const __m128 h = fold(p0, p1, p2, p3);                 // lanes l, l + 4
  const __m128 g = _mm_add_ps(h, _mm_movehl_ps(h, h));  // lanes l, l + 2
  float acc = _mm_cvtss_f32(_mm_add_ss(g, _mm_shuffle_ps(g, g, 1)));
  for (; t < d; ++t) {
    const float v = kScaled ? to_float(row[t]) * scale : to_float(row[t]);
    const float diff = v - c[t];
    acc = std::fma(diff, diff, acc);
  }
  return acc;
}

// 16-bit rows are prefetched about kPrefetchBytes ahead of the row being read: their conversion (vcvtph2ps: ~6.5
// G elements/s per znver1 core alone, ~5 G with the distance arithmetic) leaves the loop compute-bound between
// misses, and the hardware prefetcher alone then lets the misses and the arithmetic take turns (50k x 512 fp16,
// 2 threads: 5.1-5.3 -> 4.7-4.9 ms/step when first measured). An X larger than the last-level cache is
// prefetched with the non-temporal hint, which keeps the stream from evicting what does stay cached (in-process
// A/B, medians, 50k x 512: fp16 0.95-0.97x the time of the L1 hint, bf16 0.83x). float32 rows keep the
// hardware prefetcher: the non-temporal hint made 100 MB of 2 KB rows 4-13% slower (and a cached X 1.8x
// slower), though 12 MB (d = 512) and 100 MB of 512-byte rows ran 0.92-0.93x; a software prefetch with the L1
// hint changed nothing.
constexpr int64_t kPrefetchBytes = 4096;

enum class Prefetch { kHardware, kNear, kStream };

// kLocality: __builtin_prefetch's (x86: 3 prefetcht0, 0 prefetchnta), the same in GCC and clang.
constexpr int kNearLocality = 3, kStreamLocality = 0;

template <int kLocality, typename T>
ERASUS_TARGET_AVX2 inline void prefetch_row(const T* row, int64_t bytes) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, kLocality);
}

template <bool kScaled, Prefetch kPrefetch, typename T>
ERASUS_TARGET_AVX2 void avx2_distances_of(const T* x, int64_t d, __m256 vscale, float scale, const float* centre,
                                          const int64_t* rows, int64_t count, float* out) {
  constexpr int kLocality = kPrefetch == Prefetch::kStream ? kStreamLocality : kNearLocality;
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(T));
  const int64_t ahead =
      kPrefetch == Prefetch::kHardware ? 0 : std::max<int64_t>(1, kPrefetchBytes / std::max<int64_t>(row_bytes, 1));
  for (int64_t i = 0; i < std::min(ahead, count); ++i) prefetch_row<kLocality>(x + rows[i] * d, row_bytes);
  for (int64_t i = 0; i < count; ++i) {
    if (ahead && i + ahead < count) prefetch_row<kLocality>(x + rows[i + ahead] * d, row_bytes);
    out[i] = avx2_distance<kScaled>(x + rows[i] * d, vscale, scale, centre, d);
  }
}

template <Prefetch kPrefetch, typename T>
ERASUS_TARGET_AVX2 void avx2_distances(const T* x, int64_t d, float scale, const float* centre,
                                       const int64_t* rows, int64_t count, float* out) {
  const __m256 vscale = _mm256_set1_ps(scale);
  if (scale == 1.f)  // the common case: no multiply in the hot loop
    avx2_distances_of<false, kPrefetch>(x, d, vscale, scale, centre, rows, count, out);
  else
    avx2_distances_of<true, kPrefetch>(x, d, vscale, scale, centre, rows, count, out);
}

bool cpu_has_avx2_fma_f16c() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return has;
}
#endif

// Whether an n x d X of T is larger than the last-level cache: then every step streams it from memory.
template <typename T>
bool exceeds_cache(int64_t n, int64_t d) {
  return n * d * static_cast<int64_t>(sizeof(T)) > last_level_cache_bytes();
}

// The distance kernel for this CPU and an n x d X: AVX2 + FMA + F16C where the CPU has them (checked at run time,
// so a portable build still uses them), else the portable loop. Both follow the order above; the prefetch (see
// kPrefetchBytes) changes the time only.
template <typename T>
RowDistances<T> row_distances_for_cpu(bool vectorized, int64_t n, int64_t d) {
#ifdef ERASUS_X86_KERNELS
  if (vectorized && cpu_has_avx2_fma_f16c()) {
    if (sizeof(T) == 4) return &avx2_distances<Prefetch::kHardware, T>;
    if (exceeds_cache<T>(n, d)) return &avx2_distances<Prefetch::kStream, T>;
    return &avx2_distances<Prefetch::kNear, T>;
  }
#endif
  (void)vectorized, (void)n, (void)d;
  return &portable_distances<T>;
}

// ---------------------------------------------------------------------------------------------------------
// Work split. Rows are cut into chunks that depend only on the shape (never on the team), claimed one at a
// time; per-chunk winners are merged in chunk order, so the selection is bit for bit the same on any team.

// Below this many bytes of X per step the loop runs on one thread: a step takes under ~15 us there, where a team
// gains at most 1.3x on an idle machine (2-core znver1 VM, d = 128: 7.4 vs 5.7 us/step at 128 KiB, 14.4 vs
// 9.3 at 256 KiB; bench/selectors.py --only robustness prints the table), can lose far more on a busy one, and
// steps are too short to time for TeamOrAlone's choice.
constexpr int64_t kParallelMinBytes = int64_t{1} << 18;
constexpr int64_t kMinChunkBytes = int64_t{1} << 15;  // a claim (one atomic add) is then < 1% of a chunk
constexpr int64_t kMaxChunkBytes = int64_t{1} << 18;
constexpr int64_t kMaxChunks = 4096;  // ChunkTeam takes < 2^15
constexpr int64_t kBlockRows = 256;   // rows listed per distance call (stack buffers)

struct RowChunks {
  int64_t rows_per_chunk;
  int32_t count;
};

RowChunks row_chunks(int64_t n, int64_t row_bytes) {
  const int64_t total = n * row_bytes;
  const int64_t target = std::clamp(total / 64, kMinChunkBytes, kMaxChunkBytes);  // >= 64 chunks where it can
  int64_t rows = std::max<int64_t>(1, target / std::max<int64_t>(row_bytes, 1));
  rows = std::max(rows, (n + kMaxChunks - 1) / kMaxChunks);
  return {rows, static_cast<int32_t>((n + rows - 1) / rows)};
}

// Threads for a selection loop: at most `threads` (0: every thread OpenMP offers), capped by the CPUs this
// process may use, and one thread when a step reads too little to pay for a team; `fixed_team` takes
// `threads` as it is (tests and benchmarks compare teams).
int team_threads(int threads, bool fixed_team, int64_t step_bytes) {
  if (fixed_team) return std::max(threads, 1);
  if (step_bytes < kParallelMinBytes) return 1;
  const int cap = threads > 0 ? threads : max_threads();
  return std::max(1, std::min(cap, usable_cpus()));
}

// One step's chunks on the team or on the calling thread alone, as `choice` says; the step's time goes back
// to `choice`.
template <typename F>
inline void timed_run(ChunkTeam& team, TeamOrAlone& choice, int64_t step, int32_t n_chunks, F& f) {
  const bool alone = choice.alone(step);
  const auto start = std::chrono::steady_clock::now();
  team.run(n_chunks, f, alone);
  choice.record(step, std::chrono::steady_clock::now() - start);
}

struct Best {
  float value;
  int64_t index;
};

// Merge of the per-chunk winners in chunk order; `better(a, b)` is strict, so ties keep the lower index.
template <typename Better>
inline Best merge(const std::vector<Best>& per_chunk, Better better) {
  Best best = per_chunk[0];
  for (size_t i = 1; i < per_chunk.size(); ++i) {
    if (per_chunk[i].index >= 0 && (best.index < 0 || better(per_chunk[i].value, best.value))) best = per_chunk[i];
  }
  return best;
}

// Column sums of the rows of x (unscaled) in double. Rows are cut into at most kSumParts parts fixed by the
// shape; each column of a part is summed in row order and the parts are added in part order, so the sums do not
// depend on the team (nor on the code path: every float widens exactly to double). Rows are read front to
// back, kSumRows at a time (a few KB, in L1), added to each block of kSumBlock columns while its sums stay in
// registers: the sums are loaded and stored once per kSumRows rows.
constexpr int64_t kSumParts = 64;
constexpr int64_t kSumPartialBytes = int64_t{4} << 20;  // the parts' partial sums, at most
constexpr int64_t kSumRows = 8;
constexpr int64_t kSumBlock = 16;

// acc[t] += x[r][t] for rows r < rows, columns t < d (the tail columns one row at a time).
template <typename T>
using ColumnAdd = void (*)(const T* x, int64_t rows, int64_t d, double* acc);

template <typename T>
void portable_column_add(const T* x, int64_t rows, int64_t d, double* acc) {
  float wide[kSumBlock];
  int64_t t0 = 0;
  for (; t0 + kSumBlock <= d; t0 += kSumBlock) {
    double a[kSumBlock];
    for (int64_t t = 0; t < kSumBlock; ++t) a[t] = acc[t0 + t];
    for (int64_t r = 0; r < rows; ++r) {
      widen(x + r * d + t0, kSumBlock, wide);
      for (int64_t t = 0; t < kSumBlock; ++t) a[t] += static_cast<double>(wide[t]);
    }
    for (int64_t t = 0; t < kSumBlock; ++t) acc[t0 + t] = a[t];
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t t = t0; t < d; ++t) acc[t] += static_cast<double>(to_float(x[r * d + t]));
}

#ifdef ERASUS_X86_KERNELS
ERASUS_TARGET_AVX2 inline void load16(const float* p, __m256& lo, __m256& hi) {
  lo = _mm256_loadu_ps(p), hi = _mm256_loadu_ps(p + 8);
}
ERASUS_TARGET_AVX2 inline void load16(const half_bits* p, __m256& lo, __m256& hi) {
  lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
}
ERASUS_TARGET_AVX2 inline void load16(const bf16_bits* p, __m256& lo, __m256& hi) {
  const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8));
  lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(a), 16));
  hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
}

// portable_column_add with 256-bit registers: the same sums (each a double sum in row order), 1.2-1.8x faster
// on znver1, where GCC vectorises the portable loop 128 bits wide. Each block read prefetches the same columns
// kSumRows rows further on (the next call's rows: the loop reads kSumRows rows side by side, too many streams
// for the hardware prefetcher). row_nearest_mean, in-process A/B, 2 threads: 50k x 512 float32 15.0 -> 12.0 ms,
// fp16 11.5 -> 8.2, bf16 11.2 -> 7.4; 200k x 128: 0.75-0.78x the time for every dtype; 2000 x 128: unchanged.
// The hint: as avx2_distances_of gives 16-bit rows (the non-temporal one for an X larger than the last-level
// cache).
template <int kLocality, typename T>
ERASUS_TARGET_AVX2 void avx2_column_add(const T* x, int64_t rows, int64_t d, double* acc) {
  const uintptr_t row_bytes = static_cast<uintptr_t>(d) * sizeof(T);
  int64_t t0 = 0;
  for (; t0 + kSumBlock <= d; t0 += kSumBlock) {
    __m256d a0 = _mm256_loadu_pd(acc + t0), a1 = _mm256_loadu_pd(acc + t0 + 4);
    __m256d a2 = _mm256_loadu_pd(acc + t0 + 8), a3 = _mm256_loadu_pd(acc + t0 + 12);
    for (int64_t r = 0; r < rows; ++r) {
      __m256 lo, hi;
      // the address as an integer: on the last rows it lies past the end of x (a prefetch never faults)
      __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(x + r * d + t0) +
                                                       kSumRows * row_bytes),
                         0, kLocality);
      load16(x + r * d + t0, lo, hi);
      a0 = _mm256_add_pd(a0, _mm256_cvtps_pd(_mm256_castps256_ps128(lo)));
      a1 = _mm256_add_pd(a1, _mm256_cvtps_pd(_mm256_extractf128_ps(lo, 1)));
      a2 = _mm256_add_pd(a2, _mm256_cvtps_pd(_mm256_castps256_ps128(hi)));
      a3 = _mm256_add_pd(a3, _mm256_cvtps_pd(_mm256_extractf128_ps(hi, 1)));
    }
    _mm256_storeu_pd(acc + t0, a0), _mm256_storeu_pd(acc + t0 + 4, a1);
    _mm256_storeu_pd(acc + t0 + 8, a2), _mm256_storeu_pd(acc + t0 + 12, a3);
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t t = t0; t < d; ++t) acc[t] += static_cast<double>(to_float(x[r * d + t]));
}
#endif

template <typename T>
ColumnAdd<T> column_add_for_cpu(bool vectorized, int64_t n, int64_t d) {
#ifdef ERASUS_X86_KERNELS
  if (vectorized && cpu_has_avx2_fma_f16c())
    return exceeds_cache<T>(n, d) ? &avx2_column_add<kStreamLocality, T> : &avx2_column_add<kNearLocality, T>;
#endif
  (void)vectorized, (void)n, (void)d;
  return &portable_column_add<T>;
}

template <typename T>
void column_sums(const T* x, int64_t n, int64_t d, ChunkTeam& team, bool vectorized, double* sums) {
  for (int64_t t = 0; t < d; ++t) sums[t] = 0.0;
  if (n == 0 || d == 0) return;
  const ColumnAdd<T> add = column_add_for_cpu<T>(vectorized, n, d);
  const int64_t max_parts = std::max<int64_t>(1, kSumPartialBytes / (d * static_cast<int64_t>(sizeof(double))));
  const int64_t wanted = std::min({kSumParts, n, max_parts});
  const int64_t rows_per_part = (n + wanted - 1) / wanted;
  const int32_t parts = static_cast<int32_t>((n + rows_per_part - 1) / rows_per_part);
  std::vector<double> partial(static_cast<size_t>(parts) * static_cast<size_t>(d), 0.0);
  auto sum_part = [&](int64_t part) {
    const int64_t end = std::min(n, (part + 1) * rows_per_part);
    for (int64_t j = part * rows_per_part; j < end; j += kSumRows)
      add(x + j * d, std::min(kSumRows, end - j), d, partial.data() + part * d);
  };
  team.run(parts, sum_part);
  for (int32_t part = 0; part < parts; ++part)
    for (int64_t t = 0; t < d; ++t) sums[t] += partial[static_cast<size_t>(part) * static_cast<size_t>(d) + t];
}

template <typename T>
inline void widen_row(const T* row, float scale, int64_t d, float* dst) {
  for (int64_t t = 0; t < d; ++t) dst[t] = to_float(row[t]) * scale;
}

}  // namespace

// Exact pruning by the triangle inequality: a row at squared distance m from its nearest centre a cannot come
// closer to the new centre c when ||c - a||^2 >= 4 m (then ||x - c|| >= ||c - a|| - ||x - a|| >= sqrt(m)), so
// its row of X is not read. The margin keeps rows whose bound is within float32 rounding of the boundary on
// the computed path, so the selection is the one without pruning.
constexpr float kPruneMargin = 4.f * (1.f + 1e-3f);

namespace {
// One chunk of a k-center step: list the rows that must be read (not a centre; with `owner`, not ruled out by
// the triangle inequality), measure them to the new centre, update the running minima (and owners), and return
// the chunk's farthest row ({-2, -1} when it holds none; a centre's -1 when it holds only centres).
template <typename T>
Best scan_kcenter_chunk(const T* x, int64_t n, int64_t d, float scale, RowDistances<T> distances,
                        const RowChunks& chunks, int64_t chunk, const float* centre, int32_t step, float* min_dist,
                        int32_t* owner, const float* to_centre) {
  const int64_t begin = chunk * chunks.rows_per_chunk, end = std::min(n, begin + chunks.rows_per_chunk);
  int64_t rows[kBlockRows];
  float dist[kBlockRows];
  Best best{-2.f, -1};
  for (int64_t b = begin; b < end; b += kBlockRows) {
    const int64_t e = std::min(end, b + kBlockRows);
    int64_t count = 0;
    for (int64_t j = b; j < e; ++j) {
      const float m = min_dist[j];
      if (m < 0.f) continue;  // a centre
      const int32_t a = owner != nullptr ? owner[j] : -1;
      if (a < 0 || to_centre[a] < kPruneMargin * m) rows[count++] = j;
    }
    distances(x, d, scale, centre, rows, count, dist);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t j = rows[i];
      if (dist[i] < min_dist[j]) {
        min_dist[j] = dist[i];
        if (owner != nullptr) owner[j] = step;
      }
    }
    for (int64_t j = b; j < e; ++j)
      if (min_dist[j] > best.value) best = Best{min_dist[j], j};
  }
  return best;
}

// One chunk of a herding step: the chunk's unchosen row nearest the target ({inf, -1} when it has none; selected
// == nullptr: every row is a candidate). Ties keep the lower index.
template <typename T>
Best scan_herding_chunk(const T* x, int64_t n, int64_t d, float scale, RowDistances<T> distances,
                        const RowChunks& chunks, int64_t chunk, const float* target, const uint8_t* selected) {
  const int64_t begin = chunk * chunks.rows_per_chunk, end = std::min(n, begin + chunks.rows_per_chunk);
  int64_t rows[kBlockRows];
  float dist[kBlockRows];
  Best best{std::numeric_limits<float>::infinity(), -1};
  for (int64_t b = begin; b < end; b += kBlockRows) {
    const int64_t e = std::min(end, b + kBlockRows);
    int64_t count = 0;
    for (int64_t j = b; j < e; ++j)
      if (selected == nullptr || !selected[j]) rows[count++] = j;
    distances(x, d, scale, target, rows, count, dist);
    for (int64_t i = 0; i < count; ++i)
      if (best.index < 0 || dist[i] < best.value) best = Best{dist[i], rows[i]};
  }
  return best;
}

// One step of a loop run by its caller: scan(chunk) on a team sized for this call, the chunks' results merged in
// chunk order by `better`; `none` when there are no chunks.
template <typename Scan, typename Better>
Best one_step(const RowChunks& chunks, int64_t step_bytes, int threads, bool fixed_team, Best none, Scan scan,
              Better better) {
  std::vector<Best> per_chunk(static_cast<size_t>(chunks.count), none);
  auto scan_chunk = [&](int64_t chunk) { per_chunk[static_cast<size_t>(chunk)] = scan(chunk); };
  with_chunk_team(team_threads(threads, fixed_team, step_bytes),
                  [&](ChunkTeam& team) { team.run(chunks.count, scan_chunk); });
  return per_chunk.empty() ? none : merge(per_chunk, better);
}
}  // namespace

template <typename T>
int64_t herding_step(const T* x, int64_t n, int64_t d, float scale, const float* target, const uint8_t* selected,
                     float* nearest, int threads, bool fixed_team, bool vectorized) {
  const RowDistances<T> distances = row_distances_for_cpu<T>(vectorized, n, d);
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(T));
  const RowChunks chunks = row_chunks(n, row_bytes);
  const Best best = one_step(
      chunks, n * row_bytes, threads, fixed_team, Best{std::numeric_limits<float>::infinity(), -1},
      [&](int64_t chunk) { return scan_herding_chunk(x, n, d, scale, distances, chunks, chunk, target, selected); },
      [](float a, float b) { return a < b; });
  *nearest = best.value;
  return best.index;
}

template <typename T>
int64_t kcenter_step(const T* x, int64_t n, int64_t d, float scale, const float* centre, int32_t step,
                     float* min_dist, int32_t* owner, const float* to_centre, float* farthest, int threads,
                     bool fixed_team, bool vectorized) {
  const RowDistances<T> distances = row_distances_for_cpu<T>(vectorized, n, d);
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(T));
  const RowChunks chunks = row_chunks(n, row_bytes);
  const Best best = one_step(
      chunks, n * row_bytes, threads, fixed_team, Best{-2.f, -1},
      [&](int64_t chunk) {
        return scan_kcenter_chunk(x, n, d, scale, distances, chunks, chunk, centre, step, min_dist, owner,
                                  to_centre);
      },
      [](float a, float b) { return a > b; });
  *farthest = best.value;
  return best.index;
}

template <typename T>
float kcenter_greedy(const T* x, int64_t n, int64_t d, float scale, const int64_t* init, int64_t n_init,
                     int64_t k, int64_t* out, float* min_dist, bool prune, int threads, bool fixed_team,
                     bool vectorized) {
  const RowDistances<T> distances = row_distances_for_cpu<T>(vectorized, n, d);
  const RowChunks chunks = row_chunks(n, d * static_cast<int64_t>(sizeof(T)));
  std::vector<float> centre(static_cast<size_t>(d));
  std::vector<Best> per_chunk(static_cast<size_t>(chunks.count));
  std::vector<int32_t> owner(prune ? static_cast<size_t>(n) : 0, -1);  // the step of each row's nearest centre
  std::vector<float> to_centre(prune ? static_cast<size_t>(k) : 0);     // ||new centre - centre of step a||^2
  for (int64_t j = 0; j < n; ++j) min_dist[j] = std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < n_init; ++s) out[s] = init[s];

  int64_t s = 0;  // the step: read by the chunks, written by the calling thread between runs
  auto scan_chunk = [&](int64_t chunk) {
    per_chunk[static_cast<size_t>(chunk)] =
        scan_kcenter_chunk(x, n, d, scale, distances, chunks, chunk, centre.data(), static_cast<int32_t>(s),
                           min_dist, prune ? owner.data() : nullptr, to_centre.data());
  };

  float radius2 = 0.f;
  const int team_size = team_threads(threads, fixed_team, n * d * static_cast<int64_t>(sizeof(T)));
  with_chunk_team(team_size, [&](ChunkTeam& team) {
    TeamOrAlone choice(team.size() > 1, !fixed_team);
    for (s = 0; s < k; ++s) {
      const int64_t c = out[s];
      widen_row(x + c * d, scale, d, centre.data());
      min_dist[c] = -1.f;  // a centre is never chosen again, even among exact duplicates
      if (prune) distances(x, d, scale, centre.data(), out, s, to_centre.data());
      timed_run(team, choice, s, chunks.count, scan_chunk);
      const Best best = merge(per_chunk, [](float a, float b) { return a > b; });
      if (s + 1 < k && s + 1 >= n_init) out[s + 1] = best.index;
      radius2 = best.value > 0.f ? best.value : 0.f;
    }
  });
  return radius2;
}

template <typename T>
void row_distances(const T* x, int64_t n, int64_t d, float scale, const float* centre, float* out, int threads,
                   bool fixed_team, bool vectorized) {
  const RowDistances<T> distances = row_distances_for_cpu<T>(vectorized, n, d);
  const RowChunks chunks = row_chunks(n, d * static_cast<int64_t>(sizeof(T)));
  auto scan_chunk = [&](int64_t chunk) {
    const int64_t begin = chunk * chunks.rows_per_chunk, end = std::min(n, begin + chunks.rows_per_chunk);
    int64_t rows[kBlockRows];
    for (int64_t b = begin; b < end; b += kBlockRows) {
      const int64_t block = std::min(end, b + kBlockRows) - b;
      for (int64_t i = 0; i < block; ++i) rows[i] = b + i;
      distances(x, d, scale, centre, rows, block, out + b);
    }
  };
  const int team_size = team_threads(threads, fixed_team, n * d * static_cast<int64_t>(sizeof(T)));
  with_chunk_team(team_size, [&](ChunkTeam& team) { team.run(chunks.count, scan_chunk); });
}

template <typename T>
int64_t row_nearest_mean(const T* x, int64_t n, int64_t d, float scale, int threads, bool fixed_team,
                         bool vectorized) {
  const RowDistances<T> distances = row_distances_for_cpu<T>(vectorized, n, d);
  const RowChunks chunks = row_chunks(n, d * static_cast<int64_t>(sizeof(T)));
  std::vector<double> sums(static_cast<size_t>(d));
  std::vector<float> mean(static_cast<size_t>(d));
  std::vector<Best> per_chunk(static_cast<size_t>(chunks.count));
  auto scan_chunk = [&](int64_t chunk) {  // the chunk's row nearest the mean
    per_chunk[static_cast<size_t>(chunk)] =
        scan_herding_chunk(x, n, d, scale, distances, chunks, chunk, mean.data(), nullptr);
  };
  const int team_size = team_threads(threads, fixed_team, n * d * static_cast<int64_t>(sizeof(T)));
  with_chunk_team(team_size, [&](ChunkTeam& team) {
    column_sums(x, n, d, team, vectorized, sums.data());
    for (int64_t t = 0; t < d; ++t) mean[t] = static_cast<float>(sums[t] / static_cast<double>(n) * scale);
    team.run(chunks.count, scan_chunk);
  });
  return merge(per_chunk, [](float a, float b) { return a < b; }).index;
}

template <typename T>
void herding(const T* x, int64_t n, int64_t d, float scale, int64_t k, int64_t* out, uint8_t* selected,
             int threads, bool fixed_team, bool vectorized) {
  const RowDistances<T> distances = row_distances_for_cpu<T>(vectorized, n, d);
  const RowChunks chunks = row_chunks(n, d * static_cast<int64_t>(sizeof(T)));
  // The mean in double (no overflow before scaling), the same on any team (see column_sums).
  std::vector<double> mean(static_cast<size_t>(d), 0.0), chosen_sum(static_cast<size_t>(d), 0.0);

  for (int64_t j = 0; j < n; ++j) selected[j] = 0;
  std::vector<float> target(static_cast<size_t>(d));
  std::vector<Best> per_chunk(static_cast<size_t>(chunks.count));
  auto scan_chunk = [&](int64_t chunk) {
    per_chunk[static_cast<size_t>(chunk)] =
        scan_herding_chunk(x, n, d, scale, distances, chunks, chunk, target.data(), selected);
  };

  const int team_size = team_threads(threads, fixed_team, n * d * static_cast<int64_t>(sizeof(T)));
  with_chunk_team(team_size, [&](ChunkTeam& team) {
    TeamOrAlone choice(team.size() > 1, !fixed_team);
    column_sums(x, n, d, team, vectorized, mean.data());
    for (int64_t t = 0; t < d; ++t) mean[t] = mean[t] / static_cast<double>(n) * scale;
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t t = 0; t < d; ++t) target[t] = static_cast<float>((i + 1) * mean[t] - chosen_sum[t]);
      timed_run(team, choice, i, chunks.count, scan_chunk);
      const Best best = merge(per_chunk, [](float a, float b) { return a < b; });
      out[i] = best.index;
      selected[best.index] = 1;
      const T* row = x + best.index * d;
      for (int64_t t = 0; t < d; ++t) chosen_sum[t] += to_float(row[t]) * scale;
    }
  });
}

// The highest-level cache CPU 0 lists in sysfs (8 MiB on the znver1 VM, where sysconf reports the host's 64 MiB),
// else sysconf's L3, else 8 MiB.
int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    int64_t best_level = 0, best = 0;
    for (int index = 0; index < 16; ++index) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
      std::ifstream level_file(dir + "level"), size_file(dir + "size");
      int64_t level = 0, size = 0;
      std::string unit;
      if (!(level_file >> level) || !(size_file >> size)) continue;
      size_file >> unit;  // "8192K", read as 8192 then "K"
      if (unit == "K") size <<= 10;
      else if (unit == "M") size <<= 20;
      if (level > best_level && size > 0) best_level = level, best = size;
    }
#ifdef _SC_LEVEL3_CACHE_SIZE
    if (best_level < 3) best = std::max<int64_t>(best, sysconf(_SC_LEVEL3_CACHE_SIZE));
#endif
    return best > 0 ? best : int64_t{8} << 20;
  }();
  return bytes;
}

#define ERASUS_INSTANTIATE(T)                                                                                    \
  template float kcenter_greedy<T>(const T*, int64_t, int64_t, float, const int64_t*, int64_t, int64_t,          \
                                   int64_t*, float*, bool, int, bool, bool);                                     \
  template void herding<T>(const T*, int64_t, int64_t, float, int64_t, int64_t*, uint8_t*, int, bool, bool);     \
  template int64_t row_nearest_mean<T>(const T*, int64_t, int64_t, float, int, bool, bool);                      \
  template void row_distances<T>(const T*, int64_t, int64_t, float, const float*, float*, int, bool, bool);      \
  template int64_t kcenter_step<T>(const T*, int64_t, int64_t, float, const float*, int32_t, float*, int32_t*,   \
                                   const float*, float*, int, bool, bool);                                       \
  template int64_t herding_step<T>(const T*, int64_t, int64_t, float, const float*, const uint8_t*, float*, int, \
                                   bool, bool);

ERASUS_INSTANTIATE(float)
ERASUS_INSTANTIATE(half_bits)
ERASUS_INSTANTIATE(bf16_bits)
#undef ERASUS_INSTANTIATE

}  // namespace erasus

#include "dual_sensitivity.h"

#include <algorithm>
#include <cfloat>
#include <climits>
#include <vector>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define ERASUS_X86_VECTOR_MASK 1
#endif

#include "element.h"
#include "parallel.h"

namespace erasus {
namespace {

constexpr int64_t kLevel0Bins = 32768;  // key >> 16 of a non-negative float: 15 bits
constexpr int64_t kLevel1Bins = 65536;  // the low 16 bits
// Sub-histograms per thread: consecutive elements often share a bin (scores of one layer cluster), and one
// histogram would then serialise on the store-to-load dependency of its increments.
constexpr int64_t kSubHistograms = 4;
// uint32 sub-counts are flushed into the int64 totals at least this often, so they can never wrap.
constexpr int64_t kFlushEvery = int64_t{1} << 30;

// Keys are computed a tile at a time into a small buffer, in a branch-free loop the compiler vectorises
// (the division dominates the arithmetic); the histogram and the candidate scan then read the buffer.
constexpr int64_t kTile = 512;
// The candidate scan skips runs of this many elements with no key in the bracket (a sampled bracket leaves a
// few candidates in most tiles; a scalar scan of every tile would cost as much as the vectorised pass).
constexpr int64_t kRun = 32;

inline bool valid(float v) { return v >= 0.f && v <= FLT_MAX; }  // false for negatives, NaN and infinity

// keys[j] = bits of f / (r + eps) with the sign cleared, for j < len; returns how many elements were invalid.
template <typename T>
inline int64_t score_keys(const T* f, const T* r, int64_t len, float eps, uint32_t* keys) {
  int64_t bad = 0;
#pragma omp simd reduction(+ : bad)
  for (int64_t j = 0; j < len; ++j) {
    const float fv = to_float(f[j]), rv = to_float(r[j]);
    // bitwise, not &&: a branch would keep the loop from vectorising
    bad += 1 - (int(fv >= 0.f) & int(fv <= FLT_MAX) & int(rv >= 0.f) & int(rv <= FLT_MAX));
    keys[j] = float_to_bits(fv / (rv + eps)) & 0x7fffffffu;
  }
  return bad;
}

template <bool kLevel1, typename T>
int64_t histogram_block(const T* f, const T* r, int64_t begin, int64_t end, float eps, uint32_t prefix,
                        std::vector<uint32_t>& sub, std::vector<int64_t>& total) {
  constexpr int64_t bins = kLevel1 ? kLevel1Bins : kLevel0Bins;
  alignas(64) uint32_t keys[kTile];
  int64_t bad = 0;
  for (int64_t chunk = begin; chunk < end; chunk += kFlushEvery) {
    const int64_t stop = chunk + kFlushEvery < end ? chunk + kFlushEvery : end;
    for (int64_t i = chunk; i < stop; i += kTile) {
      const int64_t len = stop - i < kTile ? stop - i : kTile;
      const int64_t tile_bad = score_keys(f + i, r + i, len, eps, keys);
      if (tile_bad) {  // rare (the call then fails): leave the invalid elements out of the counts
        bad += tile_bad;
        for (int64_t j = 0; j < len; ++j)
          if (!(valid(to_float(f[i + j])) && valid(to_float(r[i + j])))) keys[j] = 0xffffffffu;
      }
      for (int64_t j = 0; j < len; ++j) {
        const uint32_t key = keys[j];
        if (key == 0xffffffffu) continue;
        uint32_t* h = sub.data() + (j & (kSubHistograms - 1)) * bins;
        if (kLevel1) {
          if ((key >> 16) == prefix) ++h[key & 0xffffu];
        } else {
          ++h[key >> 16];
        }
      }
    }
    for (int64_t s = 0; s < kSubHistograms; ++s)
      for (int64_t b = 0; b < bins; ++b) {
        total[b] += sub[s * bins + b];
        sub[s * bins + b] = 0;
      }
  }
  return bad;
}

// One thread's candidates, written through raw pointers into buffers kept per thread across calls (OpenMP's
// pool threads live on), so repeated calls reuse the capacity instead of faulting in fresh pages for every
// listing (measured: 252k candidates cost 20 ms in fresh vectors, about as much as the streaming pass itself).
// A thread lists at most `cap` candidates; past that it only notes the overflow (the caller then fails the
// bracket), so a bracket far too wide never grows the buffers beyond the caller's capacity.
struct Candidates {
  std::vector<int64_t> index;
  std::vector<int32_t> key;
  int64_t count = 0;
  int64_t cap = 0;
  bool overflow = false;
  int64_t above = 0;
  int64_t bad = 0;

  void start(int64_t capacity) {
    count = 0;
    cap = capacity;
    overflow = false;
  }
  // Whether `extra` more candidates may be written at index.data() + count (grown if needed).
  bool room(int64_t extra) {
    if (count + extra <= static_cast<int64_t>(index.size())) return true;
    if (count >= cap) {
      overflow = true;
      return false;
    }
    const int64_t size = std::min<int64_t>(std::max<int64_t>({2 * static_cast<int64_t>(index.size()),
                                                              count + extra, 4096}),
                                           cap + extra);
    index.resize(static_cast<size_t>(size));
    key.resize(static_cast<size_t>(size));
    return true;
  }
  void add(int64_t i, int32_t k) {
    if (!room(1)) return;
    index[static_cast<size_t>(count)] = i;
    key[static_cast<size_t>(count)] = k;
    ++count;
  }
  bool full() const { return overflow || count > cap; }
};

Candidates& thread_candidates() {
  static thread_local Candidates candidates;
  return candidates;
}

}  // namespace

template <typename T>
void dual_sample_keys(const T* f, const T* r, float eps, const int64_t* starts, int64_t n_blocks, int64_t block,
                      int32_t* keys) {
  // Serial (a few hundred kB of scattered reads, no team worth waking), but with the block after next
  // prefetched: each block starts with a DRAM miss, and without this the misses would come one at a time.
  constexpr int64_t kAhead = 2;
  const int64_t line = 64 / static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < n_blocks; ++b) {
    if (b + kAhead < n_blocks)
      for (int64_t j = 0; j < block; j += line) {
        __builtin_prefetch(f + starts[b + kAhead] + j);
        __builtin_prefetch(r + starts[b + kAhead] + j);
      }
    score_keys(f + starts[b], r + starts[b], block, eps, reinterpret_cast<uint32_t*>(keys + b * block));
  }
}

template <typename T>
int64_t dual_score_histogram(const T* f, const T* r, int64_t n, float eps, int level, uint32_t prefix,
                             int64_t* hist) {
  const int64_t bins = level == 0 ? kLevel0Bins : kLevel1Bins;
  std::vector<std::vector<int64_t>> per_thread(static_cast<size_t>(max_threads()));
  std::vector<int64_t> bad(per_thread.size(), 0);
  parallel_blocks(n, [&](int64_t begin, int64_t end, int tid) {
    std::vector<uint32_t> sub(static_cast<size_t>(kSubHistograms * bins), 0u);
    std::vector<int64_t>& total = per_thread[tid];
    total.assign(static_cast<size_t>(bins), 0);
    bad[tid] = level == 0 ? histogram_block<false>(f, r, begin, end, eps, prefix, sub, total)
                          : histogram_block<true>(f, r, begin, end, eps, prefix, sub, total);
  });
  int64_t n_bad = 0;
  for (size_t t = 0; t < per_thread.size(); ++t) {
    n_bad += bad[t];
    for (int64_t b = 0; b < static_cast<int64_t>(per_thread[t].size()); ++b) hist[b] += per_thread[t][b];
  }
  return n_bad;
}

namespace {

// The portable mask pass over [begin, end): keys a tile at a time, then compare, pack and list, in loops the
// compiler vectorises at the build's vector width.
template <typename T>
void mask_block_portable(const T* f, const T* r, int64_t begin, int64_t end, float eps, uint32_t lo, uint32_t hi,
                         uint8_t* mask, Candidates& mine) {
  alignas(64) uint32_t keys[kTile];
  int64_t above = 0, bad = 0;
  for (int64_t i = begin; i < end; i += kTile) {
    const int64_t len = end - i < kTile ? end - i : kTile;
    bad += score_keys(f + i, r + i, len, eps, keys);
    // 32-bit lanes throughout (a bool or a byte store in the same loop keeps it from vectorising); the bytes
    // are packed in a second loop over the tile, from a buffer that cannot alias the mask
    alignas(64) uint32_t over[kTile];
    alignas(64) uint32_t inside[kTile];
    uint32_t above_tile = 0, listed = 0;
#pragma omp simd reduction(+ : above_tile, listed)
    for (int64_t j = 0; j < len; ++j) {
      const uint32_t key = keys[j];
      over[j] = uint32_t(key > hi);
      above_tile += over[j];
      inside[j] = uint32_t(key >= lo) & uint32_t(key <= hi);
      listed += inside[j];
    }
    uint8_t* __restrict__ out = mask + i;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) out[j] = static_cast<uint8_t>(over[j]);
    above += above_tile;
    if (listed) {  // a few keys of the bracket, kept in index order; runs without one are skipped whole
      for (int64_t s = 0; s < len; s += kRun) {
        const int64_t stop = s + kRun < len ? s + kRun : len;
        uint32_t any = 0;
        for (int64_t j = s; j < stop; ++j) any |= inside[j];
        if (!any) continue;
        for (int64_t j = s; j < stop; ++j)
          if (inside[j]) mine.add(i + j, static_cast<int32_t>(keys[j]));
      }
    }
  }
  mine.above = above;
  mine.bad = bad;
}

#ifdef ERASUS_X86_VECTOR_MASK
// Layers at least this long get their mask written with non-temporal stores: the mask is not read again soon,
// and a streaming store skips the read-for-ownership an ordinary store of a line not in cache pays.
constexpr int64_t kStreamMaskFrom = int64_t{1} << 22;
constexpr int64_t kPrefetchBytes = 8192;

bool cpu_has_vector_mask() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return ok;
}

#define ERASUS_AVX2 __attribute__((target("avx2,f16c")))
ERASUS_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
ERASUS_AVX2 inline __m256 load8(const half_bits* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
ERASUS_AVX2 inline __m256 load8(const bf16_bits* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// The mask pass in one fused 256-bit loop, 32 elements per iteration: score (the same IEEE division as the
// portable path, so the same keys), compare as signed 32-bit lanes (keys have the sign bit clear; lo and hi are
// clamped into that range with the same meaning), pack the 32 compare lanes into 32 mask bytes with two pack
// instructions; one test of the OR of the bracket compares skips the common iteration (no candidate), and the
// rare one lists its candidates from movemasks. Elements before the first 32-byte-aligned mask address and the
// tail run through scalar code.
// kList: some keys can be inside the bracket (lo <= hi); kStream: non-temporal mask stores. Both are template
// arguments so that the hot loop tests neither.
template <bool kList, bool kStream, typename T>
ERASUS_AVX2 void mask_block_avx2_loop(const T* f, const T* r, int64_t begin, int64_t end, float eps, uint32_t lo,
                                      uint32_t hi, uint8_t* mask, Candidates& mine) {
  const int32_t hi_s = hi > 0x7fffffffu ? 0x7fffffff : static_cast<int32_t>(hi);
  const int32_t lo_s = kList ? static_cast<int32_t>(lo) : 0x7fffffff;
  int64_t above = 0, bad = 0;
  auto scalar = [&](int64_t j) {
    const float fv = to_float(f[j]), rv = to_float(r[j]);
    bad += !(valid(fv) && valid(rv));
    const int32_t key = static_cast<int32_t>(float_to_bits(fv / (rv + eps)) & 0x7fffffffu);
    mask[j] = static_cast<uint8_t>(key > hi_s);
    above += key > hi_s;
    if (kList && key >= lo_s && key <= hi_s) mine.add(j, key);
  };
  int64_t i = begin;
  while (i < end && (reinterpret_cast<uintptr_t>(mask + i) & 31u)) scalar(i++);
  const __m256 veps = _mm256_set1_ps(eps);
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), vhi = _mm256_set1_epi32(hi_s);
  const __m256i vlo_minus_1 = _mm256_set1_epi32(lo_s - 1);  // lo_s >= 0, so no overflow
  const __m256i byte_one = _mm256_set1_epi8(1), lane_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  // Validity in two integer ops per 8 elements: the raw bits of every valid value (+0 up to FLT_MAX) are at
  // most 0x7F7FFFFF as unsigned, while negatives, infinities and NaN lie above. The running unsigned maximum of
  // an iteration's bits is compared once (with the sign flipped, as signed); -0.0, valid but above, sends the
  // iteration through the exact scalar count like any suspect one.
  const __m256i flip = _mm256_set1_epi32(INT32_MIN), largest_valid = _mm256_set1_epi32(0x7F7FFFFF ^ INT32_MIN);
  auto key8 = [&](int64_t at) {  // the keys of the 8 elements at `at`
    const __m256 fv = load8(f + at), rv = load8(r + at);
    return _mm256_and_si256(_mm256_castps_si256(_mm256_div_ps(fv, _mm256_add_ps(rv, veps))), abs_mask);
  };
  // Few registers live across an iteration (GCC spilled the keys and compares of all four quarters otherwise):
  // the compares are packed a pair at a time, and the rare listing recomputes its keys.
  // f and r are prefetched kPrefetchBytes ahead: with the hardware prefetcher alone the pass took 1.5-2.5 ms
  // longer at 50M units (20.6-21.7 -> 18.0-19.0 ms without candidates; 1024-4096 floats ahead all did as well).
  constexpr int64_t ahead = kPrefetchBytes / static_cast<int64_t>(sizeof(T));
  for (; i + 32 <= end; i += 32) {
    if (i + ahead + 32 <= end) {
      const char* pf = reinterpret_cast<const char*>(f + i + ahead);
      const char* pr = reinterpret_cast<const char*>(r + i + ahead);
      for (int64_t b = 0; b < 32 * static_cast<int64_t>(sizeof(T)); b += 64) {
        _mm_prefetch(pf + b, _MM_HINT_T0);
        _mm_prefetch(pr + b, _MM_HINT_T0);
      }
    }
    __m256i seen = _mm256_setzero_si256(), any = _mm256_setzero_si256(), pair[2];
    for (int h = 0; h < 2; ++h) {
      __m256i over[2];
      for (int q = 0; q < 2; ++q) {
        const int64_t at = i + 16 * h + 8 * q;
        const __m256 fv = load8(f + at), rv = load8(r + at);
        seen = _mm256_max_epu32(seen, _mm256_max_epu32(_mm256_castps_si256(fv), _mm256_castps_si256(rv)));
        const __m256i key =
            _mm256_and_si256(_mm256_castps_si256(_mm256_div_ps(fv, _mm256_add_ps(rv, veps))), abs_mask);
        over[q] = _mm256_cmpgt_epi32(key, vhi);
        if (kList) any = _mm256_or_si256(any, _mm256_andnot_si256(over[q], _mm256_cmpgt_epi32(key, vlo_minus_1)));
      }
      pair[h] = _mm256_packs_epi32(over[0], over[1]);
    }
    const __m256i suspect = _mm256_cmpgt_epi32(_mm256_xor_si256(seen, flip), largest_valid);
    if (!_mm256_testz_si256(suspect, suspect))  // rare (the call then fails): count them exactly
      for (int j = 0; j < 32; ++j) bad += !(valid(to_float(f[i + j])) && valid(to_float(r[i + j])));
    // 4 x 8 lanes of 0 / -1 -> 32 bytes; the packs work within 128-bit halves, the permute restores the order
    __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(pair[0], pair[1]), lane_order);
    above += __builtin_popcount(static_cast<uint32_t>(_mm256_movemask_epi8(bytes)));
    bytes = _mm256_and_si256(bytes, byte_one);
    if (kStream)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(mask + i), bytes);
    else
      _mm256_store_si256(reinterpret_cast<__m256i*>(mask + i), bytes);
    if (!kList || _mm256_testz_si256(any, any) || !mine.room(32)) continue;  // most iterations list nothing
    // candidates in index order, through raw pointers (no per-candidate check)
    alignas(32) int32_t keys[32];
    uint32_t listed = 0;
    for (int q = 0; q < 4; ++q) {
      const __m256i key = key8(i + 8 * q);
      const __m256i in = _mm256_andnot_si256(_mm256_cmpgt_epi32(key, vhi), _mm256_cmpgt_epi32(key, vlo_minus_1));
      listed |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(in))) << (8 * q);
      _mm256_store_si256(reinterpret_cast<__m256i*>(keys + 8 * q), key);
    }
    int64_t* out_index = mine.index.data();
    int32_t* out_key = mine.key.data();
    int64_t c = mine.count;
    while (listed) {
      const int j = __builtin_ctz(listed);
      listed &= listed - 1;
      out_index[c] = i + j;
      out_key[c] = keys[j];
      ++c;
    }
    mine.count = c;
  }
  for (; i < end; ++i) scalar(i);
  if (kStream) _mm_sfence();  // the streamed mask is visible before the pass returns
  mine.above = above;
  mine.bad = bad;
}

template <typename T>
void mask_block_avx2(const T* f, const T* r, int64_t begin, int64_t end, float eps, uint32_t lo, uint32_t hi,
                     uint8_t* mask, Candidates& mine, bool stream) {
  const bool list = !(lo > hi || lo > 0x7fffffffu);
  if (list && stream) return mask_block_avx2_loop<true, true>(f, r, begin, end, eps, lo, hi, mask, mine);
  if (list) return mask_block_avx2_loop<true, false>(f, r, begin, end, eps, lo, hi, mask, mine);
  if (stream) return mask_block_avx2_loop<false, true>(f, r, begin, end, eps, lo, hi, mask, mine);
  mask_block_avx2_loop<false, false>(f, r, begin, end, eps, lo, hi, mask, mine);
}
#endif

}  // namespace

bool dual_mask_vectorized_available() {
#ifdef ERASUS_X86_VECTOR_MASK
  return cpu_has_vector_mask();
#else
  return false;
#endif
}

namespace {

// The mask pass over [0, n) on OpenMP's threads, each listing its block's candidates into its own buffer.
// Returns the threads' buffers in block order (so their candidates are in index order; nullptr for a thread the
// split did not use) and fills above / bad / listed / full.
template <typename T>
std::vector<Candidates*> mask_pass(const T* f, const T* r, int64_t n, float eps, uint32_t lo, uint32_t hi,
                                   uint8_t* mask, int64_t cap, bool vectorized, int64_t* above, int64_t* bad,
                                   int64_t* listed, bool* full) {
  std::vector<Candidates*> per_thread(static_cast<size_t>(max_threads()), nullptr);
  const bool fused = vectorized && dual_mask_vectorized_available();
  parallel_blocks(n, [&, lo, hi, eps, fused, cap](int64_t begin, int64_t end, int tid) {
    // lo, hi and eps are captured by value: read through the closure's references they could alias the
    // tile buffers, and the compare loops would not vectorise (2.2x slower pass)
    Candidates& mine = thread_candidates();
    mine.start(cap);
    per_thread[tid] = &mine;
#ifdef ERASUS_X86_VECTOR_MASK
    if (fused) {
      mask_block_avx2(f, r, begin, end, eps, lo, hi, mask, mine, n >= kStreamMaskFrom);
      return;
    }
#endif
    mask_block_portable(f, r, begin, end, eps, lo, hi, mask, mine);
  });
  *above = *bad = *listed = 0;
  *full = false;
  for (const Candidates* c : per_thread) {
    if (c == nullptr) continue;
    *listed += c->count;
    *above += c->above;
    *bad += c->bad;
    *full = *full || c->full();
  }
  *full = *full || *listed > cap;
  return per_thread;
}

// Copies the threads' candidates, in block order, to index_out / key_out; returns how many.
int64_t copy_candidates(const std::vector<Candidates*>& per_thread, int64_t* index_out, int32_t* key_out) {
  int64_t at = 0;
  for (const Candidates* c : per_thread) {  // thread blocks are ordered by index: candidates stay in index order
    if (c == nullptr) continue;
    std::copy(c->index.data(), c->index.data() + c->count, index_out + at);
    std::copy(c->key.data(), c->key.data() + c->count, key_out + at);
    at += c->count;
  }
  return at;
}

// The need-th largest of keys[0, n) (1 <= need <= n; keys >= 0), and in *n_above how many keys exceed it: a
// 4096-bin histogram of the keys' top bits over their range (small enough to stay in L1), then a selection among
// the keys of the one bin that holds it.
int32_t nth_largest_key(const int32_t* keys, int64_t n, int64_t need, int64_t* n_above) {
  int32_t low = keys[0], high = keys[0];
  for (int64_t j = 1; j < n; ++j) {
    low = std::min(low, keys[j]);
    high = std::max(high, keys[j]);
  }
  const uint32_t range = static_cast<uint32_t>(high) - static_cast<uint32_t>(low);
  int shift = 0;
  while ((range >> shift) >= 4096u) ++shift;
  std::vector<int64_t> hist(static_cast<size_t>((range >> shift) + 1), 0);
  auto bin_of = [&](int32_t k) { return static_cast<int64_t>((static_cast<uint32_t>(k) - static_cast<uint32_t>(low)) >> shift); };
  for (int64_t j = 0; j < n; ++j) ++hist[static_cast<size_t>(bin_of(keys[j]))];
  int64_t bin = static_cast<int64_t>(hist.size()) - 1, above = 0;
  while (above + hist[static_cast<size_t>(bin)] < need) above += hist[static_cast<size_t>(bin--)];
  std::vector<int32_t> in_bin;
  in_bin.reserve(static_cast<size_t>(hist[static_cast<size_t>(bin)]));
  for (int64_t j = 0; j < n; ++j)
    if (bin_of(keys[j]) == bin) in_bin.push_back(keys[j]);
  const int64_t rank = need - above;  // 1-based, largest first, within the bin
  auto nth = in_bin.begin() + (static_cast<int64_t>(in_bin.size()) - rank);
  std::nth_element(in_bin.begin(), nth, in_bin.end());
  const int32_t t = *nth;
  for (auto it = nth + 1; it != in_bin.end(); ++it) above += *it > t;  // those after nth are >= t
  *n_above = above;
  return t;
}

}  // namespace

template <typename T>
int64_t dual_mask(const T* f, const T* r, int64_t n, float eps, uint32_t lo, uint32_t hi, uint8_t* mask,
                  int64_t* cand_index, int32_t* cand_key, int64_t cand_cap, int64_t* n_cand, int64_t* n_bad,
                  bool vectorized) {
  int64_t above = 0, listed = 0;
  bool full = false;
  const std::vector<Candidates*> per_thread =
      mask_pass(f, r, n, eps, lo, hi, mask, cand_cap, vectorized, &above, n_bad, &listed, &full);
  *n_cand = listed;
  if (full) return -1;
  copy_candidates(per_thread, cand_index, cand_key);
  return above;
}

template <typename T>
int64_t dual_mask_collect(const T* f, const T* r, int64_t n, float eps, uint32_t lo, uint32_t hi, uint8_t* mask,
                          DualCandidates& out, int64_t cap, int64_t* n_bad, bool vectorized) {
  int64_t above = 0, listed = 0;
  bool full = false;
  const std::vector<Candidates*> per_thread =
      mask_pass(f, r, n, eps, lo, hi, mask, cap - out.count, vectorized, &above, n_bad, &listed, &full);
  out.layer_begin.push_back(out.count);
  if (full) return -1;
  if (out.count + listed > static_cast<int64_t>(out.index.size())) {
    out.index.resize(static_cast<size_t>(out.count + listed));
    out.key.resize(static_cast<size_t>(out.count + listed));
  }
  out.count += copy_candidates(per_thread, out.index.data() + out.count, out.key.data() + out.count);
  return above;
}

void dual_keys_at_ranks(const int32_t* keys, int64_t n, const int64_t* ranks, int64_t n_ranks, int32_t* out) {
  if (n_ranks == 0) return;
  const int64_t deepest = *std::max_element(ranks, ranks + n_ranks);
  // The ranks a bracket needs are near the top: select among the keys at or above a rough threshold read off
  // every 16th key (a few percent of them), or among all when that set turns out too small.
  static thread_local std::vector<int32_t> pool;
  pool.clear();
  const int64_t every = (n + 15) / 16, rough = 2 * (deepest / 16) + 64;
  if (every > 64 && rough < every) {
    for (int64_t j = 0; j < n; j += 16) pool.push_back(keys[j]);
    std::nth_element(pool.begin(), pool.end() - 1 - rough, pool.end());
    const int32_t threshold = *(pool.end() - 1 - rough);
    pool.clear();
    for (int64_t j = 0; j < n; ++j)
      if (keys[j] >= threshold) pool.push_back(keys[j]);
  }
  if (static_cast<int64_t>(pool.size()) <= deepest) pool.assign(keys, keys + n);
  for (int64_t q = 0; q < n_ranks; ++q) {
    auto nth = pool.end() - 1 - ranks[q];
    std::nth_element(pool.begin(), nth, pool.end());
    out[q] = *nth;
  }
}

int32_t dual_choose_and_mark(const DualCandidates& c, int64_t need, uint8_t* const* masks) {
  int64_t n_above = 0;
  const int32_t t = nth_largest_key(c.key.data(), c.count, need, &n_above);
  const int64_t* index = c.index.data();
  const int32_t* key = c.key.data();
  const std::vector<int64_t>& starts = c.layer_begin;
  // The layer of candidate j: the last layer starting at or before j (an empty layer shares its start with the
  // next one, which holds the candidates).
  auto layer_of = [&](int64_t j) {
    return static_cast<size_t>(std::upper_bound(starts.begin(), starts.end(), j) - starts.begin() - 1);
  };
  // Keys above t on OpenMP's threads (disjoint mask bytes). Each write misses the cache (the pass streamed the
  // mask out of it), so the line of the write 16 candidates ahead is prefetched.
  parallel_blocks(c.count, [&](int64_t begin, int64_t end, int) {
    if (begin >= end) return;
    size_t l = layer_of(begin);
    int64_t layer_end = l + 1 < starts.size() ? starts[l + 1] : c.count;
    for (int64_t j = begin; j < end; ++j) {
      while (j >= layer_end) layer_end = ++l + 1 < starts.size() ? starts[l + 1] : c.count;
      if (j + 16 < layer_end) __builtin_prefetch(masks[l] + index[j + 16], 1);
      if (key[j] > t) masks[l][index[j]] = 1;
    }
  });
  // The first need - n_above keys equal to t, in position order, on this thread (usually one or a few).
  int64_t ties = need - n_above;
  for (int64_t j = 0; j < c.count && ties > 0; ++j)
    if (key[j] == t) {
      masks[layer_of(j)][index[j]] = 1;
      --ties;
    }
  return t;
}

#define ERASUS_INSTANTIATE(T)                                                                                 \
  template int64_t dual_score_histogram<T>(const T*, const T*, int64_t, float, int, uint32_t, int64_t*);      \
  template void dual_sample_keys<T>(const T*, const T*, float, const int64_t*, int64_t, int64_t, int32_t*);     \
  template int64_t dual_mask<T>(const T*, const T*, int64_t, float, uint32_t, uint32_t, uint8_t*, int64_t*,  \
                                int32_t*, int64_t, int64_t*, int64_t*, bool);                                \
  template int64_t dual_mask_collect<T>(const T*, const T*, int64_t, float, uint32_t, uint32_t, uint8_t*,       \
                                        DualCandidates&, int64_t, int64_t*, bool);

ERASUS_INSTANTIATE(float)
ERASUS_INSTANTIATE(half_bits)
ERASUS_INSTANTIATE(bf16_bits)
#undef ERASUS_INSTANTIATE

}  // namespace erasus

#include "dual_sensitivity.h"

#include <cfloat>
#include <vector>

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

// One thread's candidates. Kept per thread across calls (OpenMP's pool threads live on), so repeated calls
// reuse the capacity instead of faulting in fresh pages for every listing (measured: 252k candidates cost
// 20 ms in fresh vectors, about as much as the streaming pass itself). Holds at most the largest listing seen.
struct Candidates {
  std::vector<int64_t> index;
  std::vector<int32_t> key;
  int64_t above = 0;
  int64_t bad = 0;
};

Candidates& thread_candidates() {
  static thread_local Candidates candidates;
  return candidates;
}

}  // namespace

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

template <typename T>
int64_t dual_mask(const T* f, const T* r, int64_t n, float eps, uint32_t lo, uint32_t hi, uint8_t* mask,
                  int64_t* cand_index, int32_t* cand_key, int64_t cand_cap, int64_t* n_cand, int64_t* n_bad) {
  std::vector<Candidates*> per_thread(static_cast<size_t>(max_threads()), nullptr);
  parallel_blocks(n, [&, lo, hi, eps](int64_t begin, int64_t end, int tid) {
    // lo, hi and eps are captured by value: read through the closure's references they could alias the
    // tile buffers, and the compare loops below would not vectorise (2.2x slower pass)
    Candidates& mine = thread_candidates();
    mine.index.clear();
    mine.key.clear();
    per_thread[tid] = &mine;
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
            if (inside[j]) {
              mine.index.push_back(i + j);
              mine.key.push_back(static_cast<int32_t>(keys[j]));
            }
        }
      }
    }
    mine.above = above;
    mine.bad = bad;
  });
  int64_t count = 0, above = 0;
  *n_bad = 0;
  for (const Candidates* c : per_thread) {
    if (c == nullptr) continue;  // a thread the block split did not use
    count += static_cast<int64_t>(c->index.size());
    above += c->above;
    *n_bad += c->bad;
  }
  *n_cand = count;
  if (count > cand_cap) return -1;
  int64_t at = 0;
  for (const Candidates* c : per_thread) {  // thread blocks are ordered by index: candidates stay in index order
    if (c == nullptr) continue;
    for (size_t j = 0; j < c->index.size(); ++j, ++at) {
      cand_index[at] = c->index[j];
      cand_key[at] = c->key[j];
    }
  }
  return above;
}

#define ERASUS_INSTANTIATE(T)                                                                                 \
  template int64_t dual_score_histogram<T>(const T*, const T*, int64_t, float, int, uint32_t, int64_t*);      \
  template int64_t dual_mask<T>(const T*, const T*, int64_t, float, uint32_t, uint32_t, uint8_t*, int64_t*,  \
                                int32_t*, int64_t, int64_t*, int64_t*);

ERASUS_INSTANTIATE(float)
ERASUS_INSTANTIATE(half_bits)
ERASUS_INSTANTIATE(bf16_bits)
#undef ERASUS_INSTANTIATE

}  // namespace erasus

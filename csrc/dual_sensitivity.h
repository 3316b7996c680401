// Dual-sensitivity scores S = f / (r + eps) and a radix select over their float bits, on raw arrays.
// Nothing here knows about Python or torch; the selection logic (which bin, which candidates) is the caller's.
#pragma once
#include <cstdint>
#include <vector>

namespace erasus {

// The key of a score: its float32 bits with the sign cleared (S >= 0, and -0 counts as 0), so keys order like
// the scores. Every backend computes S in float32 as widen(f) / (widen(r) + eps) with IEEE division.

// Histogram pass, fused with the scoring. level 0: hist[key >> 16] += 1 for every element (32768 bins).
// level 1: hist[key & 0xffff] += 1 for the elements whose key >> 16 == prefix (65536 bins).
// hist is accumulated into (+=), so the layers of a model share one histogram. Returns the number of
// invalid elements (f or r negative, NaN or infinite); they are not counted in hist.
template <typename T>
int64_t dual_score_histogram(const T* f, const T* r, int64_t n, float eps, int level, uint32_t prefix, int64_t* hist);

// The keys of n_blocks runs of `block` consecutive elements starting at starts[b] (each run inside [0, n)),
// into keys[b * block + j]: the scores a sampled bracket is estimated from. Invalid elements get some key;
// the mask pass that follows finds and reports them.
template <typename T>
void dual_sample_keys(const T* f, const T* r, float eps, const int64_t* starts, int64_t n_blocks, int64_t block,
                      int32_t* keys);

// out[j] = the key at 0-based rank ranks[j] of keys[0, n), counting from the largest (0 <= ranks[j] < n), by
// selections (linear), not a sort; fastest for ranks near the top.
void dual_keys_at_ranks(const int32_t* keys, int64_t n, const int64_t* ranks, int64_t n_ranks, int32_t* out);

// Mask pass: mask[i] = key_i > hi. The elements with lo <= key_i <= hi are candidates: their indices and keys
// are written to cand_index / cand_key in index order (at most cand_cap; more is an error, reported by
// returning -1 and writing nothing to the candidates; the pass stops listing there, so n_cand is then some
// count above cand_cap, not the total). n_cand receives their number, n_bad the number of
// invalid elements (as in dual_score_histogram; their mask entries are meaningless).
// Returns the number of elements with key > hi. vectorized: use the fused 256-bit loop where the CPU has AVX2
// and F16C (checked at run time; else, or when false, the portable loop); both give the same results.
template <typename T>
int64_t dual_mask(const T* f, const T* r, int64_t n, float eps, uint32_t lo, uint32_t hi, uint8_t* mask,
                  int64_t* cand_index, int32_t* cand_key, int64_t cand_cap, int64_t* n_cand, int64_t* n_bad,
                  bool vectorized = true);

// The candidates of one selection over several layers: layer-local indices and keys in position order, and
// where each layer's entries begin (layer l: [layer_begin[l], layer_begin[l + 1]), the last up to count).
// The vectors may hold more than count entries (their capacity is kept between selections).
struct DualCandidates {
  std::vector<int64_t> index;
  std::vector<int32_t> key;
  std::vector<int64_t> layer_begin;
  int64_t count = 0;

  void clear() {
    count = 0;
    layer_begin.clear();
  }
};

// dual_mask for one layer of a selection over several: appends the layer's candidates to `out` (its
// layer_begin gets the layer's first entry). Returns the number of elements with key > hi, or -1 once out would
// hold more than cap candidates (the layer's candidates are then not appended).
template <typename T>
int64_t dual_mask_collect(const T* f, const T* r, int64_t n, float eps, uint32_t lo, uint32_t hi, uint8_t* mask,
                          DualCandidates& out, int64_t cap, int64_t* n_bad, bool vectorized = true);

// Resolves a selection: t = the need-th largest candidate key (1 <= need <= c.count); sets masks[l][index] = 1
// for every candidate with key > t, and for the first (need - #keys above t) with key == t in position order.
// Returns t. Linear in the candidates (a histogram of their keys, then a selection within one bin).
int32_t dual_choose_and_mark(const DualCandidates& c, int64_t need, uint8_t* const* masks);

// Whether dual_mask's fused 256-bit loop can run on this CPU (x86-64 with AVX2 and F16C).
bool dual_mask_vectorized_available();

}  // namespace erasus

// Coreset distance loops on raw row-major arrays. Nothing here knows about Python or torch.
#pragma once
#include <cstdint>

namespace erasus {

// Both loops read the rows of x (n x d, row-major) times `scale`: pass a power of two that brings the largest
// |x| near 1 when it is far from 1, so that squared distances cannot overflow or underflow float32 (the
// selection does not change; the squared radius comes back in the scaled units).
//
// threads: at most this many threads (0: every thread OpenMP offers), capped by the CPUs this process may use,
// and one when a step reads under 256 KiB of X; fixed_team: exactly `threads`, whatever the size (tests and
// benchmarks). The selection is bit for bit the same on any team. vectorized: the AVX2 + FMA + F16C distance
// loop where the CPU has them (checked at run time); false forces the portable loop (tests compare the two).
// 16-bit rows are widened in registers and give exactly the result of their float32 widening.

// Greedy k-center (farthest-first traversal) on the rows of x.
// The first n_init centres are init[0..n_init); the rest are chosen greedily and written to out[n_init..k).
// min_dist (length n) is scratch and ends holding each row's squared distance to its nearest centre,
// with -1 marking the centres themselves. Returns the squared covering radius (0 when k == n).
// One fused pass over x per centre: distance to the newest centre, running-min update, argmax.
// Ties go to the lowest row index. With prune (the default), a row whose nearest centre is at least twice
// its distance away from the new centre is not read (the triangle inequality: it cannot come closer); the
// selection is the same.
template <typename T>
float kcenter_greedy(const T* x, int64_t n, int64_t d, float scale, const int64_t* init, int64_t n_init,
                     int64_t k, int64_t* out, float* min_dist, bool prune = true, int threads = 0,
                     bool fixed_team = false, bool vectorized = true);

// Herding (Welling 2009): row i of the selection minimises ||(i+1)*mean - S_i - x_j||^2 over unchosen j,
// where S_i is the sum of the rows chosen so far, kept incrementally. One pass over x per step.
// selected (length n) is scratch. Ties go to the lowest row index.
template <typename T>
void herding(const T* x, int64_t n, int64_t d, float scale, int64_t k, int64_t* out, uint8_t* selected,
             int threads = 0, bool fixed_team = false, bool vectorized = true);

// One step of kcenter_greedy on the rows of x, for callers that run the loop themselves (erasus.distributed: one
// rank's rows): the rows not yet centres (min_dist >= 0; mark a new centre's row -1 first) are measured to
// `centre` (d floats, already times scale) and their running minima lowered. With owner (n int32, -1 for none
// yet; nullptr: no pruning) a row whose nearest centre a = owner[j] has to_centre[a] >= 4 m (to_centre[a]: the
// squared distance of centre a to this one) is not read, and a row that comes closer gets owner[j] = step.
// Returns the farthest row (lowest index on ties) and writes its min_dist to *farthest; -1 and -2 when n == 0.
// The same arithmetic as kcenter_greedy's steps, bit for bit.
template <typename T>
int64_t kcenter_step(const T* x, int64_t n, int64_t d, float scale, const float* centre, int32_t step,
                     float* min_dist, int32_t* owner, const float* to_centre, float* farthest, int threads = 0,
                     bool fixed_team = false, bool vectorized = true);

// One step of herding on the rows of x, for callers that run the loop themselves: the row with selected[j] == 0
// nearest `target` (d floats, in the units of x * scale), lowest index on ties; writes its squared distance to
// *nearest. -1 and +inf when every row is selected or n == 0. The same arithmetic as herding's steps.
template <typename T>
int64_t herding_step(const T* x, int64_t n, int64_t d, float scale, const float* target, const uint8_t* selected,
                     float* nearest, int threads = 0, bool fixed_team = false, bool vectorized = true);

// out[j] = squared distance of row j of x (times scale) to `centre` (d floats), for every row: the distances of
// the selection loops, bit for bit (the same kernel and order), on a team as above. For callers that run a loop
// themselves (erasus.distributed: the new centre's distances to the earlier ones, for pruning).
template <typename T>
void row_distances(const T* x, int64_t n, int64_t d, float scale, const float* centre, float* out, int threads = 0,
                   bool fixed_team = false, bool vectorized = true);

// The row of x nearest the mean of its rows (times scale), for k-center's default first centre: the mean is
// summed in double (rows front to back, the same sum on any team) and rounded to float32; distances are
// k-center's own. Ties go to the lowest row index. Two passes over x; n >= 1.
template <typename T>
int64_t row_nearest_mean(const T* x, int64_t n, int64_t d, float scale, int threads = 0, bool fixed_team = false,
                         bool vectorized = true);

// Bytes of the last-level cache, as the loops see it: an X larger than this is streamed from memory on every
// step, and its 16-bit rows (and the column sums' reads, every dtype) are then prefetched with the
// non-temporal hint (the result is the same either way).
int64_t last_level_cache_bytes();

}  // namespace erasus

#include "per_sample_grad_norms.h"

#include <algorithm>
#include <vector>

#include "element.h"
#include "parallel.h"

namespace erasus {
namespace {

constexpr int64_t kTileP = 32;   // rows of the W tile held in registers/L1
constexpr int64_t kTileD = 256;  // columns of the W tile: 32 x 256 floats = 32 KiB

template <typename T>
inline void widen(const T* src, int64_t count, float* dst) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) dst[i] = to_float(src[i]);
}

inline float dot(const float* x, const float* y, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += x[i] * y[i];
  return acc;
}

// sum_{s,t} (a_s . a_t)(g_s . g_t), using the symmetry of both Gram matrices.
inline double ghost_norm(const float* a, const float* g, int64_t steps, int64_t d, int64_t p) {
  double total = 0.0;
  for (int64_t s = 0; s < steps; ++s) {
    const float* as = a + s * d;
    const float* gs = g + s * p;
    double row = 0.5 * double(dot(as, as, d)) * double(dot(gs, gs, p));
    for (int64_t t = 0; t < s; ++t) row += double(dot(as, a + t * d, d)) * double(dot(gs, g + t * p, p));
    total += 2.0 * row;
  }
  return total;
}

// ||G^T A||_F^2, one (kTileP x kTileD) tile of G^T A at a time, squared and summed before the next tile.
inline double materialized_norm(const float* a, const float* g, int64_t steps, int64_t d, int64_t p,
                                float* tile) {
  double total = 0.0;
  for (int64_t o0 = 0; o0 < p; o0 += kTileP) {
    const int64_t po = std::min(kTileP, p - o0);
    for (int64_t j0 = 0; j0 < d; j0 += kTileD) {
      const int64_t dj = std::min(kTileD, d - j0);
      for (int64_t i = 0; i < po * dj; ++i) tile[i] = 0.f;
      for (int64_t t = 0; t < steps; ++t) {
        const float* at = a + t * d + j0;
        const float* gt = g + t * p + o0;
        for (int64_t o = 0; o < po; ++o) {
          const float go = gt[o];
          float* row = tile + o * dj;
#pragma omp simd
          for (int64_t j = 0; j < dj; ++j) row[j] += go * at[j];
        }
      }
      double acc = 0.0;
      for (int64_t i = 0; i < po * dj; ++i) acc += double(tile[i]) * double(tile[i]);
      total += acc;
    }
  }
  return total;
}

}  // namespace

template <typename T>
void per_sample_grad_norms(const T* a, const T* g, int64_t batch, int64_t steps, int64_t d, int64_t p,
                           NormPath path, float* weight_out, float* bias_out) {
  // One sample per task. Each thread widens its sample into float scratch: a copy for float32 too, but a
  // negligible cost next to the T^2 (d + p) or T d p work, and it keeps one code path for every dtype.
  std::vector<std::vector<float>> scratch(static_cast<size_t>(max_threads()));
  parallel_for_each(batch, [&](int64_t i, int tid) {
    auto& buf = scratch[static_cast<size_t>(tid)];
    buf.resize(static_cast<size_t>(steps * (d + p) + p + kTileP * kTileD));
    float* af = buf.data();
    float* gf = af + steps * d;
    float* gsum = gf + steps * p;
    float* tile = gsum + p;
    widen(a + i * steps * d, steps * d, af);
    widen(g + i * steps * p, steps * p, gf);
    for (int64_t o = 0; o < p; ++o) gsum[o] = 0.f;
    for (int64_t t = 0; t < steps; ++t)
      for (int64_t o = 0; o < p; ++o) gsum[o] += gf[t * p + o];
    bias_out[i] = dot(gsum, gsum, p);
    double w = 0.0;
    if (path == NormPath::outer) {  // steps == 1 (checked by the caller)
      w = double(dot(af, af, d)) * double(dot(gf, gf, p));
    } else if (path == NormPath::ghost) {
      w = ghost_norm(af, gf, steps, d, p);
    } else {
      w = materialized_norm(af, gf, steps, d, p, tile);
    }
    weight_out[i] = static_cast<float>(w);
  });
}

#define ERASUS_INSTANTIATE(T)                                                                          \
  template void per_sample_grad_norms<T>(const T*, const T*, int64_t, int64_t, int64_t, int64_t, NormPath, \
                                         float*, float*);
ERASUS_INSTANTIATE(float)
ERASUS_INSTANTIATE(half_bits)
ERASUS_INSTANTIATE(bf16_bits)
#undef ERASUS_INSTANTIATE

}  // namespace erasus

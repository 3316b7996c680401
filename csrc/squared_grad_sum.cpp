#include "squared_grad_sum.h"

#include <algorithm>
#include <vector>

#include "element.h"
#include "parallel.h"

namespace erasus {
namespace {
constexpr int64_t kTileP = 16;
constexpr int64_t kTileD = 256;
}  // namespace

template <typename T>
void squared_grad_sum(const T* a, const T* g, int64_t batch, int64_t steps, int64_t d, int64_t p,
                      float* weight_out, float* bias_out) {
  const int64_t tiles_p = (p + kTileP - 1) / kTileP, tiles_d = (d + kTileD - 1) / kTileD;
  // Each task owns one output tile, so threads never write the same element.
  parallel_for_each(tiles_p * tiles_d, [&](int64_t task, int) {
    const int64_t o0 = (task / tiles_d) * kTileP, j0 = (task % tiles_d) * kTileD;
    const int64_t po = std::min(kTileP, p - o0), dj = std::min(kTileD, d - j0);
    std::vector<float> fisher(static_cast<size_t>(kTileP * kTileD), 0.f), acc(fisher.size()), arow(kTileD);
    for (int64_t i = 0; i < batch; ++i) {
      const T* ai = a + i * steps * d;
      const T* gi = g + i * steps * p;
      if (steps == 1) {
        for (int64_t j = 0; j < dj; ++j) {
          const float v = to_float(ai[j0 + j]);
          arow[j] = v * v;
        }
        for (int64_t o = 0; o < po; ++o) {
          const float go = to_float(gi[o0 + o]);
          const float go2 = go * go;
          float* row = fisher.data() + o * kTileD;
#pragma omp simd
          for (int64_t j = 0; j < dj; ++j) row[j] += go2 * arow[j];
        }
        continue;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < steps; ++t) {
        for (int64_t j = 0; j < dj; ++j) arow[j] = to_float(ai[t * d + j0 + j]);
        for (int64_t o = 0; o < po; ++o) {
          const float go = to_float(gi[t * p + o0 + o]);
          float* row = acc.data() + o * kTileD;
#pragma omp simd
          for (int64_t j = 0; j < dj; ++j) row[j] += go * arow[j];
        }
      }
      for (int64_t o = 0; o < po; ++o) {
        float* frow = fisher.data() + o * kTileD;
        const float* arow_acc = acc.data() + o * kTileD;
#pragma omp simd
        for (int64_t j = 0; j < dj; ++j) frow[j] += arow_acc[j] * arow_acc[j];
      }
    }
    for (int64_t o = 0; o < po; ++o)
      for (int64_t j = 0; j < dj; ++j) weight_out[(o0 + o) * d + j0 + j] += fisher[o * kTileD + j];
    if (j0 == 0) {  // the first d-tile of each row band also does the bias
      for (int64_t o = 0; o < po; ++o) {
        double sum = 0.0;
        for (int64_t i = 0; i < batch; ++i) {
          float s = 0.f;
          for (int64_t t = 0; t < steps; ++t) s += to_float(g[(i * steps + t) * p + o0 + o]);
          sum += double(s) * s;
        }
        bias_out[o0 + o] += static_cast<float>(sum);
      }
    }
  });
}

#define ERASUS_INSTANTIATE(T) \
  template void squared_grad_sum<T>(const T*, const T*, int64_t, int64_t, int64_t, int64_t, float*, float*);
ERASUS_INSTANTIATE(float)
ERASUS_INSTANTIATE(half_bits)
ERASUS_INSTANTIATE(bf16_bits)
#undef ERASUS_INSTANTIATE

}  // namespace erasus

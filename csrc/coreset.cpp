#include "coreset.h"

#include <limits>
#include <vector>

#include "element.h"
#include "parallel.h"

namespace erasus {
namespace {

// Rows are read times `scale`, a power of two chosen by the caller (1 unless |x| is far from 1): exact, and it
// keeps every squared distance inside the float32 range whatever the input's magnitude.
template <typename T>
inline float squared_distance(const T* row, float scale, const float* centre, int64_t d) {
  float acc = 0.f;
  if (scale == 1.f) {  // the common case (features of moderate size): no multiply in the hot loop
#pragma omp simd reduction(+ : acc)
    for (int64_t t = 0; t < d; ++t) {
      const float diff = to_float(row[t]) - centre[t];
      acc += diff * diff;
    }
    return acc;
  }
#pragma omp simd reduction(+ : acc)
  for (int64_t t = 0; t < d; ++t) {
    const float diff = to_float(row[t]) * scale - centre[t];
    acc += diff * diff;
  }
  return acc;
}

// The distance of a stored row: float rows directly; 16-bit rows widened into the thread's scratch row first
// (one vectorised conversion, then exactly the float32 arithmetic).
inline float row_distance(const float* row, float scale, const float* centre, int64_t d, float*) {
  return squared_distance(row, scale, centre, d);
}

template <typename T>
inline float row_distance(const T* row, float scale, const float* centre, int64_t d, float* scratch) {
  widen(row, d, scratch);
  return squared_distance(static_cast<const float*>(scratch), scale, centre, d);
}

template <typename T>
inline void widen_row(const T* row, float scale, int64_t d, float* dst) {
  for (int64_t t = 0; t < d; ++t) dst[t] = to_float(row[t]) * scale;
}

struct Best {
  float value;
  int64_t index;
};

// Serial merge of the per-thread winners; `better(a, b)` is strict, so ties keep the lower index
// because thread blocks are ordered by row.
template <typename Better>
inline Best merge(const std::vector<Best>& per_thread, Better better) {
  Best best = per_thread[0];
  for (size_t i = 1; i < per_thread.size(); ++i) {
    if (per_thread[i].index >= 0 && (best.index < 0 || better(per_thread[i].value, best.value))) best = per_thread[i];
  }
  return best;
}

}  // namespace

// Exact pruning by the triangle inequality: a row at squared distance m from its nearest centre a cannot come
// closer to the new centre c when ||c - a||^2 >= 4 m (then ||x - c|| >= ||c - a|| - ||x - a|| >= sqrt(m)), so
// its row of X is not read. The margin keeps rows whose bound is within float32 rounding of the boundary on
// the computed path, so the selection is the one without pruning.
constexpr float kPruneMargin = 4.f * (1.f + 1e-3f);

template <typename T>
float kcenter_greedy(const T* x, int64_t n, int64_t d, float scale, const int64_t* init, int64_t n_init,
                     int64_t k, int64_t* out, float* min_dist, bool prune) {
  std::vector<float> centre(static_cast<size_t>(d));
  std::vector<Best> per_thread(static_cast<size_t>(max_threads()));
  std::vector<float> scratch(per_thread.size() * static_cast<size_t>(d));  // one widened row per thread
  std::vector<int32_t> owner(prune ? static_cast<size_t>(n) : 0, -1);  // the step of each row's nearest centre
  std::vector<float> to_centre(prune ? static_cast<size_t>(k) : 0);     // ||new centre - centre of step a||^2
  for (int64_t j = 0; j < n; ++j) min_dist[j] = std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < n_init; ++s) out[s] = init[s];

  float radius2 = 0.f;
  for (int64_t s = 0; s < k; ++s) {
    const int64_t c = out[s];
    widen_row(x + c * d, scale, d, centre.data());
    min_dist[c] = -1.f;  // a centre is never chosen again, even among exact duplicates
    if (prune)
      for (int64_t a = 0; a < s; ++a)
        to_centre[a] = row_distance(x + out[a] * d, scale, centre.data(), d, scratch.data());
    for (auto& b : per_thread) b = Best{-2.f, -1};
    parallel_blocks(n, [&](int64_t begin, int64_t end, int tid) {
      Best best{-2.f, -1};
      for (int64_t j = begin; j < end; ++j) {
        float m = min_dist[j];
        if (m >= 0.f) {
          const int32_t a = prune ? owner[j] : -1;
          if (a < 0 || to_centre[a] < kPruneMargin * m) {
            const float dist = row_distance(x + j * d, scale, centre.data(), d, scratch.data() + tid * d);
            if (dist < m) {
              m = dist;
              if (prune) owner[j] = static_cast<int32_t>(s);
            }
            min_dist[j] = m;
          }
        }
        if (m > best.value) best = Best{m, j};
      }
      per_thread[static_cast<size_t>(tid)] = best;
    });
    const Best best = merge(per_thread, [](float a, float b) { return a > b; });
    if (s + 1 < k && s + 1 >= n_init) out[s + 1] = best.index;
    radius2 = best.value > 0.f ? best.value : 0.f;
  }
  return radius2;
}

template <typename T>
void herding(const T* x, int64_t n, int64_t d, float scale, int64_t k, int64_t* out, uint8_t* selected) {
  const int nt = max_threads();
  // The mean in double (no overflow before scaling): one pass, per-thread partial sums merged serially.
  std::vector<double> partial(static_cast<size_t>(nt) * static_cast<size_t>(d), 0.0);
  parallel_blocks(n, [&](int64_t begin, int64_t end, int tid) {
    double* acc = partial.data() + static_cast<size_t>(tid) * static_cast<size_t>(d);
    for (int64_t j = begin; j < end; ++j) {
      const T* row = x + j * d;
      for (int64_t t = 0; t < d; ++t) acc[t] += to_float(row[t]);
    }
  });
  std::vector<double> mean(static_cast<size_t>(d), 0.0), chosen_sum(static_cast<size_t>(d), 0.0);
  for (int i = 0; i < nt; ++i)
    for (int64_t t = 0; t < d; ++t) mean[t] += partial[static_cast<size_t>(i) * d + t];
  for (int64_t t = 0; t < d; ++t) mean[t] = mean[t] / static_cast<double>(n) * scale;

  for (int64_t j = 0; j < n; ++j) selected[j] = 0;
  std::vector<float> target(static_cast<size_t>(d));
  std::vector<Best> per_thread(static_cast<size_t>(nt));
  std::vector<float> scratch(static_cast<size_t>(nt) * static_cast<size_t>(d));  // one widened row per thread
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t t = 0; t < d; ++t) target[t] = static_cast<float>((i + 1) * mean[t] - chosen_sum[t]);
    for (auto& b : per_thread) b = Best{std::numeric_limits<float>::infinity(), -1};
    parallel_blocks(n, [&](int64_t begin, int64_t end, int tid) {
      Best best{std::numeric_limits<float>::infinity(), -1};
      for (int64_t j = begin; j < end; ++j) {
        if (selected[j]) continue;
        const float dist = row_distance(x + j * d, scale, target.data(), d, scratch.data() + tid * d);
        if (best.index < 0 || dist < best.value) best = Best{dist, j};
      }
      per_thread[static_cast<size_t>(tid)] = best;
    });
    const Best best = merge(per_thread, [](float a, float b) { return a < b; });
    out[i] = best.index;
    selected[best.index] = 1;
    const T* row = x + best.index * d;
    for (int64_t t = 0; t < d; ++t) chosen_sum[t] += to_float(row[t]) * scale;
  }
}

#define ERASUS_INSTANTIATE(T)                                                                              \
  template float kcenter_greedy<T>(const T*, int64_t, int64_t, float, const int64_t*, int64_t, int64_t,   \
                                   int64_t*, float*, bool);                                                \
  template void herding<T>(const T*, int64_t, int64_t, float, int64_t, int64_t*, uint8_t*);

ERASUS_INSTANTIATE(float)
ERASUS_INSTANTIATE(half_bits)
ERASUS_INSTANTIATE(bf16_bits)
#undef ERASUS_INSTANTIATE

}  // namespace erasus

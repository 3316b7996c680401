// Per-sample squared gradient norms of a linear map y = x W^T + b, from its inputs A_i (T x d) and output
// gradients G_i (T x p), without forming the B x p x d per-sample gradients. Raw row-major arrays only.
#pragma once
#include <cstdint>

namespace erasus {

enum class NormPath : int {
  outer = 0,        // T == 1: ||g_i a_i^T||^2 = ||a_i||^2 ||g_i||^2
  ghost = 1,        // <A_i A_i^T, G_i G_i^T>, cost ~ T^2 (d + p) per sample
  materialize = 2,  // ||G_i^T A_i||^2 accumulated tile by tile, cost ~ T d p per sample, O(tile) memory
};

// a: B x T x d, g: B x T x p. weight_out[i] = ||G_i^T A_i||_F^2, bias_out[i] = ||sum_t g_it||^2.
template <typename T>
void per_sample_grad_norms(const T* a, const T* g, int64_t batch, int64_t steps, int64_t d, int64_t p,
                           NormPath path, float* weight_out, float* bias_out);

}  // namespace erasus

// Diagonal empirical Fisher of a linear map: the sum over samples of squared per-sample gradients,
// sum_i (G_i^T A_i)^2 elementwise, accumulated into the outputs. Raw row-major arrays only.
#pragma once
#include <cstdint>

namespace erasus {

// a: B x T x d, g: B x T x p. weight_out (p x d) += sum_i (G_i^T A_i)^2; bias_out (p) += sum_i (sum_t g_it)^2.
// T == 1 reduces to (G o G)^T (A o A). For T > 1 each sample's tile of G_i^T A_i is built in cache and
// squared there: no B x p x d buffer.
template <typename T>
void squared_grad_sum(const T* a, const T* g, int64_t batch, int64_t steps, int64_t d, int64_t p,
                      float* weight_out, float* bias_out);

}  // namespace erasus

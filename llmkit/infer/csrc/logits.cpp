// Per-row statistics of vocabulary logits in one sweep (survey §7.1: scoring log-likelihoods for evaluation).
//
// Scoring a continuation needs, for every scored position, log p(target) = logit[target] - logsumexp(logits)
// and whether the target is the argmax. With a 49k-entry vocabulary those [N, V] float32 logits are the
// largest tensor of an evaluation; PyTorch's logsumexp + argmax + gather read it five times (max, subtract,
// exp, sum, argmax) and write two temporaries. `logit_stats` reads each row twice while it is in cache:
// max and first argmax, then the sum of exp(x - max) accumulated in double lanes (no rounding drift over 49k
// terms), with an AVX-512 exp (vexp.h) or std::exp elsewhere.
// Rows are split over ATen's OpenMP pool.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "bf16.h"
#include "vexp.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

template <typename T>
inline float load1(const T* p) {
  if constexpr (std::is_same_v<T, float>) return *p;
  else return llmkit::bf16_to_f32(*p);
}

#if defined(__AVX512F__)
template <typename T>
inline __m512 load16(const T* p) {
  if constexpr (std::is_same_v<T, float>) return _mm512_loadu_ps(p);
  else return llmkit::widen_bf16(p);
}

#endif

// max, first index of the max, and log(sum exp(x - max)) + max of one row.
template <typename T>
inline void row_stats(const T* x, int64_t V, float& lse, int64_t& arg) {
  float mx = -std::numeric_limits<float>::infinity();
  int64_t am = 0, j = 0;
  double sum = 0.0;
  bool has_nan = false;
#if defined(__AVX512F__)
  if (V >= 16) {
    __mmask16 nan = 0;
    __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    __m512i vidx = _mm512_setzero_si512();
    __m512i cur = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(16);
    for (; j + 16 <= V; j += 16) {  // strict '>': each lane keeps its first maximum
      __m512 v = load16(x + j);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      __mmask16 gt = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);
      vmax = _mm512_mask_mov_ps(vmax, gt, v);
      vidx = _mm512_mask_mov_epi32(vidx, gt, cur);
      cur = _mm512_add_epi32(cur, step);
    }
    has_nan = nan != 0;
    alignas(64) float mv[16];
    alignas(64) int32_t iv[16];
    _mm512_store_ps(mv, vmax);
    _mm512_store_si512(iv, vidx);
    for (int l = 0; l < 16; ++l)
      if (mv[l] > mx || (mv[l] == mx && iv[l] < am)) mx = mv[l], am = iv[l];
  }
#endif
  for (; j < V; ++j) {
    float v = load1(x + j);
    has_nan |= std::isnan(v);
    if (v > mx) mx = v, am = j;
  }
  if (!std::isfinite(mx) || has_nan) {  // torch's answers: NaN (at the first NaN), +inf, or -inf (all -inf)
    for (int64_t k = 0; has_nan && k < V; ++k)
      if (std::isnan(load1(x + k))) {
        lse = std::numeric_limits<float>::quiet_NaN(), arg = k;
        return;
      }
    lse = mx, arg = std::isinf(mx) && mx < 0 ? 0 : am;
    return;
  }
  j = 0;
#if defined(__AVX512F__)
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
  const __m512 vm = _mm512_set1_ps(mx);
  for (; j + 16 <= V; j += 16) {
    __m512 e = llmkit::exp16(_mm512_sub_ps(load16(x + j), vm));
    s0 = _mm512_add_pd(s0, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
    s1 = _mm512_add_pd(s1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1))));
  }
  sum = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
#endif
  for (; j < V; ++j) sum += std::exp(load1(x + j) - mx);
  lse = static_cast<float>(std::log(sum)) + mx;
  arg = am;
}

template <typename T>
void stats_rows(const T* base, int64_t N, int64_t V, int64_t ld, float* lse, int64_t* arg) {
  at::parallel_for(0, N, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row_stats(base + r * ld, V, lse[r], arg[r]);
  });
}

}  // namespace

// (logsumexp [N] float32, first argmax [N] int64) of logits [N, V] float32 or bfloat16, rows contiguous.
std::vector<at::Tensor> logit_stats(at::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2, "logit_stats: logits must be [N, V], got ", logits.sizes());
  TORCH_CHECK(logits.device().is_cpu(), "logit_stats: CPU tensors only");
  if (logits.stride(1) != 1) logits = logits.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  TORCH_CHECK(V > 0, "logit_stats: empty vocabulary");
  at::Tensor lse = at::empty({N}, logits.options().dtype(at::kFloat));
  at::Tensor arg = at::empty({N}, logits.options().dtype(at::kLong));
  if (logits.scalar_type() == at::kFloat) {
    stats_rows(logits.data_ptr<float>(), N, V, ld, lse.data_ptr<float>(), arg.data_ptr<int64_t>());
  } else if (logits.scalar_type() == at::kBFloat16) {
    stats_rows(reinterpret_cast<const uint16_t*>(logits.data_ptr()), N, V, ld, lse.data_ptr<float>(),
               arg.data_ptr<int64_t>());
  } else {
    TORCH_CHECK(false, "logit_stats: float32 or bfloat16 logits, got ", logits.scalar_type());
  }
  return {lse, arg};
}

// Vectorised exp shared by the native kernels (logits.cpp: logsumexp of vocabulary logits; attention.cpp:
// softmax of attention scores; train_ops.cpp: SiLU and the cross-entropy rows).
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>

namespace llmkit {

// exp(x): 2^n * p(r), n = round(x / ln 2), r = x - n ln 2 in two parts (Cody-Waite); p is the degree-6 Taylor
// polynomial (|r| <= ln2/2: truncation < 2e-8 relative). The softmaxes call it on x - max <= 0; SiLU
// (train_ops.cpp) on -g of either sign. Below -87.3, exp underflows float32 and is flushed to 0, as torch's
// float exp does; above ~88.7 the scaling by 2^n overflows to +inf (so sigmoid = 1 / (1 + inf) = 0).
inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.33654f);
  __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(x, lo);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(p, n));
}

}  // namespace llmkit
#endif

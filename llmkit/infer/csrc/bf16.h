// bfloat16 -> float32 widening shared by the native kernels (decode.cpp, logits.cpp): a bfloat16 is the top
// 16 bits of a float32, so widening is a 16-bit shift.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace llmkit {

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#if defined(__AVX512F__)
inline __m512 widen_bf16(const uint16_t* p) {  // 16 bfloat16 -> 16 float32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
#endif

}  // namespace llmkit

// Native CPU decode step for llmkit's FastDecoder family (survey §4.2.4 "efficiency"; see llmkit/infer/native.py).
//
// Batch-1 decoding of a small model on a CPU is bound by two things: streaming the weights from memory once
// per token, and the per-op overhead of launching ~600 small PyTorch ops from Python. This file removes both:
// - `QLinear`: y = x W^T (+ b) for weights stored as float32, bfloat16, int8 (per output channel scale) or
//   int4 in GGUF's Q4_1 block layout (32 weights per 20-byte block: fp16 scale d, fp16 minimum m, 16 bytes of
//   nibbles, low nibbles = elements 0..15, high = 16..31; w = q * d + m). Each weight block is loaded once,
//   widened to float32 in registers and applied to up to 8 activation rows, so decoding reads every weight
//   byte once per step at memory speed, whatever the storage type. Activations and accumulation are float32,
//   except one-row int4 products on CPUs with AVX512-VNNI, which quantise the activation row to int8 per block
//   (llama.cpp's Q8_1) and use integer dot products, and bfloat16 weights on CPUs with AVX512-BF16, which meet
//   activations rounded to bfloat16 in VDPBF16PS (as any bfloat16 matmul does).
// - `Decoder.step`: one token through every layer (pre-norm RMSNorm/LayerNorm, fused QKV, rotate-half RoPE,
//   GQA/MQA attention over the model's own preallocated KV cache, fused gate/up GLU or plain MLP, optional
//   biases, parallel attention+MLP block), the final norm and the vocabulary projection, in one call.
// Work is split over output rows (and over heads in attention) with ATen's OpenMP pool, so
// torch.set_num_threads governs it. Compiled at first use with -march=native (AVX-512 path when the CPU has it,
// portable scalar code otherwise, which the compiler vectorises).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "bf16.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#define LLMKIT_AVX512 1
#else
#define LLMKIT_AVX512 0
#endif

namespace {

enum Kind : int64_t { F32 = 0, BF16 = 1, I8 = 2, I4 = 3 };
constexpr int64_t BLK = 32;        // weights per block (Q4_1 group); K must be a multiple
constexpr int64_t Q4_BYTES = 20;   // fp16 d, fp16 m, 16 bytes of nibbles
constexpr int64_t MB = 8;          // activation rows applied per pass over a weight row

using llmkit::bf16_to_f32;

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch's .to(torch.bfloat16)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 64);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float f16_to_f32(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

struct QLinear {
  int64_t kind, N, K;
  at::Tensor w, scale, bias;  // w: [N,K] float/bf16/int8, or [N, K/32, 20] uint8 (int4); scale [N] (int8)
  const uint8_t* wp;
  const float* sp;
  const float* bp;

  QLinear(int64_t kind_, at::Tensor w_, at::Tensor scale_, at::Tensor bias_, int64_t K_)
      : kind(kind_), K(K_), w(w_.contiguous()), scale(scale_.contiguous()), bias(bias_.contiguous()) {
    TORCH_CHECK(K % BLK == 0, "native linear: in_features ", K, " must be a multiple of ", BLK);
    N = w.size(0);
    static const at::ScalarType want[] = {at::kFloat, at::kBFloat16, at::kChar, at::kByte};
    TORCH_CHECK(kind >= 0 && kind <= 3 && w.scalar_type() == want[kind], "native linear: weight dtype ",
                w.scalar_type(), " does not match kind ", kind);
    TORCH_CHECK(kind == I4 ? (w.dim() == 3 && w.size(1) == K / BLK && w.size(2) == Q4_BYTES)
                           : (w.dim() == 2 && w.size(1) == K), "native linear: weight shape ", w.sizes(),
                " does not match K=", K);
    TORCH_CHECK(kind != I8 || (scale.scalar_type() == at::kFloat && scale.numel() == N), "int8 needs [N] float scales");
    TORCH_CHECK(!bias.numel() || (bias.scalar_type() == at::kFloat && bias.numel() == N), "bias must be [N] float32");
    wp = static_cast<const uint8_t*>(w.data_ptr());
    sp = scale.numel() ? scale.data_ptr<float>() : nullptr;
    bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  }

  // y[m, n] for rows m < M of x (row stride ldx) and output rows n0 <= n < n1 (row stride ldy)
  void rows(const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) const;

  at::Tensor forward(const at::Tensor& x_) const {
    at::Tensor x = x_.to(at::kFloat).contiguous();
    TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "native linear: input ", x.sizes(), " needs [M, ", K, "]");
    const int64_t M = x.size(0);
    at::Tensor y = at::empty({M, N}, x.options());
    const float* xp = x.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    if (M == 1) {
      one_row(xp, yp);
    } else {
      many_rows(xp, M, yp);
    }
    return y;
  }

  void one_row(const float* x, float* y) const;  // the decode step's kernel (integer dots for int4)
  void many_rows(const float* x, int64_t M, float* y) const;
};

#if LLMKIT_AVX512
using llmkit::widen_bf16;

// Rows are streamed once per step; prefetching the same block PREFETCH_ROWS rows ahead keeps enough memory
// requests in flight (measured: 1.8x on the bf16 step with 2 threads; hardware prefetchers stall at each row's
// end). Addresses past the matrix are harmless: prefetches do not fault.
constexpr int64_t PREFETCH_ROWS = 4;

inline void prefetch_ahead(const QLinear& L, int64_t n, int64_t b) {
  static const int64_t elem[] = {4, 2, 1, 0};
  const int64_t bb = L.kind == I4 ? Q4_BYTES : BLK * elem[L.kind];
  const int64_t rb = L.kind == I4 ? (L.K / BLK) * Q4_BYTES : L.K * elem[L.kind];
  const char* p = reinterpret_cast<const char*>(L.wp) + (n + PREFETCH_ROWS) * rb + b * bb;
  _mm_prefetch(p, _MM_HINT_T0);
  if (bb > 64) _mm_prefetch(p + 64, _MM_HINT_T0);
}

// the 32 weights of block b of row n as two float32 vectors
template <int64_t KIND>
inline void load_block(const QLinear& L, int64_t n, int64_t b, __m512& w0, __m512& w1) {
  const int64_t off = n * L.K + b * BLK;
  if constexpr (KIND == F32) {
    const float* p = reinterpret_cast<const float*>(L.wp) + off;
    w0 = _mm512_loadu_ps(p);
    w1 = _mm512_loadu_ps(p + 16);
  } else if constexpr (KIND == BF16) {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(L.wp) + off;
    w0 = widen_bf16(p);
    w1 = widen_bf16(p + 16);
  } else if constexpr (KIND == I8) {
    const int8_t* p = reinterpret_cast<const int8_t*>(L.wp) + off;
    w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
    w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + 16))));
  } else {
    const uint8_t* blk = L.wp + (n * (L.K / BLK) + b) * Q4_BYTES;
    uint16_t dh, mh;
    std::memcpy(&dh, blk, 2);
    std::memcpy(&mh, blk + 2, 2);
    const __m512 d = _mm512_set1_ps(_cvtsh_ss(dh)), m = _mm512_set1_ps(_cvtsh_ss(mh));
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(blk + 4)));
    w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(15))), d, m);
    w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), d, m);
  }
}

// MC activation rows (a compile-time count, so the accumulators live in registers, not on the stack)
template <int64_t KIND, int MC>
void rows_mc(const QLinear& L, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t nb = L.K / BLK;
  for (int64_t n = n0; n < n1; ++n) {
    __m512 a0[MC], a1[MC];
    for (int i = 0; i < MC; ++i) a0[i] = a1[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      __m512 w0, w1;
      prefetch_ahead(L, n, b);
      load_block<KIND>(L, n, b, w0, w1);
      for (int i = 0; i < MC; ++i) {
        const float* xr = x + i * ldx + b * BLK;
        a0[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), a0[i]);
        a1[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), a1[i]);
      }
    }
    for (int i = 0; i < MC; ++i) {
      float s = _mm512_reduce_add_ps(_mm512_add_ps(a0[i], a1[i]));
      if (KIND == I8) s *= L.sp[n];
      y[i * ldy + n] = L.bp ? s + L.bp[n] : s;
    }
  }
}

template <int64_t KIND>
void rows_impl(const QLinear& L, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const float* xm = x + m0 * ldx;
    float* ym = y + m0 * ldy;
    switch (std::min(MB, M - m0)) {
      case 1: rows_mc<KIND, 1>(L, xm, ldx, ym, ldy, n0, n1); break;
      case 2: rows_mc<KIND, 2>(L, xm, ldx, ym, ldy, n0, n1); break;
      case 3: rows_mc<KIND, 3>(L, xm, ldx, ym, ldy, n0, n1); break;
      case 4: rows_mc<KIND, 4>(L, xm, ldx, ym, ldy, n0, n1); break;
      case 5: rows_mc<KIND, 5>(L, xm, ldx, ym, ldy, n0, n1); break;
      case 6: rows_mc<KIND, 6>(L, xm, ldx, ym, ldy, n0, n1); break;
      case 7: rows_mc<KIND, 7>(L, xm, ldx, ym, ldy, n0, n1); break;
      default: rows_mc<KIND, 8>(L, xm, ldx, ym, ldy, n0, n1); break;
    }
  }
}
#else
template <int64_t KIND>
inline void load_block(const QLinear& L, int64_t n, int64_t b, float* out) {
  const int64_t off = n * L.K + b * BLK;
  if constexpr (KIND == F32) {
    std::memcpy(out, reinterpret_cast<const float*>(L.wp) + off, BLK * 4);
  } else if constexpr (KIND == BF16) {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(L.wp) + off;
    for (int64_t j = 0; j < BLK; ++j) out[j] = bf16_to_f32(p[j]);
  } else if constexpr (KIND == I8) {
    const int8_t* p = reinterpret_cast<const int8_t*>(L.wp) + off;
    for (int64_t j = 0; j < BLK; ++j) out[j] = float(p[j]);
  } else {
    const uint8_t* blk = L.wp + (n * (L.K / BLK) + b) * Q4_BYTES;
    uint16_t dh, mh;
    std::memcpy(&dh, blk, 2);
    std::memcpy(&mh, blk + 2, 2);
    const float d = f16_to_f32(dh), m = f16_to_f32(mh);
    for (int64_t j = 0; j < 16; ++j) {
      out[j] = float(blk[4 + j] & 15) * d + m;
      out[j + 16] = float(blk[4 + j] >> 4) * d + m;
    }
  }
}

template <int64_t KIND>
void rows_impl(const QLinear& L, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t nb = L.K / BLK;
  float w[BLK];
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int64_t mc = std::min(MB, M - m0);
    for (int64_t n = n0; n < n1; ++n) {
      float acc[MB] = {0};
      for (int64_t b = 0; b < nb; ++b) {
        load_block<KIND>(L, n, b, w);
        for (int64_t i = 0; i < mc; ++i) {
          const float* xr = x + (m0 + i) * ldx + b * BLK;
          float s = 0;
          for (int64_t j = 0; j < BLK; ++j) s += w[j] * xr[j];
          acc[i] += s;
        }
      }
      for (int64_t i = 0; i < mc; ++i) {
        float s = acc[i];
        if (KIND == I8) s *= L.sp[n];
        y[(m0 + i) * ldy + n] = L.bp ? s + L.bp[n] : s;
      }
    }
  }
}
#endif

void QLinear::rows(const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) const {
  switch (kind) {
    case F32: return rows_impl<F32>(*this, x, M, ldx, y, ldy, n0, n1);
    case BF16: return rows_impl<BF16>(*this, x, M, ldx, y, ldy, n0, n1);
    case I8: return rows_impl<I8>(*this, x, M, ldx, y, ldy, n0, n1);
    default: return rows_impl<I4>(*this, x, M, ldx, y, ldy, n0, n1);
  }
}

#if LLMKIT_AVX512 && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LLMKIT_VNNI 1
// One activation row against Q4_1 weights with integer dot products, as llama.cpp's Q4_1 x Q8_1: x is
// quantised per 32-block to int8 (sx = max|x| / 127), each block's 32 nibbles meet it in one VPDPBUSD, and
// w = q d + m gives  sum_j w_j x_j = d sx sum_j q_j xq_j + m sum_j x_j  (the float block sum of x, exact).
// About 10 instructions per 32 weights instead of 17 for widening every weight to float.
struct Q8Row {
  std::vector<int8_t> q;
  std::vector<float> scale, sum;
  explicit Q8Row(const float* x, int64_t K) : q(K), scale(K / BLK), sum(K / BLK) {
    for (int64_t b = 0; b < K / BLK; ++b) {
      const float* xb = x + b * BLK;
      float mx = 0, s = 0;
      for (int64_t j = 0; j < BLK; ++j) mx = std::max(mx, std::fabs(xb[j])), s += xb[j];
      const float sc = mx / 127.f, inv = sc > 0 ? 1.f / sc : 0.f;
      for (int64_t j = 0; j < BLK; ++j) q[b * BLK + j] = int8_t(std::nearbyint(xb[j] * inv));
      scale[b] = sc;
      sum[b] = s;
    }
  }
};

inline void q4_rows_vnni(const QLinear& L, const Q8Row& xq, float* y, int64_t n0, int64_t n1) {
  const int64_t nb = L.K / BLK;
  const __m128i low = _mm_set1_epi8(15);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* blk = L.wp + n * nb * Q4_BYTES;
    __m256 acc = _mm256_setzero_ps();
    float msum = 0;
    for (int64_t b = 0; b < nb; ++b, blk += Q4_BYTES) {
      _mm_prefetch((const char*)(blk + PREFETCH_ROWS * nb * Q4_BYTES), _MM_HINT_T0);
      uint16_t dh, mh;
      std::memcpy(&dh, blk, 2);
      std::memcpy(&mh, blk + 2, 2);
      const __m128i raw = _mm_loadu_si128((const __m128i*)(blk + 4));
      const __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), low), _mm_and_si128(raw, low));
      const __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w,
                                              _mm256_loadu_si256((const __m256i*)(xq.q.data() + b * BLK)));
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(_cvtsh_ss(dh) * xq.scale[b]), acc);
      msum += _cvtsh_ss(mh) * xq.sum[b];
    }
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    float s = _mm_cvtss_f32(_mm_hadd_ps(_mm_hadd_ps(h, h), _mm_hadd_ps(h, h))) + msum;
    y[n] = L.bp ? s + L.bp[n] : s;
  }
}
#else
#define LLMKIT_VNNI 0
#endif

#if LLMKIT_AVX512 && defined(__AVX512BF16__)
#define LLMKIT_BF16DP 1
// bfloat16 weights against activations rounded to bfloat16 with VDPBF16PS (32 products per instruction, float32
// accumulation): what a bfloat16 matmul computes, at a third of the instructions of widening every weight.
inline std::vector<uint16_t> to_bf16(const float* x, int64_t n) {
  std::vector<uint16_t> out(n);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    _mm256_storeu_si256((__m256i*)(out.data() + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + j)));
  for (; j < n; ++j) out[j] = f32_to_bf16(x[j]);
  return out;
}

template <int MC>
void bf16_rows_mc(const QLinear& L, const uint16_t* x, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t K = L.K;
  const uint16_t* W = reinterpret_cast<const uint16_t*>(L.wp);
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc[MC];
    for (int i = 0; i < MC; ++i) acc[i] = _mm512_setzero_ps();
    const uint16_t* wr = W + n * K;
    for (int64_t k = 0; k < K; k += 32) {
      _mm_prefetch((const char*)(wr + PREFETCH_ROWS * K + k), _MM_HINT_T0);
      const __m512bh w = (__m512bh)_mm512_loadu_si512(wr + k);
      for (int i = 0; i < MC; ++i)
        acc[i] = _mm512_dpbf16_ps(acc[i], w, (__m512bh)_mm512_loadu_si512(x + i * ldx + k));
    }
    for (int i = 0; i < MC; ++i) {
      const float s = _mm512_reduce_add_ps(acc[i]);
      y[i * ldy + n] = L.bp ? s + L.bp[n] : s;
    }
  }
}

inline void bf16_rows(const QLinear& L, const uint16_t* x, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const uint16_t* xm = x + m0 * L.K;
    float* ym = y + m0 * ldy;
    switch (std::min<int64_t>(4, M - m0)) {
      case 1: bf16_rows_mc<1>(L, xm, L.K, ym, ldy, n0, n1); break;
      case 2: bf16_rows_mc<2>(L, xm, L.K, ym, ldy, n0, n1); break;
      case 3: bf16_rows_mc<3>(L, xm, L.K, ym, ldy, n0, n1); break;
      default: bf16_rows_mc<4>(L, xm, L.K, ym, ldy, n0, n1); break;
    }
  }
}
#else
#define LLMKIT_BF16DP 0
#endif

// y = x W^T (+ b) for M rows (row stride K), split over the thread pool
inline void gemm(const QLinear& L, const float* x, int64_t M, float* y) {
#if LLMKIT_BF16DP
  if (L.kind == BF16) {
    const std::vector<uint16_t> xb = to_bf16(x, M * L.K);
    at::parallel_for(0, L.N, 16, [&](int64_t a, int64_t b) { bf16_rows(L, xb.data(), M, y, L.N, a, b); });
    return;
  }
#endif
  at::parallel_for(0, L.N, 16, [&](int64_t a, int64_t b) { L.rows(x, M, L.K, y, L.N, a, b); });
}

// y = x W^T (+ b) for one row, split over the thread pool
inline void gemv(const QLinear& L, const float* x, float* y) {
#if LLMKIT_VNNI
  if (L.kind == I4) {
    const Q8Row xq(x, L.K);
    at::parallel_for(0, L.N, 16, [&](int64_t a, int64_t b) { q4_rows_vnni(L, xq, y, a, b); });
    return;
  }
#endif
  gemm(L, x, 1, y);
}

void QLinear::one_row(const float* x, float* y) const { gemv(*this, x, y); }
void QLinear::many_rows(const float* x, int64_t M, float* y) const { gemm(*this, x, M, y); }

struct Norm {
  at::Tensor w, b;  // float32, offset (Gemma's 1 + w) already folded in; b empty for RMSNorm
  bool layer;       // LayerNorm (else RMSNorm)
  double eps;
  void apply(const float* x, float* y, int64_t d) const {
    const float* wp = w.data_ptr<float>();
    double mean = 0, ss = 0;
    if (layer) {
      for (int64_t i = 0; i < d; ++i) mean += x[i];
      mean /= d;
    }
    for (int64_t i = 0; i < d; ++i) ss += (x[i] - mean) * (x[i] - mean);
    const float r = float(1.0 / std::sqrt(ss / d + eps));
    const float mu = float(mean);
    const float* bp = b.numel() ? b.data_ptr<float>() : nullptr;
    for (int64_t i = 0; i < d; ++i) y[i] = (x[i] - mu) * r * wp[i] + (bp ? bp[i] : 0.f);
  }
};

enum Act : int64_t { SILU = 0, GELU = 1, GELU_TANH = 2, RELU = 3 };

inline float activate(float v, int64_t act) {
  switch (act) {
    case SILU: return v / (1.f + std::exp(-v));
    case GELU: return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
    case GELU_TANH: return 0.5f * v * (1.f + std::tanh(0.79788456080286535f * (v + 0.044715f * v * v * v)));
    default: return v > 0 ? v : 0.f;
  }
}

// dot(q, k) over hd elements of a cache row stored as T (float or bf16 bits)
template <typename T>
inline float dot_row(const float* q, const T* k, int64_t hd) {
  int64_t j = 0;
  float s = 0;
#if LLMKIT_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (; j + 16 <= hd; j += 16) {
    __m512 kv;
    if constexpr (std::is_same_v<T, float>) kv = _mm512_loadu_ps(k + j);
    else kv = widen_bf16(k + j);
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + j), kv, acc);
  }
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; j < hd; ++j) {
    if constexpr (std::is_same_v<T, float>) s += q[j] * k[j];
    else s += q[j] * bf16_to_f32(k[j]);
  }
  return s;
}

template <typename T>
inline void axpy_row(float p, const T* v, float* out, int64_t hd) {
  int64_t j = 0;
#if LLMKIT_AVX512
  const __m512 pv = _mm512_set1_ps(p);
  for (; j + 16 <= hd; j += 16) {
    __m512 vv;
    if constexpr (std::is_same_v<T, float>) vv = _mm512_loadu_ps(v + j);
    else vv = widen_bf16(v + j);
    _mm512_storeu_ps(out + j, _mm512_fmadd_ps(pv, vv, _mm512_loadu_ps(out + j)));
  }
#endif
  for (; j < hd; ++j) {
    if constexpr (std::is_same_v<T, float>) out[j] += p * v[j];
    else out[j] += p * bf16_to_f32(v[j]);
  }
}

template <typename T>
inline T store_as(float f) {
  if constexpr (std::is_same_v<T, float>) return f;
  else return f32_to_bf16(f);
}

struct Layer {
  Norm attn_norm, mlp_norm;  // mlp_norm.w empty: parallel block (attention and MLP read attn_norm's output)
  QLinear qkv, o, up, down;  // up: [gate; up] fused for GLU
  bool glu;
  int64_t act;

  Layer(at::Tensor an_w, at::Tensor an_b, at::Tensor mn_w, at::Tensor mn_b, bool layernorm, double eps, QLinear qkv_,
        QLinear o_, QLinear up_, QLinear down_, bool glu_, int64_t act_)
      : attn_norm{an_w.to(at::kFloat).contiguous(), an_b.to(at::kFloat).contiguous(), layernorm, eps},
        mlp_norm{mn_w.to(at::kFloat).contiguous(), mn_b.to(at::kFloat).contiguous(), layernorm, eps},
        qkv(std::move(qkv_)), o(std::move(o_)), up(std::move(up_)), down(std::move(down_)), glu(glu_), act(act_) {}
};

struct Decoder {
  std::vector<Layer> layers;
  Norm final_norm;
  QLinear head;
  int64_t d, h, kv, hd;
  double scale;
  bool rope;

  Decoder(std::vector<Layer> layers_, at::Tensor fn_w, at::Tensor fn_b, bool layernorm, double eps, QLinear head_,
          int64_t h_, int64_t kv_, int64_t hd_, double scale_, bool rope_)
      : layers(std::move(layers_)), final_norm{fn_w.to(at::kFloat).contiguous(), fn_b.to(at::kFloat).contiguous(),
                                               layernorm, eps},
        head(std::move(head_)), h(h_), kv(kv_), hd(hd_), scale(scale_), rope(rope_) {
    d = final_norm.w.numel();
    TORCH_CHECK(h % kv == 0, "n_heads must be a multiple of n_kv_heads");
  }

  // rotate-half RoPE in place on n heads of hd values: x' = x * cos + rotate_half(x) * sin
  void apply_rope(float* x, int64_t n, const float* c, const float* s) const {
    const int64_t half = hd / 2;
    for (int64_t i = 0; i < n; ++i) {
      float* r = x + i * hd;
      for (int64_t j = 0; j < half; ++j) {
        const float a = r[j], b = r[j + half];
        r[j] = a * c[j] - b * s[j];
        r[j + half] = b * c[j + half] + a * s[j + half];
      }
    }
  }

  template <typename T>
  void attend(const float* q, T* K, T* V, int64_t len, int64_t stride, float* out) const {
    const int64_t group = h / kv;
    at::parallel_for(0, h, 1, [&](int64_t a, int64_t b) {
      std::vector<float> p(len);
      for (int64_t head_i = a; head_i < b; ++head_i) {
        const float* qh = q + head_i * hd;
        const T* Kg = K + (head_i / group) * stride;
        const T* Vg = V + (head_i / group) * stride;
        float mx = -INFINITY;
        for (int64_t t = 0; t < len; ++t) {
          p[t] = dot_row(qh, Kg + t * hd, hd) * float(scale);
          mx = std::max(mx, p[t]);
        }
        double z = 0;
        for (int64_t t = 0; t < len; ++t) z += (p[t] = std::exp(p[t] - mx));
        const float inv = float(1.0 / z);
        float* oh = out + head_i * hd;
        std::fill(oh, oh + hd, 0.f);
        for (int64_t t = 0; t < len; ++t) axpy_row(p[t] * inv, Vg + t * hd, oh, hd);
      }
    });
  }

  template <typename T>
  void attention(const Layer& L, const float* xn, const float* c, const float* s, at::Tensor& kc, at::Tensor& vc,
                 int64_t pos, float* out, float* buf) const {
    float* qkv = buf;  // (h + 2 kv) * hd
    gemv(L.qkv, xn, qkv);
    if (rope) apply_rope(qkv, h + kv, c, s);  // q and k heads are contiguous
    T* K = reinterpret_cast<T*>(kc.data_ptr());
    T* V = reinterpret_cast<T*>(vc.data_ptr());
    const int64_t max_len = kc.size(1), stride = max_len * hd;
    const float* k = qkv + h * hd;
    const float* v = k + kv * hd;
    for (int64_t g = 0; g < kv; ++g)
      for (int64_t j = 0; j < hd; ++j) {
        K[g * stride + pos * hd + j] = store_as<T>(k[g * hd + j]);
        V[g * stride + pos * hd + j] = store_as<T>(v[g * hd + j]);
      }
    float* att = qkv + (h + 2 * kv) * hd;  // h * hd
    attend<T>(qkv, K, V, pos + 1, stride, att);
    gemv(L.o, att, out);
  }

  void mlp(const Layer& L, const float* xn, float* out, float* buf) const {
    gemv(L.up, xn, buf);
    const int64_t f = L.glu ? L.up.N / 2 : L.up.N;
    if (L.glu)
      for (int64_t i = 0; i < f; ++i) buf[i] = activate(buf[i], L.act) * buf[i + f];
    else
      for (int64_t i = 0; i < f; ++i) buf[i] = activate(buf[i], L.act);
    gemv(L.down, buf, out);
  }

  // x0 [d] float32 embedding of the new token; cos/sin [hd]; caches [kv, max_len, hd] per layer (batch row 0)
  at::Tensor step(const at::Tensor& x0, const at::Tensor& cos, const at::Tensor& sin, std::vector<at::Tensor> kcs,
                  std::vector<at::Tensor> vcs, int64_t pos) const {
    TORCH_CHECK(x0.numel() == d && kcs.size() == layers.size() && vcs.size() == layers.size(), "native step: bad inputs");
    at::Tensor x = x0.to(at::kFloat).contiguous().clone();
    at::Tensor c = cos.to(at::kFloat).contiguous(), s = sin.to(at::kFloat).contiguous();
    int64_t widest = (h + 2 * kv) * hd + h * hd;
    for (const auto& L : layers) widest = std::max(widest, L.up.N);
    std::vector<float> xn(d), a(d), m(d), buf(widest);
    float* xp = x.data_ptr<float>();
    const float* cp = rope ? c.data_ptr<float>() : nullptr;
    const float* sp = rope ? s.data_ptr<float>() : nullptr;
    for (size_t i = 0; i < layers.size(); ++i) {
      const Layer& L = layers[i];
      at::Tensor& kc = kcs[i];
      at::Tensor& vc = vcs[i];
      TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && kc.size(1) > pos, "native step: cache too short");
      L.attn_norm.apply(xp, xn.data(), d);
      if (kc.scalar_type() == at::kFloat)
        attention<float>(L, xn.data(), cp, sp, kc, vc, pos, a.data(), buf.data());
      else {
        TORCH_CHECK(kc.scalar_type() == at::kBFloat16, "native step: KV cache must be float32 or bfloat16");
        attention<uint16_t>(L, xn.data(), cp, sp, kc, vc, pos, a.data(), buf.data());
      }
      if (L.mlp_norm.w.numel()) {  // sequential block
        for (int64_t j = 0; j < d; ++j) xp[j] += a[j];
        L.mlp_norm.apply(xp, xn.data(), d);
        mlp(L, xn.data(), m.data(), buf.data());
        for (int64_t j = 0; j < d; ++j) xp[j] += m[j];
      } else {  // parallel block: both read the same normalised input
        mlp(L, xn.data(), m.data(), buf.data());
        for (int64_t j = 0; j < d; ++j) xp[j] += a[j] + m[j];
      }
    }
    final_norm.apply(xp, xn.data(), d);
    at::Tensor logits = at::empty({head.N}, x.options());
    gemv(head, xn.data(), logits.data_ptr<float>());
    return logits;
  }
};

}  // namespace

std::vector<at::Tensor> logit_stats(at::Tensor logits);  // logits.cpp
bool attention_available();                               // attention.cpp
std::vector<at::Tensor> causal_attention_fwd(at::Tensor q, at::Tensor k, at::Tensor v, double scale, bool save);
std::vector<at::Tensor> causal_attention_bwd(at::Tensor dout, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor out,
                                             at::Tensor P, double scale);
std::vector<at::Tensor> rmsnorm_fwd(at::Tensor x, at::Tensor w, double eps,
                                    c10::optional<at::Tensor> a);  // train_ops.cpp
std::vector<at::Tensor> rmsnorm_bwd(at::Tensor dy, at::Tensor x, at::Tensor w, at::Tensor r,
                                    c10::optional<at::Tensor> dres);
double global_norm(std::vector<at::Tensor> ts);
at::Tensor swiglu_fwd(at::Tensor g, at::Tensor u);
std::vector<at::Tensor> swiglu_bwd(at::Tensor dh, at::Tensor g, at::Tensor u);
at::Tensor rope(at::Tensor x, at::Tensor c, at::Tensor s, bool inverse);
std::vector<at::Tensor> softmax_xent_(at::Tensor logits, at::Tensor target);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<QLinear>(m, "QLinear")
      .def(py::init<int64_t, at::Tensor, at::Tensor, at::Tensor, int64_t>())
      .def("__call__", &QLinear::forward)
      .def_readonly("N", &QLinear::N)
      .def_readonly("K", &QLinear::K)
      .def_readonly("kind", &QLinear::kind);
  py::class_<Layer>(m, "Layer")
      .def(py::init<at::Tensor, at::Tensor, at::Tensor, at::Tensor, bool, double, QLinear, QLinear, QLinear, QLinear,
                    bool, int64_t>());
  py::class_<Decoder>(m, "Decoder")
      .def(py::init<std::vector<Layer>, at::Tensor, at::Tensor, bool, double, QLinear, int64_t, int64_t, int64_t, double,
                    bool>())
      .def("step", &Decoder::step, py::call_guard<py::gil_scoped_release>());
  m.def("logit_stats", &logit_stats, py::call_guard<py::gil_scoped_release>());
  m.def("attention_available", &attention_available);
  m.def("causal_attention_fwd", &causal_attention_fwd, py::call_guard<py::gil_scoped_release>());
  m.def("causal_attention_bwd", &causal_attention_bwd, py::call_guard<py::gil_scoped_release>());
  m.def("rmsnorm_fwd", &rmsnorm_fwd, py::arg("x"), py::arg("w"), py::arg("eps"), py::arg("a") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("rmsnorm_bwd", &rmsnorm_bwd, py::arg("dy"), py::arg("x"), py::arg("w"), py::arg("r"),
        py::arg("dres") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("swiglu_fwd", &swiglu_fwd, py::call_guard<py::gil_scoped_release>());
  m.def("swiglu_bwd", &swiglu_bwd, py::call_guard<py::gil_scoped_release>());
  m.def("rope", &rope, py::call_guard<py::gil_scoped_release>());
  m.def("softmax_xent_", &softmax_xent_, py::call_guard<py::gil_scoped_release>());
  m.def("global_norm", &global_norm, py::call_guard<py::gil_scoped_release>());
  m.def("avx512", []() { return bool(LLMKIT_AVX512); });
  m.def("vnni", []() { return bool(LLMKIT_VNNI); });
  m.def("bf16dp", []() { return bool(LLMKIT_BF16DP); });
}

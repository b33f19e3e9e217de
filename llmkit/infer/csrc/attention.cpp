// Causal self-attention for float32 training on CPU: forward and backward (survey §4.2.4, §4.3 efficiency).
//
// torch's CPU flash-attention kernel computes the scores in blocks of keys that ignore the causal triangle at
// training lengths (T <= a few hundred) and re-derives the probabilities in its backward; at T = 256, hd = 64
// its forward + backward run at ~35 GFLOP/s of useful work on one core. This kernel works one (batch,
// key/value head) at a time while that head's [T, T] scores sit in L2:
//   forward, per block of BQ query rows [r0, r1): S = scale * Q[r0:r1] K[0:r1]^T (only keys up to the block's
//     last row: the upper triangle of blocks is never computed), row-wise causal softmax in place (vectorised
//     exp; entries right of the diagonal set to 0), O[r0:r1] = P V[0:r1]. P is kept for the backward.
//   backward (FlashAttention paper, Alg. 4, with P stored): dP = dO V^T, dS = P * (dP - rowsum(dO * O)) in place,
//     dQ = scale * dS K, per row block; then per column block [c0, c1): dK += scale * dS[c0:T, c0:c1]^T Q[c0:T],
//     dV += P[c0:T, c0:c1]^T dO[c0:T] (rows above c0 are zero there). GQA: the query heads of one key/value
//     head run in the same task and accumulate its dK and dV.
// The matrix products call the BLAS sgemm that PyTorch itself links (MKL in the x86 wheels) on strided
// row-major views, so Q, K, V, dO may be the transposed [B, T, H, D] projections without a copy. Where no
// sgemm_ symbol is linked, `attention_available()` is false and llmkit keeps SDPA.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "vexp.h"

extern "C" void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                       const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));
// MKL's per-thread thread count (exported by libtorch_cpu on x86; absent with other BLAS): 0 restores the global one.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace {

constexpr int64_t BQ = 64;  // query rows (and key columns) per block

// Runs worker(claim) once on each thread of the intra-op pool; claim() hands out the tasks [0, n) one at a time
// from a shared counter (-1 when none are left), so a core the host slows down (shared machines) takes fewer
// tasks instead of holding the others at the end of a static split. Results do not depend on which worker runs
// a task. Inside, each worker's BLAS runs single-threaded: torch.set_num_threads turns MKL's dynamic adjustment
// off, so MKL would otherwise open its own nested OpenMP team on every call from a worker, which cost ~20% of
// the 2-thread forward and backward at T = 256 (measured). The worker's previous MKL count is restored.
template <class F>
void parallel_tasks(int64_t n, const F& worker) {
  std::atomic<int64_t> next{0};
  auto claim = [&]() -> int64_t {
    const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
    return t < n ? t : -1;
  };
  at::parallel_for(0, std::max<int64_t>(1, std::min<int64_t>(n, at::get_num_threads())), 1, [&](int64_t, int64_t) {
    const int prev = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
    worker(claim);
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev);
  });
}

// Row-major C[M, N] = alpha * op(A) op(B) + beta * C; op(A) is [M, K] (A stored [K, M] when ta), op(B) [K, N].
// Column-major BLAS sees each row-major matrix transposed, so it computes C^T = op(B)^T op(A)^T.
inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
  const int m = int(N), n = int(M), k = int(K), la = int(lda), lb = int(ldb), lc = int(ldc);
  sgemm_(&cb, &ca, &m, &n, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
}

// Row t of a block: softmax of s[0..n) in place (n = t + 1 keys), zeros in s[n..width).
inline void causal_softmax_row(float* s, int64_t n, int64_t width) {
  int64_t j = 0;
  float mx = -INFINITY, sum = 0.f;
#if defined(__AVX512F__)
  __m512 vmx = _mm512_set1_ps(-INFINITY);
  for (; j + 16 <= n; j += 16) vmx = _mm512_max_ps(vmx, _mm512_loadu_ps(s + j));
  if (j < n) vmx = _mm512_mask_max_ps(vmx, __mmask16((1u << (n - j)) - 1), vmx, _mm512_maskz_loadu_ps(__mmask16((1u << (n - j)) - 1), s + j));
  mx = _mm512_reduce_max_ps(vmx);
  const __m512 vm = _mm512_set1_ps(mx);
  __m512 vs = _mm512_setzero_ps();
  for (j = 0; j + 16 <= n; j += 16) {
    __m512 e = llmkit::exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), vm));
    _mm512_storeu_ps(s + j, e);
    vs = _mm512_add_ps(vs, e);
  }
  if (j < n) {
    const __mmask16 mk = __mmask16((1u << (n - j)) - 1);
    __m512 e = _mm512_maskz_mov_ps(mk, llmkit::exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, s + j), vm)));
    _mm512_mask_storeu_ps(s + j, mk, e);
    vs = _mm512_add_ps(vs, e);
  }
  sum = _mm512_reduce_add_ps(vs);
  const __m512 inv = _mm512_set1_ps(1.f / sum);
  for (j = 0; j + 16 <= n; j += 16) _mm512_storeu_ps(s + j, _mm512_mul_ps(_mm512_loadu_ps(s + j), inv));
  if (j < n) {
    const __mmask16 mk = __mmask16((1u << (n - j)) - 1);
    _mm512_mask_storeu_ps(s + j, mk, _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, s + j), inv));
  }
#else
  for (; j < n; ++j) mx = std::max(mx, s[j]);
  for (j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - mx));
  const float inv = 1.f / sum;
  for (j = 0; j < n; ++j) s[j] *= inv;
#endif
  std::fill(s + n, s + width, 0.f);
}

// dS = P * (dP - delta) in place over the row's n keys (dp holds dP); zeros in dp[n..width).
inline void softmax_grad_row(float* dp, const float* p, int64_t n, int64_t width, float delta) {
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512 vd = _mm512_set1_ps(delta);
  for (; j + 16 <= n; j += 16)
    _mm512_storeu_ps(dp + j, _mm512_mul_ps(_mm512_loadu_ps(p + j), _mm512_sub_ps(_mm512_loadu_ps(dp + j), vd)));
#endif
  for (; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
  std::fill(dp + n, dp + width, 0.f);
}

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t j = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; j + 16 <= n; j += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j), acc);
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

// A [B, heads, T, D] float32 view with unit stride in D: base pointer of head (b, h) and its row stride.
struct View {
  float* p;
  int64_t sb, sh, st;
  explicit View(const at::Tensor& t) : p(t.data_ptr<float>()), sb(t.stride(0)), sh(t.stride(1)), st(t.stride(2)) {}
  float* at(int64_t b, int64_t h) const { return p + b * sb + h * sh; }
};

at::Tensor unit_last(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.scalar_type() == at::kFloat && t.device().is_cpu(),
              "causal_attention: ", name, " must be a float32 CPU tensor [B, heads, T, D], got ", t.sizes());
  return t.stride(3) == 1 ? t : t.contiguous();
}

}  // namespace

bool attention_available() { return sgemm_ != nullptr; }

// q [B, H, T, D], k/v [B, KV, T, D] (H a multiple of KV) -> (out [B, H, T, D] as a view of a [B, T, H, D]
// tensor, P [B, H, T, T] for the backward when `save`, else an empty tensor: each block's probabilities then
// live in a per-thread [BQ, T] buffer with the same row stride, so the arithmetic is the same either way).
std::vector<at::Tensor> causal_attention_fwd(at::Tensor q, at::Tensor k, at::Tensor v, double scale, bool save) {
  TORCH_CHECK(attention_available(), "causal_attention: no BLAS sgemm linked");
  q = unit_last(q, "q"), k = unit_last(k, "k"), v = unit_last(v, "v");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), KV = k.size(1);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(2) == T && k.size(3) == D && H % KV == 0,
              "causal_attention: q ", q.sizes(), " and k/v ", k.sizes(), " do not match");
  at::Tensor out = at::empty({B, T, H, D}, q.options()).transpose(1, 2);
  at::Tensor P = save ? at::empty({B, H, T, T}, q.options()) : at::empty({0}, q.options());
  const View Q(q), K(k), V(v), O(out);
  float* Pp = save ? P.data_ptr<float>() : nullptr;
  const int64_t rep = H / KV;
  parallel_tasks(B * KV, [&](const auto& claim) {
    std::vector<float> scratch(save ? 0 : size_t(BQ * T));
    for (int64_t task; (task = claim()) >= 0;) {
      const int64_t b = task / KV, g = task % KV;
      const float *kh = K.at(b, g), *vh = V.at(b, g);
      for (int64_t h = g * rep; h < (g + 1) * rep; ++h) {
        const float* qh = Q.at(b, h);
        float* oh = O.at(b, h);
        for (int64_t r0 = 0; r0 < T; r0 += BQ) {
          const int64_t r1 = std::min(T, r0 + BQ), m = r1 - r0;
          float* pb = save ? Pp + ((b * H + h) * T + r0) * T : scratch.data();
          gemm(false, true, m, r1, D, float(scale), qh + r0 * Q.st, Q.st, kh, K.st, 0.f, pb, T);
          for (int64_t r = r0; r < r1; ++r) causal_softmax_row(pb + (r - r0) * T, r + 1, r1);
          gemm(false, false, m, D, r1, 1.f, pb, T, vh, V.st, 0.f, oh + r0 * O.st, O.st);
        }
      }
    }
  });
  return {out, P};
}

// Gradients (dq, dk, dv) with the shapes of q, k, v, from the forward's inputs, output `out`, P and dout.
std::vector<at::Tensor> causal_attention_bwd(at::Tensor dout, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor out,
                                             at::Tensor P, double scale) {
  TORCH_CHECK(attention_available(), "causal_attention: no BLAS sgemm linked");
  dout = unit_last(dout, "dout"), q = unit_last(q, "q"), k = unit_last(k, "k"), v = unit_last(v, "v");
  out = unit_last(out, "out");
  TORCH_CHECK(P.is_contiguous(), "causal_attention: P must be the forward's contiguous probabilities");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), KV = k.size(1);
  at::Tensor dq = at::empty({B, T, H, D}, q.options()).transpose(1, 2);
  at::Tensor dk = at::empty({B, T, KV, D}, q.options()).transpose(1, 2);
  at::Tensor dv = at::empty({B, T, KV, D}, q.options()).transpose(1, 2);
  const View Q(q), K(k), V(v), O(out), dO(dout), dQ(dq), dK(dk), dV(dv);
  const float* Pp = P.data_ptr<float>();
  const int64_t rep = H / KV;
  const float sc = float(scale);
  parallel_tasks(B * KV, [&](const auto& claim) {
    std::vector<float> dS(size_t(T * T));  // this head's dS rows (lower triangle used)
    for (int64_t task; (task = claim()) >= 0;) {
      const int64_t b = task / KV, g = task % KV;
      const float *kh = K.at(b, g), *vh = V.at(b, g);
      float *dkh = dK.at(b, g), *dvh = dV.at(b, g);
      for (int64_t h = g * rep; h < (g + 1) * rep; ++h) {
        const float *qh = Q.at(b, h), *oh = O.at(b, h), *doh = dO.at(b, h);
        const float* ph = Pp + (b * H + h) * T * T;
        float* dqh = dQ.at(b, h);
        for (int64_t r0 = 0; r0 < T; r0 += BQ) {
          const int64_t r1 = std::min(T, r0 + BQ), m = r1 - r0;
          float* sb = dS.data() + r0 * T;
          gemm(false, true, m, r1, D, 1.f, doh + r0 * dO.st, dO.st, vh, V.st, 0.f, sb, T);
          for (int64_t r = r0; r < r1; ++r)
            softmax_grad_row(dS.data() + r * T, ph + r * T, r + 1, r1, dot(doh + r * dO.st, oh + r * O.st, D));
          gemm(false, false, m, D, r1, sc, sb, T, kh, K.st, 0.f, dqh + r0 * dQ.st, dQ.st);
        }
        const float beta = h == g * rep ? 0.f : 1.f;  // the group's first query head initialises dK, dV
        for (int64_t c0 = 0; c0 < T; c0 += BQ) {
          const int64_t c1 = std::min(T, c0 + BQ), n = c1 - c0, rows = T - c0;
          gemm(true, false, n, D, rows, sc, dS.data() + c0 * T + c0, T, qh + c0 * Q.st, Q.st, beta,
               dkh + c0 * dK.st, dK.st);
          gemm(true, false, n, D, rows, 1.f, ph + c0 * T + c0, T, doh + c0 * dO.st, dO.st, beta, dvh + c0 * dV.st,
               dV.st);
        }
      }
    }
  });
  return {dq, dk, dv};
}

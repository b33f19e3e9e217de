// Fused float32 elementwise kernels of a Llama-style block, forward and backward (survey §4.3 efficiency).
//
// Outside its matrix products a training step is a chain of memory-bound passes: PyTorch runs RMSNorm as
// pow, mean, rsqrt and two products (and their backward as five more), SwiGLU as silu, a product and three
// passes back, RoPE as two products and two fused multiply-adds per half. Each kernel here reads its inputs
// and writes its outputs once, one row at a time while the row is in L1:
//   rmsnorm_fwd: y = (x * r) * w, r = 1 / sqrt(mean(x^2) + eps), r kept for the backward; optionally on
//     x = x0 + a, the residual add before a pre-norm, written out in the same pass;
//   rmsnorm_bwd: dx = r * (dy w - xh * mean(dy w xh)), dw = sum over rows of dy * xh (xh = x * r; per-thread
//     partial sums, added in a fixed order); optionally plus the residual stream's gradient;
//   swiglu_fwd: h = silu(g) * u;  swiglu_bwd: dg = dh * u * s * (1 + g (1 - s)), du = dh * silu(g), s = sigmoid(g);
//   rope: [x1 c - x2 s, x2 c + x1 s] on the two halves of each head (the backward is the same call with -s),
//     written in the input's memory layout (the [B, T, H, D] projection viewed as [B, H, T, D] stays so);
//   global_norm: the gradient norm for clipping, one parallel pass over all gradients.
// The inference path of the model calls the same kernels, so its float32 output does not depend on whether
// the weights require gradients. AVX-512 where the CPU has it, plain loops (auto-vectorised) elsewhere.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "vexp.h"

namespace {

at::Tensor rows_f32(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), what, ": float32 CPU tensors only, got ",
              t.scalar_type());
  return t.contiguous();
}

inline float sum_squares(const float* x, int64_t d) {
  int64_t j = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 a = _mm512_setzero_ps();
  for (; j + 16 <= d; j += 16) {
    __m512 v = _mm512_loadu_ps(x + j);
    a = _mm512_fmadd_ps(v, v, a);
  }
  s = _mm512_reduce_add_ps(a);
#endif
  for (; j < d; ++j) s += x[j] * x[j];
  return s;
}

#if defined(__AVX512F__)
// silu(g) and sigmoid(g) of 16 lanes
inline void silu16(__m512 g, __m512& silu, __m512& sig) {
  const __m512 one = _mm512_set1_ps(1.f);
  sig = _mm512_div_ps(one, _mm512_add_ps(one, llmkit::exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
  silu = _mm512_mul_ps(g, sig);
}
#endif

// the value as rounded so far: keeps the compiler from contracting a product and a following add into one
// fused multiply-add (GCC does so by default), where bits must equal PyTorch's separate add
inline float opaque(float v) {
  __asm__("" : "+x"(v));
  return v;
}
#if defined(__AVX512F__)
inline __m512 opaque(__m512 v) {
  __asm__("" : "+v"(v));
  return v;
}
#endif

inline float sigmoid1(float g) { return 1.f / (1.f + std::exp(-g)); }

}  // namespace

// x [..., d], w [d] (the norm weight with its offset added) -> (y like x, r [rows]). With a residual branch
// `a` (same shape as x, or an undefined tensor for none) the input is h = x + a, written out too: (y, r, h), so a
// pre-norm block's residual add and the next norm read the stream once. h is the same float32 sum as x + a.
std::vector<at::Tensor> rmsnorm_fwd(at::Tensor x, at::Tensor w, double eps, c10::optional<at::Tensor> a_opt) {
  x = rows_f32(x, "rmsnorm"), w = rows_f32(w, "rmsnorm");
  const bool add = a_opt.has_value() && a_opt->defined();
  const at::Tensor a = add ? rows_f32(*a_opt, "rmsnorm") : at::Tensor();
  const int64_t d = x.size(-1), N = x.numel() / d;
  TORCH_CHECK(w.numel() == d, "rmsnorm: weight has ", w.numel(), " entries for rows of ", d);
  TORCH_CHECK(!add || a.sizes() == x.sizes(), "rmsnorm: residual ", add ? a.sizes() : x.sizes(), " and input ",
              x.sizes(), " differ");
  at::Tensor y = at::empty_like(x), r = at::empty({N}, x.options()), h = add ? at::empty_like(x) : x;
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *ap = add ? a.data_ptr<float>() : nullptr;
  float *yp = y.data_ptr<float>(), *rp = r.data_ptr<float>(), *hp = h.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const float* xr = xp + i * d;
      if (add) {  // h = x + a for the row (in L1 for the two passes below)
        const float* ar = ap + i * d;
        float* hr = hp + i * d;
        int64_t j = 0;
#if defined(__AVX512F__)
        for (; j + 16 <= d; j += 16)
          _mm512_storeu_ps(hr + j, _mm512_add_ps(_mm512_loadu_ps(xr + j), _mm512_loadu_ps(ar + j)));
#endif
        for (; j < d; ++j) hr[j] = xr[j] + ar[j];
        xr = hr;
      }
      float* yr = yp + i * d;
      const float ri = 1.f / std::sqrt(sum_squares(xr, d) / float(d) + float(eps));
      rp[i] = ri;
      int64_t j = 0;
#if defined(__AVX512F__)
      const __m512 vr = _mm512_set1_ps(ri);
      for (; j + 16 <= d; j += 16)
        _mm512_storeu_ps(yr + j, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(xr + j), vr), _mm512_loadu_ps(wp + j)));
#endif
      for (; j < d; ++j) yr[j] = (xr[j] * ri) * wp[j];
    }
  });
  if (add) return {y, r, h};
  return {y, r};
}

// (dx like x, dw [d]) from dy, the forward's x (h when it added a residual), w and r. With `dres` (the gradient
// that reaches x along the residual stream, or undefined) dx = dres + the norm's own term, rounded like the
// separate add autograd would do (the add is kept apart from the product before it: no fused multiply-add).
std::vector<at::Tensor> rmsnorm_bwd(at::Tensor dy, at::Tensor x, at::Tensor w, at::Tensor r,
                                    c10::optional<at::Tensor> dres_opt) {
  dy = rows_f32(dy, "rmsnorm"), x = rows_f32(x, "rmsnorm"), w = rows_f32(w, "rmsnorm"), r = rows_f32(r, "rmsnorm");
  const bool res = dres_opt.has_value() && dres_opt->defined();
  const at::Tensor dres = res ? rows_f32(*dres_opt, "rmsnorm") : at::Tensor();
  TORCH_CHECK(!res || dres.sizes() == x.sizes(), "rmsnorm: residual gradient ", res ? dres.sizes() : x.sizes(),
              " and input ", x.sizes(), " differ");
  const float* rsp = res ? dres.data_ptr<float>() : nullptr;
  const int64_t d = x.size(-1), N = x.numel() / d;
  at::Tensor dx = at::empty_like(x);
  const float *dyp = dy.data_ptr<float>(), *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(),
              *rp = r.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  // fixed row ranges (not the thread count) decide the partial sums, so dw does not depend on the threads
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(N, 16)), per = (N + parts - 1) / parts;
  std::vector<float> partial(size_t(parts * d), 0.f);
  at::parallel_for(0, parts, 1, [&](int64_t pa, int64_t pb) {
    for (int64_t p = pa; p < pb; ++p) {
      float* dw = partial.data() + p * d;
      for (int64_t i = p * per; i < std::min(N, (p + 1) * per); ++i) {
        const float *g = dyp + i * d, *xr = xp + i * d;
        float* o = dxp + i * d;
        const float ri = rp[i];
        int64_t j = 0;
        float m = 0.f;
#if defined(__AVX512F__)
        const __m512 vr = _mm512_set1_ps(ri);
        __m512 acc = _mm512_setzero_ps();
        for (; j + 16 <= d; j += 16) {
          __m512 xh = _mm512_mul_ps(_mm512_loadu_ps(xr + j), vr), gv = _mm512_loadu_ps(g + j);
          acc = _mm512_fmadd_ps(_mm512_mul_ps(gv, _mm512_loadu_ps(wp + j)), xh, acc);
          _mm512_storeu_ps(dw + j, _mm512_fmadd_ps(gv, xh, _mm512_loadu_ps(dw + j)));
        }
        m = _mm512_reduce_add_ps(acc);
#endif
        for (; j < d; ++j) {
          const float xh = xr[j] * ri;
          m += g[j] * wp[j] * xh;
          dw[j] += g[j] * xh;
        }
        m /= float(d);
        j = 0;
        const float* dr = res ? rsp + i * d : nullptr;
#if defined(__AVX512F__)
        const __m512 vm = _mm512_set1_ps(m);
        for (; j + 16 <= d; j += 16) {
          __m512 xh = _mm512_mul_ps(_mm512_loadu_ps(xr + j), vr);
          __m512 gw = _mm512_mul_ps(_mm512_loadu_ps(g + j), _mm512_loadu_ps(wp + j));
          __m512 t = _mm512_mul_ps(_mm512_fnmadd_ps(xh, vm, gw), vr);
          if (res) t = _mm512_add_ps(opaque(t), _mm512_loadu_ps(dr + j));
          _mm512_storeu_ps(o + j, t);
        }
#endif
        for (; j < d; ++j) {
          const float t = (g[j] * wp[j] - xr[j] * ri * m) * ri;
          o[j] = res ? opaque(t) + dr[j] : t;
        }
      }
    }
  });
  at::Tensor dw = at::zeros({d}, x.options());
  float* dwp = dw.data_ptr<float>();
  for (int64_t p = 0; p < parts; ++p)
    for (int64_t j = 0; j < d; ++j) dwp[j] += partial[size_t(p * d + j)];
  return {dx, dw};
}

at::Tensor swiglu_fwd(at::Tensor g, at::Tensor u) {
  g = rows_f32(g, "swiglu"), u = rows_f32(u, "swiglu");
  TORCH_CHECK(g.sizes() == u.sizes(), "swiglu: gate ", g.sizes(), " and up ", u.sizes(), " differ");
  at::Tensor h = at::empty_like(g);
  const float *gp = g.data_ptr<float>(), *up = u.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  at::parallel_for(0, g.numel(), 1 << 14, [&](int64_t a, int64_t b) {
    int64_t j = a;
#if defined(__AVX512F__)
    for (; j + 16 <= b; j += 16) {
      __m512 s, sg;
      silu16(_mm512_loadu_ps(gp + j), s, sg);
      _mm512_storeu_ps(hp + j, _mm512_mul_ps(s, _mm512_loadu_ps(up + j)));
    }
#endif
    for (; j < b; ++j) hp[j] = gp[j] * sigmoid1(gp[j]) * up[j];
  });
  return h;
}

std::vector<at::Tensor> swiglu_bwd(at::Tensor dh, at::Tensor g, at::Tensor u) {
  dh = rows_f32(dh, "swiglu"), g = rows_f32(g, "swiglu"), u = rows_f32(u, "swiglu");
  at::Tensor dg = at::empty_like(g), du = at::empty_like(u);
  const float *dhp = dh.data_ptr<float>(), *gp = g.data_ptr<float>(), *up = u.data_ptr<float>();
  float *dgp = dg.data_ptr<float>(), *dup = du.data_ptr<float>();
  at::parallel_for(0, g.numel(), 1 << 14, [&](int64_t a, int64_t b) {
    int64_t j = a;
#if defined(__AVX512F__)
    const __m512 one = _mm512_set1_ps(1.f);
    for (; j + 16 <= b; j += 16) {
      __m512 gv = _mm512_loadu_ps(gp + j), s, sg, d = _mm512_loadu_ps(dhp + j);
      silu16(gv, s, sg);
      _mm512_storeu_ps(dup + j, _mm512_mul_ps(d, s));
      __m512 ds = _mm512_mul_ps(sg, _mm512_fmadd_ps(gv, _mm512_sub_ps(one, sg), one));
      _mm512_storeu_ps(dgp + j, _mm512_mul_ps(_mm512_mul_ps(d, _mm512_loadu_ps(up + j)), ds));
    }
#endif
    for (; j < b; ++j) {
      const float sg = sigmoid1(gp[j]);
      dup[j] = dhp[j] * (gp[j] * sg);
      dgp[j] = dhp[j] * up[j] * (sg * (gp[j] * (1.f - sg) + 1.f));
    }
  });
  return {dg, du};
}

// x [B, H, T, D] (unit stride in D), c/s [B or 1, 1, T, D/2] half tables (unit stride in the last dim);
// out = [x1 c - x2 s, x2 c + x1 s] (s negated when `inverse`: the backward), with x's strides.
at::Tensor rope(at::Tensor x, at::Tensor c, at::Tensor s, bool inverse) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "rope: float32 CPU [B, H, T, D]");
  TORCH_CHECK(c.dim() == 4 && c.sizes() == s.sizes() && c.scalar_type() == at::kFloat && s.scalar_type() == at::kFloat,
              "rope: float32 tables [B, 1, T, D/2]");
  if (x.stride(3) != 1) x = x.contiguous();
  if (c.stride(3) != 1) c = c.contiguous();
  if (s.stride(3) != 1) s = s.contiguous();
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), half = D / 2;
  TORCH_CHECK(D % 2 == 0 && c.size(3) == half && c.size(2) == T && (c.size(0) == B || c.size(0) == 1),
              "rope: tables ", c.sizes(), " do not fit x ", x.sizes());
  at::Tensor out = at::empty_like(x);  // same strides as x (a dense view keeps its layout)
  const float* xp = x.data_ptr<float>();
  const float *cp = c.data_ptr<float>(), *sp = s.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2);
  const int64_t os0 = out.stride(0), os1 = out.stride(1), os2 = out.stride(2);
  const int64_t cs0 = c.size(0) == 1 ? 0 : c.stride(0), cs2 = c.stride(2);
  const int64_t ss0 = s.size(0) == 1 ? 0 : s.stride(0), ss2 = s.stride(2);
  const float sign = inverse ? -1.f : 1.f;
  at::parallel_for(0, B * T, 16, [&](int64_t a, int64_t b_) {
    for (int64_t bt = a; bt < b_; ++bt) {
      const int64_t b = bt / T, t = bt % T;
      const float *cr = cp + b * cs0 + t * cs2, *sr = sp + b * ss0 + t * ss2;
      for (int64_t h = 0; h < H; ++h) {
        const float* x1 = xp + b * xs0 + h * xs1 + t * xs2;
        const float* x2 = x1 + half;
        float* o1 = op + b * os0 + h * os1 + t * os2;
        float* o2 = o1 + half;
        int64_t j = 0;
#if defined(__AVX512F__)
        const __m512 vsign = _mm512_set1_ps(sign);
        for (; j + 16 <= half; j += 16) {
          __m512 a1 = _mm512_loadu_ps(x1 + j), a2 = _mm512_loadu_ps(x2 + j);
          __m512 cv = _mm512_loadu_ps(cr + j), sv = _mm512_mul_ps(_mm512_loadu_ps(sr + j), vsign);
          _mm512_storeu_ps(o1 + j, _mm512_fnmadd_ps(a2, sv, _mm512_mul_ps(a1, cv)));
          _mm512_storeu_ps(o2 + j, _mm512_fmadd_ps(a1, sv, _mm512_mul_ps(a2, cv)));
        }
#endif
        for (; j < half; ++j) {
          const float cv = cr[j], sv = sr[j] * sign;
          o1[j] = std::fma(-x2[j], sv, x1[j] * cv);
          o2[j] = std::fma(x1[j], sv, x2[j] * cv);
        }
      }
    }
  });
  return out;
}

// Cross-entropy rows for the fused output projection + loss (llmkit/train/fused_loss.py), in place: logits
// [n, V] float32 (contiguous rows), target [n] int64 in [0, V). Per row, while it is in L2: the max, then
// e_j = exp(x_j - max) for j != target (the target's own entry set to 0) and their sum s_o, then
// p_j = e_j / s with s = s_o + exp(x_t - max). Returns (lse = max + log s, x_t, 1 - p_t = s_o / s): 1 - p_t is
// summed from the other entries, not subtracted from 1, so a confident prediction keeps its small gradient.
std::vector<at::Tensor> softmax_xent_(at::Tensor logits, at::Tensor target) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == at::kFloat && logits.device().is_cpu(),
              "softmax_xent_: contiguous float32 CPU logits [n, V]");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0) && target.scalar_type() == at::kLong,
              "softmax_xent_: int64 targets [n]");
  target = target.contiguous();
  const int64_t n = logits.size(0), V = logits.size(1);
  at::Tensor lse = at::empty({n}, logits.options()), picked = at::empty({n}, logits.options()),
             other = at::empty({n}, logits.options());
  float *xp = logits.data_ptr<float>(), *lp = lse.data_ptr<float>(), *pp = picked.data_ptr<float>(),
        *op = other.data_ptr<float>();
  const int64_t* tp = target.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(tp[i] >= 0 && tp[i] < V, "softmax_xent_: target ", tp[i], " out of [0, ", V, ")");
  at::parallel_for(0, n, 4, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      float* x = xp + i * V;
      const int64_t t = tp[i];
      const float xt = x[t];
      float mx = -INFINITY, so = 0.f;
      int64_t j = 0;
#if defined(__AVX512F__)
      __m512 vm = _mm512_set1_ps(-INFINITY);
      for (; j + 16 <= V; j += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(x + j));
      mx = _mm512_reduce_max_ps(vm);
#endif
      for (; j < V; ++j) mx = std::max(mx, x[j]);
      x[t] = -INFINITY;  // excluded from the sum of the others; its exp writes the 0 the caller expects
      j = 0;
#if defined(__AVX512F__)
      const __m512 vmx = _mm512_set1_ps(mx);
      __m512 vs = _mm512_setzero_ps();
      for (; j + 16 <= V; j += 16) {
        __m512 e = llmkit::exp16(_mm512_sub_ps(_mm512_loadu_ps(x + j), vmx));
        _mm512_storeu_ps(x + j, e);
        vs = _mm512_add_ps(vs, e);
      }
      so = _mm512_reduce_add_ps(vs);
#endif
      for (; j < V; ++j) so += (x[j] = std::exp(x[j] - mx));
      const float s = so + std::exp(xt - mx), inv = 1.f / s;
      j = 0;
#if defined(__AVX512F__)
      const __m512 vi = _mm512_set1_ps(inv);
      for (; j + 16 <= V; j += 16) _mm512_storeu_ps(x + j, _mm512_mul_ps(_mm512_loadu_ps(x + j), vi));
#endif
      for (; j < V; ++j) x[j] *= inv;
      lp[i] = mx + std::log(s);
      pp[i] = xt;
      op[i] = so * inv;
    }
  });
  return {lse, picked, other};
}

// sqrt(sum of squares) over all elements of the float32 CPU tensors `ts` (the global gradient norm that clipping
// needs): one parallel pass. The elements are cut into fixed chunks of 32Ki (per tensor), each summed in float32
// by `sum_squares` (as RMSNorm's rows), and the chunk sums are added in order in double, so the result does not
// depend on the thread count. inf / NaN propagate.
double global_norm(std::vector<at::Tensor> ts) {
  constexpr int64_t CH = 1 << 15;
  std::vector<const float*> ptr;
  std::vector<int64_t> len;
  for (auto& t : ts) {
    t = rows_f32(t, "global_norm");
    for (int64_t s = 0; s < t.numel(); s += CH) {
      ptr.push_back(t.data_ptr<float>() + s);
      len.push_back(std::min(CH, t.numel() - s));
    }
  }
  std::vector<double> part(ptr.size(), 0.0);
  at::parallel_for(0, int64_t(ptr.size()), 1, [&](int64_t a, int64_t b) {
    for (int64_t c = a; c < b; ++c) part[size_t(c)] = double(sum_squares(ptr[size_t(c)], len[size_t(c)]));
  });
  double total = 0.0;
  for (double p : part) total += p;
  return std::sqrt(total);
}

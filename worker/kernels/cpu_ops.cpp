// Fused fp32 CPU kernels for the torch backend (built by cpu_ops.py with load_inline).
//
// Compiled with -ffp-contract=off: elementwise code evaluates the same expressions in the same
// order as the torch code it replaces, so RoPE is bit-identical; only reductions (RMSNorm's sum
// of squares, attention's dot products and softmax) round differently, as any other kernel would.
#include <torch/extension.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>
#include <algorithm>
#include <atomic>
#include <limits>

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, name, ": want fp32 CPU");
}

#if defined(__AVX512F__)
// exp on 16 lanes (Cephes expf: range reduction by ln 2, degree-6 polynomial, scale by 2^n);
// within 2 ulp of std::exp over the float range, 0 below -87.3 (and for -inf), +inf above 88.7.
inline __m512 exp512(__m512 x) {
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_LT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.33654f));
  x = _mm512_min_ps(x, _mm512_set1_ps(88.72284f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_mask_mov_ps(_mm512_scalef_ps(p, n), underflow, _mm512_setzero_ps());
}
#endif

}  // namespace

#if defined(__AVX512F__)
// r[i] = the sum of the 16 lanes of v[i]: pairs, then quads within 128-bit lanes, then across
// the four 128-bit lanes (15 adds instead of 16 full horizontal reductions).
inline __m512 hsum16(const __m512* v) {
  __m512 a[8], b[4];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 c0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x88),
                                  _mm512_shuffle_f32x4(b[0], b[1], 0xDD));
  const __m512 c1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x88),
                                  _mm512_shuffle_f32x4(b[2], b[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c0, c1, 0x88), _mm512_shuffle_f32x4(c0, c1, 0xDD));
}

// head_dim 64, G query heads per KV head known at compile time: q, and the output accumulators,
// live in registers for the whole sequence.
constexpr int64_t PREFETCH_AHEAD = 16;  // tokens ahead that the K and V passes prefetch

template <int G>
void decode_one_d64(const float* q, int64_t q_stride, const float* kc, const float* vc,
                    const int32_t* table, int64_t L, int64_t BS, int64_t blk_stride,
                    int64_t tok_stride, float scale, float* scores, float* out,
                    int64_t out_stride, int64_t row_lines) {
  // row_lines > 4 (the first KV head of a sequence): the prefetches also bring the rest of each
  // token's row (the other KV heads' lines) into L2, so memory is read in whole rows and the
  // next heads' passes read from L2 (~10% faster per decode step than per-head prefetching).
  __m512 qv[G][4];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < 4; ++j) qv[g][j] = _mm512_loadu_ps(q + g * q_stride + 16 * j);
  // Scores 16 tokens at a time: 16 dot-product vectors, then one transpose-and-add tree.
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 vmax[G];
  for (int g = 0; g < G; ++g) vmax[g] = neg_inf;
  for (int64_t t0 = 0; t0 < L; t0 += 16) {
    const int64_t count = std::min<int64_t>(16, L - t0);
    const __mmask16 valid = count == 16 ? 0xFFFF : static_cast<__mmask16>((1u << count) - 1u);
    const float* k[16];
    for (int j = 0; j < 16; ++j) {
      const int64_t t = t0 + (j < count ? j : count - 1);
      k[j] = kc + table[t / BS] * blk_stride + (t % BS) * tok_stride;
    }
    for (int j = 0; j < 16 && t0 + PREFETCH_AHEAD + j < L; ++j) {
      const int64_t t = t0 + PREFETCH_AHEAD + j;
      const char* nk = reinterpret_cast<const char*>(kc + table[t / BS] * blk_stride +
                                                     (t % BS) * tok_stride);
      for (int line = 0; line < 4; ++line) _mm_prefetch(nk + 64 * line, _MM_HINT_T0);
      for (int line = 4; line < row_lines; ++line) _mm_prefetch(nk + 64 * line, _MM_HINT_T1);
    }
    for (int g = 0; g < G; ++g) {
      __m512 dots[16];
      for (int j = 0; j < 16; ++j) {
        __m512 a = _mm512_mul_ps(qv[g][0], _mm512_loadu_ps(k[j]));
        a = _mm512_fmadd_ps(qv[g][1], _mm512_loadu_ps(k[j] + 16), a);
        a = _mm512_fmadd_ps(qv[g][2], _mm512_loadu_ps(k[j] + 32), a);
        dots[j] = _mm512_fmadd_ps(qv[g][3], _mm512_loadu_ps(k[j] + 48), a);
      }
      const __m512 sc = _mm512_mul_ps(hsum16(dots), vscale);
      _mm512_mask_storeu_ps(scores + g * L + t0, valid, sc);
      vmax[g] = _mm512_max_ps(vmax[g], _mm512_mask_mov_ps(neg_inf, valid, sc));
    }
  }
  float mx[G];
  for (int g = 0; g < G; ++g) mx[g] = _mm512_reduce_max_ps(vmax[g]);
  float inv[G];
  for (int g = 0; g < G; ++g) {
    float* sg = scores + g * L;
    const __m512 mv = _mm512_set1_ps(mx[g]);
    __m512 vsum = _mm512_setzero_ps();
    int64_t t = 0;
    for (; t + 16 <= L; t += 16) {
      const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sg + t), mv));
      _mm512_storeu_ps(sg + t, e);
      vsum = _mm512_add_ps(vsum, e);
    }
    if (t < L) {
      const __mmask16 m = static_cast<__mmask16>((1u << (L - t)) - 1u);
      const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sg + t), mv));
      _mm512_mask_storeu_ps(sg + t, m, e);
      vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(m, e));
    }
    inv[g] = 1.f / _mm512_reduce_add_ps(vsum);
  }
  __m512 acc[G][4];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < 4; ++j) acc[g][j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < L; ++t) {
    const float* v = vc + table[t / BS] * blk_stride + (t % BS) * tok_stride;
    if (t + PREFETCH_AHEAD < L) {
      const int64_t tn = t + PREFETCH_AHEAD;
      const char* nv = reinterpret_cast<const char*>(vc + table[tn / BS] * blk_stride +
                                                     (tn % BS) * tok_stride);
      for (int line = 0; line < 4; ++line) _mm_prefetch(nv + 64 * line, _MM_HINT_T0);
      for (int line = 4; line < row_lines; ++line) _mm_prefetch(nv + 64 * line, _MM_HINT_T1);
    }
    const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
    const __m512 v2 = _mm512_loadu_ps(v + 32), v3 = _mm512_loadu_ps(v + 48);
    for (int g = 0; g < G; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * L + t]);
      acc[g][0] = _mm512_fmadd_ps(p, v0, acc[g][0]);
      acc[g][1] = _mm512_fmadd_ps(p, v1, acc[g][1]);
      acc[g][2] = _mm512_fmadd_ps(p, v2, acc[g][2]);
      acc[g][3] = _mm512_fmadd_ps(p, v3, acc[g][3]);
    }
  }
  for (int g = 0; g < G; ++g) {
    const __m512 iv = _mm512_set1_ps(inv[g]);
    for (int j = 0; j < 4; ++j)
      _mm512_storeu_ps(out + g * out_stride + 16 * j, _mm512_mul_ps(acc[g][j], iv));
  }
}
#endif

// Scores of one cached token for the G query heads of one KV head: s[g] = q_g . k * scale.
inline void token_scores(const float* q, int64_t q_stride, const float* k, int64_t D, int64_t G,
                         float scale, float* s) {
  for (int64_t g = 0; g < G; ++g) s[g] = dot(q + g * q_stride, k, D) * scale;
}

// Any head_dim: the softmax-weighted sum over the positions of one (sequence, KV head), in two
// passes over its blocks: scores (kept in ``scores``, G rows of L), then exp / sum / V sum.
void decode_one(const float* q, int64_t q_stride, const float* kc, const float* vc,
                const int32_t* table, int64_t L, int64_t BS, int64_t blk_stride,
                int64_t tok_stride, int64_t D, int64_t G, float scale, float* scores,
                float* acc, float* out, int64_t out_stride) {
  float s[64];
  float mx[64];
  for (int64_t g = 0; g < G; ++g) mx[g] = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < L; ++t) {
    const float* k = kc + table[t / BS] * blk_stride + (t % BS) * tok_stride;
    token_scores(q, q_stride, k, D, G, scale, s);
    for (int64_t g = 0; g < G; ++g) {
      scores[g * L + t] = s[g];
      mx[g] = s[g] > mx[g] ? s[g] : mx[g];
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * L;
    float sum = 0.f;
    for (int64_t t = 0; t < L; ++t) {
      sg[t] = std::exp(sg[t] - mx[g]);
      sum += sg[t];
    }
    mx[g] = 1.f / sum;
  }
  std::fill(acc, acc + G * D, 0.f);
  for (int64_t t = 0; t < L; ++t) {
    const float* v = vc + table[t / BS] * blk_stride + (t % BS) * tok_stride;
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * L + t];
      float* a = acc + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += p * v[d];
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) out[g * out_stride + d] = acc[g * D + d] * mx[g];
}

// query [N, H, D] (any row stride, D contiguous); caches [NB, BS, KVH, D] contiguous;
// block_tables [N, max_blocks] int32; seq_lens [N] int32. One query token per sequence.
torch::Tensor paged_decode(torch::Tensor query, torch::Tensor key_cache, torch::Tensor value_cache,
                           torch::Tensor block_tables, torch::Tensor seq_lens, double scale) {
  check_f32(query, "query");
  check_f32(key_cache, "key_cache");
  check_f32(value_cache, "value_cache");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(query.stride(2) == 1, "query head_dim must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && seq_lens.scalar_type() == torch::kInt32);
  auto tables = block_tables.contiguous();
  auto lens = seq_lens.contiguous();
  const int64_t N = query.size(0), H = query.size(1), D = query.size(2);
  const int64_t BS = key_cache.size(1), KVH = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == D && H % KVH == 0 && H / KVH <= 64);
  const int64_t G = H / KVH, max_blocks = tables.size(1);
  const int64_t qs0 = query.stride(0), qs1 = query.stride(1);
  const int64_t tok_stride = KVH * D, blk_stride = BS * KVH * D;
  auto out = torch::empty({N, H, D}, query.options());
  const float* q = query.data_ptr<float>();
  const float* kc = key_cache.data_ptr<float>();
  const float* vc = value_cache.data_ptr<float>();
  const int32_t* bt = tables.data_ptr<int32_t>();
  const int32_t* sl = lens.data_ptr<int32_t>();
  float* o = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  int64_t max_len = 0;
  for (int64_t n = 0; n < N; ++n) max_len = sl[n] > max_len ? sl[n] : max_len;

  // One sequence per item, its KV heads in turn: the blocks stream from memory once and the
  // next head's reads of the same cache lines hit L2. Lengths vary a lot within a batch, so the
  // threads take sequences longest first from a shared counter (a static split of the batch left
  // one thread idle while the other finished the long ones).
  std::vector<int64_t> order(N);
  for (int64_t n = 0; n < N; ++n) order[n] = n;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return sl[a] > sl[b]; });
  std::atomic<int64_t> next{0};
  const int64_t row_lines = (tok_stride * 4 + 63) / 64;  // cache lines of one token's K (or V)
  at::parallel_for(0, std::min<int64_t>(N, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    std::vector<float> scores(G * max_len);
    std::vector<float> acc(G * D);
    for (int64_t i = next++; i < N; i = next++) {
      const int64_t n = order[i];
      for (int64_t kvh = 0; kvh < KVH; ++kvh) {
#if defined(__AVX512F__)
        if (D == 64 && G >= 1 && G <= 8) {
          const float* qn = q + n * qs0 + kvh * G * qs1;
          float* on = o + (n * H + kvh * G) * D;
          const int32_t* tn = bt + n * max_blocks;
          switch (G) {
#define PS_CASE(NG) case NG: decode_one_d64<NG>(qn, qs1, kc + kvh * D, vc + kvh * D, tn, sl[n], \
                                                 BS, blk_stride, tok_stride, fscale, \
                                                 scores.data(), on, D, \
                                                 kvh == 0 ? row_lines : 4); continue;
            PS_CASE(1) PS_CASE(2) PS_CASE(3) PS_CASE(4) PS_CASE(5) PS_CASE(6) PS_CASE(7) PS_CASE(8)
#undef PS_CASE
          }
        }
#endif
        decode_one(q + n * qs0 + kvh * G * qs1, qs1, kc + kvh * D, vc + kvh * D,
                   bt + n * max_blocks, sl[n], BS, blk_stride, tok_stride, D, G, fscale,
                   scores.data(), acc.data(), o + (n * H + kvh * G) * D, D);
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Dense fp32 projections: out[M, N] = x[M, K] @ W[N, K]^T (+ bias), W pre-packed into panels.
//
// MKL's sgemm is far from this machine's peak (2-5x slower than the loop below at the small M of
// decode steps, ~1.2x at prefill sizes). The weight of an nn.Linear is packed once, at load, into
// panels of PANEL = 48 output columns stored k-major: packed[p][k][0..47] = W[p*48 + j][k] (zero
// padded past N). The micro-kernel keeps an 8-row x 48-column tile of the output in 24 zmm
// registers, streams the panel once per 8 rows and broadcasts x. Every output element is the sum
// over k in increasing order, whatever M is, so a row's result does not depend on its batch.
constexpr int64_t PANEL = 48;
constexpr int64_t K_CHUNK = 768;  // keeps the panel slice (144 KiB) in L2 across row tiles

bool packed_linear_supported() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

#if defined(__AVX512F__)
template <int MB>
inline void panel_tile(const float* x, int64_t ldx, const float* panel, int64_t k0, int64_t k1,
                       const float* init, int64_t ldi, float* out, int64_t ldo, __mmask16 m0,
                       __mmask16 m1, __mmask16 m2) {
  // init: the partial sums so far (ldi = ldo), or the bias (ldi = 0), or nullptr for zeros.
  __m512 c[MB][3];
  for (int i = 0; i < MB; ++i) {
    if (init != nullptr) {
      c[i][0] = _mm512_maskz_loadu_ps(m0, init + i * ldi);
      c[i][1] = _mm512_maskz_loadu_ps(m1, init + i * ldi + 16);
      c[i][2] = _mm512_maskz_loadu_ps(m2, init + i * ldi + 32);
    } else {
      c[i][0] = c[i][1] = c[i][2] = _mm512_setzero_ps();
    }
  }
  for (int64_t k = k0; k < k1; ++k) {
    const float* w = panel + k * PANEL;
    _mm_prefetch(reinterpret_cast<const char*>(w + 16 * PANEL), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + 16 * PANEL + 16), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + 16 * PANEL + 32), _MM_HINT_T0);
    const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16);
    const __m512 w2 = _mm512_loadu_ps(w + 32);
    for (int i = 0; i < MB; ++i) {
      const __m512 xv = _mm512_set1_ps(x[i * ldx + k]);
      c[i][0] = _mm512_fmadd_ps(xv, w0, c[i][0]);
      c[i][1] = _mm512_fmadd_ps(xv, w1, c[i][1]);
      c[i][2] = _mm512_fmadd_ps(xv, w2, c[i][2]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    _mm512_mask_storeu_ps(out + i * ldo, m0, c[i][0]);
    _mm512_mask_storeu_ps(out + i * ldo + 16, m1, c[i][1]);
    _mm512_mask_storeu_ps(out + i * ldo + 32, m2, c[i][2]);
  }
}

inline __mmask16 column_mask(int64_t remaining) {
  if (remaining >= 16) return 0xFFFF;
  if (remaining <= 0) return 0;
  return static_cast<__mmask16>((1u << remaining) - 1u);
}
#endif

// x [M, K] (rows may be strided, k contiguous); packed [P, K, 48]; bias [N] or empty.
torch::Tensor packed_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor bias,
                            int64_t N) {
  check_f32(x, "x");
  check_f32(packed, "packed");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [M, K] with contiguous rows");
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.size(2) == PANEL &&
              packed.size(1) == x.size(1) && packed.size(0) * PANEL >= N &&
              packed.size(0) * PANEL < N + PANEL, "packed weight does not match x / N");
  const bool has_bias = bias.defined() && bias.numel() > 0;
  if (has_bias) {
    check_f32(bias, "bias");
    TORCH_CHECK(bias.is_contiguous() && bias.numel() == N, "bias must be [N]");
  }
  const int64_t M = x.size(0), K = x.size(1), P = packed.size(0), ldx = x.stride(0);
  auto out = torch::empty({M, N}, x.options());
  if (M == 0) return out;
#if defined(__AVX512F__)
  const float* xp = x.data_ptr<float>();
  const float* pp = packed.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  // Panels are handed out one at a time, not in fixed halves: a thread that loses its core for
  // a while (the router's or scheduler's Python in a local cluster) does not stall the other.
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(P, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t p = next++; p < P; p = next++) {
      const int64_t n0 = p * PANEL;
      const __mmask16 m0 = column_mask(N - n0), m1 = column_mask(N - n0 - 16);
      const __mmask16 m2 = column_mask(N - n0 - 32);
      const float* panel = pp + p * K * PANEL;
      for (int64_t k0 = 0; k0 < K; k0 += K_CHUNK) {
        const int64_t k1 = std::min(K, k0 + K_CHUNK);
        for (int64_t m = 0; m < M; m += 8) {
          const float* xm = xp + m * ldx;
          float* om = op + m * N + n0;
          const float* init = k0 > 0 ? om : (bp != nullptr ? bp + n0 : nullptr);
          const int64_t ldi = k0 > 0 ? N : 0;
          switch (std::min<int64_t>(8, M - m)) {
#define PS_TILE(R) case R: panel_tile<R>(xm, ldx, panel, k0, k1, init, ldi, om, N, m0, m1, m2); break;
            PS_TILE(1) PS_TILE(2) PS_TILE(3) PS_TILE(4) PS_TILE(5) PS_TILE(6) PS_TILE(7)
            default: panel_tile<8>(xm, ldx, panel, k0, k1, init, ldi, om, N, m0, m1, m2);
#undef PS_TILE
          }
        }
      }
    }
  });
#else
  TORCH_CHECK(false, "packed_linear needs AVX-512 (see packed_linear_supported)");
#endif
  return out;
}

// SwiGLU's elementwise half: gate_up [T, 2I] (gate | up, rows may be strided) ->
// silu(gate) * up [T, I], in one pass. silu(g) = g / (1 + exp(-g)), torch's expression.
torch::Tensor silu_mul(torch::Tensor gate_up) {
  check_f32(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "gate_up must be [T, 2I] with contiguous rows");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2, ld = gate_up.stride(0);
  auto out = torch::empty({T, I}, gate_up.options());
  const float* src = gate_up.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* g = src + t * ld;
      const float* u = g + I;
      float* o = dst + t * I;
      int64_t i = 0;
#if defined(__AVX512F__)
      const __m512 one = _mm512_set1_ps(1.f);
      for (; i + 16 <= I; i += 16) {
        const __m512 gv = _mm512_loadu_ps(g + i);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)),
                                              _mm512_loadu_ps(u + i)));
      }
#endif
      for (; i < I; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Prefill / extend attention straight from the paged cache. Sequence b has q_lens[b] new query
// rows starting at row q_starts[b]; they sit at positions seq_lens[b] - q_lens[b] + i and attend
// causally over the cached positions [0, position]. Work items are (sequence, query head, block
// of 64 query rows), longest first, taken by the threads from a shared counter. An item copies
// its K^T [D, L] out of the blocks once, then per tile of R query rows computes the scores
// (R zmm accumulators over 16 keys), the softmax, and P V (R x D/16 accumulators).
#if defined(__AVX512F__)
constexpr int64_t PREFILL_Q_BLOCK = 64;

struct PrefillItem {
  int64_t seq, head, q0, q1, cost;
};

template <int DV>
void prefill_item(const PrefillItem& it, const float* q, int64_t qs0, int64_t qs1,
                  const float* kc, const float* vc, const int32_t* table, int64_t ctx_len,
                  int64_t q_len, int64_t q_row0, int64_t BS, int64_t blk_stride,
                  int64_t tok_stride, int64_t kvh, float scale, float* o, int64_t os0,
                  int64_t os1, std::vector<float>& kt, std::vector<float>& sc) {
  constexpr int64_t D = 16 * DV;
  constexpr int R = DV <= 4 ? 6 : (DV <= 6 ? 4 : 3);
  const int64_t first_pos = ctx_len - q_len;
  const int64_t L = first_pos + it.q1;  // keys needed by the last row of this item
  const int64_t Lp = (L + 15) / 16 * 16;
  kt.assign(D * Lp, 0.f);
  for (int64_t t = 0; t < L; ++t) {
    const float* k = kc + table[t / BS] * blk_stride + (t % BS) * tok_stride + kvh * D;
    for (int64_t d = 0; d < D; ++d) kt[d * Lp + t] = k[d];
  }
  sc.resize(R * Lp);
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i0 = it.q0; i0 < it.q1; i0 += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, it.q1 - i0));
    const float* qr[R];
    int64_t limit[R];  // keys [0, limit) are visible to row r
    for (int r = 0; r < R; ++r) {
      const int64_t i = i0 + (r < rows ? r : 0);
      qr[r] = q + (q_row0 + i) * qs0 + it.head * qs1;
      limit[r] = first_pos + i + 1;
    }
    const int64_t span = (limit[rows - 1] + 15) / 16 * 16;
    for (int64_t t0 = 0; t0 < span; t0 += 16) {
      __m512 acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; ++d) {
        const __m512 kv = _mm512_loadu_ps(kt.data() + d * Lp + t0);
        for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(qr[r][d]), kv, acc[r]);
      }
      for (int r = 0; r < R; ++r) {
        const int64_t visible = limit[r] - t0;
        const __mmask16 m = visible >= 16 ? 0xFFFF
                            : (visible <= 0 ? 0 : static_cast<__mmask16>((1u << visible) - 1u));
        _mm512_storeu_ps(sc.data() + r * Lp + t0,
                         _mm512_mask_mov_ps(neg_inf, m, _mm512_mul_ps(acc[r], _mm512_set1_ps(scale))));
      }
    }
    float inv[R];
    for (int r = 0; r < R; ++r) {
      float* sr = sc.data() + r * Lp;
      __m512 mx = neg_inf;
      for (int64_t t0 = 0; t0 < span; t0 += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sr + t0));
      const __m512 mv = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t t0 = 0; t0 < span; t0 += 16) {
        const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sr + t0), mv));
        _mm512_storeu_ps(sr + t0, e);
        sum = _mm512_add_ps(sum, e);
      }
      inv[r] = 1.f / _mm512_reduce_add_ps(sum);
    }
    __m512 acc[R][DV];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < DV; ++j) acc[r][j] = _mm512_setzero_ps();
    const int64_t last = limit[rows - 1];
    for (int64_t t = 0; t < last; ++t) {
      const float* v = vc + table[t / BS] * blk_stride + (t % BS) * tok_stride + kvh * D;
      __m512 vv[DV];
      for (int j = 0; j < DV; ++j) vv[j] = _mm512_loadu_ps(v + 16 * j);
      for (int r = 0; r < R; ++r) {
        const __m512 p = _mm512_set1_ps(sc[r * Lp + t]);  // 0 past the row's own limit
        for (int j = 0; j < DV; ++j) acc[r][j] = _mm512_fmadd_ps(p, vv[j], acc[r][j]);
      }
    }
    for (int r = 0; r < rows; ++r) {
      float* orow = o + (q_row0 + i0 + r) * os0 + it.head * os1;
      const __m512 iv = _mm512_set1_ps(inv[r]);
      for (int j = 0; j < DV; ++j) _mm512_storeu_ps(orow + 16 * j, _mm512_mul_ps(acc[r][j], iv));
    }
  }
}
#endif

bool prefill_attention_supported(int64_t head_dim) {
#if defined(__AVX512F__)
  return head_dim % 16 == 0 && head_dim >= 16 && head_dim <= 128;
#else
  return false;
#endif
}

// query [T, H, D] (rows may be strided, D contiguous); out [T, H, D] written only at the rows of
// these sequences; caches [NB, BS, KVH, D] contiguous; block_tables [N, max_blocks] int32;
// seq_lens, q_starts, q_lens [N] int64.
void prefill_attention(torch::Tensor query, torch::Tensor key_cache, torch::Tensor value_cache,
                       torch::Tensor block_tables, torch::Tensor seq_lens, torch::Tensor q_starts,
                       torch::Tensor q_lens, double scale, torch::Tensor out) {
  check_f32(query, "query");
  check_f32(key_cache, "key_cache");
  check_f32(value_cache, "value_cache");
  check_f32(out, "out");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, "head_dim must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && seq_lens.scalar_type() == torch::kInt64 &&
              q_starts.scalar_type() == torch::kInt64 && q_lens.scalar_type() == torch::kInt64);
  const int64_t H = query.size(1), D = query.size(2);
  const int64_t BS = key_cache.size(1), KVH = key_cache.size(2);
  TORCH_CHECK(prefill_attention_supported(D) && key_cache.size(3) == D && H % KVH == 0,
              "prefill_attention: unsupported head_dim or heads");
  auto tables = block_tables.contiguous();
  auto lens = seq_lens.contiguous();
  auto starts = q_starts.contiguous();
  auto qlens = q_lens.contiguous();
  const int64_t N = lens.size(0), G = H / KVH, max_blocks = tables.size(1);
  const int64_t* sl = lens.data_ptr<int64_t>();
  const int64_t* qst = starts.data_ptr<int64_t>();
  const int64_t* ql = qlens.data_ptr<int64_t>();
#if defined(__AVX512F__)
  std::vector<PrefillItem> items;
  for (int64_t b = 0; b < N; ++b) {
    TORCH_CHECK(ql[b] >= 1 && ql[b] <= sl[b] && sl[b] <= max_blocks * BS, "bad lengths");
    for (int64_t h = 0; h < H; ++h)
      for (int64_t q0 = 0; q0 < ql[b]; q0 += PREFILL_Q_BLOCK) {
        const int64_t q1 = std::min(ql[b], q0 + PREFILL_Q_BLOCK);
        items.push_back({b, h, q0, q1, (q1 - q0) * (sl[b] - ql[b] + q1)});
      }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const PrefillItem& a, const PrefillItem& b) { return a.cost > b.cost; });
  const float* qp = query.data_ptr<float>();
  const float* kc = key_cache.data_ptr<float>();
  const float* vc = value_cache.data_ptr<float>();
  const int32_t* bt = tables.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  const int64_t tok_stride = KVH * D, blk_stride = BS * KVH * D;
  const float fscale = static_cast<float>(scale);
  std::atomic<int64_t> next{0};
  const int64_t num_items = static_cast<int64_t>(items.size());
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<float> kt, sc;
    for (int64_t n = next++; n < num_items; n = next++) {
      const PrefillItem& it = items[n];
      const int64_t b = it.seq;
      switch (D / 16) {
#define PS_DV(V) case V: prefill_item<V>(it, qp, query.stride(0), query.stride(1), kc, vc, \
    bt + b * max_blocks, sl[b], ql[b], qst[b], BS, blk_stride, tok_stride, it.head / G, fscale, \
    op, out.stride(0), out.stride(1), kt, sc); break;
        PS_DV(1) PS_DV(2) PS_DV(3) PS_DV(4) PS_DV(5) PS_DV(6) PS_DV(7) PS_DV(8)
#undef PS_DV
      }
    }
  });
#endif
}

// HF LlamaRMSNorm in fp32: weight * (x * rsqrt(mean(x^2) + eps)). x [T, C] contiguous.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check_f32(x, "x");
  check_f32(weight, "weight");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && weight.is_contiguous());
  const int64_t T = x.size(0), C = x.size(1);
  auto out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * C;
      float* orow = op + r * C;
      const float mean = dot(xr, xr, C) / static_cast<float>(C);
      const float inv = 1.f / std::sqrt(mean + feps);
      for (int64_t c = 0; c < C; ++c) orow[c] = w[c] * (xr[c] * inv);
    }
  });
  return out;
}

// In place on the q and k heads of a fused qkv row: [T, (Hq + Hk) * D + ...] with row stride
// qkv.stride(0). cos/sin are [T, D] (halves equal, the HF layout). Same arithmetic as
// ``x * cos + rotate_half(x) * sin``.
void rope_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t num_heads,
           int64_t head_dim) {
  check_f32(qkv, "qkv");
  TORCH_CHECK(qkv.stride(1) == 1 && cos.is_contiguous() && sin.is_contiguous());
  const int64_t T = qkv.size(0), D = head_dim, half = D / 2, rs = qkv.stride(0);
  float* base = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(D);
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cp + t * D;
      const float* s = sp + t * D;
      for (int64_t h = 0; h < num_heads; ++h) {
        float* x = base + t * rs + h * D;
        for (int64_t i = 0; i < half; ++i) {
          const float a = x[i] * c[i];
          const float b = -x[i + half] * s[i];
          tmp[i] = a + b;
        }
        for (int64_t i = half; i < D; ++i) {
          const float a = x[i] * c[i];
          const float b = x[i - half] * s[i];
          tmp[i] = a + b;
        }
        for (int64_t i = 0; i < D; ++i) x[i] = tmp[i];
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Greedy sampling over fp32 logits [N, V] (rows contiguous): per row the first index of its
// maximum (what torch.argmax picks; NaN is not handled) and that token's log-probability,
// -log(sum(exp(x - max))). Two passes over each row, the second from L2, instead of torch's
// argmax and logsumexp passes over all of [N, V] (~3x less time at N = 64, V = 49152).
std::tuple<torch::Tensor, torch::Tensor> greedy_sample(torch::Tensor logits) {
  check_f32(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0 && logits.stride(1) == 1,
              "greedy_sample: want [N, V] with contiguous rows");
  const int64_t N = logits.size(0), V = logits.size(1), stride = logits.stride(0);
  auto ids = torch::empty({N}, logits.options().dtype(torch::kInt64));
  auto logprobs = torch::empty({N}, logits.options());
  const float* base = logits.data_ptr<float>();
  int64_t* id_out = ids.data_ptr<int64_t>();
  float* lp_out = logprobs.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* x = base + n * stride;
      float best = x[0];
      int64_t best_id = 0;
      int64_t v = 0;
#if defined(__AVX512F__)
      if (V >= 16) {  // per lane: the first index holding the lane's maximum
        __m512 vmax = _mm512_loadu_ps(x);
        __m512i vidx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        __m512i cur = vidx;
        const __m512i step = _mm512_set1_epi32(16);
        for (v = 16; v + 16 <= V; v += 16) {
          cur = _mm512_add_epi32(cur, step);
          const __m512 xv = _mm512_loadu_ps(x + v);
          const __mmask16 gt = _mm512_cmp_ps_mask(xv, vmax, _CMP_GT_OQ);
          vmax = _mm512_mask_mov_ps(vmax, gt, xv);
          vidx = _mm512_mask_mov_epi32(vidx, gt, cur);
        }
        best = _mm512_reduce_max_ps(vmax);
        const __mmask16 at_max = _mm512_cmp_ps_mask(vmax, _mm512_set1_ps(best), _CMP_EQ_OQ);
        best_id = _mm512_mask_reduce_min_epi32(at_max, vidx);
      }
#endif
      for (; v < V; ++v) {  // the tail's indices all come after the vector part's
        if (x[v] > best) {
          best = x[v];
          best_id = v;
        }
      }
      float sum = 0.f;
      v = 0;
#if defined(__AVX512F__)
      __m512 acc = _mm512_setzero_ps();
      const __m512 vbest = _mm512_set1_ps(best);
      for (; v + 16 <= V; v += 16)
        acc = _mm512_add_ps(acc, exp512(_mm512_sub_ps(_mm512_loadu_ps(x + v), vbest)));
      sum = _mm512_reduce_add_ps(acc);
#endif
      for (; v < V; ++v) sum += std::exp(x[v] - best);
      id_out[n] = best_id;
      lp_out[n] = -std::log(sum);
    }
  });
  return {ids, logprobs};
}

// ---------------------------------------------------------------------------------------------
// One whole Llama decoder layer in one call, for the fp32 CPU path: the same kernels in the same
// order as LlamaDecoderLayer.forward over them, minus ~25 Python-level op dispatches per layer
// (most of a small decode step's time). Attention arguments are the torch backend's step plan:
// decode rows (``dec_*``, empty when none) and prefill sequences (``pre_*``, empty when none).
void write_kv(const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& key_cache,
              torch::Tensor& value_cache, const torch::Tensor& slot_mapping) {
  const int64_t T = k.size(0), row = key_cache.size(2) * key_cache.size(3);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
  float* kc = key_cache.data_ptr<float>();
  float* vc = value_cache.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t ks = k.stride(0), vs = v.stride(0);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t slot = slots[t];
    if (slot < 0) continue;  // padding
    TORCH_CHECK(slot < num_slots, "slot out of range");
    std::copy(kp + t * ks, kp + t * ks + row, kc + slot * row);
    std::copy(vp + t * vs, vp + t * vs + row, vc + slot * row);
  }
}

torch::Tensor decoder_layer(
    torch::Tensor x, torch::Tensor in_norm, torch::Tensor post_norm, double eps,
    torch::Tensor qkv_w, torch::Tensor qkv_b, torch::Tensor o_w, torch::Tensor o_b,
    torch::Tensor gate_up_w, torch::Tensor down_w, int64_t num_heads, int64_t num_kv_heads,
    int64_t intermediate, torch::Tensor cos, torch::Tensor sin, torch::Tensor key_cache,
    torch::Tensor value_cache, torch::Tensor slot_mapping, double scale, torch::Tensor dec_rows,
    torch::Tensor dec_tables, torch::Tensor dec_lens, torch::Tensor pre_tables,
    torch::Tensor pre_lens, torch::Tensor pre_starts, torch::Tensor pre_qlens) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && slot_mapping.scalar_type() == torch::kInt64);
  const int64_t T = x.size(0), C = x.size(1), D = key_cache.size(3);
  const int64_t q_size = num_heads * D, kv_size = num_kv_heads * D;
  const auto none = torch::Tensor();
  auto qkv = packed_linear(rms_norm(x, in_norm, eps), qkv_w, qkv_b, q_size + 2 * kv_size);
  rope_(qkv, cos, sin, num_heads + num_kv_heads, D);
  auto q = qkv.narrow(1, 0, q_size).view({T, num_heads, D});
  write_kv(qkv.narrow(1, q_size, kv_size), qkv.narrow(1, q_size + kv_size, kv_size), key_cache,
           value_cache, slot_mapping);
  const bool has_decode = dec_rows.numel() > 0, has_prefill = pre_lens.numel() > 0;
  torch::Tensor attn;
  if (has_decode && !has_prefill) {  // decode only: rows are the sequences, in order
    attn = paged_decode(q, key_cache, value_cache, dec_tables, dec_lens, scale);
  } else {
    attn = torch::empty({T, num_heads, D}, x.options());
    if (has_decode)
      attn.index_copy_(0, dec_rows, paged_decode(q.index_select(0, dec_rows), key_cache,
                                                 value_cache, dec_tables, dec_lens, scale));
    if (has_prefill)
      prefill_attention(q, key_cache, value_cache, pre_tables, pre_lens, pre_starts, pre_qlens,
                        scale, attn);
  }
  auto h = x + packed_linear(attn.view({T, q_size}), o_w, o_b, C);
  auto mlp = packed_linear(silu_mul(packed_linear(rms_norm(h, post_norm, eps), gate_up_w, none,
                                                  2 * intermediate)),
                           down_w, none, C);
  return h.add_(mlp);
}

// All decoder layers of a model, for one call per step: the weights are handed over once (at
// load), so a step converts a handful of arguments instead of ~26 per layer.
struct LayerStack {
  double eps;
  int64_t num_heads, num_kv_heads, intermediate;
  std::vector<std::vector<torch::Tensor>> layers;  // in_norm, post_norm, qkv, qkv_b, o, o_b, gu, down

  LayerStack(double eps_, int64_t heads, int64_t kv_heads, int64_t inter)
      : eps(eps_), num_heads(heads), num_kv_heads(kv_heads), intermediate(inter) {}

  void add(torch::Tensor in_norm, torch::Tensor post_norm, torch::Tensor qkv_w,
           torch::Tensor qkv_b, torch::Tensor o_w, torch::Tensor o_b, torch::Tensor gate_up_w,
           torch::Tensor down_w) {
    layers.push_back({in_norm, post_norm, qkv_w, qkv_b, o_w, o_b, gate_up_w, down_w});
  }

  torch::Tensor forward(torch::Tensor x, torch::Tensor cos, torch::Tensor sin,
                        std::vector<torch::Tensor> key_caches,
                        std::vector<torch::Tensor> value_caches, torch::Tensor slot_mapping,
                        double scale, torch::Tensor dec_rows, torch::Tensor dec_tables,
                        torch::Tensor dec_lens, torch::Tensor pre_tables, torch::Tensor pre_lens,
                        torch::Tensor pre_starts, torch::Tensor pre_qlens) {
    TORCH_CHECK(key_caches.size() == layers.size() && value_caches.size() == layers.size(),
                "one KV cache per layer");
    for (size_t i = 0; i < layers.size(); ++i) {
      const auto& w = layers[i];
      x = decoder_layer(x, w[0], w[1], eps, w[2], w[3], w[4], w[5], w[6], w[7], num_heads,
                        num_kv_heads, intermediate, cos, sin, key_caches[i], value_caches[i],
                        slot_mapping, scale, dec_rows, dec_tables, dec_lens, pre_tables, pre_lens,
                        pre_starts, pre_qlens);
    }
    return x;
  }
};

// Every kernel runs without the GIL: the router's and scheduler's event loops (same process in a
// local cluster, or the worker's own gRPC threads) keep running while a step computes.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("paged_decode", &paged_decode, release());
  m.def("rms_norm", &rms_norm, release());
  m.def("rope_", &rope_, release());
  m.def("packed_linear", &packed_linear, release());
  m.def("packed_linear_supported", &packed_linear_supported);
  m.def("silu_mul", &silu_mul, release());
  m.def("greedy_sample", &greedy_sample, release());
  m.def("prefill_attention", &prefill_attention, release());
  m.def("prefill_attention_supported", &prefill_attention_supported);
  pybind11::class_<LayerStack>(m, "LayerStack")
      .def(pybind11::init<double, int64_t, int64_t, int64_t>())
      .def("add", &LayerStack::add)
      .def("__len__", [](const LayerStack& s) { return s.layers.size(); })
      .def("forward", &LayerStack::forward, release());
}

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

}  // namespace

#if defined(__AVX512F__)
// head_dim 64, G query heads per KV head known at compile time: q, and the output accumulators,
// live in registers for the whole sequence.
template <int G>
void decode_one_d64(const float* q, int64_t q_stride, const float* kc, const float* vc,
                    const int32_t* table, int64_t L, int64_t BS, int64_t blk_stride,
                    int64_t tok_stride, float scale, float* scores, float* out,
                    int64_t out_stride) {
  __m512 qv[G][4];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < 4; ++j) qv[g][j] = _mm512_loadu_ps(q + g * q_stride + 16 * j);
  float mx[G];
  for (int g = 0; g < G; ++g) mx[g] = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < L; ++t) {
    const float* k = kc + table[t / BS] * blk_stride + (t % BS) * tok_stride;
    const __m512 k0 = _mm512_loadu_ps(k), k1 = _mm512_loadu_ps(k + 16);
    const __m512 k2 = _mm512_loadu_ps(k + 32), k3 = _mm512_loadu_ps(k + 48);
    for (int g = 0; g < G; ++g) {
      __m512 a = _mm512_mul_ps(qv[g][0], k0);
      a = _mm512_fmadd_ps(qv[g][1], k1, a);
      a = _mm512_fmadd_ps(qv[g][2], k2, a);
      a = _mm512_fmadd_ps(qv[g][3], k3, a);
      const float sc = _mm512_reduce_add_ps(a) * scale;
      scores[g * L + t] = sc;
      mx[g] = sc > mx[g] ? sc : mx[g];
    }
  }
  float inv[G];
  for (int g = 0; g < G; ++g) {
    float* sg = scores + g * L;
    float sum = 0.f;
    for (int64_t t = 0; t < L; ++t) {
      sg[t] = std::exp(sg[t] - mx[g]);
      sum += sg[t];
    }
    inv[g] = 1.f / sum;
  }
  __m512 acc[G][4];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < 4; ++j) acc[g][j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < L; ++t) {
    const float* v = vc + table[t / BS] * blk_stride + (t % BS) * tok_stride;
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

  at::parallel_for(0, N * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(G * max_len);
    std::vector<float> acc(G * D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / KVH, kvh = item % KVH;
#if defined(__AVX512F__)
      if (D == 64 && G >= 1 && G <= 8) {
        const float* qn = q + n * qs0 + kvh * G * qs1;
        float* on = o + (n * H + kvh * G) * D;
        const int32_t* tn = bt + n * max_blocks;
        switch (G) {
#define PS_CASE(NG) case NG: decode_one_d64<NG>(qn, qs1, kc + kvh * D, vc + kvh * D, tn, sl[n], \
                                               BS, blk_stride, tok_stride, fscale, \
                                               scores.data(), on, D); continue;
          PS_CASE(1) PS_CASE(2) PS_CASE(3) PS_CASE(4) PS_CASE(5) PS_CASE(6) PS_CASE(7) PS_CASE(8)
#undef PS_CASE
        }
      }
#endif
      decode_one(q + n * qs0 + kvh * G * qs1, qs1, kc + kvh * D, vc + kvh * D,
                 bt + n * max_blocks, sl[n], BS, blk_stride, tok_stride, D, G, fscale,
                 scores.data(), acc.data(), o + (n * H + kvh * G) * D, D);
    }
  });
  return out;
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

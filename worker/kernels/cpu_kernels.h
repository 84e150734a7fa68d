// The fused fp32 CPU kernels, written once over the vector operations of cpu_simd.h (W lanes,
// vf, vload, vfmadd, ...). cpu_ops.cpp includes this file once per instruction set, inside
// namespaces ps_avx512 / ps_avx2 / ps_portable; the Python side picks one namespace's bindings
// per process (cpu_ops.py). No include guard: included once per namespace.
//
// Compiled with -ffp-contract=off: elementwise code evaluates the same expressions in the same
// order as the torch code it replaces, so RoPE is bit-identical; only reductions (RMSNorm's sum
// of squares, attention's dot products and softmax) round differently, as any other kernel would.

inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

constexpr int64_t PREFETCH_AHEAD = 16;  // tokens ahead that the K and V passes prefetch

// ---------------------------------------------------------------------------------------------
// Paged decode attention. head_dim D and G query heads per KV head known at compile time: q, and
// the output accumulators, live in registers (spilling to L1 where the set has too few).
template <int G, int D>
void decode_one_vec(const float* q, int64_t q_stride, const float* kc, const float* vc,
                    const int32_t* table, int64_t L, int64_t BS, int64_t blk_stride,
                    int64_t tok_stride, float scale, float* scores, float* out,
                    int64_t out_stride, int64_t row_lines) {
  constexpr int DV = D / W;
  // row_lines > D / 16 (the first KV head of a sequence): the prefetches also bring the rest of
  // each token's row (the other KV heads' lines) into L2, so memory is read in whole rows and
  // the next heads' passes read from L2 (~10% faster per decode step than per-head prefetching).
  constexpr int64_t own_lines = D * 4 / 64;
  vf qv[G][DV];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < DV; ++j) qv[g][j] = vload(q + g * q_stride + W * j);
  // Scores W tokens at a time: W dot-product vectors, then one transpose-and-add tree.
  const float ninf = -std::numeric_limits<float>::infinity();
  const vf vscale = vset1(scale);
  vf vmx[G];
  for (int g = 0; g < G; ++g) vmx[g] = vset1(ninf);
  for (int64_t t0 = 0; t0 < L; t0 += W) {
    const int64_t count = std::min<int64_t>(W, L - t0);
    const float* k[W];
    for (int j = 0; j < W; ++j) {
      const int64_t t = t0 + (j < count ? j : count - 1);
      k[j] = kc + table[t / BS] * blk_stride + (t % BS) * tok_stride;
    }
    for (int j = 0; j < W && t0 + PREFETCH_AHEAD + j < L; ++j) {
      const int64_t t = t0 + PREFETCH_AHEAD + j;
      const char* nk = reinterpret_cast<const char*>(kc + table[t / BS] * blk_stride +
                                                     (t % BS) * tok_stride);
      for (int64_t line = 0; line < own_lines; ++line) __builtin_prefetch(nk + 64 * line, 0, 3);
      for (int64_t line = own_lines; line < row_lines; ++line)
        __builtin_prefetch(nk + 64 * line, 0, 2);
    }
    for (int g = 0; g < G; ++g) {
      vf dots[W];
      for (int j = 0; j < W; ++j) {
        vf a = vmul(qv[g][0], vload(k[j]));
        for (int c = 1; c < DV; ++c) a = vfmadd(qv[g][c], vload(k[j] + W * c), a);
        dots[j] = a;
      }
      const vf sc = vmul(vhsum(dots), vscale);
      vstore_n(scores + g * L + t0, sc, count);
      vmx[g] = vmax(vmx[g], vkeep_n(sc, count, ninf));
    }
  }
  float inv[G];
  for (int g = 0; g < G; ++g) {
    float* sg = scores + g * L;
    const vf mv = vset1(vreduce_max(vmx[g]));
    vf vsum = vzero();
    int64_t t = 0;
    for (; t + W <= L; t += W) {
      const vf e = vexp(vsub(vload(sg + t), mv));
      vstore(sg + t, e);
      vsum = vadd(vsum, e);
    }
    if (t < L) {
      const vf e = vexp(vsub(vload_n(sg + t, L - t, ninf), mv));  // exp(-inf) = 0
      vstore_n(sg + t, e, L - t);
      vsum = vadd(vsum, e);
    }
    inv[g] = 1.f / vreduce_add(vsum);
  }
  vf acc[G][DV];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < DV; ++j) acc[g][j] = vzero();
  for (int64_t t = 0; t < L; ++t) {
    const float* v = vc + table[t / BS] * blk_stride + (t % BS) * tok_stride;
    if (t + PREFETCH_AHEAD < L) {
      const int64_t tn = t + PREFETCH_AHEAD;
      const char* nv = reinterpret_cast<const char*>(vc + table[tn / BS] * blk_stride +
                                                     (tn % BS) * tok_stride);
      for (int64_t line = 0; line < own_lines; ++line) __builtin_prefetch(nv + 64 * line, 0, 3);
      for (int64_t line = own_lines; line < row_lines; ++line)
        __builtin_prefetch(nv + 64 * line, 0, 2);
    }
    vf vv[DV];
    for (int j = 0; j < DV; ++j) vv[j] = vload(v + W * j);
    for (int g = 0; g < G; ++g) {
      const vf p = vset1(scores[g * L + t]);
      for (int j = 0; j < DV; ++j) acc[g][j] = vfmadd(p, vv[j], acc[g][j]);
    }
  }
  for (int g = 0; g < G; ++g) {
    const vf iv = vset1(inv[g]);
    for (int j = 0; j < DV; ++j) vstore(out + g * out_stride + W * j, vmul(acc[g][j], iv));
  }
}

// Any head_dim: the softmax-weighted sum over the positions of one (sequence, KV head), in two
// passes over its blocks: scores (kept in ``scores``, G rows of L), then exp / sum / V sum.
inline void decode_one(const float* q, int64_t q_stride, const float* kc, const float* vc,
                       const int32_t* table, int64_t L, int64_t BS, int64_t blk_stride,
                       int64_t tok_stride, int64_t D, int64_t G, float scale, float* scores,
                       float* acc, float* out, int64_t out_stride) {
  float mx[64];
  for (int64_t g = 0; g < G; ++g) mx[g] = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < L; ++t) {
    const float* k = kc + table[t / BS] * blk_stride + (t % BS) * tok_stride;
    for (int64_t g = 0; g < G; ++g) {
      const float s = dot(q + g * q_stride, k, D) * scale;
      scores[g * L + t] = s;
      mx[g] = s > mx[g] ? s : mx[g];
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
  const bool vec = (D == 64 || D == 128) && G >= 1 && G <= 8;
  at::parallel_for(0, std::min<int64_t>(N, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    std::vector<float> scores(G * max_len + W);
    std::vector<float> acc(G * D);
    for (int64_t i = next++; i < N; i = next++) {
      const int64_t n = order[i];
      for (int64_t kvh = 0; kvh < KVH; ++kvh) {
        const float* qn = q + n * qs0 + kvh * G * qs1;
        float* on = o + (n * H + kvh * G) * D;
        const int32_t* tn = bt + n * max_blocks;
        if (vec) {
          const int64_t lines = kvh == 0 ? row_lines : D * 4 / 64;
#define PS_CASE(NG, ND) case NG: decode_one_vec<NG, ND>(qn, qs1, kc + kvh * D, vc + kvh * D, \
    tn, sl[n], BS, blk_stride, tok_stride, fscale, scores.data(), on, D, lines); break;
          if (D == 64) {
            switch (G) {
              PS_CASE(1, 64) PS_CASE(2, 64) PS_CASE(3, 64) PS_CASE(4, 64)
              PS_CASE(5, 64) PS_CASE(6, 64) PS_CASE(7, 64) PS_CASE(8, 64)
            }
          } else {
            switch (G) {
              PS_CASE(1, 128) PS_CASE(2, 128) PS_CASE(3, 128) PS_CASE(4, 128)
              PS_CASE(5, 128) PS_CASE(6, 128) PS_CASE(7, 128) PS_CASE(8, 128)
            }
          }
#undef PS_CASE
          continue;
        }
        decode_one(qn, qs1, kc + kvh * D, vc + kvh * D, tn, sl[n], BS, blk_stride, tok_stride,
                   D, G, fscale, scores.data(), acc.data(), on, D);
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Dense fp32 projections: out[M, N] = x[M, K] @ W[N, K]^T (+ bias), W pre-packed into panels.
//
// MKL's sgemm is far from these machines' peak (2-5x slower than the loop below at the small M
// of decode steps, ~1.2x at prefill sizes; much slower still on AMD CPUs). The weight of an
// nn.Linear is packed once, at load, into panels of PANEL = 48 output columns stored k-major:
// packed[p][k][0..47] = W[p*48 + j][k] (zero padded past N). The micro-kernel keeps an MB-row x
// NV-vector tile of the output in registers (AVX-512: 8 x 48 in 24 zmm; AVX2 and portable: 4 x 24
// in 12 ymm, each panel in two halves), streams the panel slice once per tile and broadcasts x.
// Every output element is the FMA chain over k in increasing order, whatever M is, so a row's
// result does not depend on its batch; and AVX-512 and AVX2 give the same bits.
constexpr int64_t PANEL = 48;
constexpr int64_t K_CHUNK = 768;  // keeps the panel slice (144 KiB) in L2 across row tiles
constexpr int TILE_ROWS = W == 16 ? 8 : 4;
constexpr int TILE_VECS = 3;  // vectors per row of a tile
constexpr int64_t TILE_COLS = TILE_VECS * W;
static_assert(PANEL % TILE_COLS == 0, "a panel is a whole number of tiles");

// The pieces of an MB x TILE_VECS register tile that panel_tile and codes_tile share: start it
// from init (rows ldi apart; ldi = 0 repeats one row, the bias; nullptr: zeros), add x[., k] *
// one k-row of weights, store its cols existing columns.
template <int MB>
inline void tile_start(vf (&c)[MB][TILE_VECS], const float* init, int64_t ldi, int64_t cols) {
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < TILE_VECS; ++j)
      c[i][j] = init != nullptr ? vload_n(init + i * ldi + W * j, cols - W * j) : vzero();
}

template <int MB>
inline void tile_fma(vf (&c)[MB][TILE_VECS], const float* x, int64_t ldx, int64_t k,
                     const vf (&wv)[TILE_VECS]) {
  for (int i = 0; i < MB; ++i) {
    const vf xv = vset1(x[i * ldx + k]);
    for (int j = 0; j < TILE_VECS; ++j) c[i][j] = vfmadd(xv, wv[j], c[i][j]);
  }
}

template <int MB>
inline void tile_store(const vf (&c)[MB][TILE_VECS], float* out, int64_t ldo, int64_t cols) {
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < TILE_VECS; ++j) {
      if (cols >= W * (j + 1)) {
        vstore(out + i * ldo + W * j, c[i][j]);
      } else {
        vstore_n(out + i * ldo + W * j, c[i][j], cols - W * j);
      }
    }
}

template <int MB>
inline void panel_tile(const float* x, int64_t ldx, const float* panel, int64_t k0, int64_t k1,
                       const float* init, int64_t ldi, float* out, int64_t ldo, int64_t cols) {
  // init: the partial sums so far (ldi = ldo), or the bias (ldi = 0), or nullptr for zeros.
  // cols: the tile's columns that exist in out (< TILE_COLS only in the last panel).
  vf c[MB][TILE_VECS];
  tile_start<MB>(c, init, ldi, cols);
  for (int64_t k = k0; k < k1; ++k) {
    const float* w = panel + k * PANEL;
    for (int64_t line = 0; line < TILE_COLS * 4; line += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(w + 16 * PANEL) + line, 0, 3);
    vf wv[TILE_VECS];
    for (int j = 0; j < TILE_VECS; ++j) wv[j] = vload(w + W * j);
    tile_fma<MB>(c, x, ldx, k, wv);
  }
  tile_store<MB>(c, out, ldo, cols);
}

// panel_tile for the last row tile too, which may have 1 .. MB rows.
template <int MB = TILE_ROWS>
inline void panel_rows(int64_t rows, const float* x, int64_t ldx, const float* panel, int64_t k0,
                       int64_t k1, const float* init, int64_t ldi, float* out, int64_t ldo,
                       int64_t cols) {
  if constexpr (MB > 1) {
    if (rows < MB) return panel_rows<MB - 1>(rows, x, ldx, panel, k0, k1, init, ldi, out, ldo, cols);
  }
  panel_tile<MB>(x, ldx, panel, k0, k1, init, ldi, out, ldo, cols);
}

// Runs body(panel, first column in the panel, first output column, columns) for every tile of
// TILE_COLS output columns, on all threads. Work items are handed out one at a time, not in
// fixed halves: a thread that loses its core for a while (the router's or scheduler's Python in
// a local cluster) does not stall the other.
template <class Body>
inline void for_each_column_tile(int64_t N, const Body& body) {
  constexpr int64_t tiles_per_panel = PANEL / TILE_COLS;
  const int64_t items = (N + TILE_COLS - 1) / TILE_COLS;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(items, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t item = next++; item < items; item = next++) {
      const int64_t p = item / tiles_per_panel;
      const int64_t c0 = (item % tiles_per_panel) * TILE_COLS;
      const int64_t n0 = p * PANEL + c0;
      body(p, c0, n0, std::min<int64_t>(TILE_COLS, N - n0));
    }
  });
}

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
  const int64_t M = x.size(0), K = x.size(1), ldx = x.stride(0);
  auto out = torch::empty({M, N}, x.options());
  if (M == 0) return out;
  const float* xp = x.data_ptr<float>();
  const float* pp = packed.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  for_each_column_tile(N, [&](int64_t p, int64_t c0, int64_t n0, int64_t cols) {
    const float* panel = pp + p * K * PANEL + c0;
    for (int64_t k0 = 0; k0 < K; k0 += K_CHUNK) {
      const int64_t k1 = std::min(K, k0 + K_CHUNK);
      for (int64_t m = 0; m < M; m += TILE_ROWS) {
        const float* xm = xp + m * ldx;
        float* om = op + m * N + n0;
        const float* init = k0 > 0 ? om : (bp != nullptr ? bp + n0 : nullptr);
        const int64_t ldi = k0 > 0 ? N : 0;
        panel_rows(std::min<int64_t>(TILE_ROWS, M - m), xm, ldx, panel, k0, k1, init, ldi, om, N,
                   cols);
      }
    }
  });
  return out;
}

// The same projection from weights kept as 8-bit codes: a weight that is exactly
// scale * code + offset (one scale and offset per output column and block of 32 along k, as
// in weights dequantized from GGUF's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0) is stored as its code, packed
// like the fp32 panels (codes[p][k][0..47], one byte each), with scales[p][k / 32][0 | 1][0..47]
// holding the block's scale and offset. The tile rebuilds each fp32 weight as fma(code, scale, offset) --
// scale * code is exact, checked with the rest bit for bit when the codes are made (cpu_ops.py),
// so one rounding or two give the same weight -- and then runs the FMA chain of packed_linear,
// so both give the same bits. It streams 1.25 bytes per weight instead of 4: a decode step of a
// few rows waits on that stream (2-3x faster at 1-4 rows, ~1.1x at 64, equal at prefill sizes).
constexpr int64_t CODE_BLOCK = 32;

// slice: nullptr, or where to keep the rebuilt weights ([K][PANEL], columns [0, TILE_COLS)) for
// the item's next row tiles (packed_linear's panel_tile then reads them from L2).
template <int MB>
inline void codes_tile(const float* x, int64_t ldx, const uint8_t* codes, const float* scales,
                       int64_t K, const float* bias, float* out, int64_t ldo, int64_t cols,
                       float* slice) {
  vf c[MB][TILE_VECS];
  tile_start<MB>(c, bias, 0, cols);
  for (int64_t k0 = 0; k0 < K; k0 += CODE_BLOCK) {
    const float* sc = scales + (k0 / CODE_BLOCK) * 2 * PANEL;
    vf d[TILE_VECS], m[TILE_VECS];
    for (int j = 0; j < TILE_VECS; ++j) {
      d[j] = vload(sc + W * j);
      m[j] = vload(sc + PANEL + W * j);
    }
    for (int64_t k = k0; k < k0 + CODE_BLOCK; ++k) {
      const uint8_t* w = codes + k * PANEL;
      __builtin_prefetch(w + 16 * PANEL, 0, 3);
      vf wv[TILE_VECS];
      for (int j = 0; j < TILE_VECS; ++j) wv[j] = vfmadd(vload_u8(w + W * j), d[j], m[j]);
      if (slice != nullptr)
        for (int j = 0; j < TILE_VECS; ++j) vstore(slice + k * PANEL + W * j, wv[j]);
      tile_fma<MB>(c, x, ldx, k, wv);
    }
  }
  tile_store<MB>(c, out, ldo, cols);
}

template <int MB = TILE_ROWS>
inline void codes_rows(int64_t rows, const float* x, int64_t ldx, const uint8_t* codes,
                       const float* scales, int64_t K, const float* bias, float* out, int64_t ldo,
                       int64_t cols, float* slice) {
  if constexpr (MB > 1) {
    if (rows < MB)
      return codes_rows<MB - 1>(rows, x, ldx, codes, scales, K, bias, out, ldo, cols, slice);
  }
  codes_tile<MB>(x, ldx, codes, scales, K, bias, out, ldo, cols, slice);
}

// x [M, K] (rows may be strided, k contiguous); codes [P, K, 48] uint8; scales
// [P, K / 32, 2, 48]; bias [N] or empty.
torch::Tensor codes_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales,
                           torch::Tensor bias, int64_t N) {
  check_f32(x, "x");
  check_f32(scales, "scales");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [M, K] with contiguous rows");
  const int64_t M = x.size(0), K = x.size(1), ldx = x.stride(0);
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.dim() == 3 && codes.is_contiguous() &&
              codes.size(2) == PANEL && codes.size(1) == K && K % CODE_BLOCK == 0 &&
              codes.size(0) * PANEL >= N && codes.size(0) * PANEL < N + PANEL,
              "weight codes do not match x / N");
  TORCH_CHECK(scales.dim() == 4 && scales.is_contiguous() && scales.size(0) == codes.size(0) &&
              scales.size(1) == K / CODE_BLOCK && scales.size(2) == 2 && scales.size(3) == PANEL,
              "weight scales do not match the codes");
  const bool has_bias = bias.defined() && bias.numel() > 0;
  if (has_bias) {
    check_f32(bias, "bias");
    TORCH_CHECK(bias.is_contiguous() && bias.numel() == N, "bias must be [N]");
  }
  auto out = torch::empty({M, N}, x.options());
  if (M == 0) return out;
  const float* xp = x.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  for_each_column_tile(N, [&](int64_t p, int64_t c0, int64_t n0, int64_t cols) {
    // More rows than one tile: the first row tile keeps the weights it rebuilds here, for the
    // others (from L2, as packed_linear's panels). One buffer per thread, kept across calls.
    thread_local std::vector<float> slice;
    if (M > TILE_ROWS && static_cast<int64_t>(slice.size()) < K * PANEL) slice.resize(K * PANEL);
    const uint8_t* pc = cp + p * K * PANEL + c0;
    const float* ps = sp + p * (K / CODE_BLOCK) * 2 * PANEL + c0;
    const float* bias = bp != nullptr ? bp + n0 : nullptr;
    codes_rows(std::min<int64_t>(M, TILE_ROWS), xp, ldx, pc, ps, K, bias, op + n0, N, cols,
               M > TILE_ROWS ? slice.data() : nullptr);
    for (int64_t m = TILE_ROWS; m < M; m += TILE_ROWS)
      panel_rows(std::min<int64_t>(TILE_ROWS, M - m), xp + m * ldx, ldx, slice.data(), 0, K, bias,
                 0, op + m * N + n0, N, cols);
  });
  return out;
}

// A projection's weight as the stack holds it: its codes where it has them (then it has no fp32
// panels: the codes give the same bits at every batch size, from a third of the memory), else
// its fp32 panels.
torch::Tensor linear(torch::Tensor x, torch::Tensor packed, torch::Tensor codes,
                     torch::Tensor scales, torch::Tensor bias, int64_t N) {
  if (codes.defined() && codes.numel() > 0) return codes_linear(x, codes, scales, bias, N);
  return packed_linear(x, packed, bias, N);
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
    const vf one = vset1(1.f);
    for (int64_t t = begin; t < end; ++t) {
      const float* g = src + t * ld;
      const float* u = g + I;
      float* o = dst + t * I;
      for (int64_t i = 0; i < I; i += W) {
        const int64_t n = std::min<int64_t>(W, I - i);
        const vf gv = vload_n(g + i, n);
        const vf e = vexp(vsub(vzero(), gv));
        vstore_n(o + i, vmul(vdiv(gv, vadd(one, e)), vload_n(u + i, n)), n);
      }
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
// (R vector accumulators over W keys), the softmax, and P V (R x CV vector accumulators per
// chunk of CV vectors of the head).
constexpr int64_t PREFILL_Q_BLOCK = 64;

struct PrefillItem {
  int64_t seq, head, q0, q1, cost;
};

template <int D>
void prefill_item(const PrefillItem& it, const float* q, int64_t qs0, int64_t qs1,
                  const float* kc, const float* vc, const int32_t* table, int64_t ctx_len,
                  int64_t q_len, int64_t q_row0, int64_t BS, int64_t blk_stride,
                  int64_t tok_stride, int64_t kvh, float scale, float* o, int64_t os0,
                  int64_t os1, std::vector<float>& kt, std::vector<float>& sc) {
  constexpr int DV = D / W;
  // Row tile and head chunk sized to the register file: 32 zmm hold 6 x 4 accumulators (or 3 x
  // 8); 16 ymm hold 3 x 4.
  constexpr int CV = W == 16 ? DV : (DV % 4 == 0 ? 4 : (DV % 3 == 0 ? 3 : (DV % 2 == 0 ? 2 : 1)));
  constexpr int R = W == 16 ? (DV <= 4 ? 6 : (DV <= 6 ? 4 : 3)) : 3;
  static_assert(DV % CV == 0, "head chunks divide the head");
  const int64_t first_pos = ctx_len - q_len;
  const int64_t L = first_pos + it.q1;  // keys needed by the last row of this item
  const int64_t Lp = (L + W - 1) / W * W;
  kt.assign(D * Lp, 0.f);
  for (int64_t t = 0; t < L; ++t) {
    const float* k = kc + table[t / BS] * blk_stride + (t % BS) * tok_stride + kvh * D;
    for (int64_t d = 0; d < D; ++d) kt[d * Lp + t] = k[d];
  }
  sc.resize(R * Lp);
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t i0 = it.q0; i0 < it.q1; i0 += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, it.q1 - i0));
    const float* qr[R];
    int64_t limit[R];  // keys [0, limit) are visible to row r
    for (int r = 0; r < R; ++r) {
      const int64_t i = i0 + (r < rows ? r : 0);
      qr[r] = q + (q_row0 + i) * qs0 + it.head * qs1;
      limit[r] = first_pos + i + 1;
    }
    const int64_t span = (limit[rows - 1] + W - 1) / W * W;
    for (int64_t t0 = 0; t0 < span; t0 += W) {
      vf acc[R];
      for (int r = 0; r < R; ++r) acc[r] = vzero();
      for (int64_t d = 0; d < D; ++d) {
        const vf kv = vload(kt.data() + d * Lp + t0);
        for (int r = 0; r < R; ++r) acc[r] = vfmadd(vset1(qr[r][d]), kv, acc[r]);
      }
      for (int r = 0; r < R; ++r)
        vstore(sc.data() + r * Lp + t0, vkeep_n(vmul(acc[r], vset1(scale)), limit[r] - t0, ninf));
    }
    float inv[R];
    for (int r = 0; r < R; ++r) {
      float* sr = sc.data() + r * Lp;
      vf mx = vset1(ninf);
      for (int64_t t0 = 0; t0 < span; t0 += W) mx = vmax(mx, vload(sr + t0));
      const vf mv = vset1(vreduce_max(mx));
      vf sum = vzero();
      for (int64_t t0 = 0; t0 < span; t0 += W) {
        const vf e = vexp(vsub(vload(sr + t0), mv));
        vstore(sr + t0, e);
        sum = vadd(sum, e);
      }
      inv[r] = 1.f / vreduce_add(sum);
    }
    const int64_t last = limit[rows - 1];
    for (int c0 = 0; c0 < DV; c0 += CV) {
      vf acc[R][CV];
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < CV; ++j) acc[r][j] = vzero();
      for (int64_t t = 0; t < last; ++t) {
        const float* v = vc + table[t / BS] * blk_stride + (t % BS) * tok_stride + kvh * D +
                         W * c0;
        vf vv[CV];
        for (int j = 0; j < CV; ++j) vv[j] = vload(v + W * j);
        for (int r = 0; r < R; ++r) {
          const vf p = vset1(sc[r * Lp + t]);  // 0 past the row's own limit
          for (int j = 0; j < CV; ++j) acc[r][j] = vfmadd(p, vv[j], acc[r][j]);
        }
      }
      for (int r = 0; r < rows; ++r) {
        float* orow = o + (q_row0 + i0 + r) * os0 + it.head * os1 + W * c0;
        const vf iv = vset1(inv[r]);
        for (int j = 0; j < CV; ++j) vstore(orow + W * j, vmul(acc[r][j], iv));
      }
    }
  }
}

bool prefill_attention_supported(int64_t head_dim) {
  return head_dim % 16 == 0 && head_dim >= 16 && head_dim <= 128;
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
      switch (D) {
#define PS_D(ND) case ND: prefill_item<ND>(it, qp, query.stride(0), query.stride(1), kc, vc, \
    bt + b * max_blocks, sl[b], ql[b], qst[b], BS, blk_stride, tok_stride, it.head / G, fscale, \
    op, out.stride(0), out.stride(1), kt, sc); break;
        PS_D(16) PS_D(32) PS_D(48) PS_D(64) PS_D(80) PS_D(96) PS_D(112) PS_D(128)
#undef PS_D
      }
    }
  });
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
// argmax and logsumexp passes over all of [N, V] (~3x less time at N = 64, V = 49152). The sum
// keeps 4 x W partial sums (32 on AVX2, 64 on AVX-512), so its rounding error stays well below
// 1e-5 at vocabulary sizes of 10^5 on every instruction set.
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
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int64_t n = begin; n < end; ++n) {
      const float* x = base + n * stride;
      // Per lane: the first index (as a float: exact below 2^24) holding the lane's maximum.
      vf vmx = vset1(ninf), vidx = vset1(0.f), cur;
      float lane[W];
      for (int i = 0; i < W; ++i) lane[i] = static_cast<float>(i);
      cur = vload(lane);
      const vf step = vset1(static_cast<float>(W));
      int64_t v = 0;
      for (; v + W <= V; v += W) {
        const vf xv = vload(x + v);
        vidx = vselect_gt(xv, vmx, cur, vidx);
        vmx = vmax(vmx, xv);
        cur = vadd(cur, step);
      }
      float mxs[W], ids_f[W];
      vstore(mxs, vmx);
      vstore(ids_f, vidx);
      float best = mxs[0];
      int64_t best_id = -1;
      for (int i = 0; i < W; ++i) best = mxs[i] > best ? mxs[i] : best;
      for (int i = 0; i < W; ++i)
        if (mxs[i] == best && v > 0) {
          const auto id = static_cast<int64_t>(ids_f[i]);
          best_id = best_id < 0 || id < best_id ? id : best_id;
        }
      for (; v < V; ++v) {  // the tail's indices all come after the vector part's
        if (best_id < 0 || x[v] > best) {
          best = x[v];
          best_id = v;
        }
      }
      const vf vbest = vset1(best);
      vf acc[4] = {vzero(), vzero(), vzero(), vzero()};
      v = 0;
      for (; v + 4 * W <= V; v += 4 * W)
        for (int a = 0; a < 4; ++a)
          acc[a] = vadd(acc[a], vexp(vsub(vload(x + v + a * W), vbest)));
      for (; v < V; v += W) acc[0] = vadd(acc[0], vexp(vsub(vload_n(x + v, V - v, ninf), vbest)));
      const float sum = vreduce_add(vadd(vadd(acc[0], acc[1]), vadd(acc[2], acc[3])));
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
    const std::vector<torch::Tensor>& w, int64_t num_heads, int64_t num_kv_heads,
    int64_t intermediate, torch::Tensor cos, torch::Tensor sin, torch::Tensor key_cache,
    torch::Tensor value_cache, torch::Tensor slot_mapping, double scale, torch::Tensor dec_rows,
    torch::Tensor dec_tables, torch::Tensor dec_lens, torch::Tensor pre_tables,
    torch::Tensor pre_lens, torch::Tensor pre_starts, torch::Tensor pre_qlens) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && slot_mapping.scalar_type() == torch::kInt64);
  const int64_t T = x.size(0), C = x.size(1), D = key_cache.size(3);
  const int64_t q_size = num_heads * D, kv_size = num_kv_heads * D;
  const auto none = torch::Tensor();
  // w: per projection (qkv, o, gate_up, down) its panels, codes and scales; then qkv's and o's
  // biases (LayerStack::add's order).
  auto proj = [&](const torch::Tensor& in, int i, const torch::Tensor& b, int64_t n) {
    return linear(in, w[3 * i], w[3 * i + 1], w[3 * i + 2], b, n);
  };
  auto qkv = proj(rms_norm(x, in_norm, eps), 0, w[12], q_size + 2 * kv_size);
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
  auto h = x + proj(attn.view({T, q_size}), 1, w[13], C);
  auto mlp = proj(silu_mul(proj(rms_norm(h, post_norm, eps), 2, none, 2 * intermediate)), 3, none,
                  C);
  return h.add_(mlp);
}

// All decoder layers of a model, for one call per step: the weights are handed over once (at
// load), so a step converts a handful of arguments instead of ~26 per layer.
struct LayerStack {
  double eps;
  int64_t num_heads, num_kv_heads, intermediate;
  std::vector<torch::Tensor> norms;                  // in_norm, post_norm per layer
  std::vector<std::vector<torch::Tensor>> weights;   // decoder_layer's ``w`` per layer

  LayerStack(double eps_, int64_t heads, int64_t kv_heads, int64_t inter)
      : eps(eps_), num_heads(heads), num_kv_heads(kv_heads), intermediate(inter) {}

  // projections: qkv, o, gate_up, down, each as (panels, codes, scales), the panels empty where
  // the weight has codes and the codes and scales empty where it has none; then the qkv and o
  // biases (empty when none).
  void add(torch::Tensor in_norm, torch::Tensor post_norm, std::vector<torch::Tensor> w) {
    TORCH_CHECK(w.size() == 14, "LayerStack.add: want 4 x (panels, codes, scales) + 2 biases");
    norms.push_back(in_norm);
    norms.push_back(post_norm);
    weights.push_back(std::move(w));
  }

  torch::Tensor forward(torch::Tensor x, torch::Tensor cos, torch::Tensor sin,
                        std::vector<torch::Tensor> key_caches,
                        std::vector<torch::Tensor> value_caches, torch::Tensor slot_mapping,
                        double scale, torch::Tensor dec_rows, torch::Tensor dec_tables,
                        torch::Tensor dec_lens, torch::Tensor pre_tables, torch::Tensor pre_lens,
                        torch::Tensor pre_starts, torch::Tensor pre_qlens) {
    TORCH_CHECK(key_caches.size() == weights.size() && value_caches.size() == weights.size(),
                "one KV cache per layer");
    for (size_t i = 0; i < weights.size(); ++i) {
      x = decoder_layer(x, norms[2 * i], norms[2 * i + 1], eps, weights[i], num_heads,
                        num_kv_heads, intermediate, cos, sin, key_caches[i], value_caches[i],
                        slot_mapping, scale, dec_rows, dec_tables, dec_lens, pre_tables, pre_lens,
                        pre_starts, pre_qlens);
    }
    return x;
  }
};

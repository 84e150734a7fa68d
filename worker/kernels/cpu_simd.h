// The handful of fp32 vector operations the kernels in cpu_kernels.h are written in, once per
// instruction set. cpu_ops.cpp includes this file (and then cpu_kernels.h) three times, each
// inside its own namespace and, on x86-64, its own `#pragma GCC target` region, with exactly one
// of PS_SIMD_AVX512 / PS_SIMD_AVX2 / PS_SIMD_PORTABLE defined:
//
//   AVX-512   16 lanes, 32 registers, masked loads and stores, FMA
//   AVX2+FMA   8 lanes, 16 registers, FMA (Zen 2/3, Haswell and later)
//   portable   4 lanes of GCC vector extensions: SSE2 on any x86-64, NEON on aarch64; no FMA
//              (fmadd is a multiply then an add, as the source is compiled with
//              -ffp-contract=off), so its sums round differently from the two above
//
// vexp is the same algorithm on every set (Cephes expf); on AVX-512 and AVX2 it gives the same
// bits lane for lane. No include guard: included once per namespace.

#if defined(PS_SIMD_AVX512)

constexpr int W = 16;  // lanes
using vf = __m512;

inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset1(float x) { return _mm512_set1_ps(x); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
// W bytes (0..255) as floats (exact).
inline vf vload_u8(const uint8_t* p) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
}
inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF)
                 : (n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1u));
}
// Lanes [0, n) from p, `fill` in the rest (nothing is read past p + n).
inline vf vload_n(const float* p, int64_t n, float fill = 0.f) {
  return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), first_lanes(n), p);
}
inline void vstore_n(float* p, vf v, int64_t n) { _mm512_mask_storeu_ps(p, first_lanes(n), v); }
// Lanes [0, n) of v, `fill` in the rest.
inline vf vkeep_n(vf v, int64_t n, float fill) {
  return _mm512_mask_mov_ps(_mm512_set1_ps(fill), first_lanes(n), v);
}
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
inline vf vfmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }   // a * b + c
inline vf vfnmadd(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); } // c - a * b
inline float vreduce_add(vf v) { return _mm512_reduce_add_ps(v); }
inline float vreduce_max(vf v) { return _mm512_reduce_max_ps(v); }
// Round to nearest, ties to even.
inline vf vround(vf x) {
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
// 2^n for integral n in [-126, 127] (exact).
inline vf vpow2(vf n) {
  const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
  return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
}
// Lanes where x < limit become 0.
inline vf vzero_below(vf v, vf x, float limit) {
  return _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(x, _mm512_set1_ps(limit), _CMP_LT_OQ),
                            _mm512_setzero_ps());
}
// Lanes where a > b take c, the others d.
inline vf vselect_gt(vf a, vf b, vf c, vf d) {
  return _mm512_mask_mov_ps(d, _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ), c);
}

// r[i] = the sum of the 16 lanes of v[i]: pairs, then quads within 128-bit lanes, then across
// the four 128-bit lanes (15 adds instead of 16 full horizontal reductions).
inline vf vhsum(const vf* v) {
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

#elif defined(PS_SIMD_AVX2)

constexpr int W = 8;
using vf = __m256;

inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset1(float x) { return _mm256_set1_ps(x); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vload_u8(const uint8_t* p) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
}
inline __m256i first_lanes(int64_t n) {
  const int32_t k = static_cast<int32_t>(n < 0 ? 0 : (n > 8 ? 8 : n));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline vf vload_n(const float* p, int64_t n, float fill = 0.f) {
  const __m256i m = first_lanes(n);
  return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
}
inline void vstore_n(float* p, vf v, int64_t n) { _mm256_maskstore_ps(p, first_lanes(n), v); }
inline vf vkeep_n(vf v, int64_t n, float fill) {
  return _mm256_blendv_ps(_mm256_set1_ps(fill), v, _mm256_castsi256_ps(first_lanes(n)));
}
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
inline vf vfmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vfnmadd(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
inline float vreduce_add(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float vreduce_max(vf v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline vf vround(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vpow2(vf n) {
  const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}
inline vf vzero_below(vf v, vf x, float limit) {
  return _mm256_blendv_ps(v, _mm256_setzero_ps(),
                          _mm256_cmp_ps(x, _mm256_set1_ps(limit), _CMP_LT_OQ));
}
inline vf vselect_gt(vf a, vf b, vf c, vf d) {
  return _mm256_blendv_ps(d, c, _mm256_cmp_ps(a, b, _CMP_GT_OQ));
}

// r[i] = the sum of the 8 lanes of v[i] (pairs, quads within 128-bit lanes, then the halves).
inline vf vhsum(const vf* v) {
  __m256 a[4], b[2];
  for (int i = 0; i < 4; ++i)
    a[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 2; ++i) {
    const __m256d x = _mm256_castps_pd(a[2 * i]), y = _mm256_castps_pd(a[2 * i + 1]);
    b[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)),
                         _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
  }
  return _mm256_add_ps(_mm256_permute2f128_ps(b[0], b[1], 0x20),
                       _mm256_permute2f128_ps(b[0], b[1], 0x31));
}

#elif defined(PS_SIMD_PORTABLE)

constexpr int W = 4;  // one SSE2 / NEON register
typedef float vf __attribute__((vector_size(16)));
typedef int32_t vi __attribute__((vector_size(16)));

inline vf vzero() { return vf{0.f, 0.f, 0.f, 0.f}; }
inline vf vset1(float x) { return vf{x, x, x, x}; }
inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline vf vload_u8(const uint8_t* p) {
  return vf{static_cast<float>(p[0]), static_cast<float>(p[1]), static_cast<float>(p[2]),
            static_cast<float>(p[3])};
}
inline vf vload_n(const float* p, int64_t n, float fill = 0.f) {
  if (n >= W) return vload(p);
  vf v = vset1(fill);
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  return v;
}
inline void vstore_n(float* p, vf v, int64_t n) {
  if (n >= W) return vstore(p, v);
  for (int64_t i = 0; i < n; ++i) p[i] = v[i];
}
inline vf vkeep_n(vf v, int64_t n, float fill) {
  for (int64_t i = n < 0 ? 0 : n; i < W; ++i) v[i] = fill;
  return v;
}
inline vf vadd(vf a, vf b) { return a + b; }
inline vf vsub(vf a, vf b) { return a - b; }
inline vf vmul(vf a, vf b) { return a * b; }
inline vf vdiv(vf a, vf b) { return a / b; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline vf vmin(vf a, vf b) { return a < b ? a : b; }
inline vf vfmadd(vf a, vf b, vf c) { return a * b + c; }   // two roundings (no FMA here)
inline vf vfnmadd(vf a, vf b, vf c) { return c - a * b; }
inline float vreduce_add(vf v) { return (v[0] + v[2]) + (v[1] + v[3]); }
inline float vreduce_max(vf v) {
  const float a = v[0] > v[2] ? v[0] : v[2], b = v[1] > v[3] ? v[1] : v[3];
  return a > b ? a : b;
}
// Adding and subtracting 1.5 * 2^23 rounds to the nearest integer, ties to even (|x| < 2^22).
inline vf vround(vf x) {
  const vf magic = vset1(12582912.f);
  return (x + magic) - magic;
}
inline vf vpow2(vf n) {
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf r;
  std::memcpy(&r, &e, sizeof(r));
  return r;
}
inline vf vzero_below(vf v, vf x, float limit) { return x < vset1(limit) ? vzero() : v; }
inline vf vselect_gt(vf a, vf b, vf c, vf d) { return a > b ? c : d; }
inline vf vhsum(const vf* v) {
  return vf{vreduce_add(v[0]), vreduce_add(v[1]), vreduce_add(v[2]), vreduce_add(v[3])};
}

#else
#error "define one of PS_SIMD_AVX512, PS_SIMD_AVX2, PS_SIMD_PORTABLE"
#endif

// exp on every lane (Cephes expf: range reduction by ln 2, degree-6 polynomial, scale by 2^n);
// within 2 ulp of std::exp over the float range, 0 below -87.3 (and for -inf), +inf above 88.7.
// The scale is two exact multiplies by 2^(n/2) and 2^(n - n/2), so the one rounding happens
// where a single p * 2^n would round (subnormal results, overflow at n = 128).
inline vf vexp(vf x0) {
  const vf xr = vmin(vmax(x0, vset1(-87.33654f)), vset1(88.72284f));
  const vf n = vround(vmul(xr, vset1(1.44269504088896341f)));
  vf r = vfnmadd(n, vset1(0.693359375f), xr);
  r = vfnmadd(n, vset1(-2.12194440e-4f), r);
  vf p = vset1(1.9875691500e-4f);
  p = vfmadd(p, r, vset1(1.3981999507e-3f));
  p = vfmadd(p, r, vset1(8.3334519073e-3f));
  p = vfmadd(p, r, vset1(4.1665795894e-2f));
  p = vfmadd(p, r, vset1(1.6666665459e-1f));
  p = vfmadd(p, r, vset1(5.0000001201e-1f));
  p = vfmadd(p, vmul(r, r), vadd(r, vset1(1.f)));
  const vf half = vround(vmul(n, vset1(0.5f)));
  const vf scaled = vmul(vmul(p, vpow2(half)), vpow2(vsub(n, half)));
  return vzero_below(scaled, x0, -87.33654f);
}

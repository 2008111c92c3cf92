/* The prelude of every compiled program: _codegen.py writes each program after it, and the two
   are compiled as one source, which the program's cache key hashes (sqrt_probe.cpp includes it
   likewise). What it holds: the context the kernel passes a program (kernel.cpp's Ctx), the
   storage conversions of float16 and bfloat16 (per element and on whole vectors), the CPU's
   whole vectors, and MKL's sqrt. */
#include <stdint.h>
#include <string.h>
#include <math.h>
#if defined(__AVX__)
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#endif

struct polyak_ctx {
  void (*vms)(int, const float*, float*, long long);
  void (*vmd)(int, const double*, double*, long long);
  long long mode;
  /* bitsandbytes' maps for 8-bit state (kernel/quant.h's QuantMaps), by whether signed: the
     values, the padded midpoints, the table of midpoints below each upper-16-bit pattern, and
     how many midpoints lie within one pattern. */
  const float* qmap[2];
  const float* qmid[2];
  const uint8_t* qbelow[2];
  const uint32_t* qpack[2];
  const int64_t* qinside;
};

#define PK_INLINE static inline __attribute__((always_inline))

PK_INLINE float pk_bits_f(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
PK_INLINE uint32_t pk_f_bits(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }
PK_INLINE double pk_bits_d(uint64_t b) { double f; memcpy(&f, &b, 8); return f; }
PK_INLINE uint64_t pk_d_bits(double f) { uint64_t b; memcpy(&b, &f, 8); return b; }
PK_INLINE float pk_neg_f(float x) { return pk_bits_f(pk_f_bits(x) ^ 0x80000000u); }
PK_INLINE double pk_neg_d(double x) { return pk_bits_d(pk_d_bits(x) ^ 0x8000000000000000ull); }
/* x * y + z rounded twice, for torch's kernels that do not fuse (-ffp-contract=off keeps it). */
PK_INLINE float pk_mad_f(float x, float y, float z) { return x * y + z; }
PK_INLINE double pk_mad_d(double x, double y, double z) { return x * y + z; }

/* bfloat16: the upper half of a float; stores round to nearest even, NaN to 0x7fc0. */
PK_INLINE float pk_bf16_load(uint16_t h) { return pk_bits_f((uint32_t)h << 16); }
PK_INLINE uint16_t pk_bf16_store(float f) {
  const uint32_t u = pk_f_bits(f);
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return f != f ? (uint16_t)0x7fc0u : (uint16_t)r;
}

/* float16, IEEE binary16: exact widening; narrowing rounds to nearest even, NaN to 0x7e00. */
PK_INLINE float pk_f16_load(uint16_t h) {
  const uint32_t w = (uint32_t)h << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = pk_bits_f((two_w >> 4) + (0xe0u << 23)) * pk_bits_f(0x7800000u);
  const float denormalized = pk_bits_f((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result = sign | (two_w < (1u << 27) ? pk_f_bits(denormalized)
                                                       : pk_f_bits(normalized));
  return pk_bits_f(result);
}
PK_INLINE uint16_t pk_f16_store(float f) {
  float base = (fabsf(f) * pk_bits_f(0x77800000u)) * pk_bits_f(0x08800000u);
  const uint32_t w = pk_f_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xff000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = pk_bits_f((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = pk_f_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007c00u;
  const uint32_t mantissa_bits = bits & 0x00000fffu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return (uint16_t)((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : nonsign));
}

/* Whole vectors of PK_W floats, where the CPU has fused multiply-adds: AVX-512 (16 lanes),
   AVX2 (8 lanes) or ARM's NEON (4 lanes, every AArch64 CPU). Generated code written on these
   keeps an element's whole update, sqrt included, in vector registers; elsewhere it is written
   per element and left to the compiler's vectoriser. The vectors are the compiler's (GCC and
   Clang vector extensions); only fma, sqrt and MKL's sqrt (x86 only) name the CPU's
   instructions, each in the block of its CPU below. */
#if defined(__AVX512F__)
#define PK_W 16
#elif defined(__AVX2__) && defined(__FMA__)
#define PK_W 8
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define PK_W 4
#else
#define PK_W 0
#endif
#if PK_W
typedef float pk_vf __attribute__((vector_size(PK_W * 4)));
typedef int32_t pk_vm __attribute__((vector_size(PK_W * 4)));
typedef uint32_t pk_vu __attribute__((vector_size(PK_W * 4)));
PK_INLINE pk_vf pk_ld(const float* p) { pk_vf v; memcpy(&v, p, sizeof v); return v; }
PK_INLINE void pk_st(float* p, pk_vf v) { memcpy(p, &v, sizeof v); }
/* The first n < PK_W elements; the other lanes are zeros, computed and never stored. */
PK_INLINE pk_vf pk_ldn(const float* p, int64_t n) {
  pk_vf v = {};
  memcpy(&v, p, (size_t)n * 4);
  return v;
}
PK_INLINE void pk_stn(float* p, pk_vf v, int64_t n) { memcpy(p, &v, (size_t)n * 4); }
PK_INLINE pk_vf pk_splat(float s) { return (pk_vf){} + s; }
PK_INLINE pk_vf pk_bitsv(uint32_t b) { return (pk_vf)((pk_vu){} + b); }
/* The lanes at or past torch's scalar tail (see kernel.cpp's Work), d elements from the first. */
PK_INLINE pk_vm pk_tailv(int tb, int64_t d) {
  pk_vm iota;
  for (int i = 0; i < PK_W; ++i) iota[i] = i;
  const int32_t k = d < 0 ? 0 : d > PK_W ? PK_W : (int32_t)d;
  return tb ? (pk_vm)(iota >= k) : (pk_vm){};
}
PK_INLINE pk_vf pk_negv(pk_vf a) { return (pk_vf)((pk_vu)a ^ 0x80000000u); }
PK_INLINE pk_vf pk_madv(pk_vf a, pk_vf b, pk_vf c) { return a * b + c; }
PK_INLINE pk_vf pk_absv(pk_vf a) { return (pk_vf)((pk_vu)a & 0x7fffffffu); }
#if PK_W == 16
PK_INLINE pk_vf pk_fmav(pk_vf a, pk_vf b, pk_vf c) { return (pk_vf)_mm512_fmadd_ps(a, b, c); }
PK_INLINE pk_vf pk_sqrtv(pk_vf a) { return (pk_vf)_mm512_sqrt_ps(a); }
/* The lanes MKL's sqrt treats apart (see pk_sqrt_apart), as a mask register. */
typedef __mmask16 pk_lanes;
PK_INLINE pk_lanes pk_apart_lanes(pk_vf x) {
  return _mm512_cmpgt_epi32_mask(_mm512_add_epi32((__m512i)x, _mm512_set1_epi32(0x7f800000)),
                                 _mm512_set1_epi32((int)0xfefff000u));
}
PK_INLINE pk_vm pk_lanes_mask(pk_lanes m) {
  return (pk_vm)_mm512_maskz_mov_epi32(m, _mm512_set1_epi32(-1));
}
/* The 12-bit estimate MKL starts from is rsqrtps's (AVX-512's rsqrt14 rounds otherwise). */
PK_INLINE pk_vf pk_rsqrt_estimate(pk_vf x) {
  const __m512 v = (__m512)x;
  const __m256 lo = _mm256_rsqrt_ps(_mm512_castps512_ps256(v));
  const __m256d upper = _mm512_extractf64x4_pd(_mm512_castps_pd(v), 1);
  const __m256 hi = _mm256_rsqrt_ps(_mm256_castpd_ps(upper));
  return (pk_vf)_mm512_castpd_ps(
      _mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi), 1));
}
#elif PK_W == 4
PK_INLINE pk_vf pk_fmav(pk_vf a, pk_vf b, pk_vf c) {
  return (pk_vf)vfmaq_f32((float32x4_t)c, (float32x4_t)a, (float32x4_t)b);
}
PK_INLINE pk_vf pk_sqrtv(pk_vf a) { return (pk_vf)vsqrtq_f32((float32x4_t)a); }
#else
PK_INLINE pk_vf pk_fmav(pk_vf a, pk_vf b, pk_vf c) { return (pk_vf)_mm256_fmadd_ps(a, b, c); }
PK_INLINE pk_vf pk_sqrtv(pk_vf a) { return (pk_vf)_mm256_sqrt_ps(a); }
typedef int pk_lanes;
PK_INLINE pk_lanes pk_apart_lanes(pk_vf x) {
  /* One add and one signed compare, as written (the compiler's own form takes one more). */
  const __m256i shifted = _mm256_add_epi32((__m256i)x, _mm256_set1_epi32(0x7f800000));
  const __m256i m = _mm256_cmpgt_epi32(shifted, _mm256_set1_epi32((int)0xfefff000u));
  return _mm256_movemask_ps(_mm256_castsi256_ps(m));
}
PK_INLINE pk_vm pk_lanes_mask(pk_lanes m) {
  const pk_vm bit = {1, 2, 4, 8, 16, 32, 64, 128};
  return (pk_vm)((bit & m) != 0);
}
PK_INLINE pk_vf pk_rsqrt_estimate(pk_vf x) { return (pk_vf)_mm256_rsqrt_ps((__m256)x); }
#endif
/* Streams stored as bfloat16 or float16 (state narrower than its parameters, or half-precision
   parameters), PK_W halves at a time, widened to floats and rounded back in registers, bit
   for bit as the scalar forms above convert (a NaN to a NaN). bfloat16 is integer arithmetic
   on the vector, or the CPU's conversion where it has AVX512-BF16. float16 is the CPU's
   conversion where it has one (AVX-512, or F16C beside AVX2: the one c10::Half makes with
   F16C, NaN payloads included), and the scalar forms lane by lane elsewhere. */
typedef uint16_t pk_vh __attribute__((vector_size(PK_W * 2)));
PK_INLINE pk_vh pk_ldh(const uint16_t* p) { pk_vh v; memcpy(&v, p, sizeof v); return v; }
PK_INLINE pk_vh pk_ldhn(const uint16_t* p, int64_t n) {
  pk_vh v = {};
  memcpy(&v, p, (size_t)n * 2);
  return v;
}
/* The bfloat16 of each lane, in the low half of its 32 bits. */
PK_INLINE pk_vu pk_bf16_bits(pk_vf v) {
  const pk_vu u = (pk_vu)v;
  const pk_vu r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return v != v ? (pk_vu){} + 0x7fc0u : r;
}
/* Widening and narrowing between 16 and 32 bits per lane are the CPU's instructions: the
   compiler's own form of them took several shuffles per vector (Adam with bfloat16 moments,
   operands in cache: 0.55 ns per element, 0.51 with these, 0.44 with float32 moments). */
#if PK_W == 16
PK_INLINE pk_vf pk_from_bf16(pk_vh h) {
  return (pk_vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16);
}
PK_INLINE pk_vh pk_to_bf16_int(pk_vf v) {
  return (pk_vh)_mm512_cvtepi32_epi16((__m512i)pk_bf16_bits(v));
}
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
/* The CPU's conversion rounds to nearest even in one instruction, but reads subnormals as
   zeros and keeps a NaN's payload: vectors holding either (one class test finds them) take
   the integer form, on a branch the usual vectors skip. */
PK_INLINE pk_vh pk_to_bf16(pk_vf v) {
  const __mmask16 apart = _mm512_fpclass_ps_mask((__m512)v, 0x01 | 0x20 | 0x80);
  if (__builtin_expect(apart != 0, 0)) return pk_to_bf16_int(v);
  return (pk_vh)_mm512_cvtneps_pbh((__m512)v);
}
#else
PK_INLINE pk_vh pk_to_bf16(pk_vf v) { return pk_to_bf16_int(v); }
#endif
#elif PK_W == 8
PK_INLINE pk_vf pk_from_bf16(pk_vh h) {
  return (pk_vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32((__m128i)h), 16);
}
PK_INLINE pk_vh pk_to_bf16(pk_vf v) {
  const __m256i b = (__m256i)pk_bf16_bits(v);  /* each lane below 2**16: packing saturates none */
  return (pk_vh)_mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
}
#else
PK_INLINE pk_vf pk_from_bf16(pk_vh h) { return (pk_vf)(__builtin_convertvector(h, pk_vu) << 16); }
PK_INLINE pk_vh pk_to_bf16(pk_vf v) { return __builtin_convertvector(pk_bf16_bits(v), pk_vh); }
#endif
#if PK_W == 16
PK_INLINE pk_vf pk_from_f16(pk_vh h) { return (pk_vf)_mm512_cvtph_ps((__m256i)h); }
PK_INLINE pk_vh pk_to_f16(pk_vf v) {
  return (pk_vh)_mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
#elif PK_W == 8 && defined(__F16C__)
PK_INLINE pk_vf pk_from_f16(pk_vh h) { return (pk_vf)_mm256_cvtph_ps((__m128i)h); }
PK_INLINE pk_vh pk_to_f16(pk_vf v) {
  return (pk_vh)_mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
#else
PK_INLINE pk_vf pk_from_f16(pk_vh h) {
  pk_vf v;
  for (int i = 0; i < PK_W; ++i) v[i] = pk_f16_load(h[i]);
  return v;
}
PK_INLINE pk_vh pk_to_f16(pk_vf v) {
  pk_vh h;
  for (int i = 0; i < PK_W; ++i) h[i] = pk_f16_store(v[i]);
  return h;
}
#endif
PK_INLINE pk_vf pk_ld_bf16(const uint16_t* p) { return pk_from_bf16(pk_ldh(p)); }
PK_INLINE pk_vf pk_ldn_bf16(const uint16_t* p, int64_t n) { return pk_from_bf16(pk_ldhn(p, n)); }
PK_INLINE void pk_st_bf16(uint16_t* p, pk_vf v) {
  const pk_vh h = pk_to_bf16(v);
  memcpy(p, &h, sizeof h);
}
PK_INLINE void pk_stn_bf16(uint16_t* p, pk_vf v, int64_t n) {
  const pk_vh h = pk_to_bf16(v);
  memcpy(p, &h, (size_t)n * 2);
}
PK_INLINE pk_vf pk_ld_f16(const uint16_t* p) { return pk_from_f16(pk_ldh(p)); }
PK_INLINE pk_vf pk_ldn_f16(const uint16_t* p, int64_t n) { return pk_from_f16(pk_ldhn(p, n)); }
PK_INLINE void pk_st_f16(uint16_t* p, pk_vf v) {
  const pk_vh h = pk_to_f16(v);
  memcpy(p, &h, sizeof h);
}
PK_INLINE void pk_stn_f16(uint16_t* p, pk_vf v, int64_t n) {
  const pk_vh h = pk_to_f16(v);
  memcpy(p, &h, (size_t)n * 2);
}
#endif
/* MKL runs on x86 only: the copy of its sqrt is made on x86 vectors. */
#if PK_W == 16 || PK_W == 8
/* The inputs MKL's code treats apart, as it treats them: zeros and +inf are returned, NaNs
   quieted, negatives give the canonical NaN, and subnormals and the largest normals their
   correctly rounded root. On a branch the usual vectors skip; inline, so that taking it
   (a vector holding a zero: a moment that never moved) costs no call and no spills. */
PK_INLINE pk_vf pk_sqrt_apart(pk_vf x, pk_vf out, pk_lanes lanes) {
  const pk_vm apart = pk_lanes_mask(lanes);
  const pk_vu b = (pk_vu)x, a = b & 0x7fffffffu;
  pk_vf f = pk_sqrtv(x);
  f = (b >> 31) != 0 ? pk_bitsv(0x7fc00000u) : f;
  f = a > 0x7f800000u ? (pk_vf)(b | 0x00400000u) : f;
  f = (a == 0) | (b == 0x7f800000u) ? x : f;
  return apart ? f : out;
}
/* MKL's high-accuracy float32 sqrt as its generic x86 code computes it: a reciprocal square
   root estimate refined by one coupled Newton step, each operation rounded on its own. Used
   only where an exhaustive comparison proved it identical to MKL on this machine. */
PK_INLINE pk_vf pk_sqrt_mklv(pk_vf x) {
  const pk_lanes apart = pk_apart_lanes(x);
  const pk_vf y = pk_rsqrt_estimate(x);
  const pk_vf s = x * y, h = y * 0.5f;
  const pk_vf e = 0.5f - s * h;
  const pk_vf s1 = s * e + s, h1 = e * h + h;
  const pk_vf r = x - s1 * s1;
  const pk_vf out = r * h1 + s1;
  return __builtin_expect(apart != 0, 0) ? pk_sqrt_apart(x, out, apart) : out;
}
static inline void pk_sqrt_mkl(const float* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + PK_W <= n; i += PK_W) pk_st(out + i, pk_sqrt_mklv(pk_ld(in + i)));
  if (i < n) {
    pk_vf v = pk_splat(1.0f);
    memcpy(&v, in + i, (size_t)(n - i) * 4);
    pk_stn(out + i, pk_sqrt_mklv(v), n - i);
  }
}
#define PK_HAVE_SQRT_MKL 1
#else
/* Without x86 vectors the copy is not made (the probe says so, and programs call MKL). */
#define PK_HAVE_SQRT_MKL 0
static void pk_sqrt_mkl(const float* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = sqrtf(in[i]);
}
#endif

/* 8-bit block-wise state, as kernel/quant.h reads and writes it (the rule of polyak/_quant.py):
   a block of codes read as float32 values (map value times the block's absmax), and a block of
   new values written as codes and absmax. On AVX-512 the map, the table and the midpoints are
   read by gathers (the table of bytes read as 32-bit words at byte offsets, masked: QuantMaps
   has room past its end). */
static inline void pk_deq(const uint8_t* codes, float absmax, const float* map, float* d,
                          int64_t n) {
  int64_t j = 0;
#if defined(__AVX512F__)
  /* The map in 16 registers, looked up by permutes of 32 values and blends on the code's upper
     three bits: a third of the gather's time per element here. */
  const __m512 a = _mm512_set1_ps(absmax);
  __m512 t[16];
  for (int k = 0; k < 16; ++k) t[k] = _mm512_loadu_ps(map + 16 * k);
  const __m512i b5 = _mm512_set1_epi32(32), b6 = _mm512_set1_epi32(64);
  const __m512i b7 = _mm512_set1_epi32(128);
  for (; j + 16 <= n; j += 16) {
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(codes + j)));
    __m512 r[8];
    for (int k = 0; k < 8; ++k) r[k] = _mm512_permutex2var_ps(t[2 * k], idx, t[2 * k + 1]);
    const __mmask16 m5 = _mm512_test_epi32_mask(idx, b5), m6 = _mm512_test_epi32_mask(idx, b6);
    const __m512 u0 = _mm512_mask_blend_ps(m6, _mm512_mask_blend_ps(m5, r[0], r[1]),
                                           _mm512_mask_blend_ps(m5, r[2], r[3]));
    const __m512 u1 = _mm512_mask_blend_ps(m6, _mm512_mask_blend_ps(m5, r[4], r[5]),
                                           _mm512_mask_blend_ps(m5, r[6], r[7]));
    const __m512 v = _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, b7), u0, u1);
    _mm512_storeu_ps(d + j, _mm512_mul_ps(v, a));
  }
#endif
  for (; j < n; ++j) d[j] = map[codes[j]] * absmax;
}

static inline uint8_t pk_code(float x, const float* mid, const uint8_t* below, int64_t inside) {
  uint32_t bits;
  memcpy(&bits, &x, 4);
  int64_t code = below[bits >> 16];
  const int64_t base = code;
  for (int64_t k = 0; k < inside; ++k) code += x > mid[base + k];
  return (uint8_t)code;
}

static inline void pk_quant(const float* s, int64_t n, uint8_t* codes, float* absmax,
                            const struct polyak_ctx* ctx, int sgn) {
  const float* mid = ctx->qmid[sgn];
  const uint8_t* below = ctx->qbelow[sgn];
  const int64_t inside = ctx->qinside[sgn];
  /* The block's largest magnitude, NaN where it holds one (as torch's amax). */
  float m = 0.0f;
  int nan = 0;
  int64_t j = 0;
#if defined(__AVX512F__)
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 vnan = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 x = _mm512_abs_ps(_mm512_loadu_ps(s + j));
    vnan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, x);
  }
  m = _mm512_reduce_max_ps(vmax);
  nan = vnan != 0;
#endif
  for (; j < n; ++j) {
    const float a = fabsf(s[j]);
    nan |= a != a;
    m = a > m ? a : m;
  }
  const float found = nan ? __builtin_nanf("") : m;
  const float floor = found < 1e-38f ? 1e-38f : found; /* torch's clamp(min=): NaN stays */
  /* A full block is scaled by the float32 reciprocal, the last short one divided. */
  const int full = n == 256;
  const float scale = 1.0f / floor;
  j = 0;
#if defined(__AVX512F__)
  /* One gather per vector, of the packed word of each value's pattern (see kernel/quant.h). */
  if (inside == 1) {
    const uint32_t* pack = ctx->qpack[sgn];
    const __m512 vs = _mm512_set1_ps(scale), vf = _mm512_set1_ps(floor);
    const __m512 lo = _mm512_set1_ps(-1.0f), hi = _mm512_set1_ps(1.0f);
    const __m512i low16 = _mm512_set1_epi32(0xffff), one = _mm512_set1_epi32(1);
    for (; j + 16 <= n; j += 16) {
      const __m512 v = _mm512_loadu_ps(s + j);
      __m512 x = full ? _mm512_mul_ps(v, vs) : _mm512_div_ps(v, vf);
      x = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), x, lo);
      x = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, hi, _CMP_GT_OQ), x, hi);
      const __m512i bits = _mm512_castps_si512(x);
      const __m512i word = _mm512_i32gather_epi32(_mm512_srli_epi32(bits, 16), (const void*)pack, 4);
      /* The lower 16 bits, flipped for negative values, against the midpoint's. */
      const __m512i flip = _mm512_and_si512(_mm512_srai_epi32(bits, 31), low16);
      const __m512i low = _mm512_xor_si512(_mm512_and_si512(bits, low16), flip);
      const __mmask16 above =
          _mm512_cmpgt_epi32_mask(low, _mm512_and_si512(word, low16));
      const __m512i base = _mm512_srli_epi32(word, 16);
      const __m512i code = _mm512_mask_add_epi32(base, above, base, one);
      _mm_storeu_si128((__m128i*)(codes + j), _mm512_cvtepi32_epi8(code));
    }
  }
#endif
  for (; j < n; ++j) {
    float x = full ? s[j] * scale : s[j] / floor;
    x = x < -1.0f ? -1.0f : x;
    x = x > 1.0f ? 1.0f : x;
    codes[j] = pk_code(x, mid, below, inside);
  }
  *absmax = full ? found : floor;
}

"""Compiling traced programs into register-resident machine code.

The kernel (``_vm.cpp``) can run a traced vector program by interpretation: one operation at a
time over blocks of 128 elements held in L1 arrays, so every operation loads and stores its
operands again. That is fast enough wherever memory is slow, and compute-bound wherever it is
fast or threads are few. So each program is also turned into C++ here, one statement per
instruction over one element, in a loop the compiler vectorises: every element's whole update
then stays in vector registers, and the parameter, gradient and state are each read once and
written once.

The source is compiled for this machine (``-march=native``) in a background thread, once per
program and machine: the result is cached on disk under a key of the source, the compiler
flags and version and the CPU, so that a later process loads it at once and a cache shared by
machines of several CPU types never loads code built for another. Until it is ready, steps run
the interpreter, which computes the same bits.

Numbers. The statements are the interpreter's (one fused multiply-add where torch's kernels
fuse, ``-ffp-contract=off`` so that nothing else is fused), so results are bit-identical to it.
torch's CPU ``sqrt`` is MKL's vector sqrt in high-accuracy mode, which is not correctly
rounded; how the compiled code gets its bits is decided once per machine (see
:func:`sqrt_mode`): an inline copy of MKL's algorithm where an exhaustive comparison over all
2**32 float32 inputs proves it identical on this CPU, a call to MKL on blocks of 64 elements
otherwise. ``fused=True`` steps use the correctly rounded sqrt, as torch's fused kernels do.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import json
import os
import platform
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from polyak.strategies import _dispatch, _native
from polyak.strategies._trace import (
    V_ABS,
    V_ADD,
    V_ADD1,
    V_ADDCDIV,
    V_ADDCMUL,
    V_ADDS,
    V_COMPARISONS,
    V_COPY,
    V_DIV,
    V_DIVV,
    V_FILL,
    V_LERP,
    V_MAX,
    V_MAXF,
    V_MUL,
    V_MULADD,
    V_MULV,
    V_NEG,
    V_RECIP,
    V_SELECT,
    V_SELS,
    V_SIGN,
    V_SQRT,
)

#: How a program computes sqrt: correctly rounded inline, MKL's algorithm inline, or MKL called.
SQRT_EXACT, SQRT_MKL_INLINE, SQRT_MKL_CALL = 0, 1, 2
SQRT_NAMES = {
    SQRT_EXACT: "correctly rounded, inline",
    SQRT_MKL_INLINE: "MKL's algorithm, inline (proven identical on this machine)",
    SQRT_MKL_CALL: "MKL, called per block",
}
#: Bumped whenever the generated code changes meaning, so that old builds are not reused.
_VERSION = 7
# The kernel's flags (every rounding the one written), for a plain shared library.
_FLAGS = [*_native.FLAGS, "-fno-trapping-math", "-fPIC", "-shared"]
#: Whether an element lies in the scalar tail of torch's chunk (see _vm.cpp's Work).
_TAIL_TEST = "(tb & (j0 + j >= tail))"
#: What each vector instruction computes for one element, with the interpreter's roundings
#: (one fused multiply-add where torch's CPU kernels fuse; see _vm.cpp).
_STATEMENTS = {
    # Negation flips the sign bit, NaN's included, as torch's neg does; written on the bits, so
    # that the compiler does not fold it into a neighbouring multiply-add (whose NaN keeps its
    # sign).
    V_NEG: "{neg}({a})",
    V_ADD: "{fma}({b}, {s}, {a})",
    V_ADD1: "{a} + {b}",
    V_MUL: "{a} * {s}",
    V_DIV: "{a} / {s}",
    V_ADDS: "{a} + {s}",
    # torch's lerp: from the nearer end, so that weights 0 and 1 are exact, with its vectorised
    # body's operands (the coefficient w - 1, NaN of b - a unchanged).
    V_LERP: "pk_lc{k}_ ? {fma}({s}, {b} - {a}, {a}) : {fma}(lw{k}, {b} - {a}, {b})",
    V_ADDCMUL: "{fma}({s} * {b}, {c}, {a})",
    V_ADDCDIV: "{a} + ({s} * {b}) / {c}",
    V_SQRT: "{sqrt}({a})",
    # As torch's maximum: NaN in its vectorised body as ``{body_nan}`` says (all ones on x86
    # vectors, the NaN operand on generic ones), the canonical NaN in the scalar tail of each
    # of its chunks (which also keeps the first of two equal values).
    V_MAX: "(({a} != {a}) | ({b} != {b})) ? (" + _TAIL_TEST + " ? pk_qnan : {body_nan}) "
    ": (" + _TAIL_TEST + " ? ({a} < {b} ? {b} : {a}) : ({a} > {b} ? {a} : {b}))",
    # torch's fused kernels (see _trace.fused_form): the body's rounding of a * s + b * c,
    # and past the tail what the compiler made of its scalar C++; maximum there is std::max.
    V_MULADD: "(" + _TAIL_TEST + " ? {fma}({a}, {s}, {b} * {c}) : {fma}({b}, {c}, {a} * {s}))",
    V_MAXF: "(" + _TAIL_TEST + " ? ({a} < {b} ? {b} : {a}) : ((({a} != {a}) | ({b} != {b})) "
    "? {body_nan} : ({a} > {b} ? {a} : {b})))",
    V_COPY: "{a}",
    V_MULV: "{a} * {b}",
    V_DIVV: "{a} / {b}",
    V_ABS: "{abs}({a})",
    # As torch's sign: 0 for zeros (+0) and NaN.
    V_SIGN: "({a} > 0 ? ({t})1 : ({t})0) - ({a} < 0 ? ({t})1 : ({t})0)",
    V_RECIP: "({t})1 / {a}",
    # Masks are booleans, which the compiler turns into vector masks and the selects into
    # blends; ``{bs}`` is ``b``, or the scalar where the instruction has no ``b``.
    **{op: "{a} " + name + " {bs}" for name, op in V_COMPARISONS.items()},
    V_SELECT: "{c} ? {bs} : {a}",
    # Per-tensor conditions are constants of the loop, which is copied for each outcome (see
    # _unswitch): ``pk_if`` is 1 or 0 there, and the compiler drops what is not kept.
    V_SELS: "pk_if{k}_ ? {b} : {a}",
    V_FILL: "{s}",
}
#: Bytes per stream of a block: the loop's unit, and of the prefetches into the next item.
_BLOCK_BYTES = 256
#: How far ahead of the computation the next work item's streams are prefetched (measured on
#: 2000 tensors of 4 KiB: 2 KiB into L1 1.5x slower, 8 KiB no better).
_AHEAD_BYTES = 4096

_STORAGE = {
    torch.float32: ("float", "float", 4),
    torch.float64: ("double", "double", 8),
    torch.float16: ("uint16_t", "float", 2),
    torch.bfloat16: ("uint16_t", "float", 2),
}

_PRELUDE = r"""
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
/* The lanes at or past torch's scalar tail (see _vm.cpp's Work), d elements from the first. */
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
"""

_PROBE = r"""
#include <thread>
#include <vector>
#include <atomic>
/* Counts the float32 inputs where MKL's sqrt differs from the inline copy (which = 0) or from
   the correctly rounded sqrt (which = 1): all 2**31 non-negative inputs (NaNs with a clear sign
   bit included), then 2**22 negative ones, spread over their whole range, and -0, -inf and
   negative NaNs, which MKL computes one at a time and the copy treats apart. */
extern "C" int64_t polyak_probe_sqrt(const polyak_ctx* ctx, int which) {
  if (!PK_HAVE_SQRT_MKL && which == 0) return -1;
  std::atomic<int64_t> bad{0};
  unsigned n_threads = std::thread::hardware_concurrency();
  if (n_threads == 0) n_threads = 1;
  if (n_threads > 8) n_threads = 8;
  const uint64_t positives = 1ull << 31, negatives = 1ull << 22;
  const uint64_t total = positives + negatives, per = total / n_threads;
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < n_threads; ++t) {
    threads.emplace_back([&, t]() {
      const int chunk = 4096;
      std::vector<float> in(chunk), ref(chunk), got(chunk);
      int64_t local = 0;
      const uint64_t lo = t * per, hi = t + 1 == n_threads ? total : lo + per;
      for (uint64_t at = lo; at < hi; at += chunk) {
        const int len = (int)(hi - at < (uint64_t)chunk ? hi - at : chunk);
        for (int k = 0; k < len; ++k) {
          const uint64_t i = at + k;
          const uint32_t bits = i < positives
              ? (uint32_t)i
              : 0x80000000u | (uint32_t)(((i - positives) * 0x9e3779b1ull) & 0x7fffffffu);
          in[k] = pk_bits_f(bits);
        }
        if (hi == total && at + chunk >= total) {
          in[0] = pk_bits_f(0x80000000u);
          in[1] = pk_bits_f(0xff800000u);
          in[2] = pk_bits_f(0xff800001u);
          in[3] = pk_bits_f(0xffc00000u);
          in[4] = pk_bits_f(0xffffffffu);
        }
        ctx->vms(len, in.data(), ref.data(), ctx->mode);
        if (which == 0) {
          pk_sqrt_mkl(in.data(), got.data(), len);
        } else {
          for (int k = 0; k < len; ++k) got[k] = sqrtf(in[k]);
        }
        for (int k = 0; k < len; ++k) local += pk_f_bits(ref[k]) != pk_f_bits(got[k]);
      }
      bad += local;
    });
  }
  for (auto& th : threads) th.join();
  return bad.load();
}
"""


def _statement(
    ins: tuple[int, ...], operands: list[str], max_keep: bool = False, **names: str
) -> str:
    """The C++ expression of one vector instruction, on its operands' expressions, with the
    form's names for the type and the functions (``t``, ``fma``, ``neg``, ``sqrt``, ``abs``);
    ``max_keep``: maximum's vector body passes a NaN operand through (else: all ones)."""
    op, _, _, b, _, s = ins
    if op not in _STATEMENTS:
        raise ValueError(f"unknown opcode {op}")
    va, vb, vc = operands
    bs = vb if b >= 0 else f"s{s}"
    body_nan = f"({va} != {va} ? {va} : {vb})" if max_keep else "pk_ones"
    return _STATEMENTS[op].format(
        a=va, b=vb, c=vc, s=f"s{s}", bs=bs, k=s, body_nan=body_nan, **names
    )


def generate(
    vcode: list[tuple[int, ...]],
    n_bound: int,
    stored: list[int],
    dtype: torch.dtype,
    sqrt_mode: int,
    fma: bool = True,
    max_keep: bool = False,
) -> str:
    """C++ source of one program's kernel (``polyak_run``), prelude included.

    Each instruction becomes one statement over one element, in a loop over blocks of
    ``_BLOCK_BYTES`` per stream that the compiler vectorises. A sqrt computed by a call over the
    block (see ``sqrt_mode``) splits the loop in two: the values the second part needs pass
    through block-sized arrays, which stay in L1.

    Args:
        vcode: the vector program, ``(op, dst, a, b, c, sreg)`` per instruction.
        n_bound: how many registers are bound to memory (parameter, gradient, state).
        stored: the bound registers the program writes.
        dtype: the tensors' storage type.
        sqrt_mode: one of ``SQRT_EXACT``, ``SQRT_MKL_INLINE``, ``SQRT_MKL_CALL``.
        fma: whether torch's kernels fuse multiply-adds (see ``_dispatch.Rounding``).
        max_keep: whether maximum's vector body passes a NaN operand through.
    """
    storage, compute, size = _STORAGE[dtype]
    block = _BLOCK_BYTES // size
    ahead = _AHEAD_BYTES // size
    if fma:
        mad = "__builtin_fmaf" if compute == "float" else "__builtin_fma"
    else:
        mad = "pk_mad_f" if compute == "float" else "pk_mad_d"
    fabs = "fabsf" if compute == "float" else "fabs"
    csqrt = "__builtin_sqrtf" if compute == "float" else "__builtin_sqrt"
    if dtype == torch.float16:
        load, store = "pk_f16_load({})", "pk_f16_store({})"
    elif dtype == torch.bfloat16:
        load, store = "pk_bf16_load({})", "pk_bf16_store({})"
    else:
        load, store = "{}", "{}"
    if sqrt_mode == SQRT_MKL_INLINE and compute != "float":
        sqrt_mode = SQRT_MKL_CALL

    # Segments of straight-line code, split where sqrt is a call over the block.
    segments: list[list[tuple[int, ...]]] = [[]]
    splits: list[tuple[int, int]] = []  # (source register, destination register)
    for ins in vcode:
        if ins[0] == V_SQRT and sqrt_mode != SQRT_EXACT:
            splits.append((ins[2], ins[1]))
            segments.append([])
        else:
            segments[-1].append(ins)

    def sources(ins: tuple[int, ...]) -> list[int]:
        return [r for r in ins[2:5] if r >= 0]

    # Each segment's live-in temporaries (read before written), and what it writes.
    live_in: list[set[int]] = []
    writes: list[set[int]] = []
    for k, seg in enumerate(segments):
        seen = {splits[k - 1][1]} if k > 0 else set()
        needs: set[int] = set()
        for ins in seg:
            needs.update(r for r in sources(ins) if r not in seen and r >= n_bound)
            seen.add(ins[1])
        if k < len(splits) and splits[k][0] not in seen and splits[k][0] >= n_bound:
            needs.add(splits[k][0])
        live_in.append(needs)
        # What the segment computes, the sqrt result it starts from included.
        writes.append({ins[1] for ins in seg} | ({splits[k - 1][1]} if k > 0 else set()))
    spilled = sorted(set().union(*live_in))
    read_bound = sorted(
        {r for seg in segments for ins in seg for r in sources(ins) if r < n_bound}
        | {src for src, _ in splits if src < n_bound}
    )
    sregs = sorted({ins[5] for ins in vcode if ins[5] >= 0})
    # Registers holding masks: never numbers (the trace keeps the two apart).
    masks = {ins[1] for ins in vcode if ins[0] in V_COMPARISONS.values()}

    body: list[str] = []
    for k, seg in enumerate(segments):
        live: set[int] = set()
        lines: list[str] = []

        def use(reg: int, k: int = k, live: set[int] = live, lines: list[str] = lines) -> str:
            if reg not in live:
                live.add(reg)
                if reg < n_bound:
                    value = load.format(f"m{reg}[j0 + j]")
                elif k > 0 and reg == splits[k - 1][1]:
                    value = f"sq_out{k - 1}[j]"
                else:
                    value = f"sp{reg}[j]"
                lines.append(f"      {compute} v{reg} = {value};")
            return f"v{reg}"

        if k > 0:
            use(splits[k - 1][1])
        for op, dst, a, b, c, s in seg:
            expr = _statement(
                (op, dst, a, b, c, s),
                [use(r) if r >= 0 else "" for r in (a, b, c)],
                max_keep,
                t=compute,
                fma=mad,
                neg="pk_neg_f" if compute == "float" else "pk_neg_d",
                sqrt=csqrt,
                abs=fabs,
            )
            if dst in live:
                lines.append(f"      v{dst} = {expr};")
            else:
                live.add(dst)
                kind = "bool" if dst in masks else compute
                lines.append(f"      {kind} v{dst} = {expr};")
        if k < len(splits):
            lines.append(f"      sq_in{k}[j] = {use(splits[k][0])};")
        for reg in sorted(writes[k]):
            if reg in stored:
                lines.append(f"      m{reg}[j0 + j] = " + store.format(f"v{reg}") + ";")
            elif any(reg in live_in[q] for q in range(k + 1, len(segments))):
                lines.append(f"      sp{reg}[j] = v{reg};")
        body.append("      for (int64_t j = 0; j < n; ++j) {")
        body.extend("  " + line for line in lines)
        body.append("      }")
        if k < len(splits):
            if sqrt_mode == SQRT_MKL_INLINE:
                body.append(f"      pk_sqrt_mkl(sq_in{k}, sq_out{k}, n);")
            else:
                call = "vms" if compute == "float" else "vmd"
                body.append(f"      ctx->{call}((int)n, sq_in{k}, sq_out{k}, ctx->mode);")

    conditions = sorted({ins[5] for ins in vcode if ins[0] == V_SELS})
    lerps = sorted({ins[5] for ins in vcode if ins[0] == V_LERP})
    # The constants the loop is copied for: per-tensor conditions first (each copy computes one
    # continuation only), then which end each lerp starts from (each copy keeps one weight).
    switched = [f"pk_if{c}_" for c in conditions[:_UNSWITCHED]]
    switched += [f"pk_lc{s}_" for s in lerps][: _UNSWITCHED + 1 - len(switched)]
    prefetch = _prefetch(read_bound, storage, block, ahead)

    out: list[str] = [_PRELUDE]
    out.append(
        'extern "C" void polyak_run(void* const* bound, const double* r, int64_t start, '
        "int64_t end, void* const* next, int64_t nstart, int64_t tail, "
        "const struct polyak_ctx* ctx) {"
    )
    for reg in range(n_bound):
        const = "" if reg in stored else "const "
        out.append(f"  {const}{storage}* __restrict m{reg} = ({const}{storage}*)bound[{reg}];")
    out.append("  (void)ctx; (void)tail;")
    # float32 with sqrt inline (or none): written on whole vectors where the CPU has them.
    vector = dtype == torch.float32 and sqrt_mode != SQRT_MKL_CALL
    if vector:
        out.append("#if PK_W")
        decls, vloop = _vector_kernel(
            vcode, stored, sqrt_mode, sregs, lerps, masks, conditions, fma, max_keep
        )
        out.extend(decls)
        out.extend(_unswitch([*prefetch, *vloop], switched))
        out.append("#else")
    for s in sregs:
        out.append(f"  const {compute} s{s} = ({compute})r[{s}];")
    for s in lerps:
        out.append(f"  const int pk_lc{s}_ = {fabs}(s{s}) < ({compute})0.5;")
        out.append(f"  const {compute} lw{s} = s{s} - ({compute})1;")
    n_arrays = len(spilled) + 2 * len(splits)
    if n_arrays:
        out.append(f"  {compute} sp_all[{n_arrays}][{block}] __attribute__((aligned(64)));")
    index = 0
    for reg in spilled:
        out.append(f"  {compute}* __restrict const sp{reg} = sp_all[{index}];")
        index += 1
    for k in range(len(splits)):
        out.append(f"  {compute}* __restrict const sq_in{k} = sp_all[{index}];")
        out.append(f"  {compute}* __restrict const sq_out{k} = sp_all[{index + 1}];")
        index += 2
    ones = "pk_bits_f(0xffffffffu)" if compute == "float" else "pk_bits_d(~0ull)"
    qnan = "pk_bits_f(0x7fc00000u)" if compute == "float" else "pk_bits_d(0x7ff8000000000000ull)"
    out.append(f"  const {compute} pk_ones = {ones}, pk_qnan = {qnan};")
    out.append("  (void)pk_ones; (void)pk_qnan;")
    for s in conditions:
        out.append(f"  const int pk_if{s}_ = s{s} != 0;")
    loop: list[str] = [*prefetch]
    loop.append(f"    if (end - j0 >= {block}) {{")
    loop.append(f"      const int64_t n = {block};")
    loop.extend(_short_of_tail(body, _TAIL_TEST))
    loop.append("    } else {")
    loop.append("      const int64_t n = end - j0;")
    loop.extend(body)
    loop.append("    }")
    loop.append("  }")
    out.extend(_unswitch(loop, switched))
    if vector:
        out.append("#endif")
    out.append("}")
    return "\n".join(out) + "\n"


def _prefetch(read_bound: list[int], storage: str, block: int, ahead: int) -> list[str]:
    """The head of the loop over blocks: past the end of the item, every stream the program
    reads is asked for, into L2, that far into the next item (the hardware prefetcher follows
    a stream within a page but stops at a page's end, let alone a tensor's; within an item it
    does better alone); and whether the block reaches torch's scalar tail, a constant of the
    block, so that the usual blocks' loop is free of the test."""
    lines = [f"  for (int64_t j0 = start; j0 < end; j0 += {block}) {{"]
    lines.append(f"    const int64_t pf = j0 + {ahead};")
    lines.append("    if (pf >= end && next != 0) {")
    lines.append("      const int64_t at = nstart + (pf - end);")
    for reg in read_bound:
        for q in range(0, _BLOCK_BYTES, 64):
            lines.append(
                f"      __builtin_prefetch((const char*)((const {storage}*)next[{reg}] + at)"
                f" + {q}, 0, 2);"
            )
    lines.append("    }")
    lines.append(f"    const int tb = j0 + {block} > tail;")
    lines.append("    (void)tb;")
    return lines


def _short_of_tail(block: list[str], test: str) -> list[str]:
    """The lines of a block's loop, where they hold torch's tail ``test``, preceded by a copy
    without it for the blocks short of the tail (``tb`` false): the compiler vectorises that
    copy, where the test makes the loop's control flow its own."""
    fast = [line.replace(test, "0") for line in block]
    if fast == block:
        return block
    return [
        "      if (!tb) {",
        *("  " + line for line in fast),
        "      } else {",
        *("  " + line for line in block),
        "      }",
    ]


#: The tail test on whole vectors: the lanes at or past the tail.
_TAIL_TEST_V = "pk_tailv(tb, tail - (j0 + j))"


def _vector_kernel(
    vcode: list[tuple[int, ...]],
    stored: list[int],
    sqrt_mode: int,
    sregs: list[int],
    lerps: list[int],
    masks: set[int],
    conditions: list[int],
    fma: bool = True,
    max_keep: bool = False,
) -> tuple[list[str], list[str]]:
    """The float32 kernel on whole vectors of ``PK_W`` lanes (see the prelude): one statement
    per instruction over a vector, sqrt inline, each stream loaded and stored once per
    vector, so that an element's whole update stays in registers. The last vector of an item
    shorter than ``PK_W`` is loaded and stored in part. Returns the declarations and the body
    of the loop over blocks."""
    block = _BLOCK_BYTES // 4
    sqrt = "pk_sqrt_mklv" if sqrt_mode == SQRT_MKL_INLINE else "pk_sqrtv"

    def body(partial: bool) -> list[str]:
        live: set[int] = set()
        lines: list[str] = []

        def use(reg: int) -> str:
            if reg not in live:
                live.add(reg)
                load = f"pk_ldn(m{reg} + j0 + j, n - j)" if partial else f"pk_ld(m{reg} + j0 + j)"
                lines.append(f"pk_vf v{reg} = {load};")
            return f"v{reg}"

        written: set[int] = set()
        for op, dst, a, b, c, s in vcode:
            expr = _statement(
                (op, dst, a, b, c, s),
                [use(r) if r >= 0 else "" for r in (a, b, c)],
                max_keep,
                t="float",
                fma="pk_fmav" if fma else "pk_madv",
                neg="pk_negv",
                sqrt=sqrt,
                abs="pk_absv",
            ).replace(_TAIL_TEST, _TAIL_TEST_V)
            written.add(dst)
            if dst in live:
                lines.append(f"v{dst} = {expr};")
            else:
                live.add(dst)
                lines.append(f"{'pk_vm' if dst in masks else 'pk_vf'} v{dst} = {expr};")
        for reg in sorted(written & set(stored)):
            lines.append(
                f"pk_stn(m{reg} + j0 + j, v{reg}, n - j);"
                if partial
                else f"pk_st(m{reg} + j0 + j, v{reg});"
            )
        return lines

    full, part = body(False), body(True)
    out = [f"  const pk_vf s{s} = pk_splat((float)r[{s}]);" for s in sregs]
    for s in lerps:
        out.append(f"  const int pk_lc{s}_ = fabsf((float)r[{s}]) < 0.5f;")
        out.append(f"  const pk_vf lw{s} = pk_splat((float)r[{s}] - 1.0f);")
    out.append("  const pk_vf pk_ones = pk_bitsv(0xffffffffu), pk_qnan = pk_bitsv(0x7fc00000u);")
    out.append("  (void)pk_ones; (void)pk_qnan;")
    for s in conditions:
        out.append(f"  const int pk_if{s}_ = (float)r[{s}] != 0;")
    loop: list[str] = []
    loop.append(f"    if (end - j0 >= {block}) {{")
    vectors = [
        f"      for (int64_t j = 0; j < {block}; j += PK_W) {{",
        *("        " + line for line in full),
        "      }",
    ]
    loop.extend(_short_of_tail(vectors, _TAIL_TEST_V))
    loop.append("    } else {")
    loop.append("      const int64_t n = end - j0;")
    loop.append("      int64_t j = 0;")
    loop.append("      for (; j + PK_W <= n; j += PK_W) {")
    loop.extend("        " + line for line in full)
    loop.append("      }")
    loop.append("      if (j < n) {")
    loop.extend("        " + line for line in part)
    loop.append("      }")
    loop.append("    }")
    loop.append("  }")
    return out, loop


#: Per-tensor conditions the element loop is copied for (2**n copies); more stay selects. One
#: more copy may be made for a lerp's weight.
_UNSWITCHED = 2


def _unswitch(loop: list[str], names: list[str]) -> list[str]:
    """``loop`` once per outcome of each of ``names``, constants of the loop that are 1 or 0:
    the conditions of the scalar program it selects on (a branch of the rule on a per-tensor
    number, see ``_trace._merge``), and which end a lerp starts from. Each copy computes only
    the continuation it keeps: both continuations' roundings are their own, so the bits are
    those of the select, without the other continuation's work, and no copy tests a constant
    per element or holds the other continuation's numbers in registers."""
    if not names:
        return loop
    name = names[0]
    copies = [_unswitch([line.replace(name, v) for line in loop], names[1:]) for v in "10"]
    return [
        f"  if ({name}) {{",
        *("  " + line for line in copies[0]),
        "  } else {",
        *("  " + line for line in copies[1]),
        "  }",
    ]


def _cpu_signature() -> str:
    """What identifies this CPU type for ``-march=native`` code: model name and feature flags."""
    model, flags = "", ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = " ".join(sorted(value.split()))
                if flags and model:
                    break
    except OSError:
        pass
    return f"{platform.machine()}|{model or platform.processor()}|{flags}"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


_compiler_versions: dict[str, str] = {}


def _compiler_version(cxx: str) -> str:
    if cxx not in _compiler_versions:
        try:
            done = subprocess.run(
                [cxx, "--version"], capture_output=True, text=True, timeout=30, check=False
            )
            _compiler_versions[cxx] = done.stdout.splitlines()[0] if done.stdout else cxx
        except (OSError, subprocess.SubprocessError):
            _compiler_versions[cxx] = cxx
    return _compiler_versions[cxx]


_VECTOR_MACROS = (
    ("__AVX512F__", "AVX-512 vectors, 16 floats"),
    ("__AVX2__", "AVX2 vectors, 8 floats"),
    ("__ARM_NEON", "NEON vectors, 4 floats"),
)


@functools.cache
def vector_target() -> str:
    """What compiled programs run on: the ``-march`` they are built for and the vectors that
    gives them (``-march=native: AVX-512 vectors, 16 floats``); asked of the compiler."""
    march = next((f for f in _FLAGS if f.startswith("-march=")), "-march=native")
    cxx = _compiler()
    if cxx is None:
        return f"{march}: no C++ compiler"
    try:
        done = subprocess.run(
            [cxx, march, "-dM", "-E", "-x", "c++", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return f"{march}: unknown vectors"
    macros = set(line.split()[1] for line in done.stdout.splitlines() if line.count(" ") >= 1)
    for macro, name in _VECTOR_MACROS:
        if macro in macros and (macro != "__AVX2__" or "__FMA__" in macros):
            return f"{march}: {name}"
    return f"{march}: no whole vectors (per element, as the compiler vectorises)"


def cache_dir() -> Path:
    """Where compiled programs are kept: ``POLYAK_CACHE_DIR``, else the user's cache folder."""
    root = os.environ.get("POLYAK_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "polyak"


_machine_keys: dict[str, str] = {}


def _machine_key(cxx: str) -> str:
    """The cache's folder for this machine: CPU type, compiler, flags, torch and code version."""
    if cxx not in _machine_keys:
        parts = (str(_VERSION), _cpu_signature(), _compiler_version(cxx), " ".join(_FLAGS))
        # The kernel is a Python extension: its build serves one Python version and torch.
        text = "|".join((*parts, torch.__version__, str(sys.implementation.cache_tag)))
        _machine_keys[cxx] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return _machine_keys[cxx]


def _roots() -> list[Path]:
    """The cache folders, in order: :func:`cache_dir`, then a per-user folder in the temporary
    directory, for a cache that cannot be written (a read-only home, a shared cache)."""
    user = os.getuid() if hasattr(os, "getuid") else os.getlogin()
    return [cache_dir(), Path(tempfile.gettempdir()) / f"polyak-{user}"]


def _target(source: str, name: str, root: Path) -> Path | None:
    cxx = _compiler()
    if cxx is None:
        return None
    key = hashlib.sha256(source.encode()).hexdigest()[:24]
    return root / _machine_key(cxx) / f"{name}-{key}.so"


def _built(source: str, name: str) -> Path | None:
    """The cached build of ``source``, if there is one; reading needs no write access."""
    for root in _roots():
        target = _target(source, name, root)
        if target is not None and target.exists():
            return target
    return None


#: A build folder older than this belonged to a process that died while it built.
_STALE_SECONDS = 3600.0
#: Seconds one program's compile may take.
_COMPILE_SECONDS = 300
#: One program's detached compile (argv: scratch folder, target, the compiler's command line):
#: the library, when the compiler made one, is renamed to the target; the scratch folder goes.
_COMPILE = f"""
import os, shutil, subprocess, sys
scratch, target = sys.argv[1:3]
command = sys.argv[3:]
try:
    done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout={_COMPILE_SECONDS})
    library = command[command.index("-o") + 1]
    if done.returncode == 0 and os.path.exists(library):
        os.replace(library, target)
finally:
    shutil.rmtree(scratch, ignore_errors=True)
"""


def _build(source: str, name: str) -> Path | None:
    """The shared library built from ``source`` for this machine, from the cache if there;
    None where it cannot be built.

    Each build runs in a folder of its own, in a process of its own session that renames its
    result into place: a process that ends while it builds leaves it to finish, a build killed
    midway leaves no partial library and no lock, two processes building the same program both
    succeed, and the folders of dead builds are removed by later ones.
    """
    cxx = _compiler()
    if cxx is None:
        return None
    found = _built(source, name)
    if found is not None:
        return found
    for root in _roots():
        target = _target(source, name, root)
        assert target is not None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(target.parent)
            scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
            src = scratch / f"{name}.cpp"
            src.write_text(source)
            command = [sys.executable, "-c", _COMPILE, str(scratch), str(target), cxx]
            child = subprocess.Popen(
                [*command, *_FLAGS, "-o", str(scratch / f"{name}.so"), str(src)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                child.wait(timeout=_COMPILE_SECONDS + 30)
            except subprocess.TimeoutExpired:
                return None
            return target if target.exists() else None
        except OSError:
            continue  # not writable: the next folder
        except subprocess.SubprocessError:
            return None
    return None


def _remove_stale(folder: Path) -> None:
    now = time.time()
    for old in folder.glob(".build-*"):
        try:
            if now - old.stat().st_mtime > _STALE_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


_libraries: dict[Path, ctypes.CDLL] = {}


def _open(path: Path) -> ctypes.CDLL:
    if path not in _libraries:
        _libraries[path] = ctypes.CDLL(str(path))
    return _libraries[path]


_sqrt_lock = threading.Lock()
_sqrt_mode: int | None = None


def _verdict_paths() -> list[Path]:
    cxx = _compiler()
    if cxx is None:
        return []
    # MKL picks its code path by the CPU and by its environment variables: a verdict holds for
    # one setting of them.
    path = hashlib.sha256(_dispatch.mkl_path().encode()).hexdigest()[:12]
    return [root / _machine_key(cxx) / f"sqrt-{path}.json" for root in _roots()]


def _known_sqrt_mode(vm: Any) -> int | None:
    """The sqrt mode where it is decided already (in this process or on disk), else None."""
    global _sqrt_mode
    if _sqrt_mode is not None:
        return _sqrt_mode
    if not vm.has_mkl_sqrt():
        return SQRT_EXACT
    for verdict in _verdict_paths():
        try:
            mode = int(json.loads(verdict.read_text())["mode"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if mode in (SQRT_EXACT, SQRT_MKL_INLINE, SQRT_MKL_CALL):
            _sqrt_mode = mode
            return mode
    return None


def probe_sqrt(vm: Any, which: int) -> int:
    """Over all 2**32 float32 inputs, how many times torch's MKL sqrt differs from the inline
    copy of its algorithm (``which=0``) or from the correctly rounded sqrt (``which=1``); -1
    where the probe cannot be built or the copy is not available on this CPU."""
    probe = _build(_PRELUDE + _PROBE, "sqrt-probe")
    return -1 if probe is None else run_probe(_open(probe), vm, which)


def run_probe(library: ctypes.CDLL, vm: Any, which: int) -> int:
    """The count :func:`probe_sqrt` returns, from a built probe ``library``."""
    run = library.polyak_probe_sqrt
    run.restype = ctypes.c_int64
    run.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return int(run(vm.ctx_address(), which))


def sqrt_mode(vm: Any) -> int:
    """How compiled default-path programs compute float32 sqrt on this machine, with torch's
    bits: ``SQRT_EXACT`` where torch's sqrt is correctly rounded (no MKL, or an MKL whose
    results are), ``SQRT_MKL_INLINE`` where the inline copy of MKL's algorithm gives MKL's
    result for all 2**32 inputs, and ``SQRT_MKL_CALL`` otherwise. Decided once per machine
    (a few seconds, in the background thread) and cached."""
    global _sqrt_mode
    known = _known_sqrt_mode(vm)
    if known is not None:
        return known
    with _sqrt_lock:
        if _sqrt_mode is not None:
            return _sqrt_mode
        mode = SQRT_MKL_CALL
        if probe_sqrt(vm, 0) == 0:
            mode = SQRT_MKL_INLINE
        elif probe_sqrt(vm, 1) == 0:
            mode = SQRT_EXACT
        for verdict in _verdict_paths():
            try:
                verdict.parent.mkdir(parents=True, exist_ok=True)
                partial = verdict.with_suffix(f".{os.getpid()}")
                partial.write_text(json.dumps({"mode": mode}))
                os.replace(partial, verdict)
                break
            except OSError:
                continue
        _sqrt_mode = mode
        return mode


class _Builder:
    """One background thread that compiles programs in the order they are asked for."""

    def __init__(self) -> None:
        self.jobs: queue.Queue[Callable[[], None]] = queue.Queue()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        self.pending = 0
        self.idle = threading.Condition(self.lock)

    def submit(self, job: Callable[[], None]) -> None:
        with self.lock:
            self.pending += 1
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="polyak-build", daemon=True)
                self.thread.start()
        self.jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                job()
            except Exception as error:  # a failed build leaves the interpreter running
                print(f"polyak: a program could not be compiled ({error})", file=sys.stderr)
            finally:
                with self.lock:
                    self.pending -= 1
                    self.idle.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        with self.lock:
            return self.idle.wait_for(lambda: self.pending == 0, timeout)


_builder = _Builder()


@atexit.register
def _finish_builds() -> None:
    # A compile under way finishes in its own process whatever this one does; a process that
    # ends gives the ones it asked for and has not started yet a moment (each takes about half
    # a second), so that they land in the cache for the next process.
    _builder.wait(timeout=_EXIT_WAIT)


#: Seconds a process that ends waits for the builds it started.
_EXIT_WAIT = 30.0
#: The kernel slot of each program, by what determines its source.
_kernels: dict[tuple[Any, ...], Any] = {}


def enabled() -> bool:
    """Whether programs are compiled (``POLYAK_COMPILE=0`` keeps every step interpreted)."""
    return os.environ.get("POLYAK_COMPILE", "1").strip().lower() not in ("0", "false", "off", "no")


def kernel(
    vm: Any,
    program: Any,
    n_bound: int,
    dtype: torch.dtype,
    exact_sqrt: bool,
    rounding: _dispatch.Rounding | None = None,
) -> Any:
    """The kernel slot for ``program``: filled at once where its build is cached, by the
    background thread otherwise, and never where it cannot be built (the interpreter runs).
    ``rounding``: how torch's kernels round (default: fused multiply-adds, NaN as all ones
    in maximum's vector body)."""
    vcode = [tuple(int(x) for x in row) for row in program.vcode.tolist()]
    fma = rounding is None or rounding.fma
    max_keep = rounding is not None and rounding.max_nan == _dispatch.MAX_NAN_KEEP
    key = (tuple(vcode), n_bound, tuple(program.stored), dtype, exact_sqrt, fma, max_keep)
    slot = _kernels.get(key)
    if slot is not None:
        return slot
    slot = _kernels[key] = vm.Kernel()
    if not enabled() or dtype not in _STORAGE:
        return slot
    uses_sqrt = any(row[0] == V_SQRT for row in vcode)

    def source(mode: int) -> str:
        if exact_sqrt or not uses_sqrt:
            mode = SQRT_EXACT
        return generate(vcode, n_bound, list(program.stored), dtype, mode, fma, max_keep)

    def install(path: Path | None) -> None:
        if path is not None:
            function = _open(path).polyak_run
            slot.set(ctypes.cast(function, ctypes.c_void_p).value)

    # Built before, by this process or another: loaded at once.
    known = SQRT_EXACT if exact_sqrt or not uses_sqrt else _known_sqrt_mode(vm)
    if known is not None:
        cached = _built(source(known), "program")
        if cached is not None:
            install(cached)
            return slot
    _builder.submit(lambda: install(_build(source(sqrt_mode(vm)), "program")))
    return slot


def wait(timeout: float | None = None) -> bool:
    """Wait until every program asked for so far is compiled (or failed); False on timeout."""
    return _builder.wait(timeout)

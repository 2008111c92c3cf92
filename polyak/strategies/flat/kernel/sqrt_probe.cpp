/* The sqrt probe (see _compiled.py's probe_sqrt): compiled once per machine, it tells whether
   the inline copy of MKL's sqrt in prelude.h gives MKL's bits on this CPU. */
#include "prelude.h"
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

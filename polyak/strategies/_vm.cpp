// The flat strategy's kernel: one pass over a parameter group, running a traced update rule.
//
// An update rule written over lists of tensors is traced once (polyak/strategies/_trace.py)
// into two small programs: a scalar program, run once per tensor in double precision (bias
// corrections, step counters), and a vector program, run over each tensor's elements in blocks
// that stay in L1 cache. The parameters, gradients and state are read and written in place, in
// one pass, with every rounding step of torch's CPU kernels (fma where they fuse).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

// torch's CPU sqrt runs MKL's vector math (high-accuracy mode) where torch was built with MKL,
// and those results are not always correctly rounded: the kernel calls the same functions,
// exported by libtorch_cpu, so that it gets the same bits. Where they are absent, torch's sqrt
// is the correctly rounded one, which std::sqrt computes.
extern "C" {
void vmsSqrt(int n, const float* a, float* r, long long mode) __attribute__((weak));
void vmdSqrt(int n, const double* a, double* r, long long mode) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));
}

namespace {

// VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE, the mode torch passes.
constexpr long long kVmlMode = 0x00000002 | 0x00140000 | 0x00000100;

inline void vector_sqrt(float* d, const float* a, int64_t len) {
  if (vmsSqrt != nullptr) {
    vmsSqrt(static_cast<int>(len), a, d, kVmlMode);
  } else {
    for (int64_t j = 0; j < len; ++j) d[j] = std::sqrt(a[j]);
  }
}

inline void vector_sqrt(double* d, const double* a, int64_t len) {
  if (vmdSqrt != nullptr) {
    vmdSqrt(static_cast<int>(len), a, d, kVmlMode);
  } else {
    for (int64_t j = 0; j < len; ++j) d[j] = std::sqrt(a[j]);
  }
}

constexpr int64_t kBlock = 128;
// How many blocks ahead the kernel prefetches.
constexpr int64_t kAhead = 4;
constexpr int kMaxRegs = 24;

// Vector opcodes; keep in sync with _trace.py.
enum VOp : int64_t {
  V_NEG = 0,      // d = -a
  V_ADD = 1,      // d = fma(b, s, a)          a.add(b, alpha=s)
  V_MUL = 2,      // d = a * s
  V_DIV = 3,      // d = a / s
  V_ADDS = 4,     // d = a + s
  V_LERP = 5,     // d = lerp(a, b, s)
  V_ADDCMUL = 6,  // d = fma(s * b, c, a)
  V_ADDCDIV = 7,  // d = a + (s * b) / c
  V_SQRT = 8,     // d = sqrt(a)
  V_MAX = 9,      // d = maximum(a, b), NaN-propagating
  V_COPY = 10,    // d = a
  V_ADD1 = 11,    // d = a + b                 a.add(b)
};

// Scalar opcodes, double precision.
enum SOp : int64_t {
  S_CONST = 0,  // d = imm
  S_ADD = 1,
  S_SUB = 2,
  S_MUL = 3,
  S_DIV = 4,
  S_POW = 5,
  S_NEG = 6,
  S_LOAD = 7,   // d = scalar state [a] of this tensor
  S_STORE = 8,  // scalar state [a] of this tensor = reg b, rounded to its dtype
};

template <typename T>
void run_block(const int64_t* code, int64_t n_code, T* const* reg, const double* sregs,
               int64_t len) {
  for (int64_t k = 0; k < n_code; ++k) {
    const int64_t* ins = code + 6 * k;
    T* d = reg[ins[1]];
    const T* a = ins[2] >= 0 ? reg[ins[2]] : nullptr;
    const T* b = ins[3] >= 0 ? reg[ins[3]] : nullptr;
    const T* c = ins[4] >= 0 ? reg[ins[4]] : nullptr;
    const T s = ins[5] >= 0 ? static_cast<T>(sregs[ins[5]]) : T(0);
    switch (ins[0]) {
      case V_NEG:
        for (int64_t j = 0; j < len; ++j) d[j] = -a[j];
        break;
      case V_ADD:
        for (int64_t j = 0; j < len; ++j) d[j] = std::fma(b[j], s, a[j]);
        break;
      case V_ADD1:
        for (int64_t j = 0; j < len; ++j) d[j] = a[j] + b[j];
        break;
      case V_MUL:
        for (int64_t j = 0; j < len; ++j) d[j] = a[j] * s;
        break;
      case V_DIV:
        for (int64_t j = 0; j < len; ++j) d[j] = a[j] / s;
        break;
      case V_ADDS:
        for (int64_t j = 0; j < len; ++j) d[j] = a[j] + s;
        break;
      case V_LERP:
        if (std::abs(s) < T(0.5)) {
          for (int64_t j = 0; j < len; ++j) d[j] = std::fma(s, b[j] - a[j], a[j]);
        } else {
          const T w = T(1) - s;
          for (int64_t j = 0; j < len; ++j) d[j] = std::fma(-(b[j] - a[j]), w, b[j]);
        }
        break;
      case V_ADDCMUL:
        for (int64_t j = 0; j < len; ++j) d[j] = std::fma(s * b[j], c[j], a[j]);
        break;
      case V_ADDCDIV:
        for (int64_t j = 0; j < len; ++j) d[j] = a[j] + (s * b[j]) / c[j];
        break;
      case V_SQRT:
        vector_sqrt(d, a, len);
        break;
      case V_MAX:
        for (int64_t j = 0; j < len; ++j)
          d[j] = (a[j] != a[j] || b[j] != b[j]) ? a[j] + b[j] : (a[j] > b[j] ? a[j] : b[j]);
        break;
      case V_COPY:
        for (int64_t j = 0; j < len; ++j) d[j] = a[j];
        break;
      default:
        break;
    }
  }
}

double read_scalar(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return static_cast<double>(*static_cast<const float*>(t.const_data_ptr()));
    case at::kDouble: return *static_cast<const double*>(t.const_data_ptr());
    default: return t.item<double>();
  }
}

void write_scalar(at::Tensor& t, double v) {
  switch (t.scalar_type()) {
    case at::kFloat: *static_cast<float*>(t.data_ptr()) = static_cast<float>(v); break;
    case at::kDouble: *static_cast<double*>(t.data_ptr()) = v; break;
    default: t.fill_(v); break;
  }
}

// One group's tensors, held across steps: the parameters themselves (so that a replaced
// ``.data`` or a new ``.grad`` is seen), and each parameter's state tensors.
struct Plan {
  std::vector<at::Tensor> params;
  std::vector<std::vector<at::Tensor>> vstate;  // [key][i], param-shaped
  std::vector<std::vector<at::Tensor>> sstate;  // [key][i], 0-dim
  at::ScalarType dtype;
};

// Return codes of step().
constexpr int64_t kDone = 0;
constexpr int64_t kFallback = 1;  // something this step cannot do: run the reference path

template <typename S>
inline void prefetch_block(const std::vector<S*>& bound, const std::vector<int64_t>& read,
                           int64_t offset, int64_t len) {
  const int64_t bytes = len * static_cast<int64_t>(sizeof(S));
  for (int64_t b : read) {
    const char* base = reinterpret_cast<const char*>(bound[b] + offset);
    for (int64_t q = 0; q < bytes; q += 64) __builtin_prefetch(base + q, 0, 3);
  }
}

template <typename S, typename T>
int64_t step_typed(Plan& plan, const at::Tensor& vcode, const at::Tensor& scode,
                   const at::Tensor& hyper, int64_t n_sregs, int64_t n_vregs,
                   const std::vector<int64_t>& stored) {
  const int64_t n = static_cast<int64_t>(plan.params.size());
  const int64_t nv = static_cast<int64_t>(plan.vstate.size());
  // Check every tensor and take its pointers, in parallel: a model may have thousands.
  std::vector<const S*> grad_all(n, nullptr);
  std::vector<S*> param_all(n, nullptr);
  std::vector<int64_t> numel_all(n, -1);  // -1: no gradient this step
  std::vector<std::vector<S*>> state_all(nv, std::vector<S*>(n, nullptr));
  std::atomic<bool> unfit{false};
  at::parallel_for(0, n, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const at::Tensor& p = plan.params[i];
      const at::Tensor& g = p.grad();
      if (!g.defined()) continue;
      const int64_t numel = p.numel();
      bool fit = p.scalar_type() == plan.dtype && g.scalar_type() == plan.dtype &&
                 g.layout() == at::kStrided && p.is_contiguous() && g.is_contiguous() &&
                 g.numel() == numel && p.is_cpu() && g.is_cpu();
      for (int64_t k = 0; fit && k < nv; ++k) {
        const at::Tensor& st = plan.vstate[k][i];
        fit = st.scalar_type() == plan.dtype && st.is_contiguous() && st.numel() == numel;
        if (fit) state_all[k][i] = static_cast<S*>(st.data_ptr());
      }
      for (const auto& keyed : plan.sstate) fit = fit && keyed[i].numel() == 1 && keyed[i].is_cpu();
      if (!fit) {
        unfit.store(true, std::memory_order_relaxed);
        return;
      }
      grad_all[i] = static_cast<const S*>(g.const_data_ptr());
      param_all[i] = static_cast<S*>(p.data_ptr());
      numel_all[i] = numel;
    }
  });
  if (unfit.load()) return kFallback;
  std::vector<const S*> grad_ptr;
  std::vector<S*> param_ptr;
  std::vector<int64_t> numels;
  std::vector<int64_t> live;
  std::vector<std::vector<S*>> state_ptr(nv);
  for (int64_t i = 0; i < n; ++i) {
    if (numel_all[i] < 0) continue;
    grad_ptr.push_back(grad_all[i]);
    param_ptr.push_back(param_all[i]);
    numels.push_back(numel_all[i]);
    for (int64_t k = 0; k < nv; ++k) state_ptr[k].push_back(state_all[k][i]);
    live.push_back(i);
  }

  // Scalar program, once per tensor, in order. Tensors whose scalar state holds the same values
  // as the previous tensor's (all of them, in most steps) reuse its results and only store.
  const int64_t* sc = scode.data_ptr<int64_t>();
  const int64_t n_scode = scode.size(0);
  const double* simm = reinterpret_cast<const double*>(sc);  // imm bits travel as int64
  const double* hp = hyper.data_ptr<double>();
  const int64_t n_hp = hyper.numel();
  const int64_t n_live = static_cast<int64_t>(live.size());
  const int64_t ns = static_cast<int64_t>(plan.sstate.size());
  // Without scalar state every tensor has the same scalars: one register file serves all.
  const bool shared = ns == 0;
  const int64_t stride = shared ? 0 : n_sregs;
  std::vector<double> sregs(static_cast<size_t>((shared ? 1 : n_live) * n_sregs));
  std::vector<double> prev_in(ns), cur_in(ns);
  for (int64_t t = 0; t < (shared ? std::min<int64_t>(n_live, 1) : n_live); ++t) {
    const int64_t i = live[t];
    double* r = sregs.data() + t * n_sregs;
    for (int64_t k = 0; k < ns; ++k) cur_in[k] = read_scalar(plan.sstate[k][i]);
    if (t > 0 && cur_in == prev_in) {
      std::copy(r - n_sregs, r, r);
      for (int64_t k = 0; k < n_scode; ++k) {
        const int64_t* ins = sc + 4 * k;
        if (ins[0] == S_STORE) write_scalar(plan.sstate[ins[2]][i], r[ins[3]]);
      }
      continue;
    }
    prev_in = cur_in;
    for (int64_t h = 0; h < n_hp; ++h) r[h] = hp[h];
    for (int64_t k = 0; k < n_scode; ++k) {
      const int64_t* ins = sc + 4 * k;
      switch (ins[0]) {
        case S_CONST: r[ins[1]] = simm[4 * k + 3]; break;
        case S_ADD: r[ins[1]] = r[ins[2]] + r[ins[3]]; break;
        case S_SUB: r[ins[1]] = r[ins[2]] - r[ins[3]]; break;
        case S_MUL: r[ins[1]] = r[ins[2]] * r[ins[3]]; break;
        case S_DIV: r[ins[1]] = r[ins[2]] / r[ins[3]]; break;
        case S_POW: r[ins[1]] = std::pow(r[ins[2]], r[ins[3]]); break;
        case S_NEG: r[ins[1]] = -r[ins[2]]; break;
        case S_LOAD: r[ins[1]] = read_scalar(plan.sstate[ins[2]][i]); break;
        case S_STORE:
          write_scalar(plan.sstate[ins[2]][i], r[ins[3]]);
          // Later reads see the stored value, rounded to the state's dtype.
          r[ins[3]] = read_scalar(plan.sstate[ins[2]][i]);
          break;
        default: break;
      }
    }
  }

  // Work items: (live tensor, first element), at most kChunk elements each.
  constexpr int64_t kChunk = 1 << 14;
  std::vector<std::pair<int64_t, int64_t>> work;
  work.reserve(n_live);
  for (int64_t t = 0; t < n_live; ++t) {
    for (int64_t start = 0; start < numels[t]; start += kChunk) work.emplace_back(t, start);
  }
  const int64_t* vc = vcode.data_ptr<int64_t>();
  const int64_t n_vcode = vcode.size(0);
  const int64_t n_bound = 2 + nv;
  // The memory-bound registers the program reads: only these are loaded and prefetched.
  std::vector<int64_t> read;
  {
    std::vector<bool> used(n_bound, false);
    for (int64_t k = 0; k < n_vcode; ++k)
      for (int64_t f = 2; f <= 4; ++f)
        if (vc[6 * k + f] >= 0 && vc[6 * k + f] < n_bound) used[vc[6 * k + f]] = true;
    for (int64_t b = 0; b < n_bound; ++b)
      if (used[b]) read.push_back(b);
  }
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t lo, int64_t hi) {
    // MKL would otherwise start threads of its own for each block's sqrt, inside ours.
    const int mkl_threads = MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0;
    // Temporaries live in L1-sized blocks; where storage and compute types agree, the bound
    // registers point straight into the tensors, so each is read and written once.
    T local[kMaxRegs][kBlock];
    T* reg[kMaxRegs];
    std::vector<S*> bound(n_bound);
    std::vector<S*> next_bound(n_bound);
    if (lo < hi) {
      const int64_t u = work[lo].first;
      next_bound[0] = param_ptr[u];
      next_bound[1] = const_cast<S*>(grad_ptr[u]);
      for (int64_t k = 0; k < nv; ++k) next_bound[2 + k] = state_ptr[k][u];
      prefetch_block(next_bound, read, work[lo].second,
                     std::min(kAhead * kBlock, numels[u] - work[lo].second));
    }
    for (int64_t w = lo; w < hi; ++w) {
      const int64_t t = work[w].first;
      const int64_t end = std::min(numels[t], work[w].second + kChunk);
      const double* r = sregs.data() + t * stride;
      bound[0] = param_ptr[t];
      bound[1] = const_cast<S*>(grad_ptr[t]);
      for (int64_t k = 0; k < nv; ++k) bound[2 + k] = state_ptr[k][t];
      for (int64_t k = 0; k < kMaxRegs; ++k) reg[k] = local[k];
      for (int64_t off = work[w].second; off < end; off += kBlock) {
        const int64_t len = std::min(kBlock, end - off);
        // Ask for the block kAhead blocks on of every stream now, so that all of them arrive
        // in time; at the start of a chunk, also for the next chunk's first blocks, which the
        // hardware prefetcher would not guess (another page, often of another tensor).
        const int64_t next = off + kAhead * kBlock;
        if (next < end) {
          prefetch_block(bound, read, next, std::min(kBlock, end - next));
        }
        if (off == work[w].second && w + 1 < hi) {
          const int64_t u = work[w + 1].first;
          next_bound[0] = param_ptr[u];
          next_bound[1] = const_cast<S*>(grad_ptr[u]);
          for (int64_t k = 0; k < nv; ++k) next_bound[2 + k] = state_ptr[k][u];
          const int64_t start = work[w + 1].second;
          prefetch_block(next_bound, read, start, std::min(kAhead * kBlock, numels[u] - start));
        }
        if constexpr (std::is_same_v<S, T>) {
          for (int64_t b = 0; b < n_bound; ++b) reg[b] = bound[b] + off;
          run_block<T>(vc, n_vcode, reg, r, len);
        } else {
          for (int64_t b : read)
            for (int64_t j = 0; j < len; ++j) local[b][j] = static_cast<T>(bound[b][off + j]);
          run_block<T>(vc, n_vcode, reg, r, len);
          for (int64_t b : stored)
            for (int64_t j = 0; j < len; ++j) bound[b][off + j] = static_cast<S>(local[b][j]);
        }
      }
    }
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(mkl_threads);
  });
  (void)n_vregs;
  return kDone;
}

int64_t step(Plan& plan, const at::Tensor& vcode, const at::Tensor& scode,
             const at::Tensor& hyper, int64_t n_sregs, int64_t n_vregs,
             const std::vector<int64_t>& stored) {
  TORCH_CHECK(n_vregs <= kMaxRegs, "update rule needs too many registers");
  switch (plan.dtype) {
    case at::kFloat: return step_typed<float, float>(plan, vcode, scode, hyper, n_sregs, n_vregs, stored);
    case at::kDouble: return step_typed<double, double>(plan, vcode, scode, hyper, n_sregs, n_vregs, stored);
    case at::kHalf: return step_typed<c10::Half, float>(plan, vcode, scode, hyper, n_sregs, n_vregs, stored);
    case at::kBFloat16: return step_typed<c10::BFloat16, float>(plan, vcode, scode, hyper, n_sregs, n_vregs, stored);
    default: return kFallback;
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Plan>(m, "Plan")
      .def(pybind11::init([](std::vector<at::Tensor> params,
                             std::vector<std::vector<at::Tensor>> vstate,
                             std::vector<std::vector<at::Tensor>> sstate) {
        Plan plan;
        plan.dtype = params.empty() ? at::kFloat : params[0].scalar_type();
        plan.params = std::move(params);
        plan.vstate = std::move(vstate);
        plan.sstate = std::move(sstate);
        return plan;
      }))
      .def("step", &step);
}

// The kernel of the flat strategy: one pass over a parameter group, running a traced update
// rule. It is built and loaded by _kernel.py; compiled programs (_compiled.py, with
// prelude.h) plug into it.
//
// An update rule written over lists of tensors is traced once (polyak/strategies/flat/_trace.py)
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
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
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

// What compiled programs (see _codegen.py) receive besides their tensors: the sqrt functions
// torch calls, for programs that call them rather than compute their bits inline.
struct Ctx {
  void (*vms)(int, const float*, float*, long long);
  void (*vmd)(int, const double*, double*, long long);
  long long mode;
};

void plain_sqrt(int n, const float* a, float* r, long long) {
  for (int j = 0; j < n; ++j) r[j] = std::sqrt(a[j]);
}
void plain_sqrt(int n, const double* a, double* r, long long) {
  for (int j = 0; j < n; ++j) r[j] = std::sqrt(a[j]);
}

const Ctx kCtx = {vmsSqrt != nullptr ? vmsSqrt : static_cast<void (*)(int, const float*, float*, long long)>(plain_sqrt),
                  vmdSqrt != nullptr ? vmdSqrt : static_cast<void (*)(int, const double*, double*, long long)>(plain_sqrt),
                  kVmlMode};

// A compiled program: ``polyak_run`` of _codegen.py, which runs the vector program over
// elements [start, end) of one tensor's streams with every element's update in registers, and
// prefetches ahead into the next work item. Filled in when the background build is done;
// until then steps interpret the program.
using CompiledFn = void (*)(void* const* bound, const double* sregs, int64_t start, int64_t end,
                            void* const* next, int64_t nstart, int64_t tail, const Ctx* ctx);
struct Compiled {
  std::atomic<CompiledFn> fn{nullptr};
};

constexpr int64_t kBlock = 128;
// How many blocks ahead the kernel prefetches.
constexpr int64_t kAhead = 4;
constexpr int kMaxRegs = 24;

// Vector opcodes, as _program.py numbers them (tests/test_native.py checks the two agree).
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
  V_MULV = 12,    // d = a * b                 a.mul(b)
  V_DIVV = 13,    // d = a / b                 a.div(b)
  V_ABS = 14,     // d = |a|
  V_SIGN = 15,    // d = (a > 0) - (a < 0)    a.sign(): 0 for zeros and NaN
  V_RECIP = 16,   // d = 1 / a
  // Comparisons of a with b, or without b with s: a mask register (1 or 0 here; the
  // generated code keeps masks as booleans).
  V_LT = 17, V_LE = 18, V_GT = 19, V_GE = 20, V_EQ = 21, V_NE = 22,
  V_SELECT = 23,  // d = c ? (b or s) : a      masked_fill, where
  V_SELS = 24,    // d = s ? b : a             s a per-tensor condition of the scalar program
  V_FILL = 25,    // d = s
  // torch's fused kernels (see fused_form in _program.py): d = a * s + b * c, rounded as their
  // vector body (fma(b, c, a * s)) or, in their scalar tail, as the compiler contracts it
  // (fma(a, s, b * c)); and maximum, std::max in their tail.
  V_MULADD = 26,
  V_MAXF = 27,
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
  S_F32 = 9,    // d = a rounded to float32
  S_ROUND = 10, // d = a rounded to the dtype of scalar state [b]
  S_LT = 11, S_LE = 12, S_GT = 13, S_GE = 14, S_EQ = 15, S_NE = 16,  // d = 1 or 0
  S_COPY = 17,
  S_SELECT = 18,  // d = d ? a : b
};

// NaN as torch's CPU maximum writes it on x86 vectors: all ones in its vectorised body (the
// canonical quiet NaN in the scalar tail of each of its thread's chunks).
template <typename T>
T all_ones() {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  const U bits = ~U(0);
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// A comparison into a mask register, of ``a`` with ``b`` or, without it, with ``s``.
template <typename T, typename F>
inline void compare(T* d, const T* a, const T* b, T s, int64_t len, F holds) {
  if (b != nullptr) {
    for (int64_t j = 0; j < len; ++j) d[j] = holds(a[j], b[j]) ? T(1) : T(0);
  } else {
    for (int64_t j = 0; j < len; ++j) d[j] = holds(a[j], s) ? T(1) : T(0);
  }
}

// x * y + z as torch's kernels at this process's capability compute it: rounded once where
// they fuse (``fma``), the product and the sum rounded apart where they do not (the file is
// compiled with -ffp-contract=off, so the second form is not fused behind our back).
template <typename T>
inline T mad(T x, T y, T z, bool fma) {
  return fma ? std::fma(x, y, z) : x * y + z;
}

// How torch's kernels round, as polyak/strategies/flat/_dispatch.py found them: whether they
// fuse multiply-adds, and whether maximum's vector body keeps a NaN operand (else: all ones).
struct Rounding {
  bool fma = true;
  bool max_keep = false;
};

// ``first``: the index of the block's first element in its tensor; ``tail``: where the scalar
// tail of torch's chunk holding the block starts (see Work).
template <typename T>
void run_block(const int64_t* code, int64_t n_code, T* const* reg, const double* sregs,
               int64_t len, bool exact_sqrt, int64_t first, int64_t tail, Rounding rounding) {
  const bool fma = rounding.fma;
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
        for (int64_t j = 0; j < len; ++j) d[j] = mad(b[j], s, a[j], fma);
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
          for (int64_t j = 0; j < len; ++j) d[j] = mad(s, b[j] - a[j], a[j], fma);
        } else {
          // As torch's vectorised body: the coefficient w - 1 (the NaN of b - a keeps its sign).
          const T w = s - T(1);
          for (int64_t j = 0; j < len; ++j) d[j] = mad(w, b[j] - a[j], b[j], fma);
        }
        break;
      case V_ADDCMUL:
        for (int64_t j = 0; j < len; ++j) d[j] = mad(s * b[j], c[j], a[j], fma);
        break;
      case V_ADDCDIV:
        for (int64_t j = 0; j < len; ++j) d[j] = a[j] + (s * b[j]) / c[j];
        break;
      case V_SQRT:
        if (exact_sqrt) {
          for (int64_t j = 0; j < len; ++j) d[j] = std::sqrt(a[j]);
        } else {
          vector_sqrt(d, a, len);
        }
        break;
      case V_MAX:
        for (int64_t j = 0; j < len; ++j) {
          const bool in_tail = first + j >= tail;
          if (a[j] != a[j] || b[j] != b[j]) {
            const T body = rounding.max_keep ? (a[j] != a[j] ? a[j] : b[j]) : all_ones<T>();
            d[j] = in_tail ? std::numeric_limits<T>::quiet_NaN() : body;
          } else {
            d[j] = in_tail ? (a[j] < b[j] ? b[j] : a[j]) : (a[j] > b[j] ? a[j] : b[j]);
          }
        }
        break;
      case V_MAXF:
        for (int64_t j = 0; j < len; ++j) {
          if (first + j >= tail) {
            d[j] = a[j] < b[j] ? b[j] : a[j];
          } else if (a[j] != a[j] || b[j] != b[j]) {
            d[j] = rounding.max_keep ? (a[j] != a[j] ? a[j] : b[j]) : all_ones<T>();
          } else {
            d[j] = a[j] > b[j] ? a[j] : b[j];
          }
        }
        break;
      case V_MULADD:
        for (int64_t j = 0; j < len; ++j) {
          d[j] = first + j >= tail ? mad(a[j], s, b[j] * c[j], fma)
                                   : mad(b[j], c[j], a[j] * s, fma);
        }
        break;
      case V_COPY:
        for (int64_t j = 0; j < len; ++j) d[j] = a[j];
        break;
      case V_MULV:
        for (int64_t j = 0; j < len; ++j) d[j] = a[j] * b[j];
        break;
      case V_DIVV:
        for (int64_t j = 0; j < len; ++j) d[j] = a[j] / b[j];
        break;
      case V_ABS:
        for (int64_t j = 0; j < len; ++j) d[j] = std::abs(a[j]);
        break;
      case V_SIGN:
        for (int64_t j = 0; j < len; ++j) {
          d[j] = (a[j] > T(0) ? T(1) : T(0)) - (a[j] < T(0) ? T(1) : T(0));
        }
        break;
      case V_RECIP:
        for (int64_t j = 0; j < len; ++j) d[j] = T(1) / a[j];
        break;
      case V_LT: compare(d, a, b, s, len, [](T x, T y) { return x < y; }); break;
      case V_LE: compare(d, a, b, s, len, [](T x, T y) { return x <= y; }); break;
      case V_GT: compare(d, a, b, s, len, [](T x, T y) { return x > y; }); break;
      case V_GE: compare(d, a, b, s, len, [](T x, T y) { return x >= y; }); break;
      case V_EQ: compare(d, a, b, s, len, [](T x, T y) { return x == y; }); break;
      case V_NE: compare(d, a, b, s, len, [](T x, T y) { return x != y; }); break;
      case V_SELECT:
        for (int64_t j = 0; j < len; ++j) d[j] = c[j] != T(0) ? (b != nullptr ? b[j] : s) : a[j];
        break;
      case V_SELS: {
        const bool cond = sregs[ins[5]] != 0.0;
        for (int64_t j = 0; j < len; ++j) d[j] = cond ? b[j] : a[j];
        break;
      }
      case V_FILL:
        for (int64_t j = 0; j < len; ++j) d[j] = s;
        break;
      default:
        break;
    }
  }
}

// One group's tensors, held across steps: the parameters themselves (so that a replaced
// ``.data`` or a new ``.grad`` is seen), and each parameter's state tensors. The arrays after
// them are each step's scratch, kept so that a step allocates nothing.
// A run of one tensor's elements that one call of the kernel updates: (tensor, first element,
// end), at most 2^14 elements. A tensor without elements has one, which makes its scalar
// stores. Items do not straddle the chunks torch's own kernels would split the tensor into
// (at::parallel_for over the grain size, and in each chunk a vectorised body and a scalar
// tail); ``tail`` is where the item's chunk's tail starts, for the one operation whose bits
// tell them apart (maximum, on NaN).
struct Work {
  int64_t i, start, end, tail;
};

struct Plan {
  std::vector<pybind11::object> owners;  // the parameters as the group's list holds them
  std::vector<at::Tensor> params;   // the tensors updated: the parameters, or their local data
  // Each step's gradients where the plan's tensors are not the parameters themselves (the
  // local data of distributed tensors): given by the caller, undefined for none. Empty: each
  // parameter's own gradient.
  std::vector<at::Tensor> grads;
  std::vector<std::vector<at::Tensor>> vstate;  // [key][i], param-shaped
  std::vector<std::vector<at::Tensor>> sstate;  // [key][i], 0-dim
  at::ScalarType dtype;
  std::vector<void*> ptr;        // [i][param, grad, vector state...]: where each stream starts
  std::vector<int64_t> numel;    // [i]; -1: no gradient this step
  std::vector<void*> sptr;       // [i][key]: where each scalar state value lives
  std::vector<double> sval;      // [i][key]: its value at the start of the step
  std::vector<uint8_t> sdouble;  // [i][key]: whether it is a double (else a float)
  // [i][param, grad, vector state..., scalar state...]: the tensors the step writes, whose
  // version counters it advances as in-place operations do (null: not written, or an
  // inference tensor inside inference mode, which counts nothing).
  std::vector<c10::TensorImpl*> written;
  // [param, grad, vector state..., scalar state...]: whether the program writes each (the
  // bound registers its vector code stores, the scalar state its scalar code stores).
  std::vector<uint8_t> writes;
  // Whether the step was called in inference mode, where inference tensors may be written.
  bool inference = false;
  // For the local data of distributed tensors: the distributed tensors themselves, whose
  // version counters autograd sees, as [param, none, vector state..., scalar state...][i].
  std::vector<std::vector<at::Tensor>> counted;
  // The memory the last step found disjoint: ptr, sptr and numel as they were then (empty:
  // none yet).
  std::vector<void*> disjoint_ptr, disjoint_sptr;
  std::vector<int64_t> disjoint_numel;
  std::vector<double> sregs;     // [row][register]: scalar registers, one row per distinct set
  std::vector<int64_t> srow;     // [i]: the row of tensor i's scalar registers
  // The work items of the last step, and the element counts, threads and width they are for.
  std::vector<Work> work;
  std::vector<int64_t> work_numel;
  int64_t work_threads = -1, work_width = -1;
  // The program to run (see _program.py): vector and scalar code, the hyperparameter registers'
  // values, the scalar register count, and the bound registers the vector code writes.
  at::Tensor vcode, scode;
  std::vector<double> hyper;
  int64_t n_sregs = 0;
  std::vector<int64_t> stored;
  // What the plan was made for: the optimizer's state dict and its version, and the group's
  // hyperparameters (key, value) when the program was loaded, with the group's size then.
  pybind11::object state;
  int64_t version = 0;
  std::vector<std::pair<pybind11::object, pybind11::object>> hyper_items;
  Py_ssize_t group_size = -1;
  // The program's guards: (slot, comparison, number, expected); see _program.GUARD_OPS. Without
  // them (a guard compares with something not a number) new numbers go through Python.
  struct Guard {
    int64_t slot, op;
    double number;
    bool expected;
  };
  std::optional<std::vector<Guard>> guards;
  // State whose changes are not counted: (parameter index, its entry or null, the entry's
  // items as they were), compared by identity at every step.
  struct Watched {
    int64_t index;
    pybind11::object entry;
    std::vector<std::pair<pybind11::object, pybind11::object>> items;
  };
  std::vector<Watched> watched;
  // The compiled form of the program, when built; and how many steps ran it.
  std::shared_ptr<Compiled> compiled;
  int64_t compiled_steps = 0;
  // Whether sqrt is the correctly rounded one (fused steps, as torch's fused kernels), or
  // the one torch's per-tensor path calls.
  bool exact_sqrt = false;
  // The bytes per step of the vector body of torch's maximum, which tell its scalar tail
  // apart, and how its kernels round (see Rounding).
  int64_t vector_bytes = 64;
  Rounding rounding;
  // Whether the scalar tail is the last numel % width elements of each whole tensor, as in
  // torch's fused kernels (whose threads split tensors at multiples of their vector width),
  // rather than of each of its thread's chunks, as in torch's per-tensor kernels.
  bool whole_tail = false;
};

// Return codes of step().
constexpr int64_t kDone = 0;
constexpr int64_t kFallback = 1;  // something this step cannot do: another strategy runs it
constexpr int64_t kStale = 2;     // the group's parameters or the state changed: build anew
constexpr int64_t kReload = 3;    // the hyperparameters changed: load a program for them

// Metadata is asked for into the second-level cache (prefetcht1): the check asks for a few
// dozen scattered lines per tensor, and requests into the first level hold its few miss
// buffers until each line arrives, which stalls the loop (on Zen 4 the check of 2000 tensors
// ran about an eighth faster so).
inline void prefetch(const void* at) { __builtin_prefetch(at, 0, 2); }

inline c10::TensorImpl* impl_of(const at::Tensor& t) { return t.unsafeGetTensorImpl(); }

// Asks for every line of a tensor's metadata (the object is a few lines long): the storage and
// autograd pointers, sizes, offset, element count, dtype, flags and dispatch keys.
inline void prefetch_impl(const c10::TensorImpl* impl) {
  const char* base = reinterpret_cast<const char*>(impl);
  for (size_t at = 0; at < sizeof(c10::TensorImpl); at += 64) prefetch(base + at);
  prefetch(base + sizeof(c10::TensorImpl) - 1);
}

// Asks for the lines of a storage that hold its data pointer and its access flags.
inline void prefetch_storage(const c10::TensorImpl* impl) {
  const c10::StorageImpl* storage = impl->unsafe_storage().unsafeGetStorageImpl();
  if (storage != nullptr) {
    prefetch(reinterpret_cast<const char*>(storage) + 16);
    prefetch(reinterpret_cast<const char*>(storage) + 63);
  }
}

// The dispatch keys a tensor whose memory the kernel reads and writes in place may carry: a
// dense CPU tensor, with or without autograd's and autocast's keys (an inference tensor has
// none). A conjugate or negative view, a sparse, meta or wrapper tensor has others.
struct PlainKeys {
  uint64_t cpu = c10::DispatchKeySet(c10::DispatchKey::CPU).raw_repr();
  uint64_t extras = 0;
  PlainKeys() {
    const uint64_t full = at::empty({0}).unsafeGetTensorImpl()->key_set().raw_repr();
    extras = full & ~cpu;
  }
  bool plain(const c10::TensorImpl* t) const { return (t->key_set().raw_repr() & ~extras) == cpu; }
};

// Finds where a plain tensor's first element lives, as data_ptr() does: its storage's data at
// the tensor's offset. A copy-on-write storage the step writes is materialised first, as there;
// one it only reads (a gradient) is read as const_data_ptr() reads it. False for a tensor
// without storage.
inline bool data_of(const c10::TensorImpl* t, int64_t itemsize, void** at, bool written = true) {
  c10::StorageImpl* storage = t->unsafe_storage().unsafeGetStorageImpl();
  if (storage == nullptr) return false;
  char* data = written ? static_cast<char*>(storage->mutable_data())
                       : static_cast<char*>(const_cast<void*>(storage->data()));
  *at = data == nullptr ? nullptr : data + t->storage_offset() * itemsize;
  return true;
}

// Whether ``t`` has the parameter ``p``'s shape (torch refuses a gradient or state of another)
// and lays its elements out in memory as ``p`` does, densely: both contiguous, or both dense
// without overlap and with the same strides wherever a dimension has more than one element,
// as a channels-last weight, its gradient (autograd gives it the parameter's strides) and its
// state (made with the parameter's memory format) are. The kernel then runs over their memory
// in order, as torch's elementwise kernels do once they have merged the dimensions.
inline bool laid_out_as(const c10::TensorImpl* p, const c10::TensorImpl* t) {
  const c10::IntArrayRef sizes = p->sizes();
  if (t->sizes() != sizes) return false;
  if (p->is_contiguous() && t->is_contiguous()) return true;
  if (!p->is_non_overlapping_and_dense() || !t->is_non_overlapping_and_dense()) return false;
  const c10::IntArrayRef ps = p->strides(), ts = t->strides();
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] > 1 && ps[d] != ts[d]) return false;
  }
  return true;
}

// A parameter's gradient, as TensorImpl::grad() returns it, read in place.
inline const at::Tensor* grad_of(const c10::TensorImpl* t) {
  const auto* meta = static_cast<const torch::autograd::AutogradMeta*>(t->autograd_meta());
  return meta == nullptr ? nullptr : &meta->grad_;
}

// The counter a tensor's VariableVersion points to, as c10 declares it (privately): one
// pointer to a reference-counted object holding the version.
struct VersionCounterLayout : c10::intrusive_ptr_target {
  std::atomic<uint32_t> version_;
};
static_assert(sizeof(c10::VariableVersion) == sizeof(void*));

inline std::atomic<uint32_t>* version_of(const c10::TensorImpl* t) {
  auto* counter = *reinterpret_cast<VersionCounterLayout* const*>(&t->version_counter());
  return &counter->version_;
}

// Rounds a scalar state value to its dtype.
inline double rounded(bool is_double, double v) {
  return is_double ? v : static_cast<double>(static_cast<float>(v));
}

// Runs the scalar program for tensor ``i`` into its registers ``r``: the hyperparameters, then
// what the program computes from them and from the tensor's scalar state (read in ``in``).
// Stores are not made here but when the tensor is updated; later loads see the value stored,
// rounded to the state's dtype.
void run_scalar_program(const Plan& plan, int64_t i, const double* in, double* r, double* cur) {
  const int64_t* sc = plan.scode.data_ptr<int64_t>();
  const int64_t n_scode = plan.scode.size(0);
  const double* simm = reinterpret_cast<const double*>(sc);  // imm bits travel as int64
  const std::vector<double>& hp = plan.hyper;
  const int64_t ns = static_cast<int64_t>(plan.sstate.size());
  const uint8_t* is_double = plan.sdouble.data() + i * ns;
  std::copy(in, in + ns, cur);
  std::copy(hp.begin(), hp.end(), r);
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
      case S_LOAD: r[ins[1]] = cur[ins[2]]; break;
      case S_STORE: cur[ins[2]] = r[ins[3]] = rounded(is_double[ins[2]], r[ins[3]]); break;
      case S_F32: r[ins[1]] = rounded(false, r[ins[2]]); break;
      case S_ROUND: r[ins[1]] = rounded(is_double[ins[3]], r[ins[2]]); break;
      case S_LT: r[ins[1]] = r[ins[2]] < r[ins[3]]; break;
      case S_LE: r[ins[1]] = r[ins[2]] <= r[ins[3]]; break;
      case S_GT: r[ins[1]] = r[ins[2]] > r[ins[3]]; break;
      case S_GE: r[ins[1]] = r[ins[2]] >= r[ins[3]]; break;
      case S_EQ: r[ins[1]] = r[ins[2]] == r[ins[3]]; break;
      case S_NE: r[ins[1]] = r[ins[2]] != r[ins[3]]; break;
      case S_COPY: r[ins[1]] = r[ins[2]]; break;
      case S_SELECT: r[ins[1]] = r[ins[1]] != 0.0 ? r[ins[2]] : r[ins[3]]; break;
      default: break;
    }
  }
}

bool disjoint(Plan& plan, bool grad_written);

// Whether the memory the step writes is where the last step found it disjoint: the same
// pointers and element counts. Gradients count only where the step writes them, as a
// training loop that sets them to None gives new ones, elsewhere in memory, every step.
bool written_as_before(const Plan& plan, bool grad_written) {
  if (plan.sptr != plan.disjoint_sptr || plan.numel != plan.disjoint_numel ||
      plan.ptr.size() != plan.disjoint_ptr.size()) {
    return false;
  }
  if (grad_written) return plan.ptr == plan.disjoint_ptr;
  const size_t n_bound = 2 + plan.vstate.size();
  for (size_t k = 0; k < plan.ptr.size(); ++k) {
    if (k % n_bound != 1 && plan.ptr[k] != plan.disjoint_ptr[k]) return false;
  }
  return true;
}

// Whether the program writes the gradient (a step that unscales it in place).
inline bool writes_grad(const Plan& plan) {
  return std::find(plan.stored.begin(), plan.stored.end(), 1) != plan.stored.end();
}

// Checks every tensor of the group, records where its data lives and runs its scalar program,
// or returns false where this step cannot run flat; nothing is written to the tensors.
//
// The tensors' metadata is scattered over the heap and, in a training loop, seldom in cache,
// so the loop runs as a pipeline that asks for each tensor's objects a few tensors ahead of
// where it reads them (the tensor, then its storage and autograd record, then its gradient,
// then the gradient's storage): their latencies overlap.
bool check_group(Plan& plan) {
  const int64_t n = static_cast<int64_t>(plan.params.size());
  const int64_t nv = static_cast<int64_t>(plan.vstate.size());
  const int64_t ns = static_cast<int64_t>(plan.sstate.size());
  const int64_t n_bound = 2 + nv;
  const int64_t n_sregs = plan.n_sregs;
  plan.ptr.resize(n * n_bound);
  plan.numel.resize(n);
  plan.sptr.resize(n * ns);
  plan.sval.resize(n * ns);
  plan.sdouble.resize(n * ns);
  // Without scalar state every tensor has the same scalars: one register file serves all.
  plan.sregs.resize(static_cast<size_t>((ns == 0 ? 1 : n) * n_sregs));
  plan.srow.assign(n, 0);
  if (ns == 0) run_scalar_program(plan, 0, nullptr, plan.sregs.data(), nullptr);
  const int64_t n_slots = n_bound + ns;
  const std::vector<uint8_t>& writes = plan.writes;
  plan.written.assign(n * n_slots, nullptr);
  constexpr int64_t kAheadTensors = 4;  // tensors between two stages of the pipeline
  static const PlainKeys keys;
  const bool grad_written = writes_grad(plan);
  const caffe2::TypeMeta dtype = c10::scalarTypeToTypeMeta(plan.dtype);
  const int64_t itemsize = static_cast<int64_t>(dtype.itemsize());
  // Tensor i's gradient: the one the caller gave, or the parameter's own.
  const bool given = !plan.grads.empty();
  auto grad_at = [&](int64_t i) -> const at::Tensor* {
    return given ? &plan.grads[i] : grad_of(impl_of(plan.params[i]));
  };
  std::atomic<bool> unfit{false};
  at::parallel_for(0, n, 64, [&](int64_t lo, int64_t hi) {
    // Tensors whose scalar state holds the same values as the previous one's (all of them, in
    // most steps) reuse its registers.
    const double* prev_in = nullptr;
    const uint8_t* prev_doubles = nullptr;
    int64_t prev_row = 0;
    std::vector<double> cur(ns);
    for (int64_t j = lo; j < hi + 4 * kAheadTensors; ++j) {
      if (int64_t i = j; i < hi) {
        prefetch_impl(impl_of(plan.params[i]));
        for (const auto& keyed : plan.vstate) prefetch_impl(impl_of(keyed[i]));
        for (const auto& keyed : plan.sstate) prefetch_impl(impl_of(keyed[i]));
      }
      if (int64_t i = j - kAheadTensors; i >= lo && i < hi) {
        const c10::TensorImpl* p = impl_of(plan.params[i]);
        prefetch_storage(p);
        if (p->autograd_meta() != nullptr) prefetch(grad_of(p));  // the line holding .grad
        for (const auto& keyed : plan.vstate) prefetch_storage(impl_of(keyed[i]));
        for (const auto& keyed : plan.sstate) prefetch_storage(impl_of(keyed[i]));
      }
      if (int64_t i = j - 2 * kAheadTensors; i >= lo && i < hi) {
        const at::Tensor* g = grad_at(i);
        if (g != nullptr && g->defined()) prefetch_impl(impl_of(*g));
        for (const auto& keyed : plan.sstate) {
          const c10::StorageImpl* storage = impl_of(keyed[i])->unsafe_storage().unsafeGetStorageImpl();
          if (storage != nullptr) prefetch(storage->data());
        }
      }
      if (int64_t i = j - 3 * kAheadTensors; i >= lo && i < hi) {
        const at::Tensor* g = grad_at(i);
        if (g != nullptr && g->defined()) prefetch_storage(impl_of(*g));
      }
      const int64_t i = j - 4 * kAheadTensors;
      if (i < lo) continue;
      const c10::TensorImpl* p = impl_of(plan.params[i]);
      const at::Tensor* grad = grad_at(i);
      plan.numel[i] = -1;
      if (grad == nullptr || !grad->defined()) {
        std::fill_n(plan.ptr.data() + i * n_bound, n_bound, nullptr);
        std::fill_n(plan.sptr.data() + i * ns, ns, nullptr);
        continue;
      }
      const c10::TensorImpl* g = impl_of(*grad);
      const int64_t numel = p->numel();
      void** ptr = plan.ptr.data() + i * n_bound;
      bool fit = keys.plain(p) && keys.plain(g) && p->dtype() == dtype && g->dtype() == dtype &&
                 laid_out_as(p, g) && data_of(p, itemsize, &ptr[0]) &&
                 data_of(g, itemsize, &ptr[1], grad_written);
      for (int64_t k = 0; fit && k < nv; ++k) {
        const c10::TensorImpl* st = impl_of(plan.vstate[k][i]);
        fit = keys.plain(st) && st->dtype() == dtype && laid_out_as(p, st) &&
              data_of(st, itemsize, &ptr[2 + k]);
      }
      double* in = plan.sval.data() + i * ns;
      for (int64_t k = 0; fit && k < ns; ++k) {
        const c10::TensorImpl* st = impl_of(plan.sstate[k][i]);
        const bool is_double = st->dtype() == caffe2::TypeMeta::Make<double>();
        void* at = nullptr;
        fit = keys.plain(st) && st->numel() == 1 &&
              (is_double || st->dtype() == caffe2::TypeMeta::Make<float>()) &&
              data_of(st, is_double ? 8 : 4, &at) && at != nullptr;
        if (!fit) break;
        plan.sptr[i * ns + k] = at;
        plan.sdouble[i * ns + k] = is_double;
        in[k] = is_double ? *static_cast<const double*>(at)
                          : static_cast<double>(*static_cast<const float*>(at));
      }
      if (!fit) {
        unfit.store(true, std::memory_order_relaxed);
        return;
      }
      // Every tensor written needs a version counter, which only inference tensors lack:
      // outside inference mode torch refuses to write those in place.
      c10::TensorImpl** counted = plan.written.data() + i * n_slots;
      for (int64_t b = 0; fit && b < n_slots; ++b) {
        if (!writes[b]) continue;
        const at::Tensor& t = !plan.counted.empty() && b != 1 ? plan.counted[b][i]
                              : b == 0                          ? plan.params[i]
                              : b == 1                          ? *grad
                              : b < n_bound                     ? plan.vstate[b - 2][i]
                                                                : plan.sstate[b - n_bound][i];
        c10::TensorImpl* impl = impl_of(t);
        if (impl->version_counter().enabled()) {
          counted[b] = impl;
          __builtin_prefetch(version_of(impl), 1, 2);
        } else {
          fit = plan.inference;
        }
      }
      if (!fit) {
        unfit.store(true, std::memory_order_relaxed);
        return;
      }
      plan.numel[i] = numel;
      if (ns > 0) {
        const uint8_t* doubles = plan.sdouble.data() + i * ns;
        if (prev_in != nullptr && std::equal(in, in + ns, prev_in) &&
            std::equal(doubles, doubles + ns, prev_doubles)) {
          plan.srow[i] = prev_row;
        } else {
          run_scalar_program(plan, i, in, plan.sregs.data() + i * n_sregs, cur.data());
          plan.srow[i] = i;
          prev_in = in;
          prev_doubles = doubles;
          prev_row = i;
        }
      }
    }
  });
  return !unfit.load() && disjoint(plan, grad_written);
}

// Whether the memory every step writes (parameters, vector and scalar state) is disjoint.
// Parameters over one storage, overlapping views, or a step counter shared by several
// parameters are updated one after the other by torch; the flat pass would update them at
// once, so such a group takes the reference path. The memory written seldom moves between
// steps, so the sort runs only when it did.
bool disjoint(Plan& plan, bool grad_written) {
  if (written_as_before(plan, grad_written)) return true;
  const int64_t n = static_cast<int64_t>(plan.params.size());
  const int64_t n_bound = 2 + static_cast<int64_t>(plan.vstate.size());
  const int64_t ns = static_cast<int64_t>(plan.sstate.size());
  const int64_t item = static_cast<int64_t>(c10::elementSize(plan.dtype));
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  spans.reserve(n * (n_bound - 1 + ns));
  for (int64_t i = 0; i < n; ++i) {
    if (plan.numel[i] < 0) continue;  // no gradient: nothing written
    for (int64_t b = 0; b < n_bound && plan.numel[i] > 0; ++b) {
      if (b == 1 && !grad_written) continue;  // a gradient only read may be shared
      const auto at = reinterpret_cast<uintptr_t>(plan.ptr[i * n_bound + b]);
      spans.emplace_back(at, at + plan.numel[i] * item);
    }
    for (int64_t k = 0; k < ns; ++k) {
      const auto at = reinterpret_cast<uintptr_t>(plan.sptr[i * ns + k]);
      spans.emplace_back(at, at + (plan.sdouble[i * ns + k] ? 8 : 4));
    }
  }
  std::sort(spans.begin(), spans.end());
  for (size_t k = 1; k < spans.size(); ++k) {
    if (spans[k].first < spans[k - 1].second) return false;
  }
  plan.disjoint_ptr = plan.ptr;
  plan.disjoint_sptr = plan.sptr;
  plan.disjoint_numel = plan.numel;
  return true;
}

// Advances the version counter of every tensor the step writes, once, as an in-place
// operation on it does: autograd then refuses a graph that saved one of them before the step.
// The step's thread is the only one writing them (as it is for the tensors' data), so the
// increments need no locked instruction, which would wait for each line in turn.
void advance_versions(const Plan& plan) {
  for (c10::TensorImpl* impl : plan.written) {
    if (impl == nullptr) continue;
    std::atomic<uint32_t>* version = version_of(impl);
    version->store(version->load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  }
}

// Writes a scalar state value, already rounded to its dtype.
inline void store_scalar(void* at, bool is_double, double v) {
  if (is_double) {
    *static_cast<double*>(at) = v;
  } else {
    *static_cast<float*>(at) = static_cast<float>(v);
  }
}

// Splits the tensors that have gradients into work items, or returns the items of the last
// step where the element counts, the thread count and the vector width are as they were then.
const std::vector<Work>& work_items(Plan& plan, int64_t torch_threads, int64_t width) {
  constexpr int64_t kChunk = 1 << 14;
  constexpr int64_t kTorchGrain = 32768;  // at::internal::GRAIN_SIZE
  if (plan.work_numel == plan.numel && plan.work_threads == torch_threads &&
      plan.work_width == width) {
    return plan.work;
  }
  std::vector<Work>& work = plan.work;
  work.clear();
  const int64_t n = static_cast<int64_t>(plan.numel.size());
  for (int64_t i = 0; i < n; ++i) {
    const int64_t numel = plan.numel[i];
    if (numel < 0) continue;  // no gradient
    const int64_t parts = std::max<int64_t>(
        1, std::min<int64_t>(torch_threads, (numel + kTorchGrain - 1) / kTorchGrain));
    const int64_t span = std::max<int64_t>((numel + parts - 1) / parts, 1);
    int64_t chunk_start = 0;
    do {
      const int64_t chunk_end = std::min(numel, chunk_start + span);
      const int64_t tail = plan.whole_tail ? numel - numel % width
                                           : chunk_end - (chunk_end - chunk_start) % width;
      int64_t start = chunk_start;
      do {
        work.push_back({i, start, std::min(chunk_end, start + kChunk), tail});
        start += kChunk;
      } while (start < chunk_end);
      chunk_start = chunk_end;
    } while (chunk_start < numel);
  }
  plan.work_numel = plan.numel;
  plan.work_threads = torch_threads;
  plan.work_width = width;
  return work;
}

template <typename S, typename T>
int64_t step_typed(Plan& plan) {
  if (!check_group(plan)) return kFallback;
  advance_versions(plan);
  const at::Tensor& vcode = plan.vcode;
  const int64_t n_sregs = plan.n_sregs;
  const std::vector<int64_t>& stored = plan.stored;
  const int64_t n = static_cast<int64_t>(plan.params.size());
  const int64_t nv = static_cast<int64_t>(plan.vstate.size());
  const int64_t n_bound = 2 + nv;
  const int64_t ns = static_cast<int64_t>(plan.sstate.size());
  // The scalar program's stores: (state key, register), made as each tensor is updated.
  std::vector<std::pair<int64_t, int64_t>> stores;
  {
    const int64_t* sc = plan.scode.data_ptr<int64_t>();
    for (int64_t k = 0; k < plan.scode.size(0); ++k)
      if (sc[4 * k] == S_STORE) stores.emplace_back(sc[4 * k + 2], sc[4 * k + 3]);
  }

  const int64_t width = std::max<int64_t>(plan.vector_bytes / static_cast<int64_t>(sizeof(S)), 1);
  const std::vector<Work>& work = work_items(plan, at::get_num_threads(), width);
  const int64_t* vc = vcode.data_ptr<int64_t>();
  const int64_t n_vcode = vcode.size(0);
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
  S* const* ptr = reinterpret_cast<S* const*>(plan.ptr.data());
  const CompiledFn compiled = plan.compiled ? plan.compiled->fn.load(std::memory_order_acquire) : nullptr;
  if (compiled != nullptr) {
    ++plan.compiled_steps;
    void* const* vptr = plan.ptr.data();
    at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t lo, int64_t hi) {
      const int mkl_threads =
          MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0;
      for (int64_t w = lo; w < hi; ++w) {
        const Work& item = work[w];
        const double* r = plan.sregs.data() + plan.srow[item.i] * n_sregs;
        if (item.start == 0) {
          for (const auto& [key, reg] : stores) {
            store_scalar(plan.sptr[item.i * ns + key], plan.sdouble[item.i * ns + key], r[reg]);
          }
        }
        const bool more = w + 1 < hi;
        compiled(vptr + item.i * n_bound, r, item.start, item.end,
                 more ? vptr + work[w + 1].i * n_bound : nullptr, more ? work[w + 1].start : 0,
                 item.tail, &kCtx);
      }
      if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(mkl_threads);
    });
    return kDone;
  }
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t lo, int64_t hi) {
    // MKL would otherwise start threads of its own for each block's sqrt, inside ours.
    const int mkl_threads = MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0;
    // A second cursor walks the same blocks kAhead blocks ahead, across chunks and tensors,
    // and asks for each of them: every stream is fetched the same distance ahead, which the
    // hardware prefetcher would not do past the end of a page, let alone of a tensor.
    int64_t pw = lo;
    int64_t poff = lo < hi ? work[lo].start : 0;
    auto prefetch_next = [&]() {
      if (pw >= hi) return;
      const Work& item = work[pw];
      S* const* at = ptr + item.i * n_bound;
      const int64_t bytes = std::min(kBlock, item.end - poff) * static_cast<int64_t>(sizeof(S));
      for (int64_t b : read) {
        const char* base = reinterpret_cast<const char*>(at[b] + poff);
        for (int64_t q = 0; q < bytes; q += 64) __builtin_prefetch(base + q, 0, 3);
      }
      poff += kBlock;
      if (poff >= item.end && ++pw < hi) poff = work[pw].start;
    };
    for (int64_t k = 0; k < kAhead; ++k) prefetch_next();
    // Temporaries live in L1-sized blocks; where storage and compute types agree, the bound
    // registers point straight into the tensors, so each is read and written once.
    T local[kMaxRegs][kBlock];
    T* reg[kMaxRegs];
    for (int64_t k = 0; k < kMaxRegs; ++k) reg[k] = local[k];
    for (int64_t w = lo; w < hi; ++w) {
      const Work& item = work[w];
      const double* r = plan.sregs.data() + plan.srow[item.i] * n_sregs;
      S* const* bound = ptr + item.i * n_bound;
      if (item.start == 0) {
        for (const auto& [key, reg] : stores) {
          store_scalar(plan.sptr[item.i * ns + key], plan.sdouble[item.i * ns + key], r[reg]);
        }
      }
      for (int64_t off = item.start; off < item.end; off += kBlock) {
        const int64_t len = std::min(kBlock, item.end - off);
        prefetch_next();
        if constexpr (std::is_same_v<S, T>) {
          for (int64_t b = 0; b < n_bound; ++b) reg[b] = bound[b] + off;
          run_block<T>(vc, n_vcode, reg, r, len, plan.exact_sqrt, off, item.tail, plan.rounding);
        } else {
          for (int64_t b : read)
            for (int64_t j = 0; j < len; ++j) local[b][j] = static_cast<T>(bound[b][off + j]);
          run_block<T>(vc, n_vcode, reg, r, len, plan.exact_sqrt, off, item.tail, plan.rounding);
          for (int64_t b : stored)
            for (int64_t j = 0; j < len; ++j) bound[b][off + j] = static_cast<S>(local[b][j]);
        }
      }
    }
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(mkl_threads);
  });
  return kDone;
}

// Whether two hyperparameter values are the same numbers and flags. Only the types a
// program can be loaded for are compared by value; anything else is the same only if it is
// the same object.
bool same_value(PyObject* a, PyObject* b) {
  // A tensor (a fused step's lr) may have changed in place: its number is read again.
  if (THPVariable_Check(a)) return false;
  if (a == b) return true;
  if (Py_TYPE(a) != Py_TYPE(b)) return false;
  if (PyFloat_CheckExact(a)) {
    const double x = PyFloat_AS_DOUBLE(a), y = PyFloat_AS_DOUBLE(b);
    return std::memcmp(&x, &y, sizeof(double)) == 0;
  }
  if (PyLong_CheckExact(a) || PyUnicode_CheckExact(a)) {
    return PyObject_RichCompareBool(a, b, Py_EQ) == 1;
  }
  if (PyTuple_CheckExact(a)) {
    const Py_ssize_t n = PyTuple_GET_SIZE(a);
    if (PyTuple_GET_SIZE(b) != n) return false;
    for (Py_ssize_t k = 0; k < n; ++k) {
      if (!same_value(PyTuple_GET_ITEM(a, k), PyTuple_GET_ITEM(b, k))) return false;
    }
    return true;
  }
  return false;
}

// Appends the numbers of a hyperparameter value to ``out`` as _program.split does, where ``now``
// has the structure of ``before`` (the same flags, strings and tuple lengths, numbers where it
// had numbers); returns false otherwise.
bool renumber(PyObject* now, PyObject* before, std::vector<double>& out) {
  const bool was_number = (PyFloat_Check(before) || PyLong_Check(before)) && !PyBool_Check(before);
  if (was_number) {
    if (PyBool_Check(now) || !(PyFloat_CheckExact(now) || PyLong_CheckExact(now))) return false;
    const double v = PyFloat_CheckExact(now) ? PyFloat_AS_DOUBLE(now) : PyLong_AsDouble(now);
    if (v == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    out.push_back(v);
    return true;
  }
  if (THPVariable_Check(before)) {
    // A one-element tensor of a fused step, which torch's fused kernels read as a number.
    if (!THPVariable_Check(now)) return false;
    const at::Tensor& t = THPVariable_Unpack(now);
    if (!t.device().is_cpu() || t.numel() != 1 || !at::isFloatingType(t.scalar_type()) ||
        t.requires_grad() || t.is_sparse()) {
      return false;
    }
    out.push_back(t.item<double>());
    return true;
  }
  if (PyTuple_CheckExact(before)) {
    const Py_ssize_t n = PyTuple_GET_SIZE(before);
    if (!PyTuple_CheckExact(now) || PyTuple_GET_SIZE(now) != n) return false;
    for (Py_ssize_t k = 0; k < n; ++k) {
      if (!renumber(PyTuple_GET_ITEM(now, k), PyTuple_GET_ITEM(before, k), out)) return false;
    }
    return true;
  }
  return same_value(now, before);
}

bool guards_hold(const std::vector<Plan::Guard>& guards, const std::vector<double>& numbers) {
  for (const auto& g : guards) {
    const double v = numbers[g.slot];
    // Past the seven comparisons with a number, the same comparisons with another slot.
    const double number = g.op >= 7 ? numbers[static_cast<size_t>(g.number)] : g.number;
    bool result = false;
    switch (g.op % 7) {
      case 0: result = v == number; break;
      case 1: result = v != number; break;
      case 2: result = v < number; break;
      case 3: result = v <= number; break;
      case 4: result = v > number; break;
      case 5: result = v >= number; break;
      case 6: result = v != 0.0; break;
      default: return false;
    }
    if (result != g.expected) return false;
  }
  return true;
}

// Whether the group's hyperparameters are those the plan's numbers were loaded from; where only
// numbers changed (as schedulers change them) and the program's guards hold for the new ones,
// they are taken in place.
bool same_hyperparameters(Plan& plan, PyObject* group) {
  if (PyDict_Size(group) != plan.group_size) return false;
  size_t changed = 0;
  for (const auto& [key, value] : plan.hyper_items) {
    PyObject* now = PyDict_GetItem(group, key.ptr());
    if (now == nullptr) return false;
    changed += !same_value(now, value.ptr());
  }
  if (changed == 0) return true;
  if (!plan.guards) return false;
  std::vector<double> numbers;
  numbers.reserve(plan.hyper.size());
  for (const auto& [key, value] : plan.hyper_items) {
    if (!renumber(PyDict_GetItem(group, key.ptr()), value.ptr(), numbers)) return false;
  }
  if (numbers.size() != plan.hyper.size() || !guards_hold(*plan.guards, numbers)) return false;
  for (auto& [key, value] : plan.hyper_items) {
    value = pybind11::reinterpret_borrow<pybind11::object>(PyDict_GetItem(group, key.ptr()));
  }
  plan.hyper = std::move(numbers);
  return true;
}

// Runs one step of the group ``group`` (a param_groups dict) with the program last loaded.
// Everything the plan was made for is checked first, without touching the parameters, which
// in a training loop are seldom in cache: the group's list must hold the plan's parameters
// (a parameter replaced there, as model surgery does, must be the one updated), the
// optimizer's state must be the same dict at the same version, and the hyperparameters the
// values the program was loaded for, or new numbers its guards hold for.
// Whether the watched state is as the plan was made from: the same entry for each watched
// parameter, holding the same values under the same keys.
bool watched_unchanged(const Plan& plan, PyObject* state) {
  for (const auto& w : plan.watched) {
    PyObject* entry = PyDict_GetItem(state, plan.owners[w.index].ptr());  // borrowed
    if (entry != (w.entry.is_none() ? nullptr : w.entry.ptr())) return false;
    if (entry == nullptr) continue;
    if (!PyDict_Check(entry) || PyDict_Size(entry) != static_cast<Py_ssize_t>(w.items.size())) {
      return false;
    }
    for (const auto& [key, value] : w.items) {
      if (PyDict_GetItem(entry, key.ptr()) != value.ptr()) return false;
    }
  }
  return true;
}

int64_t step(Plan& plan, pybind11::dict group, pybind11::handle state, int64_t version,
             std::optional<std::vector<std::optional<at::Tensor>>> grads) {
  if (state.ptr() != plan.state.ptr() || version != plan.version) return kStale;
  if (!plan.watched.empty() && !watched_unchanged(plan, state.ptr())) return kStale;
  PyObject* params = PyDict_GetItemString(group.ptr(), "params");
  if (params == nullptr || (!PyList_Check(params) && !PyTuple_Check(params))) return kStale;
  if (PySequence_Fast_GET_SIZE(params) != static_cast<Py_ssize_t>(plan.owners.size())) {
    return kStale;
  }
  PyObject** items = PySequence_Fast_ITEMS(params);
  for (size_t i = 0; i < plan.owners.size(); ++i) {
    if (items[i] != plan.owners[i].ptr()) return kStale;
  }
  if (!plan.vcode.defined() || !same_hyperparameters(plan, group.ptr())) return kReload;
  plan.grads.clear();
  if (grads) {
    if (grads->size() != plan.params.size()) return kStale;
    for (auto& g : *grads) plan.grads.push_back(g ? std::move(*g) : at::Tensor());
  }
  int64_t done = kFallback;
  plan.inference = c10::InferenceMode::is_enabled();
  {
    pybind11::gil_scoped_release released;
    switch (plan.dtype) {
      case at::kFloat: done = step_typed<float, float>(plan); break;
      case at::kDouble: done = step_typed<double, double>(plan); break;
      case at::kHalf: done = step_typed<c10::Half, float>(plan); break;
      case at::kBFloat16: done = step_typed<c10::BFloat16, float>(plan); break;
      default: break;
    }
  }
  plan.grads.clear();  // the gradients are not kept alive past the step
  return done;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Compiled, std::shared_ptr<Compiled>>(m, "Compiled")
      .def(pybind11::init<>())
      .def("set", [](Compiled& k, uintptr_t address) {
        k.fn.store(reinterpret_cast<CompiledFn>(address), std::memory_order_release);
      })
      .def_property_readonly("ready", [](const Compiled& k) { return k.fn.load() != nullptr; });
  m.def("ctx_address", []() { return reinterpret_cast<uintptr_t>(&kCtx); });
  m.def("has_mkl_sqrt", []() { return vmsSqrt != nullptr; });
  // Sets ``.grad`` to None on every tensor of ``params`` whose type is one of ``plain``, as
  // ``p.grad = None`` does for them (torch's setter resets the gradient where no torch
  // function handles the assignment: the caller makes sure no mode does). Returns the other
  // tensors that hold a gradient, for Python to clear.
  m.def("clear_grads", [](pybind11::list params, pybind11::tuple plain) {
    pybind11::list rest;
    for (pybind11::handle p : params) {
      bool is_plain = false;
      for (pybind11::handle type : plain) is_plain |= type.ptr() == (PyObject*)Py_TYPE(p.ptr());
      if (!is_plain) {
        if (!pybind11::getattr(p, "grad").is_none()) rest.append(p);
        continue;
      }
      const at::Tensor& t = THPVariable_Unpack(p.ptr());
      if (t.unsafeGetTensorImpl()->autograd_meta() != nullptr) t.mutable_grad().reset();
    }
    return rest;
  });
  pybind11::class_<Plan>(m, "Plan")
      .def(pybind11::init([](pybind11::list params, std::vector<std::vector<at::Tensor>> vstate,
                             std::vector<std::vector<at::Tensor>> sstate, pybind11::object state,
                             int64_t version, pybind11::list watch, int64_t vector_bytes,
                             std::optional<std::vector<at::Tensor>> local,
                             std::optional<std::vector<std::vector<at::Tensor>>> counted,
                             bool fma, bool max_keep) {
        Plan plan;
        plan.vector_bytes = vector_bytes;
        plan.rounding = {fma, max_keep};
        for (pybind11::handle w : watch) {
          auto t = w.cast<pybind11::tuple>();
          Plan::Watched watched{t[0].cast<int64_t>(), pybind11::reinterpret_borrow<pybind11::object>(t[1]), {}};
          for (pybind11::handle item : t[2].cast<pybind11::list>()) {
            auto kv = item.cast<pybind11::tuple>();
            watched.items.emplace_back(pybind11::reinterpret_borrow<pybind11::object>(kv[0]),
                                       pybind11::reinterpret_borrow<pybind11::object>(kv[1]));
          }
          plan.watched.push_back(std::move(watched));
        }
        plan.state = std::move(state);
        plan.version = version;
        for (pybind11::handle p : params) {
          plan.owners.push_back(pybind11::reinterpret_borrow<pybind11::object>(p));
          if (!local) plan.params.push_back(p.cast<at::Tensor>());
        }
        if (local) plan.params = std::move(*local);
        if (counted) plan.counted = std::move(*counted);
        plan.dtype = plan.params.empty() ? at::kFloat : plan.params[0].scalar_type();
        plan.vstate = std::move(vstate);
        plan.sstate = std::move(sstate);
        return plan;
      }),
           pybind11::arg("params"), pybind11::arg("vstate"), pybind11::arg("sstate"),
           pybind11::arg("state"), pybind11::arg("version"), pybind11::arg("watch"),
           pybind11::arg("vector_bytes"), pybind11::arg("local") = pybind11::none(),
           pybind11::arg("counted") = pybind11::none(), pybind11::arg("fma") = true,
           pybind11::arg("max_keep") = false)
      .def("load_program",
           [](Plan& plan, at::Tensor vcode, at::Tensor scode, int64_t n_sregs, int64_t n_vregs,
              std::vector<int64_t> stored,
              std::optional<std::vector<std::tuple<int64_t, int64_t, double, bool>>> checks,
              std::shared_ptr<Compiled> compiled, bool exact_sqrt, int64_t vector_bytes,
              bool whole_tail) {
             TORCH_CHECK(n_vregs <= kMaxRegs, "update rule needs too many registers");
             plan.guards.reset();
             if (checks) {
               plan.guards.emplace();
               for (const auto& [slot, op, number, expected] : *checks)
                 plan.guards->push_back({slot, op, number, expected});
             }
             plan.vcode = std::move(vcode);
             plan.scode = std::move(scode);
             plan.n_sregs = n_sregs;
             plan.stored = std::move(stored);
             const size_t n_bound = 2 + plan.vstate.size();
             plan.writes.assign(n_bound + plan.sstate.size(), 0);
             for (int64_t b : plan.stored) plan.writes[b] = 1;
             const int64_t* sc = plan.scode.data_ptr<int64_t>();
             for (int64_t k = 0; k < plan.scode.size(0); ++k)
               if (sc[4 * k] == S_STORE) plan.writes[n_bound + sc[4 * k + 2]] = 1;
             // What the overlap check covers depends on what the program writes (a program
             // that unscales gradients writes them too): check afresh.
             plan.disjoint_ptr.clear();
             plan.disjoint_sptr.clear();
             plan.disjoint_numel.clear();
             plan.compiled = std::move(compiled);
             plan.exact_sqrt = exact_sqrt;
             plan.vector_bytes = vector_bytes;
             plan.whole_tail = whole_tail;
           },
           pybind11::arg("vcode"), pybind11::arg("scode"), pybind11::arg("n_sregs"),
           pybind11::arg("n_vregs"), pybind11::arg("stored"), pybind11::arg("checks"),
           pybind11::arg("compiled"), pybind11::arg("exact_sqrt"), pybind11::arg("vector_bytes"),
           pybind11::arg("whole_tail") = false)
      .def("load_numbers",
           [](Plan& plan, pybind11::dict group, std::vector<double> numbers) {
             plan.hyper_items.clear();
             for (auto [key, value] : group) {
               const auto name = pybind11::str(key).cast<std::string>();
               if (name == "params" || name == "param_names") continue;
               plan.hyper_items.emplace_back(pybind11::reinterpret_borrow<pybind11::object>(key),
                                             pybind11::reinterpret_borrow<pybind11::object>(value));
             }
             plan.group_size = PyDict_Size(group.ptr());
             plan.hyper = std::move(numbers);
           })
      .def("step", &step, pybind11::arg("group"), pybind11::arg("state"), pybind11::arg("version"),
           pybind11::arg("grads") = pybind11::none())
      .def_readonly("compiled_steps", &Plan::compiled_steps);
}

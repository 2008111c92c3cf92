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

#include "quant.h"

// What compiled programs (see _codegen.py) receive besides their tensors: the sqrt functions
// torch calls, for programs that call them rather than compute their bits inline; and the
// maps of 8-bit state (prelude.h's polyak_ctx has the same layout).
struct Ctx {
  void (*vms)(int, const float*, float*, long long);
  void (*vmd)(int, const double*, double*, long long);
  long long mode;
  const float* qmap[2];
  const float* qmid[2];
  const uint8_t* qbelow[2];
  const uint32_t* qpack[2];
  const int64_t* qinside;
};

void plain_sqrt(int n, const float* a, float* r, long long) {
  for (int j = 0; j < n; ++j) r[j] = std::sqrt(a[j]);
}
void plain_sqrt(int n, const double* a, double* r, long long) {
  for (int j = 0; j < n; ++j) r[j] = std::sqrt(a[j]);
}

const Ctx kCtx = {vmsSqrt != nullptr ? vmsSqrt : static_cast<void (*)(int, const float*, float*, long long)>(plain_sqrt),
                  vmdSqrt != nullptr ? vmdSqrt : static_cast<void (*)(int, const double*, double*, long long)>(plain_sqrt),
                  kVmlMode,
                  {quant_maps.map[0], quant_maps.map[1]},
                  {quant_maps.mid[0], quant_maps.mid[1]},
                  {quant_maps.below[0], quant_maps.below[1]},
                  {quant_maps.pack[0], quant_maps.pack[1]},
                  quant_maps.inside};

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
#include "interpret.h"
#include "plan.h"
#include "check.h"

// Converts ``len`` elements of one stream between its storage type and the compute type T:
// exactly where it is widened, to nearest even where it is narrowed (as c10::Half and
// c10::BFloat16 round, NaN included). Only the pairs a plan admits occur (see Plan's vdtype).
template <typename T>
void widen(at::ScalarType type, const void* from, int64_t off, T* d, int64_t len) {
  auto run = [&](auto* s) {
    for (int64_t j = 0; j < len; ++j) d[j] = static_cast<T>(static_cast<float>(s[off + j]));
  };
  switch (type) {
    case at::kFloat: run(static_cast<const float*>(from)); break;
    case at::kHalf: run(static_cast<const c10::Half*>(from)); break;
    case at::kBFloat16: run(static_cast<const c10::BFloat16*>(from)); break;
    default: {
      const double* s = static_cast<const double*>(from) + off;
      for (int64_t j = 0; j < len; ++j) d[j] = static_cast<T>(s[j]);
    }
  }
}

template <typename T>
void narrow(at::ScalarType type, const T* s, void* to, int64_t off, int64_t len) {
  auto run = [&](auto* d) {
    using U = std::remove_pointer_t<decltype(d)>;
    for (int64_t j = 0; j < len; ++j) d[off + j] = static_cast<U>(static_cast<float>(s[j]));
  };
  switch (type) {
    case at::kFloat: run(static_cast<float*>(to)); break;
    case at::kHalf: run(static_cast<c10::Half*>(to)); break;
    case at::kBFloat16: run(static_cast<c10::BFloat16*>(to)); break;
    default: {
      double* d = static_cast<double*>(to) + off;
      for (int64_t j = 0; j < len; ++j) d[j] = static_cast<double>(s[j]);
    }
  }
}

// One step of a plan computing in T (float, or double for float64 parameters), each stream
// stored in its own type.
template <typename T>
int64_t step_typed(Plan& plan) {
  const bool prechecked = std::exchange(plan.prechecked, false);
  if (!prechecked && !check_group(plan)) return kFallback;
  advance_versions(plan);
  const at::Tensor& vcode = plan.vcode;
  const int64_t n_sregs = plan.n_sregs;
  const std::vector<int64_t>& stored = plan.stored;
  const int64_t nv = static_cast<int64_t>(plan.vstate.size());
  const int64_t n_bound = 2 + nv;
  const int64_t row = plan.row;
  const int64_t ns = static_cast<int64_t>(plan.sstate.size());
  // The scalar program's stores: (state key, register), made as each tensor is updated.
  std::vector<std::pair<int64_t, int64_t>> stores;
  {
    const int64_t* sc = plan.scode.data_ptr<int64_t>();
    for (int64_t k = 0; k < plan.scode.size(0); ++k)
      if (sc[4 * k] == S_STORE) stores.emplace_back(sc[4 * k + 2], sc[4 * k + 3]);
  }
  // Each stream's storage type and element size; where it is the compute type, its register
  // points straight into the tensor, so it is read and written once.
  std::vector<at::ScalarType> types(n_bound, plan.dtype);
  std::copy(plan.vdtype.begin(), plan.vdtype.end(), types.begin() + 2);
  std::vector<int64_t> sizes(n_bound);
  std::vector<uint8_t> direct(n_bound);
  for (int64_t b = 0; b < n_bound; ++b) {
    sizes[b] = static_cast<int64_t>(c10::elementSize(types[b]));
    direct[b] = types[b] == c10::CppTypeToScalarType<T>::value;
  }

  const int64_t item_size = static_cast<int64_t>(c10::elementSize(plan.dtype));
  const int64_t width = std::max<int64_t>(plan.vector_bytes / item_size, 1);
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
    // 8-bit state is read and written whether or not the program does, as the reference
    // path dequantizes and quantizes it at every step.
    for (int64_t k = 0; k < nv; ++k) used[2 + k] = used[2 + k] || plan.qsigned[k] >= 0;
    for (int64_t b = 0; b < n_bound; ++b)
      if (used[b]) read.push_back(b);
  }
  std::vector<int64_t> quantized;  // the bound registers of 8-bit state
  for (int64_t k = 0; k < nv; ++k)
    if (plan.qsigned[k] >= 0) quantized.push_back(2 + k);
  // 8-bit plans run a quantization block at a time (work items start on one): its new values
  // are all in the block arrays when its absmax is found and its codes written.
  const int64_t block = plan.quantized ? kQBlock : kBlock;
  void* const* ptr = plan.ptr.data();
  const CompiledFn compiled = plan.compiled ? plan.compiled->fn.load(std::memory_order_acquire) : nullptr;
  if (compiled != nullptr) {
    ++plan.compiled_steps;
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
        compiled(ptr + item.i * row, r, item.start, item.end,
                 more ? ptr + work[w + 1].i * row : nullptr, more ? work[w + 1].start : 0,
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
      void* const* at = ptr + item.i * row;
      const int64_t len = std::min(block, item.end - poff);
      for (int64_t b : read) {
        const char* base = static_cast<const char*>(at[b]) + poff * sizes[b];
        for (int64_t q = 0; q < len * sizes[b]; q += 64) __builtin_prefetch(base + q, 0, 3);
      }
      poff += block;
      if (poff >= item.end && ++pw < hi) poff = work[pw].start;
    };
    for (int64_t k = 0; k < kAhead; ++k) prefetch_next();
    // Temporaries, and the streams stored in another type, live in L1-sized blocks.
    T local[kMaxRegs][kQBlock];
    T* reg[kMaxRegs];
    for (int64_t k = 0; k < kMaxRegs; ++k) reg[k] = local[k];
    for (int64_t w = lo; w < hi; ++w) {
      const Work& item = work[w];
      const double* r = plan.sregs.data() + plan.srow[item.i] * n_sregs;
      void* const* bound = ptr + item.i * row;
      if (item.start == 0) {
        for (const auto& [key, reg] : stores) {
          store_scalar(plan.sptr[item.i * ns + key], plan.sdouble[item.i * ns + key], r[reg]);
        }
      }
      for (int64_t off = item.start; off < item.end; off += block) {
        const int64_t len = std::min(block, item.end - off);
        prefetch_next();
        for (int64_t b = 0; b < n_bound; ++b)
          if (direct[b]) reg[b] = static_cast<T*>(bound[b]) + off;
        for (int64_t b : read) {
          if (direct[b]) continue;
          if (types[b] != at::kByte) {
            widen<T>(types[b], bound[b], off, local[b], len);
          } else if constexpr (std::is_same_v<T, float>) {
            const float* absmax = static_cast<const float*>(bound[n_bound + b - 2]);
            dequantize_block(static_cast<const uint8_t*>(bound[b]) + off, absmax[off / kQBlock],
                             plan.qsigned[b - 2] > 0, local[b], len);
          }
        }
        run_block<T>(vc, n_vcode, reg, r, len, plan.exact_sqrt, off, item.tail, plan.rounding);
        for (int64_t b : stored)
          if (!direct[b] && types[b] != at::kByte) narrow<T>(types[b], local[b], bound[b], off, len);
        if constexpr (std::is_same_v<T, float>) {
          for (int64_t b : quantized) {
            float* absmax = static_cast<float*>(bound[n_bound + b - 2]);
            quantize_block(local[b], len, plan.qsigned[b - 2] > 0,
                           static_cast<uint8_t*>(bound[b]) + off, absmax + off / kQBlock);
          }
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
             std::optional<std::vector<std::optional<at::Tensor>>> grads, int64_t mode) {
  // mode: 0 checks and steps; 1 only checks; 2 steps on the records of the check-only call
  // just made, where it found the group fit.
  const bool prechecked = std::exchange(plan.prechecked, false) && mode == 2;
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
  if (mode == 1) {
    // Whether the step would run: the same check as its own, writing nothing.
    plan.prechecked = check_group(plan);
    plan.grads.clear();
    return plan.prechecked ? kDone : kFallback;
  }
  plan.prechecked = prechecked;
  {
    pybind11::gil_scoped_release released;
    switch (plan.dtype) {
      case at::kDouble: done = step_typed<double>(plan); break;
      case at::kFloat:
      case at::kHalf:
      case at::kBFloat16: done = step_typed<float>(plan); break;
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
  // bitsandbytes' maps as _quant.py makes them, for each of unsigned (0) and signed (1): the
  // 256 map values, the midpoints padded with infinities, the table of midpoints below each
  // pattern of a float32's upper 16 bits, and how many midpoints lie within one pattern.
  m.def("set_maps", [](int64_t is_signed, at::Tensor map, at::Tensor mid, at::Tensor below,
                       int64_t inside) {
    TORCH_CHECK(is_signed == 0 || is_signed == 1, "a map is signed or not");
    map = map.contiguous().to(at::kFloat);
    mid = mid.contiguous().to(at::kFloat);
    below = below.contiguous().to(at::kLong);
    TORCH_CHECK(map.numel() == 256 && below.numel() == (1 << 16) && inside >= 0 &&
                    mid.numel() <= 264 && mid.numel() >= 255 + inside + 1,
                "a map of 256 codes");
    std::memcpy(quant_maps.map[is_signed], map.data_ptr<float>(), 256 * sizeof(float));
    std::fill_n(quant_maps.mid[is_signed], 264, std::numeric_limits<float>::infinity());
    std::memcpy(quant_maps.mid[is_signed], mid.data_ptr<float>(), mid.numel() * sizeof(float));
    const int64_t* b = below.data_ptr<int64_t>();
    for (int64_t k = 0; k < (1 << 16); ++k) {
      TORCH_CHECK(b[k] >= 0 && b[k] < 256 && b[k] + inside <= 256, "a table of codes");
      quant_maps.below[is_signed][k] = static_cast<uint8_t>(b[k]);
    }
    quant_maps.inside[is_signed] = inside;
    pack_map(static_cast<int>(is_signed));
  });
  m.def("quant_block", [](at::Tensor values, bool is_signed) {
    // One block quantized as a step writes it (for tests): codes and absmax.
    TORCH_CHECK(maps_ready() && values.numel() <= kQBlock && values.scalar_type() == at::kFloat);
    at::Tensor v = values.contiguous();
    at::Tensor codes = at::empty({v.numel()}, v.options().dtype(at::kByte));
    at::Tensor absmax = at::empty({1}, v.options());
    quantize_block(v.data_ptr<float>(), v.numel(), is_signed, codes.data_ptr<uint8_t>(),
                   absmax.data_ptr<float>());
    return std::make_tuple(codes, absmax);
  });
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
                             bool fma, bool max_keep,
                             std::optional<std::vector<at::ScalarType>> vdtype,
                             std::optional<std::vector<int64_t>> qsigned,
                             std::optional<std::vector<std::vector<at::Tensor>>> absmax) {
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
        plan.vdtype = vdtype ? std::move(*vdtype)
                             : std::vector<at::ScalarType>(plan.vstate.size(), plan.dtype);
        TORCH_CHECK(plan.vdtype.size() == plan.vstate.size(), "one storage type per state key");
        const int64_t nv = static_cast<int64_t>(plan.vstate.size());
        plan.qsigned.assign(nv, -1);
        if (qsigned) {
          TORCH_CHECK(static_cast<int64_t>(qsigned->size()) == nv, "one map per state key");
          for (int64_t k = 0; k < nv; ++k) plan.qsigned[k] = static_cast<int8_t>((*qsigned)[k]);
        }
        if (absmax) plan.absmax = std::move(*absmax);
        // The conversions a step makes: float64 state with float64 parameters only; otherwise
        // each key in float32, float16 or bfloat16, all computed in float32; and 8-bit codes
        // (with their absmax and map) beside float32 parameters.
        const bool wide = plan.dtype == at::kDouble;
        for (int64_t k = 0; k < nv; ++k) {
          const at::ScalarType t = plan.vdtype[k];
          if (t == at::kByte) {
            TORCH_CHECK(plan.dtype == at::kFloat && plan.qsigned[k] >= 0 && maps_ready() &&
                            static_cast<int64_t>(plan.absmax.size()) == nv &&
                            plan.absmax[k].size() == plan.params.size() && plan.counted.empty(),
                        "8-bit state needs float32 parameters, its map and its absmax");
            plan.quantized = true;
            continue;
          }
          TORCH_CHECK(plan.qsigned[k] < 0, "a map for state not stored in 8 bits");
          TORCH_CHECK(wide ? t == at::kDouble
                           : (t == at::kFloat || t == at::kHalf || t == at::kBFloat16),
                      "state stored as ", t, " beside ", plan.dtype, " parameters");
        }
        plan.row = 2 + nv + (plan.quantized ? nv : 0);
        return plan;
      }),
           pybind11::arg("params"), pybind11::arg("vstate"), pybind11::arg("sstate"),
           pybind11::arg("state"), pybind11::arg("version"), pybind11::arg("watch"),
           pybind11::arg("vector_bytes"), pybind11::arg("local") = pybind11::none(),
           pybind11::arg("counted") = pybind11::none(), pybind11::arg("fma") = true,
           pybind11::arg("max_keep") = false, pybind11::arg("vdtype") = pybind11::none(),
           pybind11::arg("qsigned") = pybind11::none(), pybind11::arg("absmax") = pybind11::none())
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
             const size_t ns = plan.sstate.size();
             plan.writes.assign(n_bound + ns + (plan.quantized ? plan.vstate.size() : 0), 0);
             for (int64_t b : plan.stored) plan.writes[b] = 1;
             for (size_t k = 0; k < plan.vstate.size(); ++k) {
               if (plan.qsigned[k] >= 0) plan.writes[2 + k] = plan.writes[n_bound + ns + k] = 1;
             }
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
           pybind11::arg("grads") = pybind11::none(), pybind11::arg("mode") = 0)
      .def_readonly("compiled_steps", &Plan::compiled_steps);
}

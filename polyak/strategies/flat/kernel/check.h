// The check a step makes before it writes anything, and how it splits the work (part of kernel.cpp, included there inside its anonymous namespace).

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
  const size_t row = static_cast<size_t>(plan.row);
  for (size_t k = 0; k < plan.ptr.size(); ++k) {
    if (k % row != 1 && plan.ptr[k] != plan.disjoint_ptr[k]) return false;
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
  const int64_t row = plan.row;
  const int64_t n_sregs = plan.n_sregs;
  plan.ptr.resize(n * row);
  plan.numel.resize(n);
  plan.sptr.resize(n * ns);
  plan.sval.resize(n * ns);
  plan.sdouble.resize(n * ns);
  // Without scalar state every tensor has the same scalars: one register file serves all.
  plan.sregs.resize(static_cast<size_t>((ns == 0 ? 1 : n) * n_sregs));
  plan.srow.assign(n, 0);
  if (ns == 0) run_scalar_program(plan, 0, nullptr, plan.sregs.data(), nullptr);
  const int64_t n_slots = n_bound + ns + (plan.quantized ? nv : 0);
  const std::vector<uint8_t>& writes = plan.writes;
  plan.written.assign(n * n_slots, nullptr);
  constexpr int64_t kAheadTensors = 4;  // tensors between two stages of the pipeline
  static const PlainKeys keys;
  const bool grad_written = writes_grad(plan);
  const caffe2::TypeMeta dtype = c10::scalarTypeToTypeMeta(plan.dtype);
  const int64_t itemsize = static_cast<int64_t>(dtype.itemsize());
  // Each state key's storage type, as the plan was made for: a tensor of another type (given
  // by ``.data =``) must not be read as this one.
  std::vector<caffe2::TypeMeta> vmeta(nv);
  std::vector<int64_t> vsize(nv);
  for (int64_t k = 0; k < nv; ++k) {
    vmeta[k] = c10::scalarTypeToTypeMeta(plan.vdtype[k]);
    vsize[k] = static_cast<int64_t>(vmeta[k].itemsize());
  }
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
        std::fill_n(plan.ptr.data() + i * row, row, nullptr);
        std::fill_n(plan.sptr.data() + i * ns, ns, nullptr);
        continue;
      }
      const c10::TensorImpl* g = impl_of(*grad);
      const int64_t numel = p->numel();
      void** ptr = plan.ptr.data() + i * row;
      // 8-bit state is quantized in blocks of its memory order, which _quant.py takes in the
      // tensor's logical order: only contiguous tensors have both.
      bool fit = keys.plain(p) && keys.plain(g) && p->dtype() == dtype && g->dtype() == dtype &&
                 (!plan.quantized || p->is_contiguous()) && laid_out_as(p, g) &&
                 data_of(p, itemsize, &ptr[0]) && data_of(g, itemsize, &ptr[1], grad_written);
      for (int64_t k = 0; fit && k < nv; ++k) {
        const c10::TensorImpl* st = impl_of(plan.vstate[k][i]);
        fit = keys.plain(st) && st->dtype() == vmeta[k] && laid_out_as(p, st) &&
              data_of(st, vsize[k], &ptr[2 + k]);
        if (!fit || plan.qsigned[k] < 0) continue;
        // Its absmax: float32, one per block, in memory order; read as nothing else.
        const c10::TensorImpl* am = impl_of(plan.absmax[k][i]);
        fit = keys.plain(am) && am->dtype() == caffe2::TypeMeta::Make<float>() &&
              am->is_contiguous() && am->numel() == (numel + kQBlock - 1) / kQBlock &&
              data_of(am, 4, &ptr[n_bound + k]);
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
                              : b < n_bound + ns                ? plan.sstate[b - n_bound][i]
                                                 : plan.absmax[b - n_bound - ns][i];
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
  const int64_t nv = static_cast<int64_t>(plan.vstate.size());
  const int64_t n_bound = 2 + nv;
  const int64_t row = plan.row;
  const int64_t ns = static_cast<int64_t>(plan.sstate.size());
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  spans.reserve(n * (row - 1 + ns));
  for (int64_t i = 0; i < n; ++i) {
    if (plan.numel[i] < 0) continue;  // no gradient: nothing written
    for (int64_t b = 0; b < n_bound && plan.numel[i] > 0; ++b) {
      if (b == 1 && !grad_written) continue;  // a gradient only read may be shared
      const auto at = reinterpret_cast<uintptr_t>(plan.ptr[i * row + b]);
      const at::ScalarType type = b < 2 ? plan.dtype : plan.vdtype[b - 2];
      spans.emplace_back(at, at + plan.numel[i] * static_cast<int64_t>(c10::elementSize(type)));
    }
    for (int64_t k = 0; k < nv && plan.numel[i] > 0; ++k) {
      if (plan.qsigned[k] < 0) continue;
      const auto at = reinterpret_cast<uintptr_t>(plan.ptr[i * row + n_bound + k]);
      spans.emplace_back(at, at + 4 * ((plan.numel[i] + kQBlock - 1) / kQBlock));
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
    int64_t span = std::max<int64_t>((numel + parts - 1) / parts, 1);
    // Each quantization block is written whole, by one item: threads split 8-bit plans at
    // block boundaries (kChunk is a multiple of kQBlock), which moves torch's chunk boundary
    // by less than a block (only maximum's NaN bits near it could tell).
    if (plan.quantized) span = (span + kQBlock - 1) / kQBlock * kQBlock;
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

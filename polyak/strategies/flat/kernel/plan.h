// A group's plan: its tensors, programs, work items and the scratch of each step (part of kernel.cpp, included there inside its anonymous namespace).

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
  // [key]: the type each vector state key is stored in. The parameters' own; or, for float32,
  // float16 and bfloat16 parameters, any of these three, each key its own: the step widens
  // what it reads to the compute type exactly and rounds what it writes to nearest even, so
  // that narrower state moves fewer bytes and computes as float32 state does.
  std::vector<at::ScalarType> vdtype;
  // [key]: for a key stored in 8 bits (vdtype kByte: uint8 codes of the parameter's shape in
  // bitsandbytes' block-wise format, see quant.h), whether its map is the signed one (1) or
  // the unsigned one (0); -1 for the other keys.
  std::vector<int8_t> qsigned;
  // [key][i]: each 8-bit key's absmax, one float32 per block of kQBlock (undefined for the
  // other keys). Read and written by every step, with its key's codes.
  std::vector<std::vector<at::Tensor>> absmax;
  // Whether any key is stored in 8 bits: work items then start and end on quantization
  // blocks, and each tensor's row in ptr holds one absmax pointer per key after its streams.
  bool quantized = false;
  int64_t row = 0;  // pointers per tensor in ptr
  // [i][param, grad, vector state..., (8-bit plans) absmax of each key]: where each stream
  // starts.
  std::vector<void*> ptr;
  std::vector<int64_t> numel;    // [i]; -1: no gradient this step
  std::vector<void*> sptr;       // [i][key]: where each scalar state value lives
  std::vector<double> sval;      // [i][key]: its value at the start of the step
  std::vector<uint8_t> sdouble;  // [i][key]: whether it is a double (else a float)
  // [i][param, grad, vector state..., scalar state..., (8-bit plans) absmax of each key]: the
  // tensors the step writes, whose
  // version counters it advances as in-place operations do (null: not written, or an
  // inference tensor inside inference mode, which counts nothing).
  std::vector<c10::TensorImpl*> written;
  // [param, grad, vector state..., scalar state..., absmax...]: whether the program writes each
  // (the bound registers its vector code stores, the scalar state its scalar code stores; an
  // 8-bit key and its absmax always, as the reference path quantizes them at every step).
  std::vector<uint8_t> writes;
  // Whether the step was called in inference mode, where inference tensors may be written.
  bool inference = false;
  // A check-only call found the group fit, and the step that follows it in the same
  // optimizer step may take its records (nothing of the group can change in between).
  bool prechecked = false;
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

// The interpreter of traced programs: opcodes, torch's roundings, one block at a time (part of kernel.cpp, included there inside its anonymous namespace).

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

// State stored in 8 bits, block-wise, in bitsandbytes' format (part of kernel.cpp, included
// there inside its anonymous namespace; see polyak/_quant.py for the rule these functions
// follow element for element).
//
// A state tensor of this kind is uint8 codes of the parameter's shape and one float32 absmax
// per block of kQBlock elements in memory order (the last block possibly shorter). A code is
// read as its map value times its block's absmax; a block's new values are written as their
// largest magnitude and, for each, the number of midpoints of neighbouring map values below it
// once scaled by that magnitude.

// Elements per quantization block (_quant.BLOCK).
constexpr int64_t kQBlock = 256;

// bitsandbytes' two dynamic maps, indexed by whether the map is signed, as _quant.py makes
// them: the map values; the midpoints of neighbouring values, padded with infinities; and, by
// the upper 16 bits of a scaled value's float32 pattern, how many midpoints lie below every
// value of that pattern, with how many at most lie among them (each one comparison more).
// Python hands them over once (set_maps) before any plan with 8-bit state is made.
//
// For the compiled programs' whole vectors, ``pack`` folds the table and the one comparison
// into one 32-bit word per pattern, read by one gather: where at most one midpoint lies among
// a pattern's values, a value of that pattern exceeds the midpoint exactly where its lower 16
// bits do the midpoint's (for negative values, where they fall short: both are then flipped).
// The word is the code below (upper half) and the midpoint's lower 16 bits, or 0xffff where no
// midpoint lies among the pattern's values (no value exceeds it). Zero where a pattern may hold
// several midpoints, which leaves ``inside`` > 1 and the compiled code to the table.
struct QuantMaps {
  float map[2][256];
  float mid[2][264];
  uint8_t below[2][1 << 16];
  uint32_t pack[2][1 << 16];
  int64_t inside[2] = {-1, -1};
};
QuantMaps quant_maps;

// Fills ``pack`` for one map from ``below`` and ``mid`` (see QuantMaps).
inline void pack_map(int is_signed) {
  const float* mid = quant_maps.mid[is_signed];
  for (uint32_t key = 0; key < (1u << 16); ++key) {
    const uint32_t base = quant_maps.below[is_signed][key];
    uint32_t bits;
    std::memcpy(&bits, &mid[base], 4);
    uint32_t low = 0xffff;  // no midpoint among the pattern's values
    if ((bits >> 16) == key) low = (key & 0x8000) ? 0xffff - (bits & 0xffff) : bits & 0xffff;
    quant_maps.pack[is_signed][key] = base << 16 | low;
  }
}

inline bool maps_ready() { return quant_maps.inside[0] >= 0 && quant_maps.inside[1] >= 0; }

// Reads ``len`` codes of one block as float32 values: each code's map value times the block's
// absmax, one float32 multiply (_quant.dequantize).
inline void dequantize_block(const uint8_t* codes, float absmax, bool is_signed, float* d,
                             int64_t len) {
  const float* map = quant_maps.map[is_signed];
  for (int64_t j = 0; j < len; ++j) d[j] = map[codes[j]] * absmax;
}

// The block's largest magnitude, NaN where it holds a NaN (as torch's amax).
inline float block_absmax(const float* s, int64_t len) {
  float m = 0.0f;
  bool nan = false;
  for (int64_t j = 0; j < len; ++j) {
    const float a = std::fabs(s[j]);
    nan |= a != a;
    m = a > m ? a : m;
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

// The code of one scaled value (clamped to [-1, 1], or NaN), as _quant._codes finds it.
inline uint8_t code_of(float x, bool is_signed) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const int64_t base = quant_maps.below[is_signed][bits >> 16];
  const float* mid = quant_maps.mid[is_signed];
  int64_t code = base;
  for (int64_t k = 0; k < quant_maps.inside[is_signed]; ++k) code += x > mid[base + k];
  return static_cast<uint8_t>(code);
}

// torch's clamp to [-1, 1]: a NaN stays NaN.
inline float clamp_unit(float x) {
  x = x < -1.0f ? -1.0f : x;
  return x > 1.0f ? 1.0f : x;
}

// Writes one block's new values ``s`` as codes and its absmax, as _quant.quantize does: a full
// block is scaled by the float32 reciprocal of its absmax (made at least 1e-38) and keeps its
// absmax as found; the last short block of a tensor is divided by its absmax made at least
// 1e-38, which it keeps.
inline void quantize_block(const float* s, int64_t len, bool is_signed, uint8_t* codes,
                           float* absmax) {
  const float found = block_absmax(s, len);
  const float floor = found < 1e-38f ? 1e-38f : found;  // torch's clamp(min=): NaN stays
  if (len == kQBlock) {
    const float scale = 1.0f / floor;
    for (int64_t j = 0; j < len; ++j) codes[j] = code_of(clamp_unit(s[j] * scale), is_signed);
    *absmax = found;
  } else {
    for (int64_t j = 0; j < len; ++j) codes[j] = code_of(clamp_unit(s[j] / floor), is_signed);
    *absmax = floor;
  }
}

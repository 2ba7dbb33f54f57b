// CPU decode runtime for every weight format (our own code).
//
// y[r, :] = sum over input channels i with |x[r, i]| * act_scale[i] > threshold of
//           x[r, i] * W^T[i, :]   (+ bias)
//
// W^T (in, out) is stored in one of the formats of sparsellm/formats.py (fp32,
// bf16, int8 per output channel, int4 group-wise, or a bitmask per W^T row with packed
// bf16 / int8 / int4 values). A skipped input channel is one row never read; a pruned
// weight is a zero bit never expanded into a multiply. Kernels exist as an AVX2+FMA path
// (with AVX-512 versions of the dense kinds, and AVX-512 VBMI2 expand-load versions of the
// bitmask bf16 / int8 kinds, all bit-identical to it), chosen at run time
// from what the CPU has, and a portable scalar path (forced with set_isa("portable");
// the tests compare every path against the dense reference). The file is compiled
// without -march so one build runs on any x86-64 CPU.
// Work is split over output columns when they are wide, else over the kept rows.
// `Decoder` runs a whole decode step through every block in one call (see there).

#include <torch/extension.h>
#include <ATen/Parallel.h>

// SPARSELLM_NO_X86 builds what other CPUs (ARM) build, here too (a test compiles it)
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(SPARSELLM_NO_X86)
#include <immintrin.h>
#define SPARSELLM_X86 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace {

// Kinds, in the order of formats.KINDS.
enum Kind : int64_t { kF32 = 0, kBF16 = 1, kI8 = 2, kI4 = 3, kSBF16 = 4, kSI8 = 5, kSI4 = 6 };
// Outputs per sparse offset chunk as stored (formats.CHUNK).
constexpr int64_t kChunk = 2048;
// The column split's unit, and the outputs per offset the runtime derives from the mask
// when it loads a bitmask weight. Why finer than kChunk: qwen0.5b's 4864-wide gate/up
// are 2.4 stored chunks, so splitting them by chunk gave one of two threads 4096 outputs
// and the other 768.
constexpr int64_t kUnit = 256;
// Output slices narrower than this per thread are split over kept rows instead.
constexpr int64_t kOutSplit = 2048;

bool g_avx2 = false;    // set by set_isa (auto-detected at import)
bool g_avx512 = false;  // dense kinds 16 outputs per vector (implies g_avx2)
bool g_vbmi2 = false;   // bitmask kinds by expand-loads, 16 outputs per vector (implies g_avx512)
bool g_vnni = false;    // int8 kinds by integer dot products on int8 activations (implies g_vbmi2)

// Kept channels of a row per activation scale on the VNNI path (llama.cpp's Q8_0 block).
constexpr int64_t kQGroup = 32;
// `case R: CALL(R); break;` for R = 1..8. Kernels that keep R activation rows' sums in
// registers take R as a template argument; a switch on the run-time count picks one.
#define SPARSELLM_CASES_1_TO_8(CALL) \
  case 1: CALL(1); break;            \
  case 2: CALL(2); break;            \
  case 3: CALL(3); break;            \
  case 4: CALL(4); break;            \
  case 5: CALL(5); break;            \
  case 6: CALL(6); break;            \
  case 7: CALL(7); break;            \
  case 8: CALL(8); break;

// Bytes of one tile of `make_tiles`: a group of kQGroup rows times 16 outputs.
constexpr int64_t kTileBytes = kQGroup * 16;

bool cpu_has_avx2() {
#if SPARSELLM_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("popcnt");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if SPARSELLM_X86
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}

bool cpu_has_vbmi2() {
#if SPARSELLM_X86
  __builtin_cpu_init();
  return cpu_has_avx512() && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("bmi2");
#else
  return false;
#endif
}

bool cpu_has_vnni() {
#if SPARSELLM_X86
  __builtin_cpu_init();
  return cpu_has_vbmi2() && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// A packed W^T, pointers into tensors owned by a PackedWeight.
struct Weight {
  int64_t kind = kF32, in = 0, out = 0, group = 0, n_units = 0;
  const void* values = nullptr;
  const float* scale = nullptr;
  const uint8_t* mask = nullptr;
  const int64_t* offsets = nullptr;
  const uint8_t* tiles = nullptr;     // int8 kinds and int4 on VNNI CPUs: see `make_tiles`
  const int64_t* tile_at = nullptr;  // bitmask int8: where each tile starts in `tiles`
};

inline bool sparse_kind(int64_t k) { return k >= kSBF16; }

// Where tile `tile` (group g, chunk c: g * chunks + c) of a weight's tiles starts.
inline const uint8_t* tile_start(const Weight& w, int64_t tile) {
  if (w.kind == kSI8) return w.tiles + w.tile_at[tile];
  return w.tiles + tile * (w.kind == kI4 ? kTileBytes / 2 : kTileBytes);
}

// Nibble (q + 8) of output o in an int4 row: 16 outputs share 8 bytes, output k of a
// block in byte k's low nibble, output k + 8 in its high one.
inline int i4_row_nibble(const uint8_t* row, int64_t o) {
  const uint8_t byte = row[(o / 16) * 8 + (o % 8)];
  return (o % 16) < 8 ? (byte & 15) : (byte >> 4);
}
// Where row `at` (0 .. kQGroup - 1) of a group lies in an int4 tile: in step at / 8, at
// byte 4l + at % 4 for output l, shifted by this (the high nibble for at % 8 >= 4).
inline int64_t i4_tile_byte(int64_t at) { return 64 * (at / 8) + at % 4; }
inline int i4_tile_shift(int64_t at) { return static_cast<int>(4 * ((at % 8) / 4)); }
inline bool row_scaled(int64_t k) { return k == kI8 || k == kSI8; }  // scale[o] at the end

inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Start of row i's packed values for output o0 (a multiple of kUnit).
inline int64_t sparse_start(const Weight& w, int64_t i, int64_t o0) {
  return w.offsets[i * w.n_units + o0 / kUnit];
}

// ---------------------------------------------------------------- portable kernels
// acc[o] += v * value(W^T[i, o]) for the kept rows j0..j1 and outputs [o0, o1); int8
// kinds accumulate unscaled (scale[o] applied by `gemv_into`), int4 kinds apply their group
// scale per row.
void rows_portable(const Weight& w, float* acc, const int64_t* ip, const float* vp, int64_t j0,
                   int64_t j1, int64_t o0, int64_t o1) {
  const int64_t out = w.out;
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t i = ip[j];
    const float v = vp[j];
    switch (w.kind) {
      case kF32: {
        const float* r = static_cast<const float*>(w.values) + i * out;
        for (int64_t o = o0; o < o1; ++o) acc[o] += v * r[o];
        break;
      }
      case kBF16: {
        const uint16_t* r = static_cast<const uint16_t*>(w.values) + i * out;
        for (int64_t o = o0; o < o1; ++o) acc[o] += v * bf16_to_f32(r[o]);
        break;
      }
      case kI8: {
        const int8_t* r = static_cast<const int8_t*>(w.values) + i * out;
        for (int64_t o = o0; o < o1; ++o) acc[o] += v * static_cast<float>(r[o]);
        break;
      }
      case kI4: {
        const uint8_t* r = static_cast<const uint8_t*>(w.values) + i * (out / 2);
        const float* s = w.scale + (i / w.group) * out;
        for (int64_t o = o0; o < o1; ++o)
          acc[o] += v * s[o] * static_cast<float>(i4_row_nibble(r, o) - 8);
        break;
      }
      default: {  // bitmask kinds: per mask byte, one packed value per set bit
        const uint8_t* m = w.mask + i * (out / 8);
        int64_t p = sparse_start(w, i, o0);
        const float* s = w.kind == kSI4 ? w.scale + (i / w.group) * out : nullptr;
        for (int64_t o = o0; o < o1; o += 8) {
          for (unsigned mb = m[o / 8]; mb; mb &= mb - 1, ++p) {
            const int64_t at = o + __builtin_ctz(mb);
            float val;
            if (w.kind == kSBF16) {
              val = bf16_to_f32(static_cast<const uint16_t*>(w.values)[p]);
            } else if (w.kind == kSI8) {
              val = static_cast<float>(static_cast<const int8_t*>(w.values)[p]);
            } else {
              const uint8_t byte = static_cast<const uint8_t*>(w.values)[p / 2];
              val = static_cast<float>(((p % 2) ? (byte >> 4) : (byte & 15)) - 8) * s[at];
            }
            acc[at] += v * val;
          }
        }
      }
    }
  }
}

#if SPARSELLM_X86
// ---------------------------------------------------------------- AVX2 + FMA kernels
#pragma GCC push_options
#pragma GCC target("avx2,fma,popcnt")

// vpshufb controls that expand a mask byte's packed values into 8 fp32-ready lanes:
// for int8, value r of the group goes to byte 3 of its lane (the lane reads v << 24, so
// cvt gives v * 2^24, undone by scaling x); for bf16, bytes 2r, 2r+1 go to bytes 2-3 (the
// lane's bits are then exactly the fp32 value). 0x80 zeroes a byte.
alignas(32) uint8_t g_lut_i8[256][32];
alignas(32) uint8_t g_lut_bf16[256][32];

void build_luts() {
  for (int m = 0; m < 256; ++m) {
    std::memset(g_lut_i8[m], 0x80, 32);
    std::memset(g_lut_bf16[m], 0x80, 32);
    int r = 0;
    for (int lane = 0; lane < 8; ++lane) {
      if (!((m >> lane) & 1)) continue;
      const int base = 4 * lane;  // byte of the lane in the 256-bit vector (both halves
                                  // hold the same 16 source bytes, so indices are 0..15)
      g_lut_i8[m][base + 3] = static_cast<uint8_t>(r);
      g_lut_bf16[m][base + 2] = static_cast<uint8_t>(2 * r);
      g_lut_bf16[m][base + 3] = static_cast<uint8_t>(2 * r + 1);
      ++r;
    }
  }
}

inline __m256 load8_f32(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8_bf16(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8_i8(const int8_t* p) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

// Weight rows ahead of the current group whose lines are prefetched while it is computed
// (a prefetch is a hint: results are unchanged).
constexpr int64_t PF_ROWS = 8;

// The four weight rows PF_ROWS past the group starting at kept row j, in `next`; false
// (nothing to prefetch) near the end of the kept rows.
template <class T>
inline bool rows_ahead(const T* values, const int64_t* ip, int64_t j, int64_t j1,
                       int64_t out, const T* next[4]) {
  if (j + PF_ROWS + 4 > j1) return false;
  for (int k = 0; k < 4; ++k) next[k] = values + ip[j + PF_ROWS + k] * out;
  return true;
}

// Prefetch output offset `o` of each of the four rows `pf`. Callers test whether to
// fetch with a flag, not a null `pf`: GCC 12 silently dropped every prefetch of a helper
// that returned early on `!pf` (seen in the disassembly).
template <class T>
inline void prefetch4(const T* const* pf, int64_t o) {
  for (int k = 0; k < 4; ++k) _mm_prefetch(reinterpret_cast<const char*>(pf[k] + o), _MM_HINT_T0);
}

// Dense kinds, four rows at a time so acc is loaded and stored once per four weight rows.
// Every output accumulates its kept rows in order, one FMA each (acc = v_j * w_j + acc),
// whatever the kernel, ISA or loop order: `nb` activation rows share the call (row r
// reads vp + r * vstride and accumulates into acc + r * astride), a batch or a speculative
// verification pass reads the weights from memory once, and a row's result does not
// depend on the rows beside it (greedy speculative decoding is then token-identical to
// plain decoding). Loop order: fp32 (and any kind for one row) takes a row's four
// broadcasts once per weight-row group and streams the outputs, later rows re-reading the
// group's weights from L1; converted kinds convert each weight vector once and apply it
// to every row. (On AVX-512, several rows go through `dense_tiles_avx512` instead.)
template <class T, class Load>
void dense_rows_avx2(const T* values, int64_t out, float* acc, const int64_t* ip,
                     const float* vp, int64_t j0, int64_t j1, int64_t o0, int64_t o1,
                     Load load, int64_t nb = 1, int64_t vstride = 0, int64_t astride = 0) {
  int64_t j = j0;
  const int64_t o8 = o0 + (o1 - o0) / 8 * 8;
  const bool row_outer = nb == 1 || std::is_same_v<T, float>;
  // one group of four weight rows, one activation row, every output block
  auto group_row = [&](const T* r0, const T* r1, const T* r2, const T* r3, const float* v,
                       float* ar, const T* const* pf, bool fetch) {
    const __m256 v0 = _mm256_set1_ps(v[0]), v1 = _mm256_set1_ps(v[1]);
    const __m256 v2 = _mm256_set1_ps(v[2]), v3 = _mm256_set1_ps(v[3]);
    for (int64_t o = o0; o < o8; o += 8) {
      if (fetch) prefetch4(pf, o);
      __m256 a = _mm256_fmadd_ps(v0, load(r0 + o), _mm256_loadu_ps(ar + o));
      a = _mm256_fmadd_ps(v1, load(r1 + o), a);
      a = _mm256_fmadd_ps(v2, load(r2 + o), a);
      _mm256_storeu_ps(ar + o, _mm256_fmadd_ps(v3, load(r3 + o), a));
    }
  };
  for (; j + 4 <= j1; j += 4) {
    const T* r0 = values + ip[j] * out;
    const T* r1 = values + ip[j + 1] * out;
    const T* r2 = values + ip[j + 2] * out;
    const T* r3 = values + ip[j + 3] * out;
    if (row_outer) {
      const T* next[4];
      const bool ahead = rows_ahead(values, ip, j, j1, out, next);
      for (int64_t r = 0; r < nb; ++r)
        group_row(r0, r1, r2, r3, vp + r * vstride + j, acc + r * astride, next,
                  ahead && r == 0);
      continue;
    }
    for (int64_t o = o0; o < o8; o += 8) {
      const __m256 w0 = load(r0 + o), w1 = load(r1 + o), w2 = load(r2 + o), w3 = load(r3 + o);
      for (int64_t r = 0; r < nb; ++r) {
        const float* v = vp + r * vstride + j;
        float* ar = acc + r * astride + o;
        __m256 a = _mm256_fmadd_ps(_mm256_set1_ps(v[0]), w0, _mm256_loadu_ps(ar));
        a = _mm256_fmadd_ps(_mm256_set1_ps(v[1]), w1, a);
        a = _mm256_fmadd_ps(_mm256_set1_ps(v[2]), w2, a);
        _mm256_storeu_ps(ar, _mm256_fmadd_ps(_mm256_set1_ps(v[3]), w3, a));
      }
    }
  }
  // leftover rows (columns past the last multiple of 8 are left to the portable kernel)
  for (; j < j1; ++j) {
    const T* rw = values + ip[j] * out;
    for (int64_t r = 0; r < nb; ++r) {
      const __m256 v = _mm256_set1_ps(vp[r * vstride + j]);
      float* ar = acc + r * astride;
      for (int64_t o = o0; o < o8; o += 8)
        _mm256_storeu_ps(ar + o, _mm256_fmadd_ps(v, load(rw + o), _mm256_loadu_ps(ar + o)));
    }
  }
}

// All rows of a dense fp32 / bf16 / int8 weight for `nb` activation rows at once (see
// dense_rows_avx2); false for other kinds.
bool dense_multi_avx2(const Weight& w, float* acc, const int64_t* ip, const float* vp,
                      int64_t j0, int64_t j1, int64_t o0, int64_t o1, int64_t nb,
                      int64_t vstride, int64_t astride) {
  switch (w.kind) {
    case kF32:
      dense_rows_avx2(static_cast<const float*>(w.values), w.out, acc, ip, vp, j0, j1, o0, o1,
                      [](const float* p) { return load8_f32(p); }, nb, vstride, astride);
      return true;
    case kBF16:
      dense_rows_avx2(static_cast<const uint16_t*>(w.values), w.out, acc, ip, vp, j0, j1, o0,
                      o1, [](const uint16_t* p) { return load8_bf16(p); }, nb, vstride,
                      astride);
      return true;
    case kI8:
      dense_rows_avx2(static_cast<const int8_t*>(w.values), w.out, acc, ip, vp, j0, j1, o0, o1,
                      [](const int8_t* p) { return load8_i8(p); }, nb, vstride, astride);
      return true;
    default:
      return false;
  }
}

// Int4: the kept rows of one scale group (a run of rows: kept rows come in ascending
// order) are summed unscaled into `part`, four rows per load and store of it, and the
// group's scales are applied once per run: acc[o] += s_g[o] * part[o]. Why: applying the
// scale per row cost two loads and two multiplies per 16 outputs and row on top of the
// nibble unpacking, and one row at a time loaded and stored acc per row (measured: int4
// decoded slower than int8 on the default model while reading 0.6x the bytes).
void i4_rows_avx2(const Weight& w, float* acc, const int64_t* ip, const float* vp, int64_t j0,
                  int64_t j1, int64_t o0, int64_t o1) {
  const int64_t out = w.out, n = o1 - o0;
  const __m256i low = _mm256_set1_epi32(15), eight = _mm256_set1_epi32(8);
  thread_local std::vector<float> part_buf;
  part_buf.resize(static_cast<size_t>(n));
  float* part = part_buf.data() - o0;  // indexed by output
  const auto* base = static_cast<const uint8_t*>(w.values);
  // the 16 outputs at o of row pointer r, as (outputs o..o+7, outputs o+8..o+15)
  auto unpack = [&](const uint8_t* r, int64_t o, __m256& lo, __m256& hi) {
    const __m256i u =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r + o / 2)));
    lo = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(u, low), eight));
    hi = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(u, 4), eight));
  };
  for (int64_t j = j0; j < j1;) {
    const int64_t g = ip[j] / w.group;
    int64_t e = j;
    while (e < j1 && ip[e] / w.group == g) ++e;
    std::fill_n(part + o0, n, 0.0f);
    for (; j + 4 <= e; j += 4) {
      const uint8_t* r[4];
      const uint8_t* next[4];
      for (int k = 0; k < 4; ++k) {
        r[k] = base + ip[j + k] * (out / 2);
        next[k] = base + ip[std::min(j + k + PF_ROWS, j1 - 1)] * (out / 2);
      }
      const __m256 v0 = _mm256_set1_ps(vp[j]), v1 = _mm256_set1_ps(vp[j + 1]);
      const __m256 v2 = _mm256_set1_ps(vp[j + 2]), v3 = _mm256_set1_ps(vp[j + 3]);
      for (int64_t o = o0; o < o1; o += 16) {
        if (((o - o0) & 127) == 0) prefetch4(next, o / 2);
        __m256 l0, h0, l1, h1, l2, h2, l3, h3;
        unpack(r[0], o, l0, h0);
        unpack(r[1], o, l1, h1);
        unpack(r[2], o, l2, h2);
        unpack(r[3], o, l3, h3);
        __m256 a = _mm256_fmadd_ps(v0, l0, _mm256_loadu_ps(part + o));
        __m256 b = _mm256_mul_ps(v1, l1);
        a = _mm256_fmadd_ps(v2, l2, a);
        b = _mm256_fmadd_ps(v3, l3, b);
        _mm256_storeu_ps(part + o, _mm256_add_ps(a, b));
        a = _mm256_fmadd_ps(v0, h0, _mm256_loadu_ps(part + o + 8));
        b = _mm256_mul_ps(v1, h1);
        a = _mm256_fmadd_ps(v2, h2, a);
        b = _mm256_fmadd_ps(v3, h3, b);
        _mm256_storeu_ps(part + o + 8, _mm256_add_ps(a, b));
      }
    }
    for (; j < e; ++j) {
      const uint8_t* r = base + ip[j] * (out / 2);
      const __m256 v = _mm256_set1_ps(vp[j]);
      for (int64_t o = o0; o < o1; o += 16) {
        __m256 lo, hi;
        unpack(r, o, lo, hi);
        _mm256_storeu_ps(part + o, _mm256_fmadd_ps(v, lo, _mm256_loadu_ps(part + o)));
        _mm256_storeu_ps(part + o + 8, _mm256_fmadd_ps(v, hi, _mm256_loadu_ps(part + o + 8)));
      }
    }
    const float* sg = w.scale + g * out;
    for (int64_t o = o0; o < o1; o += 8)
      _mm256_storeu_ps(acc + o, _mm256_fmadd_ps(_mm256_loadu_ps(sg + o), _mm256_loadu_ps(part + o),
                                                _mm256_loadu_ps(acc + o)));
  }
}

// Bitmask kinds with byte-sized (int8) or 2-byte (bf16) values: per 8 outputs, one mask
// byte picks a vpshufb control that places the next popcount(mask) packed values in
// their lanes; no branch on the mask (an empty byte expands to zeros). Four rows share
// one load and store of acc (one row at a time was bound by those, measured: 1.46x the
// time of dense int8 per weight position with acc in L1).
template <bool kBf16>
inline __m256 expand8(const uint8_t*& p, unsigned mb) {
  constexpr int64_t kSize = kBf16 ? 2 : 1;
  const auto* lut = kBf16 ? g_lut_bf16 : g_lut_i8;
  const __m256i src =
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i e =
      _mm256_shuffle_epi8(src, _mm256_load_si256(reinterpret_cast<const __m256i*>(lut[mb])));
  p += kSize * __builtin_popcount(mb);
  return kBf16 ? _mm256_castsi256_ps(e) : _mm256_cvtepi32_ps(e);
}

template <bool kBf16>
void sparse_rows_avx2(const Weight& w, float* acc, const int64_t* ip, const float* vp,
                      int64_t j0, int64_t j1, int64_t o0, int64_t o1) {
  const int64_t out = w.out;
  constexpr int64_t kSize = kBf16 ? 2 : 1;
  const float unit = kBf16 ? 1.0f : 1.0f / 16777216.0f;  // int8 lanes hold v * 2^24
  const auto* base = static_cast<const uint8_t*>(w.values);
  auto row = [&](int64_t j, const uint8_t*& m, const uint8_t*& p, __m256& v) {
    const int64_t i = ip[j];
    m = w.mask + i * (out / 8) + o0 / 8;
    p = base + sparse_start(w, i, o0) * kSize;
    v = _mm256_set1_ps(vp[j] * unit);
  };
  const int64_t n8 = (o1 - o0) / 8;
  int64_t j = j0;
  for (; j + 4 <= j1; j += 4) {
    const uint8_t *m0, *m1, *m2, *m3, *p0, *p1, *p2, *p3;
    __m256 v0, v1, v2, v3;
    row(j, m0, p0, v0);
    row(j + 1, m1, p1, v1);
    row(j + 2, m2, p2, v2);
    row(j + 3, m3, p3, v3);
    float* a = acc + o0;
    for (int64_t k = 0; k < n8; ++k, a += 8) {
      __m256 s = _mm256_fmadd_ps(v0, expand8<kBf16>(p0, m0[k]), _mm256_loadu_ps(a));
      __m256 t = _mm256_mul_ps(v1, expand8<kBf16>(p1, m1[k]));
      s = _mm256_fmadd_ps(v2, expand8<kBf16>(p2, m2[k]), s);
      t = _mm256_fmadd_ps(v3, expand8<kBf16>(p3, m3[k]), t);
      _mm256_storeu_ps(a, _mm256_add_ps(s, t));
    }
  }
  for (; j < j1; ++j) {
    const uint8_t *m, *p;
    __m256 v;
    row(j, m, p, v);
    float* a = acc + o0;
    for (int64_t k = 0; k < n8; ++k, a += 8)
      _mm256_storeu_ps(a, _mm256_fmadd_ps(v, expand8<kBf16>(p, m[k]), _mm256_loadu_ps(a)));
  }
}

void rows_avx2(const Weight& w, float* acc, const int64_t* ip, const float* vp, int64_t j0,
               int64_t j1, int64_t o0, int64_t o1) {
  switch (w.kind) {
    case kF32:
      dense_rows_avx2(static_cast<const float*>(w.values), w.out, acc, ip, vp, j0, j1, o0, o1,
                      [](const float* p) { return load8_f32(p); });
      break;
    case kBF16:
      dense_rows_avx2(static_cast<const uint16_t*>(w.values), w.out, acc, ip, vp, j0, j1, o0,
                      o1, [](const uint16_t* p) { return load8_bf16(p); });
      break;
    case kI8:
      dense_rows_avx2(static_cast<const int8_t*>(w.values), w.out, acc, ip, vp, j0, j1, o0, o1,
                      [](const int8_t* p) { return load8_i8(p); });
      break;
    case kI4:
      i4_rows_avx2(w, acc, ip, vp, j0, j1, o0, o1);
      break;
    case kSBF16:
      sparse_rows_avx2<true>(w, acc, ip, vp, j0, j1, o0, o1);
      break;
    case kSI8:
      sparse_rows_avx2<false>(w, acc, ip, vp, j0, j1, o0, o1);
      break;
    default:  // sparse int4: nibble-packed values have no byte-aligned vpshufb expansion
      rows_portable(w, acc, ip, vp, j0, j1, o0, o1);
  }
}

#pragma GCC pop_options
#endif  // SPARSELLM_X86

#if SPARSELLM_X86
// ---------------------------------------------------------------- AVX-512 dense kernels
// dense_rows_avx2's one-row loops with 16 outputs per vector. Every output lane gets the
// same operations in the same order as in the AVX2 kernel (one FMA per kept row, in
// order), so the two ISAs give bit-identical results and a call may mix them (a slice's
// last 8 outputs go to AVX2). Several rows go through the register-blocked tiles below
// (measured on a Xeon with AVX-512: with the streaming loop each extra row of a fp32 step
// cost a fifth of the memory-bound first row).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx2,fma,popcnt")

inline __m512 load16_f32(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16_bf16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16_i8(const int8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}

// Outputs [o0, o16) of one activation row of dense_rows_avx2 (o16: o0 plus the largest
// multiple of 16 that fits); returns o16.
template <class T, class Load>
int64_t dense_rows_avx512(const T* values, int64_t out, float* acc, const int64_t* ip,
                          const float* vp, int64_t j0, int64_t j1, int64_t o0, int64_t o1,
                          Load load) {
  const int64_t o16 = o0 + (o1 - o0) / 16 * 16;
  int64_t j = j0;
  for (; j + 4 <= j1; j += 4) {
    const T* r0 = values + ip[j] * out;
    const T* r1 = values + ip[j + 1] * out;
    const T* r2 = values + ip[j + 2] * out;
    const T* r3 = values + ip[j + 3] * out;
    const T* next[4];
    const bool ahead = rows_ahead(values, ip, j, j1, out, next);
    const __m512 v0 = _mm512_set1_ps(vp[j]), v1 = _mm512_set1_ps(vp[j + 1]);
    const __m512 v2 = _mm512_set1_ps(vp[j + 2]), v3 = _mm512_set1_ps(vp[j + 3]);
    for (int64_t o = o0; o < o16; o += 16) {
      if (ahead) prefetch4(next, o);
      __m512 a = _mm512_fmadd_ps(v0, load(r0 + o), _mm512_loadu_ps(acc + o));
      a = _mm512_fmadd_ps(v1, load(r1 + o), a);
      a = _mm512_fmadd_ps(v2, load(r2 + o), a);
      _mm512_storeu_ps(acc + o, _mm512_fmadd_ps(v3, load(r3 + o), a));
    }
  }
  for (; j < j1; ++j) {
    const T* rw = values + ip[j] * out;
    const __m512 v = _mm512_set1_ps(vp[j]);
    for (int64_t o = o0; o < o16; o += 16)
      _mm512_storeu_ps(acc + o, _mm512_fmadd_ps(v, load(rw + o), _mm512_loadu_ps(acc + o)));
  }
  return o16;
}

// `f(values, load)` with a dense fp32 / bf16 / int8 weight's typed values and its 16-lane
// load (one dispatch for every AVX-512 dense kernel); `other` for other kinds.
template <class F>
int64_t with_dense512(const Weight& w, int64_t other, F f) {
  switch (w.kind) {
    case kF32:
      return f(static_cast<const float*>(w.values), [](const float* p) { return load16_f32(p); });
    case kBF16:
      return f(static_cast<const uint16_t*>(w.values),
               [](const uint16_t* p) { return load16_bf16(p); });
    case kI8:
      return f(static_cast<const int8_t*>(w.values), [](const int8_t* p) { return load16_i8(p); });
    default:
      return other;
  }
}

// The AVX-512 part of one activation row over a dense fp32 / bf16 / int8 weight's outputs
// [o0, o1); returns where it stopped (o0 for other kinds: nothing done).
int64_t dense_avx512(const Weight& w, float* acc, const int64_t* ip, const float* vp,
                     int64_t j0, int64_t j1, int64_t o0, int64_t o1) {
  return with_dense512(w, o0, [&](auto values, auto load) {
    return dense_rows_avx512(values, w.out, acc, ip, vp, j0, j1, o0, o1, load);
  });
}

// Several activation rows of a dense weight, register-blocked: the accumulators of R rows
// by K vectors of 16 outputs stay in registers while kTileRows weight rows go by, each
// weight vector loaded once for the R rows and each activation broadcast once for the K
// vectors. The streaming kernel above loads and stores its accumulator and re-loads the
// weights for every row, which left a 9-row fp32 verification pass at 1.65 decode steps
// where its FMAs alone need well under one (measured on the default model). Each output
// still gets one FMA per kept row, in order (an accumulator spilled between chunks of
// rows is the same float), so results are bit-identical to the one-row kernels.
constexpr int64_t kTileRows = 32;  // weight rows per chunk: R x K x kTileRows FMAs per spill
constexpr int kTileMaxR = 8;       // activation rows per register block (R x K + K + 1 regs)

template <int R, int K, class T, class Load>
inline void dense_tile(const T* const* wr, int64_t jn, int64_t o, const float* vp,
                       int64_t vstride, float* acc, int64_t astride, Load load, bool fetch) {
  __m512 c[R][K];
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < K; ++k) c[r][k] = _mm512_loadu_ps(acc + r * astride + o + 16 * k);
  for (int64_t j = 0; j < jn; ++j) {
    const T* p = wr[j] + o;
    // the first row block pulls the weights in from memory: fetch this row's lines four
    // tiles ahead into L2, not L1. A tile walks kTileRows rows at once, and prefetches to
    // L1 hold the core's few L1 miss buffers: on an AMD EPYC (32 MB L3, weights streamed
    // from DRAM) 2 to 16 fp32 rows read 17-19 GB/s against one row's 30-35 (microbench);
    // fetched into L2, the speculative bench's pass costs 2 rows 1.14 decode steps and 9
    // rows 1.50.
    if (fetch)
      for (int64_t b = 0; b < 16 * K * static_cast<int64_t>(sizeof(T)); b += 64)
        _mm_prefetch(reinterpret_cast<const char*>(p + 64 * K) + b, _MM_HINT_T1);
    __m512 w[K];
    for (int k = 0; k < K; ++k) w[k] = load(p + 16 * k);
    for (int r = 0; r < R; ++r) {
      const __m512 v = _mm512_set1_ps(vp[r * vstride + j]);
      for (int k = 0; k < K; ++k) c[r][k] = _mm512_fmadd_ps(v, w[k], c[r][k]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < K; ++k) _mm512_storeu_ps(acc + r * astride + o + 16 * k, c[r][k]);
}

template <int K, class T, class Load>
void dense_tile_rows(int64_t rows, const T* const* wr, int64_t jn, int64_t o, const float* vp,
                     int64_t vstride, float* acc, int64_t astride, Load load, bool fetch) {
  switch (rows) {
#define SPARSELLM_TILE(R) dense_tile<R, K>(wr, jn, o, vp, vstride, acc, astride, load, fetch)
    SPARSELLM_CASES_1_TO_8(SPARSELLM_TILE)
#undef SPARSELLM_TILE
    default:
      break;
  }
}

// Outputs [o0, o16) of nb activation rows (nb > 1) for the kept rows j0..j1 of a dense
// weight; returns o16. Loop order: a chunk of kTileRows weight rows, then 32-output tiles
// across the slice (each weight row read front to back, so memory streams), then blocks
// of rows balanced to at most kTileMaxR (9 rows: 5 + 4), the later blocks finding the
// tile's weights in L1.
template <class T, class Load>
int64_t dense_tiles_avx512(const T* values, int64_t out, float* acc, const int64_t* ip,
                           const float* vp, int64_t j0, int64_t j1, int64_t o0, int64_t o1,
                           Load load, int64_t nb, int64_t vstride, int64_t astride) {
  const int64_t o16 = o0 + (o1 - o0) / 16 * 16;
  const int64_t blocks = (nb + kTileMaxR - 1) / kTileMaxR;
  const T* wr[kTileRows];
  for (int64_t j = j0; j < j1; j += kTileRows) {
    const int64_t jn = std::min(kTileRows, j1 - j);
    for (int64_t q = 0; q < jn; ++q) wr[q] = values + ip[j + q] * out;
    for (int64_t o = o0; o < o16;) {
      const int K = o + 32 <= o16 ? 2 : 1;
      for (int64_t b = 0, r0 = 0; b < blocks; ++b) {
        const int64_t r1 = nb * (b + 1) / blocks;
        const float* v = vp + r0 * vstride + j;
        float* a = acc + r0 * astride;
        if (K == 2) dense_tile_rows<2>(r1 - r0, wr, jn, o, v, vstride, a, astride, load, b == 0);
        else dense_tile_rows<1>(r1 - r0, wr, jn, o, v, vstride, a, astride, load, b == 0);
        r0 = r1;
      }
      o += 16 * K;
    }
  }
  return o16;
}

// The AVX-512 part of nb > 1 activation rows (see dense_avx512), through the tiles.
int64_t dense_tiles(const Weight& w, float* acc, const int64_t* ip, const float* vp,
                    int64_t j0, int64_t j1, int64_t o0, int64_t o1, int64_t nb,
                    int64_t vstride, int64_t astride) {
  return with_dense512(w, o0, [&](auto values, auto load) {
    return dense_tiles_avx512(values, w.out, acc, ip, vp, j0, j1, o0, o1, load, nb, vstride,
                              astride);
  });
}

// A row's kept channels (|x_i| * s_i > thr; indices to idx, values to val, in order;
// returns how many) on AVX-512, 16 channels at a time: a compare gives the kept lanes, a
// register compress packs them (not a compress to memory, which is microcoded on AMD
// Zen 4), stored whole, so idx and val need 16 entries of slack past the last kept one.
// The same float test as the portable loop: the same channels in the same order. Why:
// that loop's branch per channel mispredicts about half the time under TEAL's
// thresholds; perf put 5% of TEAL decode samples in it, on the calling thread while the
// other waited, and this path decoded TEAL 40% + 50% sparse-int8 7.6% faster (default
// model, AMD EPYC, 2 threads, medians of 5 alternated runs: 180.5 against 167.8 tok/s).
int64_t select_avx512(const float* x, int64_t in, const float* sp, float thr, int64_t* idx,
                      float* val) {
  const __m512 t = _mm512_set1_ps(thr), one = _mm512_set1_ps(1.0f);
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  int64_t n = 0;
  for (int64_t i = 0; i < in; i += 16) {
    const __mmask16 k = in - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (in - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(k, x + i);
    const __m512 s = sp ? _mm512_maskz_loadu_ps(k, sp + i) : one;
    const __mmask16 m =
        _mm512_mask_cmp_ps_mask(k, _mm512_mul_ps(_mm512_abs_ps(v), s), t, _CMP_GT_OQ);
    if (!m) continue;
    _mm512_storeu_ps(val + n, _mm512_maskz_compress_ps(m, v));
    const __m512i c = _mm512_maskz_compress_epi32(
        m, _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(i))));
    _mm512_storeu_si512(idx + n, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(c)));
    _mm512_storeu_si512(idx + n + 8, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(c, 1)));
    n += __builtin_popcount(m);
  }
  return n;
}

#pragma GCC pop_options
#endif  // SPARSELLM_X86

#if SPARSELLM_X86
// ---------------------------------------------------------------- AVX-512 VBMI2 bitmask kernels
// sparse_rows_avx2 with 16 outputs per vector and no lookup table. Int8: per 64 outputs
// of a row, one expand-load (vpexpandb) by the row's 64 mask bits places the next
// popcount packed values at their outputs (zeros elsewhere), widened 16 at a time. Bf16:
// per 16 outputs, the mask bits are spread (pdep) to the top word of each 32-bit lane and
// one vpexpandw lands each value as its exact fp32. Same operations per lane in the same
// order as the AVX2 kernel (x * w is exact whether w is scaled by 2^24 or not), so results
// are bit-identical to it. Why: profiled on 50% sparse-int8 decode (default model, one
// thread), the AVX2 kernel took 53% of the samples for 0.6x of dense int8's bytes: per
// 8 outputs a 16-byte load, a table load, a shuffle, a popcount and a convert. Measured
// with a 1.2 GB working set (beyond the caches), 2 threads, this kernel runs 50% sparse
// int8 at 28 G weight positions/s against dense int8's 26: still bound by instructions
// (expand, widen, convert, FMA per position), not by memory; the 16-wide pdep form of the
// int8 kernel measured slower than this one.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi2,bmi2,avx2,fma,popcnt")

template <bool kBf16>
inline __m512 expand16(const uint8_t*& p, uint32_t m16) {
  __m512i e;
  if constexpr (kBf16) {
    e = _mm512_maskz_expandloadu_epi16(static_cast<__mmask32>(_pdep_u32(m16, 0xAAAAAAAAu)), p);
    p += 2 * __builtin_popcount(m16);
    return _mm512_castsi512_ps(e);
  } else {
    e = _mm512_maskz_expandloadu_epi8(_pdep_u64(m16, 0x8888888888888888ull), p);
    p += __builtin_popcount(m16);
    return _mm512_cvtepi32_ps(e);
  }
}

// Int8 values for 64 outputs of one row: one expand-load by the row's 64 mask bits.
inline __m512i expand64(const uint8_t*& p, const uint16_t* m) {
  uint64_t mk;
  std::memcpy(&mk, m, 8);
  const __m512i e = _mm512_maskz_expandloadu_epi8(mk, p);
  p += __builtin_popcountll(mk);
  return e;
}

// Outputs 16q..16q+15 of an expand64 block as fp32.
template <int Q>
inline __m512 widen16(__m512i e) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(e, Q)));
}

template <bool kBf16>
void sparse_rows_avx512(const Weight& w, float* acc, const int64_t* ip, const float* vp,
                        int64_t j0, int64_t j1, int64_t o0, int64_t o1) {
  const int64_t out = w.out;
  constexpr int64_t kSize = kBf16 ? 2 : 1;
  const float unit = kBf16 ? 1.0f : 1.0f / 16777216.0f;  // int8 lanes hold v * 2^24
  const auto* base = static_cast<const uint8_t*>(w.values);
  auto row = [&](int64_t j, const uint16_t*& m, const uint8_t*& p, __m512& v) {
    const int64_t i = ip[j];
    m = reinterpret_cast<const uint16_t*>(w.mask + i * (out / 8) + o0 / 8);
    p = base + sparse_start(w, i, o0) * kSize;
    v = _mm512_set1_ps(vp[j] * unit);
  };
  const int64_t n16 = (o1 - o0) / 16;
  int64_t j = j0;
  for (; j + 4 <= j1; j += 4) {
    const uint16_t *m0, *m1, *m2, *m3;
    const uint8_t *p0, *p1, *p2, *p3;
    __m512 v0, v1, v2, v3;
    row(j, m0, p0, v0);
    row(j + 1, m1, p1, v1);
    row(j + 2, m2, p2, v2);
    row(j + 3, m3, p3, v3);
    // the rows PF_ROWS ahead: their masks now, their values as far in as row j has got
    const bool fetch = j + PF_ROWS + 4 <= j1;
    const uint8_t* next[4] = {p0, p0, p0, p0};
    if (fetch) {
      for (int q = 0; q < 4; ++q) {
        const int64_t i = ip[j + PF_ROWS + q];
        next[q] = base + sparse_start(w, i, o0) * kSize;
        const uint8_t* nm = w.mask + i * (out / 8) + o0 / 8;
        for (int64_t b = 0; b < (o1 - o0) / 8; b += 64)
          _mm_prefetch(reinterpret_cast<const char*>(nm + b), _MM_HINT_T0);
      }
    }
    const uint8_t* const start0 = p0;
    float* a = acc + o0;
    int64_t k = 0;
    if constexpr (!kBf16) {
      const __m512 x0 = _mm512_set1_ps(vp[j]), x1 = _mm512_set1_ps(vp[j + 1]);
      const __m512 x2 = _mm512_set1_ps(vp[j + 2]), x3 = _mm512_set1_ps(vp[j + 3]);
      auto block = [&](float* aq, __m512 w0, __m512 w1, __m512 w2, __m512 w3) {
        __m512 s = _mm512_fmadd_ps(x0, w0, _mm512_loadu_ps(aq));
        __m512 t = _mm512_mul_ps(x1, w1);
        s = _mm512_fmadd_ps(x2, w2, s);
        t = _mm512_fmadd_ps(x3, w3, t);
        _mm512_storeu_ps(aq, _mm512_add_ps(s, t));
      };
      for (; k + 4 <= n16; k += 4, a += 64) {
        if (fetch) prefetch4(next, p0 - start0);
        const __m512i e0 = expand64(p0, m0 + k), e1 = expand64(p1, m1 + k);
        const __m512i e2 = expand64(p2, m2 + k), e3 = expand64(p3, m3 + k);
        block(a, widen16<0>(e0), widen16<0>(e1), widen16<0>(e2), widen16<0>(e3));
        block(a + 16, widen16<1>(e0), widen16<1>(e1), widen16<1>(e2), widen16<1>(e3));
        block(a + 32, widen16<2>(e0), widen16<2>(e1), widen16<2>(e2), widen16<2>(e3));
        block(a + 48, widen16<3>(e0), widen16<3>(e1), widen16<3>(e2), widen16<3>(e3));
      }
    }
    for (; k < n16; ++k, a += 16) {
      if (fetch && (k & 3) == 0) prefetch4(next, p0 - start0);
      __m512 s = _mm512_fmadd_ps(v0, expand16<kBf16>(p0, m0[k]), _mm512_loadu_ps(a));
      __m512 t = _mm512_mul_ps(v1, expand16<kBf16>(p1, m1[k]));
      s = _mm512_fmadd_ps(v2, expand16<kBf16>(p2, m2[k]), s);
      t = _mm512_fmadd_ps(v3, expand16<kBf16>(p3, m3[k]), t);
      _mm512_storeu_ps(a, _mm512_add_ps(s, t));
    }
  }
  for (; j < j1; ++j) {
    const uint16_t* m;
    const uint8_t* p;
    __m512 v;
    row(j, m, p, v);
    float* a = acc + o0;
    for (int64_t k = 0; k < n16; ++k, a += 16)
      _mm512_storeu_ps(a, _mm512_fmadd_ps(v, expand16<kBf16>(p, m[k]), _mm512_loadu_ps(a)));
  }
}

// The VBMI2 kernel of a bitmask bf16 / int8 weight; false for other kinds.
bool sparse_avx512(const Weight& w, float* acc, const int64_t* ip, const float* vp, int64_t j0,
                   int64_t j1, int64_t o0, int64_t o1) {
  if (w.kind == kSBF16) sparse_rows_avx512<true>(w, acc, ip, vp, j0, j1, o0, o1);
  else if (w.kind == kSI8) sparse_rows_avx512<false>(w, acc, ip, vp, j0, j1, o0, o1);
  else return false;
  return true;
}

#pragma GCC pop_options
#endif  // SPARSELLM_X86

#if SPARSELLM_X86
// ---------------------------------------------------------------- AVX-512 VNNI int8 kernels
// Int8 weights (dense and bitmask) times int8 activations, summed in int32 by vpdpbusd:
// 64 multiply-adds per instruction, where the float kernels above widen, convert and
// FMA 16 weights at a time. Why: on an AMD EPYC (32 MB L3, 31.6 GB/s read) those float
// kernels were bound by instructions, not memory: dense int8 decode read 51% of the
// bandwidth (results/runtime-default.json before these kernels). Activations are
// quantized per kQGroup kept channels of a row (`quantize_groups`), as llama.cpp
// quantizes activations to Q8_0 blocks of 32 for its Q8_0 weights. The layout stays W^T
// rows, so a skipped channel is still a row never read: four kept rows are loaded side
// by side and byte-interleaved (two unpack levels), so each 32-bit lane holds one
// output's four weights; the lane order within 64 outputs is permuted, and undone when a
// group's int32 sums are folded into fp32 (acc += s_g * sum). vpdpbusd multiplies
// unsigned by signed bytes: the activations go in as |q|, and a negative q negates its
// row's weights (one masked subtract; int8 weights are in [-127, 127], checked at load).
// A group's int32 sum is exact and groups fold in order, so a row's result does not
// depend on the rows beside it: results are batch-invariant, as the float kernels' are.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512vnni,bmi2,avx2,fma,popcnt")

// The 64-bit mask of `bytes` low bytes (bytes <= 64).
inline uint64_t low_bytes(int64_t bytes) { return _bzhi_u64(~0ull, static_cast<unsigned>(bytes)); }

// Four rows' 64-byte vectors interleaved: lane 4L + i of u[v] holds the four rows' weights
// of output 16L + 4v + i.
inline void interleave4(__m512i r0, __m512i r1, __m512i r2, __m512i r3, __m512i u[4]) {
  const __m512i t0 = _mm512_unpacklo_epi8(r0, r1), t1 = _mm512_unpackhi_epi8(r0, r1);
  const __m512i t2 = _mm512_unpacklo_epi8(r2, r3), t3 = _mm512_unpackhi_epi8(r2, r3);
  u[0] = _mm512_unpacklo_epi16(t0, t2);
  u[1] = _mm512_unpackhi_epi16(t0, t2);
  u[2] = _mm512_unpacklo_epi16(t1, t3);
  u[3] = _mm512_unpackhi_epi16(t1, t3);
}

// acc[o .. o + left) (left <= 64) += s * the int32 sums of one chunk in interleave4's lane
// order: a 4x4 transpose of 128-bit lanes puts outputs 16L .. 16L + 15 in vector L.
inline void fold_chunk(const __m512i sum[4], float s, float* acc, int64_t left) {
  const __m512i t0 = _mm512_shuffle_i32x4(sum[0], sum[1], 0x44);
  const __m512i t1 = _mm512_shuffle_i32x4(sum[2], sum[3], 0x44);
  const __m512i t2 = _mm512_shuffle_i32x4(sum[0], sum[1], 0xEE);
  const __m512i t3 = _mm512_shuffle_i32x4(sum[2], sum[3], 0xEE);
  const __m512i nat[4] = {_mm512_shuffle_i32x4(t0, t1, 0x88), _mm512_shuffle_i32x4(t0, t1, 0xDD),
                          _mm512_shuffle_i32x4(t2, t3, 0x88), _mm512_shuffle_i32x4(t2, t3, 0xDD)};
  const __m512 sc = _mm512_set1_ps(s);
  for (int v = 0; v < 4 && 16 * v < left; ++v) {
    const __mmask16 k = left - 16 * v >= 16 ? 0xFFFF
                        : static_cast<__mmask16>((1u << (left - 16 * v)) - 1);
    const __m512 f = _mm512_cvtepi32_ps(nat[v]);
    _mm512_mask_storeu_ps(acc + 16 * v, k,
                          _mm512_fmadd_ps(f, sc, _mm512_maskz_loadu_ps(k, acc + 16 * v)));
  }
}

// Four kept rows' |q| (a byte each, zero past the group's end) and the signs as a mask
// over interleave4's bytes.
inline void pack_act(const int8_t* q, int64_t cnt, uint32_t& word, uint64_t& neg) {
  uint32_t w = 0, sign = 0;
  for (int64_t k = 0; k < 4 && k < cnt; ++k) {
    w |= static_cast<uint32_t>(q[k] < 0 ? -q[k] : q[k]) << (8 * k);
    sign |= static_cast<uint32_t>(q[k] < 0) << k;
  }
  word = w;
  neg = sign * 0x1111111111111111ull;
}

// Outputs per column block of the dense kernel: what it prefetches of the next group's
// 32 rows is one block of each (32 KB of int8).
constexpr int64_t kVnniBlock = 1024;

// One group (steps of four rows, `wr` at the chunk's first output) times NB activation
// rows over one chunk of 64 outputs (fewer where `keep` masks them), folded into fp32:
// the int32 sums stay in registers for the whole group.
template <int NB>
inline void dense_vnni_chunk(const int8_t* const* wr, int64_t steps, uint64_t keep,
                             const uint32_t* act, const uint64_t* neg, int64_t rstride,
                             const float* s, int64_t sstride, float* acc, int64_t astride,
                             int64_t left) {
  __m512i sum[NB][4];
  for (int r = 0; r < NB; ++r)
    for (int v = 0; v < 4; ++v) sum[r][v] = _mm512_setzero_si512();
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t t = 0; t < steps; ++t) {
    __m512i u[4];
    interleave4(_mm512_maskz_loadu_epi8(keep, wr[4 * t]), _mm512_maskz_loadu_epi8(keep, wr[4 * t + 1]),
                _mm512_maskz_loadu_epi8(keep, wr[4 * t + 2]), _mm512_maskz_loadu_epi8(keep, wr[4 * t + 3]),
                u);
    for (int r = 0; r < NB; ++r) {
      const __m512i a = _mm512_set1_epi32(static_cast<int>(act[r * rstride + t]));
      const __mmask64 k = neg[r * rstride + t];
      for (int v = 0; v < 4; ++v)
        sum[r][v] = _mm512_dpbusd_epi32(sum[r][v], a, _mm512_mask_sub_epi8(u[v], k, zero, u[v]));
    }
  }
  for (int r = 0; r < NB; ++r) fold_chunk(sum[r], s[r * sstride], acc + r * astride, left);
}

// Dense int8: acc (nb rows, outputs [o0, o1)) += the product of the kept rows j0..j1 (j0
// a multiple of kQGroup, group g = j / kQGroup) with the rows' quantized activations
// (row r's q at qv + r * vstride, its group scales at qs + r * qstride). Loop order:
// column blocks, groups, chunks of 64 outputs, blocks of at most 4 activation rows (a
// block after the first re-reads the chunk's weights from L1). Why blocks and the
// prefetch: a group's 32 rows are 32 streams at once, more than the hardware prefetchers
// follow; while a group is computed, the next group's rows of the block (or the next
// block's first group) are fetched into L2, chunk by chunk. On an AMD EPYC, 2 threads,
// the same kernel without it (a prefetch a few chunks ahead in the same rows) decoded
// the default model at 0.92x of the float kernels; streaming four rows across the slice
// (as the bitmask kernel below does) was slower than these blocks for dense weights.
void dense_vnni(const Weight& w, float* acc, const int64_t* ip, const int8_t* qv,
                const float* qs, int64_t j0, int64_t j1, int64_t o0, int64_t o1, int64_t nb,
                int64_t vstride, int64_t qstride, int64_t astride) {
  constexpr int64_t kSteps = kQGroup / 4;
  const auto* values = static_cast<const int8_t*>(w.values);
  const int64_t ng = (j1 - j0 + kQGroup - 1) / kQGroup;
  std::vector<uint32_t> act(static_cast<size_t>(nb * ng * kSteps));
  std::vector<uint64_t> neg(static_cast<size_t>(nb * ng * kSteps));
  std::vector<float> s(static_cast<size_t>(nb * ng));
  std::vector<int64_t> rows(static_cast<size_t>(ng * kQGroup));
  auto count = [&](int64_t gi) { return std::min(j1 - j0 - gi * kQGroup, kQGroup); };
  for (int64_t gi = 0; gi < ng; ++gi) {
    const int64_t g0 = j0 + gi * kQGroup, cnt = count(gi);
    for (int64_t k = 0; k < kQGroup; ++k) rows[gi * kQGroup + k] = ip[g0 + std::min(k, cnt - 1)];
    for (int64_t r = 0; r < nb; ++r) {
      for (int64_t t = 0; 4 * t < cnt; ++t)
        pack_act(qv + r * vstride + g0 + 4 * t, cnt - 4 * t, act[(r * ng + gi) * kSteps + t],
                 neg[(r * ng + gi) * kSteps + t]);
      s[r * ng + gi] = qs[r * qstride + g0 / kQGroup];
    }
  }
  const int8_t* wr[kQGroup];
  for (int64_t b0 = o0; b0 < o1; b0 += kVnniBlock) {
    const int64_t b1 = std::min(o1, b0 + kVnniBlock), n = b1 - b0, nch = (n + 63) / 64;
    const uint64_t last = low_bytes(n - 64 * (nch - 1));
    for (int64_t gi = 0; gi < ng; ++gi) {
      const int64_t steps = (count(gi) + 3) / 4;
      for (int64_t k = 0; k < 4 * steps; ++k) wr[k] = values + rows[gi * kQGroup + k] * w.out + b0;
      // the rows read after this group: the next group's, or the next block's first
      const bool more = gi + 1 < ng || b1 < o1;
      const int64_t gn = gi + 1 < ng ? gi + 1 : 0, nb0 = gi + 1 < ng ? b0 : b1;
      const int64_t* nrows = rows.data() + gn * kQGroup;
      const int64_t ncnt = count(gn);
      for (int64_t c = 0; c < nch; ++c) {
        if (more)
          for (int64_t k = 0; k < ncnt; ++k)
            _mm_prefetch(reinterpret_cast<const char*>(values + nrows[k] * w.out + nb0 + 64 * c),
                         _MM_HINT_T1);
        const uint64_t keep = c + 1 < nch ? ~0ull : last;
        for (int64_t r0 = 0; r0 < nb; r0 += 4) {
          const int64_t at = (r0 * ng + gi) * kSteps, rs = ng * kSteps;
          const uint32_t* ab = act.data() + at;
          const uint64_t* nm = neg.data() + at;
          const float* sb = s.data() + r0 * ng + gi;
          float* ar = acc + r0 * astride + b0 + 64 * c;
          const int64_t left = n - 64 * c;
          switch (std::min<int64_t>(4, nb - r0)) {
#define SPARSELLM_VNNI(R)                                                                     \
  case R:                                                                                     \
    dense_vnni_chunk<R>(wr, steps, keep, ab, nm, rs, sb, ng, ar, astride, left);              \
    break;
            SPARSELLM_VNNI(1)
            SPARSELLM_VNNI(2)
            SPARSELLM_VNNI(3)
            SPARSELLM_VNNI(4)
#undef SPARSELLM_VNNI
            default:
              break;
          }
        }
        for (int64_t k = 0; k < 4 * steps; ++k) wr[k] += 64;
      }
    }
  }
}

// Bitmask int8 for one activation row (q at qv, group scales at qs; j0, j1 as above):
// four kept rows at a time stream across the whole slice, as the float kernels do, the
// rows PF_ROWS ahead prefetched as far in as these have got; a row's 64 mask bits of a
// chunk expand its next packed values (vpexpandb), the int32 sums wait in a buffer of the
// slice and fold into fp32 after each group. Why not dense_vnni's blocks: on the default
// model (AMD EPYC, 2 threads) they decoded 50% sparse-int8 at 0.98x of the float
// kernels' dense int8, this kernel at 1.10x (one alternated scratch run).
void sparse_vnni_row(const Weight& w, float* acc, const int64_t* ip, const int8_t* qv,
                     const float* qs, int64_t j0, int64_t j1, int64_t o0, int64_t o1) {
  const int64_t n = o1 - o0, nch = (n + 63) / 64, out = w.out;
  // the slice's last chunk reads only its own mask bytes (n is a multiple of 16)
  const __mmask16 tail = static_cast<__mmask16>((1u << ((n - 64 * (nch - 1)) / 8)) - 1);
  const auto* base = static_cast<const uint8_t*>(w.values);
  thread_local std::vector<int32_t> buf;
  if (static_cast<int64_t>(buf.size()) < nch * 64) buf.resize(static_cast<size_t>(nch * 64));
  int32_t* ib = buf.data();
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t g0 = j0; g0 < j1; g0 += kQGroup) {
    const int64_t g1 = std::min(j1, g0 + kQGroup);
    std::fill_n(ib, nch * 64, 0);
    for (int64_t j = g0; j < g1; j += 4) {
      const int64_t cnt = std::min<int64_t>(4, g1 - j);
      const uint8_t* p[4];
      const uint8_t* m[4];
      for (int64_t k = 0; k < 4; ++k) {
        const int64_t i = ip[j + std::min(k, cnt - 1)];
        p[k] = base + sparse_start(w, i, o0);
        m[k] = w.mask + i * (out / 8) + o0 / 8;
      }
      uint32_t word;
      uint64_t neg;
      pack_act(qv + j, cnt, word, neg);
      const __m512i a = _mm512_set1_epi32(static_cast<int>(word));
      const bool fetch = j + PF_ROWS + 4 <= j1;
      const uint8_t* next[4] = {p[0], p[0], p[0], p[0]};
      if (fetch) {
        for (int k = 0; k < 4; ++k) {
          const int64_t i = ip[j + PF_ROWS + k];
          next[k] = base + sparse_start(w, i, o0);
          const uint8_t* nm = w.mask + i * (out / 8) + o0 / 8;
          for (int64_t b = 0; b < n / 8; b += 64)
            _mm_prefetch(reinterpret_cast<const char*>(nm + b), _MM_HINT_T0);
        }
      }
      const uint8_t* const start0 = p[0];
      auto load = [&](int k, int64_t c) {
        const uint64_t mk =
            c + 1 < nch ? *reinterpret_cast<const uint64_t*>(m[k] + 8 * c)
                        : static_cast<uint64_t>(_mm_cvtsi128_si64(_mm_maskz_loadu_epi8(tail, m[k] + 8 * c)));
        const int64_t pc = __builtin_popcountll(mk);
        // only the chunk's own values: the packed stream's padding is shorter than 64
        const __m512i v = _mm512_maskz_loadu_epi8(low_bytes(pc), p[k]);
        p[k] += pc;
        return _mm512_maskz_expand_epi8(mk, v);
      };
      for (int64_t c = 0; c < nch; ++c) {
        if (fetch) prefetch4(next, p[0] - start0);
        __m512i u[4];
        interleave4(load(0, c), load(1, c), load(2, c), load(3, c), u);
        int32_t* q = ib + 64 * c;
        for (int v = 0; v < 4; ++v) {
          const __m512i wv = _mm512_mask_sub_epi8(u[v], neg, zero, u[v]);
          _mm512_storeu_si512(q + 16 * v,
                              _mm512_dpbusd_epi32(_mm512_loadu_si512(q + 16 * v), a, wv));
        }
      }
    }
    for (int64_t c = 0; c < nch; ++c) {
      const __m512i sum[4] = {_mm512_loadu_si512(ib + 64 * c), _mm512_loadu_si512(ib + 64 * c + 16),
                              _mm512_loadu_si512(ib + 64 * c + 32), _mm512_loadu_si512(ib + 64 * c + 48)};
      fold_chunk(sum, qs[g0 / kQGroup], acc + o0 + 64 * c, n - 64 * c);
    }
  }
}

// How far ahead the tile kernels prefetch, in dense tiles (4 KB), into L2. On an AMD
// EPYC (2 threads, the default model's 120 block projections in a row, cold) dense int8
// tiles ran at 24-26 GB/s with it and ~20 with the same prefetch into L1 or with none;
// 4 to 64 tiles ahead ran alike.
constexpr int64_t kPfTiles = 8;

// One row's quantized activations of a group (cnt <= kQGroup of them at q, scale s) as
// the tile kernels multiply them: step t's four (signed) bytes broadcast to every lane,
// the offset * sum q that the weights' unsigned offset (int8 128, int4 8) adds to each
// output, and the scale.
inline void group_activations(const int8_t* q, int64_t cnt, float s, int32_t offset, __m512i* a,
                              __m512i& corr, __m512& sc) {
  int32_t sum = 0;
  for (int64_t t = 0; t < kQGroup / 4; ++t) {
    uint32_t word = 0;
    for (int64_t k = 0; k < 4 && 4 * t + k < cnt; ++k) {
      word |= static_cast<uint32_t>(static_cast<uint8_t>(q[4 * t + k])) << (8 * k);
      sum += q[4 * t + k];
    }
    a[t] = _mm512_set1_epi32(static_cast<int>(word));
  }
  corr = _mm512_set1_epi32(offset * sum);
  sc = _mm512_set1_ps(s);
}

// Step t of a tile as the 64 bytes vpdpbusd multiplies: a dense tile's as they lie at
// p + 64t; a bitmask tile's packed values at p (advanced past them) expanded to its 64
// mask bits mk[t], 128 (weight 0) where a bit is clear. The expansion loads a full 64
// bytes: what lies past the step's values is not expanded (the buffer ends with 64
// bytes of padding).
inline __m512i tile_step(const uint8_t*& p, const uint64_t* mk, int64_t t, bool sparse) {
  if (!sparse) return _mm512_loadu_si512(p + 64 * t);
  const __m512i v = _mm512_mask_expand_epi8(_mm512_set1_epi8(static_cast<char>(128)), mk[t],
                                            _mm512_loadu_si512(p));
  p += __builtin_popcountll(mk[t]);
  return v;
}

// One tile (the chunk of 16 outputs whose tile starts at p) times R activation rows,
// folded into acc: y[r] += sc[r] * (sum over the tile - corr[r]). A step's 64 bytes are
// what vpdpbusd multiplies as they lie (dense), or its 64 mask bits expand its packed
// values (vpexpandb, 128 where a bit is clear: weight 0) into them (bitmask). Why NP
// sums a row: one vpdpbusd waits for the previous one's result (5 cycles on an AMD
// EPYC), so a single chain of 8 per tile ran at a third of the loads' pace; integer
// sums in any order are the same, so this changes no bit.
//
// kNib (int4, half-size tiles): a step's 64 bytes hold two int8 steps' bytes, step 2t in
// the low nibbles and 2t + 1 in the high ones, each q + 8; `ws` points at the tile's 16
// outputs' scales of its weight group, which multiply the activation scale.
template <int R, bool kSparse, bool kNib>
inline void tile_dot(const uint8_t* p, const __m512i (*a)[kQGroup / 4], const __m512i* corr,
                      const __m512* sc, const float* ws, float* acc, int64_t astride,
                      __mmask16 k) {
  constexpr int NP = R >= 4 ? 1 : 4 / R;
  constexpr int64_t kBytes = kNib ? kTileBytes / 2 : kTileBytes;
  for (int64_t f = 0; f < kBytes; f += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p + kPfTiles * kBytes + f), _MM_HINT_T1);
  __m512i sum[R][NP];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NP; ++i) sum[r][i] = _mm512_setzero_si512();
  if constexpr (kNib) {
    const __m512i low = _mm512_set1_epi8(15);
    for (int t = 0; t < kQGroup / 8; ++t) {
      const __m512i v = _mm512_loadu_si512(p + 64 * t);
      const __m512i lo = _mm512_and_si512(v, low);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      for (int r = 0; r < R; ++r) {
        sum[r][(2 * t) % NP] = _mm512_dpbusd_epi32(sum[r][(2 * t) % NP], lo, a[r][2 * t]);
        sum[r][(2 * t + 1) % NP] =
            _mm512_dpbusd_epi32(sum[r][(2 * t + 1) % NP], hi, a[r][2 * t + 1]);
      }
    }
  } else {
    const auto* mk = reinterpret_cast<const uint64_t*>(p);
    if constexpr (kSparse) p += 64;
    for (int t = 0; t < kQGroup / 4; ++t) {
      const __m512i v = tile_step(p, mk, t, kSparse);
      for (int r = 0; r < R; ++r)
        sum[r][t % NP] = _mm512_dpbusd_epi32(sum[r][t % NP], v, a[r][t]);
    }
  }
  __m512 wsv = _mm512_set1_ps(1.0f);
  if constexpr (kNib) wsv = _mm512_maskz_loadu_ps(k, ws);
  for (int r = 0; r < R; ++r) {
    __m512i total = sum[r][0];
    for (int i = 1; i < NP; ++i) total = _mm512_add_epi32(total, sum[r][i]);
    float* y = acc + r * astride;
    const __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(total, corr[r]));
    const __m512 s = kNib ? _mm512_mul_ps(sc[r], wsv) : sc[r];
    _mm512_mask_storeu_ps(y, k, _mm512_fmadd_ps(f, s, _mm512_maskz_loadu_ps(k, y)));
  }
}

// Int8 kinds over `make_tiles`' layout, for rows that keep every channel (ip[j] == j;
// arguments as dense_vnni's, o0 and o1 multiples of 16 or o1 == out). No shuffle, no
// sign fix-up: one vpdpbusd per 64 weight positions, a group's tiles read in address
// order. The weights are stored plus 128 (unsigned), so a step computes sum (w + 128) q
// and the group's sum is that minus 128 * sum q: exactly the int32 that dense_vnni and
// sparse_vnni_row fold, in the same group order, so these give their bits. kNib: int4's
// half-size tiles (q + 8, so minus 8 * sum q), each tile's sum times its weight group's
// scales as well.
template <bool kSparse, bool kNib>
void tiles_vnni(const Weight& w, float* acc, const int8_t* qv, const float* qs, int64_t j0,
                int64_t j1, int64_t o0, int64_t o1, int64_t nb, int64_t vstride,
                int64_t qstride, int64_t astride) {
  constexpr int kRows = 8;  // activation rows per pass over a tile (Decoder steps: <= 8)
  const int64_t chunks = (w.out + 15) / 16;
  for (int64_t g0 = j0; g0 < j1; g0 += kQGroup) {
    const int64_t cnt = std::min(kQGroup, w.in - g0), g = g0 / kQGroup;
    for (int64_t r0 = 0; r0 < nb; r0 += kRows) {
      const int64_t rn = std::min<int64_t>(kRows, nb - r0);
      __m512i a[kRows][kQGroup / 4];
      __m512i corr[kRows];
      __m512 sc[kRows];
      for (int64_t r = 0; r < rn; ++r)
        group_activations(qv + (r0 + r) * vstride + g0, cnt, qs[(r0 + r) * qstride + g],
                          kNib ? 8 : 128, a[r], corr[r], sc[r]);
      // int4: the scales of the weight group these rows are in (group % kQGroup == 0)
      const float* ws = kNib ? w.scale + g0 / w.group * w.out : nullptr;
      for (int64_t o = o0; o < o1; o += 16) {
        const uint8_t* p = tile_start(w, g * chunks + o / 16);
        const __mmask16 k = o1 - o >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (o1 - o)) - 1);
        float* y = acc + r0 * astride + o;
        switch (rn) {
#define SPARSELLM_TILE(R) \
  tile_dot<R, kSparse, kNib>(p, a, corr, sc, kNib ? ws + o : nullptr, y, astride, k)
          SPARSELLM_CASES_1_TO_8(SPARSELLM_TILE)
#undef SPARSELLM_TILE
          default:
            break;
        }
      }
    }
  }
}

// Rows kQGroup g .. of W^T, fp32 times the row scales, from a weight's tiles into tp
// (in, out): what `dequantize` gives from the rows, bit for bit (a weight whose rows
// were released still serves prompts, which run as matmuls over it).
void dequantize_tile_group(const Weight& w, int64_t g, float* tp) {
  const int64_t chunks = (w.out + 15) / 16;
  const bool sparse = w.kind == kSI8;
  if (w.kind == kI4) {  // nibbles q + 8 times the weight group's scales
    const float* ws = w.scale + kQGroup * g / w.group * w.out;
    for (int64_t o = 0; o < w.out; o += 16) {  // int4: out % 16 == 0
      const __m512 sc = _mm512_loadu_ps(ws + o);
      const uint8_t* p = tile_start(w, g * chunks + o / 16);
      for (int64_t i = kQGroup * g; i < std::min(w.in, kQGroup * (g + 1)); ++i) {
        // lane l's 32 bits hold output l's bytes: row at's byte at % 4, nibble by shift
        const int64_t at = i % kQGroup;
        const int shift = 8 * static_cast<int>(at % 4) + i4_tile_shift(at);
        const __m512i v = _mm512_loadu_si512(p + i4_tile_byte(at) - at % 4);
        const __m512i b = _mm512_and_si512(_mm512_srli_epi32(v, static_cast<unsigned>(shift)),
                                           _mm512_set1_epi32(15));
        const __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(b, _mm512_set1_epi32(8)));
        _mm512_storeu_ps(tp + i * w.out + o, _mm512_mul_ps(f, sc));
      }
    }
    return;
  }
  for (int64_t o = 0; o < w.out; o += 16) {
    const __mmask16 k = w.out - o >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (w.out - o)) - 1);
    const __m512 sc = _mm512_maskz_loadu_ps(k, w.scale + o);
    const uint8_t* p = tile_start(w, g * chunks + o / 16);
    const auto* mk = reinterpret_cast<const uint64_t*>(p);
    if (sparse) p += 64;
    for (int64_t st = 0; st < kQGroup / 4; ++st) {
      const __m512i v = tile_step(p, mk, st, sparse);
      for (int64_t r = 0; r < 4 && kQGroup * g + 4 * st + r < w.in; ++r) {
        // byte r of each lane is row 4st + r's weight of one output, plus 128
        const __m512i b = _mm512_and_si512(_mm512_srlv_epi32(v, _mm512_set1_epi32(8 * r)),
                                           _mm512_set1_epi32(0xFF));
        const __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(b, _mm512_set1_epi32(128)));
        _mm512_mask_storeu_ps(tp + (kQGroup * g + 4 * st + r) * w.out + o, k,
                              _mm512_mul_ps(f, sc));
      }
    }
  }
}

// The VNNI kernels of an int8 / bitmask-int8 weight, or of an int4 one's tiles (arguments
// as dense_vnni's; `every`: the rows keep every channel, so tiles serve them where the
// weight has them); false for other kinds. The bitmask row kernel takes rows one at a
// time: a batch re-reads them.
bool int8_vnni(const Weight& w, float* acc, const int64_t* ip, const int8_t* qv,
               const float* qs, int64_t j0, int64_t j1, int64_t o0, int64_t o1, int64_t nb,
               int64_t vstride, int64_t qstride, int64_t astride, bool every) {
  if (w.kind == kI8 && w.tiles && every) {
    tiles_vnni<false, false>(w, acc, qv, qs, j0, j1, o0, o1, nb, vstride, qstride, astride);
  } else if (w.kind == kSI8 && w.tiles && every) {
    tiles_vnni<true, false>(w, acc, qv, qs, j0, j1, o0, o1, nb, vstride, qstride, astride);
  } else if (w.kind == kI4 && w.tiles && every) {
    tiles_vnni<false, true>(w, acc, qv, qs, j0, j1, o0, o1, nb, vstride, qstride, astride);
  } else if (w.kind == kI8) {
    dense_vnni(w, acc, ip, qv, qs, j0, j1, o0, o1, nb, vstride, qstride, astride);
  } else if (w.kind == kSI8) {
    for (int64_t r = 0; r < nb; ++r)
      sparse_vnni_row(w, acc + r * astride, ip, qv + r * vstride, qs + r * qstride, j0, j1,
                      o0, o1);
  } else {
    return false;
  }
  return true;
}

#pragma GCC pop_options
#endif  // SPARSELLM_X86

void rows(const Weight& w, float* acc, const int64_t* ip, const float* vp, int64_t j0,
          int64_t j1, int64_t o0, int64_t o1) {
#if SPARSELLM_X86
  if (g_vbmi2 && sparse_avx512(w, acc, ip, vp, j0, j1, o0, o1)) return;
  if (g_avx512 && !sparse_kind(w.kind) && w.kind != kI4) {
    o0 = dense_avx512(w, acc, ip, vp, j0, j1, o0, o1);
    if (o0 == o1) return;
  }
  if (g_avx2) {
    // dense AVX2 loops stop at the last multiple of 8; finish the tail portably
    rows_avx2(w, acc, ip, vp, j0, j1, o0, o1);
    const int64_t o8 = o0 + (o1 - o0) / 8 * 8;
    if (o8 < o1 && !sparse_kind(w.kind) && w.kind != kI4)
      rows_portable(w, acc, ip, vp, j0, j1, o8, o1);
    return;
  }
#endif
  rows_portable(w, acc, ip, vp, j0, j1, o0, o1);
}

// Floats of one output slice's accumulators (nb rows) plus a fp32 group's four weight
// rows in `rows_multi`: 24 KB, within L1.
constexpr int64_t kMultiL1Floats = 6144;

// `rows` for nb activation rows that keep the same channels (ip shared; row r's values at
// vp + r * vstride, its accumulator at acc + r * astride): dense kinds read each weight
// once for all rows (AVX-512 tiles, else AVX2 slices), other kinds and the portable path
// run row by row. Either way a row's result is the one `rows` gives it alone.
void rows_multi(const Weight& w, float* acc, const int64_t* ip, const float* vp, int64_t j0,
                int64_t j1, int64_t o0, int64_t o1, int64_t nb, int64_t vstride,
                int64_t astride) {
#if SPARSELLM_X86
  if (g_avx512) {  // dense kinds: one row streams, several go through the tiles
    o0 = nb > 1 ? dense_tiles(w, acc, ip, vp, j0, j1, o0, o1, nb, vstride, astride)
                : dense_avx512(w, acc, ip, vp, j0, j1, o0, o1);
    if (o0 == o1) return;  // what is left: the last 8 outputs, or a kind without them
  }
  // Several rows on AVX2: outputs in slices whose accumulators (nb rows) and current
  // weight rows stay in L1; a slice changes the loop order, not any output's arithmetic.
  const int64_t slice =
      nb > 1 ? std::max<int64_t>(64, kMultiL1Floats / (nb + 4) / 16 * 16) : o1 - o0;
  bool done = g_avx2;
  for (int64_t a = o0; done && a < o1; a += slice)
    done = dense_multi_avx2(w, acc, ip, vp, j0, j1, a, std::min(o1, a + slice), nb, vstride,
                            astride);
  if (done) {
    const int64_t o8 = o0 + (o1 - o0) / 8 * 8;
    if (o8 < o1)
      for (int64_t r = 0; r < nb; ++r)
        rows_portable(w, acc + r * astride, ip, vp + r * vstride, j0, j1, o8, o1);
    return;
  }
#endif
  for (int64_t r = 0; r < nb; ++r)
    rows(w, acc + r * astride, ip, vp + r * vstride, j0, j1, o0, o1);
}

// Reusable buffers of one caller (the Decoder keeps one; a plain call makes its own):
// the decode step then allocates nothing per projection.
struct Scratch {
  std::vector<int64_t> idx;
  std::vector<float> val;
  std::vector<int64_t> start;
  std::vector<float> part;
  std::vector<int8_t> q;       // VNNI path: val quantized per group of kQGroup
  std::vector<float> qs;       // and each group's scale
  std::vector<int64_t> gstart; // row r's first group in qs
};

// Quantize each row's kept values per group of kQGroup (counted from the row's first
// kept channel): q = round-half-even(v * 127 / max |v|), scale = max |v| / 127 (0 for
// an all-zero group). Fills s.q, s.qs, s.gstart for the b rows starting at st.
void quantize_groups(int64_t b, const int64_t* st, Scratch& s) {
  s.q.resize(s.val.size());
  s.gstart.assign(static_cast<size_t>(b + 1), 0);
  for (int64_t r = 0; r < b; ++r)
    s.gstart[r + 1] = s.gstart[r] + (st[r + 1] - st[r] + kQGroup - 1) / kQGroup;
  s.qs.resize(static_cast<size_t>(s.gstart[b]));
  for (int64_t r = 0; r < b; ++r) {
    for (int64_t g = 0; st[r] + g * kQGroup < st[r + 1]; ++g) {
      const int64_t j0 = st[r] + g * kQGroup, j1 = std::min(st[r + 1], j0 + kQGroup);
      float amax = 0.0f;
      for (int64_t j = j0; j < j1; ++j) amax = std::max(amax, std::fabs(s.val[j]));
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      for (int64_t j = j0; j < j1; ++j)
        s.q[j] = static_cast<int8_t>(std::nearbyint(s.val[j] * inv));
      s.qs[s.gstart[r] + g] = amax / 127.0f;
    }
  }
}

// The shared GEMV: x (b, in) row-major, w packed W^T (in, out). thr < 0 keeps every
// channel. Writes y (b, out) with bias added; returns the number of kept (row, channel)
// pairs.
int64_t gemv_into(const float* xp, int64_t b, const Weight& w, const float* sp, float thr,
                  const float* bias, float* yp, Scratch& s) {
  const int64_t in = w.in, out = w.out;
  TORCH_CHECK(w.values || (g_vnni && thr < 0),
              "this weight keeps only its VNNI tiles (rows released): it serves calls that keep "
              "every channel on the avx512vnni kernels");
  // every channel kept (a dense call): all rows share the channel list, so they go
  // through the kernels together and the weights are read once (see rows_multi)
  const bool shared = thr < 0;
  // 16 entries of slack for select_avx512's whole-vector stores
  s.idx.resize(static_cast<size_t>(b * in + 16));
  s.val.resize(static_cast<size_t>(b * in + 16));
  s.start.assign(static_cast<size_t>(b + 1), 0);
  int64_t n = 0;
  if (shared) {  // the kernels read only the first row's channel list: 0 .. in - 1
    for (int64_t i = 0; i < in; ++i) s.idx[i] = i;
    std::copy_n(xp, b * in, s.val.data());
    n = b * in;
    for (int64_t r = 0; r < b; ++r) s.start[r + 1] = (r + 1) * in;
  }
  for (int64_t r = 0; r < b && !shared; ++r) {
    const float* xr = xp + r * in;
#if SPARSELLM_X86
    if (g_avx512) {
      n += select_avx512(xr, in, sp, thr, s.idx.data() + n, s.val.data() + n);
      s.start[r + 1] = n;
      continue;
    }
#endif
    for (int64_t i = 0; i < in; ++i) {
      const float v = xr[i];
      if (std::fabs(v) * (sp ? sp[i] : 1.0f) > thr) {
        s.idx[n] = i;
        s.val[n++] = v;
      }
    }
    s.start[r + 1] = n;
  }
  const int64_t* ip = s.idx.data();
  const float* vp = s.val.data();
  const int64_t* st = s.start.data();
  const int nt = at::get_num_threads();
#if SPARSELLM_X86
  // int4 only through its tiles, which calls that skip channels do not use
  const bool a8 =
      g_vnni && (w.kind == kI8 || w.kind == kSI8 || (w.kind == kI4 && w.tiles && shared));
#else
  const bool a8 = false;
#endif
  if (a8) quantize_groups(b, st, s);
  // The kernels over kept rows [j0, j1) of row r (row-relative; with `shared`, of every
  // row at once), outputs [o0, o1), into acc (row r's at acc + r * out when shared).
  auto run = [&](int64_t r, float* acc, int64_t j0, int64_t j1, int64_t o0, int64_t o1) {
#if SPARSELLM_X86
    if (a8) {
      const int64_t nb = shared ? b : 1, row = shared ? 0 : r;
      int8_vnni(w, acc, ip + st[row], s.q.data() + st[row], s.qs.data() + s.gstart[row], j0,
                j1, o0, o1, nb, in, s.gstart[1] - s.gstart[0], out, shared);
      return;
    }
#endif
    if (shared) rows_multi(w, acc, ip, vp, j0, j1, o0, o1, b, in, out);
    else rows(w, acc, ip + st[r], vp + st[r], j0, j1, o0, o1);
  };
  // rows split over threads in tasks of `grain` kept rows (a whole number of activation
  // groups on the VNNI path, so each group's scale applies to its complete sum)
  const int64_t grain = a8 ? kQGroup : 32;
  const int64_t n_rows = shared ? 1 : b;
  // y[r, o0 .. o1) = its sum times the int8 row scales, plus the bias
  auto finish = [&](int64_t o0, int64_t o1) {
    for (int64_t r = 0; r < b; ++r) {
      float* yr = yp + r * out;
      if (row_scaled(w.kind))
        for (int64_t o = o0; o < o1; ++o) yr[o] *= w.scale[o];
      if (bias)
        for (int64_t o = o0; o < o1; ++o) yr[o] += bias[o];
    }
  };
  if (out >= kOutSplit * nt) {
    // Wide output: each thread owns an equal run of kUnit-wide slices of y, no reduction;
    // it also zeroes and finishes its own slices (an LM head's y is 49152 floats a row).
    const int64_t n_units = (out + kUnit - 1) / kUnit;
    at::parallel_for(0, n_units, 1, [&](int64_t c0, int64_t c1) {
      const int64_t o0 = c0 * kUnit, o1 = std::min(out, c1 * kUnit);
      for (int64_t r = 0; r < b; ++r) std::fill(yp + r * out + o0, yp + r * out + o1, 0.0f);
      for (int64_t r = 0; r < n_rows; ++r)
        run(r, yp + r * out, 0, shared ? in : st[r + 1] - st[r], o0, o1);
      finish(o0, o1);
    });
    return n;
  }
  {
    // Narrow output (e.g. down_proj, 576 wide): threads split the kept rows, each into
    // its own full-width partial sum, added at the end (out floats per thread: a few KB).
    s.part.assign(static_cast<size_t>(nt) * b * out, 0.0f);
    float* part = s.part.data();
    for (int64_t r = 0; r < n_rows; ++r) {
      const int64_t kept = shared ? in : st[r + 1] - st[r];
      at::parallel_for(0, (kept + grain - 1) / grain, 1, [&](int64_t t0, int64_t t1) {
        float* acc = part + (static_cast<int64_t>(at::get_thread_num()) * b + r) * out;
        run(r, acc, t0 * grain, std::min(kept, t1 * grain), 0, out);
      });
    }
    std::copy_n(part, b * out, yp);
    for (int t = 1; t < nt; ++t)
      for (int64_t k = 0; k < b * out; ++k) yp[k] += part[static_cast<size_t>(t) * b * out + k];
  }
  finish(0, out);
  return n;
}

// y = x * rsqrt(mean(x^2) + eps) * w, row by row (fp32, as HF's RMSNorm computes it).
void rms_norm(const float* xp, int64_t b, int64_t n, const float* wp, double eps, float* yp) {
  for (int64_t r = 0; r < b; ++r) {
    const float* xr = xp + r * n;
    float ss = 0.0f;
    for (int64_t i = 0; i < n; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + static_cast<float>(eps));
    for (int64_t i = 0; i < n; ++i) yp[r * n + i] = wp[i] * (xr[i] * inv);
  }
}

}  // namespace

// A packed W^T and the tensors it points into (kept alive here). Built by
// sparsellm.runtime.kernels.native_weight from a formats.Packed, which has already been
// validated; the checks below guard against misuse from Python.
struct PackedWeight {
  torch::Tensor values, scale, mask, offsets;
  torch::Tensor units;  // bitmask kinds (in, n_units): row i's start at output u * kUnit
  torch::Tensor tiles, tile_at;  // int8 kinds and int4 on VNNI CPUs (see make_tiles)
  Weight w;

  // Int8 kinds (and int4 whose group is a multiple of kQGroup) rearranged for the tile
  // kernels: a second copy of the weight until `release_rows` drops the row layout. Per
  // group of kQGroup rows and 16 outputs (group-major), a tile of kQGroup / 4 steps of 64
  // bytes: byte 4l + r of step t is W^T[kQGroup g + 4t + r, 16c + l] + 128 (128, weight
  // 0, past the edge). Int4 tiles are half the size: byte 4l + r of step t holds rows
  // 8t + r (low nibble) and 8t + 4 + r (high) of output 16c + l, each q + 8 (8 past the
  // edge; see i4_tile_byte and tile_dot).
  // Bitmask int8 keeps, per tile, its steps' 64-bit masks (8 x 8 bytes) followed by the
  // set positions' bytes in order, the tile's start in tile_at.
  void make_tiles() {
    const int64_t groups = (w.in + kQGroup - 1) / kQGroup, chunks = (w.out + 15) / 16;
    const int64_t n_tiles = groups * chunks, out = w.out;
    if (w.kind == kI4) {
      tiles = torch::full({n_tiles * kTileBytes / 2}, 0x88, torch::kByte);  // 8: weight 0
      uint8_t* t = tiles.data_ptr<uint8_t>();
      const auto* v = static_cast<const uint8_t*>(w.values);
      // a task owns whole groups: the two rows that share a byte are in one group
      at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
        for (int64_t i = g0 * kQGroup; i < std::min(w.in, g1 * kQGroup); ++i) {
          const int64_t at = i % kQGroup;
          const int shift = i4_tile_shift(at);
          uint8_t* d = t + i / kQGroup * chunks * (kTileBytes / 2) + i4_tile_byte(at);
          for (int64_t o = 0; o < out; ++o) {
            uint8_t& b = d[o / 16 * (kTileBytes / 2) + 4 * (o % 16)];
            b = static_cast<uint8_t>((b & ~(15 << shift)) |
                                     (i4_row_nibble(v + i * (out / 2), o) << shift));
          }
        }
      });
      w.tiles = t;
      return;
    }
    const bool sparse = w.kind == kSI8;
    // W^T[i, 16c + l] lies at row_at(i) + kTileBytes * c + 4 * l
    auto row_at = [&](int64_t i) {
      return i / kQGroup * chunks * kTileBytes + 64 * ((i % kQGroup) / 4) + i % 4;
    };
    // dense int8 fills its tiles in place; bitmask fills a dense image and marks its set
    // bytes, then packs both
    std::vector<uint8_t> image(sparse ? static_cast<size_t>(n_tiles * kTileBytes) : 0, 128);
    std::vector<uint8_t> set(image.size(), 0);
    if (!sparse) tiles = torch::full({n_tiles * kTileBytes}, 128, torch::kByte);
    uint8_t* dense = sparse ? image.data() : tiles.data_ptr<uint8_t>();
    const auto* v = static_cast<const int8_t*>(w.values);
    const int64_t n_values = values.numel();
    at::parallel_for(0, w.in, 64, [&](int64_t i0, int64_t i1) {  // rows fill disjoint bytes
      for (int64_t i = i0; i < i1; ++i) {
        uint8_t* d = dense + row_at(i);
        if (!sparse) {
          for (int64_t o = 0; o < out; ++o)
            d[o / 16 * kTileBytes + 4 * (o % 16)] = static_cast<uint8_t>(v[i * out + o] + 128);
          continue;
        }
        uint8_t* f = set.data() + row_at(i);
        const uint8_t* m = w.mask + i * (out / 8);  // set bits take the row's values in turn
        int64_t p = sparse_start(w, i, 0);
        for (int64_t o = 0; o < out; o += 8)
          for (unsigned mb = m[o / 8]; mb; mb &= mb - 1, ++p) {
            const int64_t oo = o + __builtin_ctz(mb), at = oo / 16 * kTileBytes + 4 * (oo % 16);
            TORCH_CHECK(p < n_values, "the mask sets more weights than there are values");
            d[at] = static_cast<uint8_t>(v[p] + 128);
            f[at] = 1;
          }
      }
    });
    if (!sparse) {
      w.tiles = dense;
      return;
    }
    // per tile: 8 masks of 8 bytes, then its set positions' bytes in order
    tile_at = torch::empty({n_tiles}, torch::kLong);
    int64_t* ta = tile_at.data_ptr<int64_t>();
    at::parallel_for(0, n_tiles, 256, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k)
        ta[k] = 64 + std::count(set.begin() + k * kTileBytes,
                                set.begin() + (k + 1) * kTileBytes, 1);
    });
    int64_t total = 0;
    for (int64_t k = 0; k < n_tiles; ++k) {  // sizes to starts
      const int64_t size = ta[k];
      ta[k] = total;
      total += size;
    }
    tiles = torch::zeros({total + 64}, torch::kByte);  // + 64: tiles_vnni's full last load
    uint8_t* t = tiles.data_ptr<uint8_t>();
    at::parallel_for(0, n_tiles, 256, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        uint8_t* vals = t + ta[k] + 64;
        for (int64_t st = 0; st < kQGroup / 4; ++st) {
          uint64_t m = 0;
          for (int64_t b = 0; b < 64; ++b) {
            const size_t at = static_cast<size_t>(k * kTileBytes + 64 * st + b);
            if (!set[at]) continue;
            m |= 1ull << b;
            *vals++ = dense[at];
          }
          std::memcpy(t + ta[k] + 8 * st, &m, 8);
        }
      }
    });
    w.tiles = t;
    w.tile_at = ta;
  }

  // Per row, the packed-value start of every kUnit outputs: the stored chunk start plus
  // the mask bits before it, checked against the next stored chunk start.
  void derive_units(const int64_t* stored, int64_t n_chunks) {
    const int64_t out = w.out, per_chunk = kChunk / kUnit;
    w.n_units = (out + kUnit - 1) / kUnit;
    units = torch::empty({w.in, w.n_units}, torch::kLong);
    int64_t* up = units.data_ptr<int64_t>();
    for (int64_t i = 0; i < w.in; ++i) {
      const uint8_t* m = w.mask + i * (out / 8);
      int64_t p = stored[i * n_chunks];
      for (int64_t u = 0; u < w.n_units; ++u) {
        if (u % per_chunk == 0)
          TORCH_CHECK(p == stored[i * n_chunks + u / per_chunk],
                      "offsets do not match the mask");
        up[i * w.n_units + u] = p;
        for (int64_t b = u * kUnit / 8; b < std::min(out, (u + 1) * kUnit) / 8; ++b)
          p += __builtin_popcount(m[b]);
      }
    }
    w.offsets = up;
  }

  // `with_tiles`: also lay int8 kinds and int4 out for tiles_vnni (where the VNNI kernels
  // are in use), for a weight whose decode calls keep every input channel.
  PackedWeight(int64_t kind, int64_t out, int64_t in, int64_t group, torch::Tensor values_,
               torch::Tensor scale_, torch::Tensor mask_, torch::Tensor offsets_,
               bool with_tiles)
      : values(values_.contiguous()), scale(scale_.contiguous()), mask(mask_.contiguous()),
        offsets(offsets_.contiguous()) {
    TORCH_CHECK(kind >= kF32 && kind <= kSI4, "unknown kind ", kind);
    TORCH_CHECK(out > 0 && in > 0, "empty weight");
    w.kind = kind;
    w.in = in;
    w.out = out;
    w.group = group;
    w.values = values.data_ptr();
    if (kind == kI8 || kind == kSI8 || kind == kI4 || kind == kSI4) {
      TORCH_CHECK(scale.scalar_type() == torch::kFloat, "fp32 scales expected");
      w.scale = scale.data_ptr<float>();
    }
    if (kind == kI4 || kind == kSI4) {  // the kernels read 16 outputs' nibbles at a time
      TORCH_CHECK(group > 0, "int4 needs a group");
      TORCH_CHECK(out % 16 == 0, "int4 needs out % 16 == 0");
    }
    if (kind == kI8 || kind == kSI8) {  // the VNNI kernels negate weights: -128 has no negative
      TORCH_CHECK(values.scalar_type() == torch::kChar || values.scalar_type() == torch::kByte,
                  "int8 values expected");
      const auto* v = static_cast<const int8_t*>(w.values);
      bool ok = true;
      for (int64_t k = 0; k < values.numel(); ++k) ok &= v[k] != -128;
      TORCH_CHECK(ok, "int8 values must be in [-127, 127]");
    }
    if (sparse_kind(kind)) {
      TORCH_CHECK(out % 16 == 0, "sparse kinds need out % 16 == 0");
      TORCH_CHECK(mask.scalar_type() == torch::kByte && mask.numel() == in * (out / 8),
                  "mask (in, out / 8) uint8 expected");
      TORCH_CHECK(offsets.scalar_type() == torch::kLong && offsets.dim() == 2 &&
                      offsets.size(0) == in && offsets.size(1) == (out + kChunk - 1) / kChunk,
                  "offsets (in, chunks) int64 expected");
      w.mask = mask.data_ptr<uint8_t>();
      derive_units(offsets.data_ptr<int64_t>(), offsets.size(1));
    } else {
      const int64_t per_row = kind == kF32 ? 4 * out : kind == kBF16 ? 2 * out
                              : kind == kI8 ? out : out / 2;
      TORCH_CHECK(values.numel() * values.element_size() == in * per_row,
                  "values do not match the weight's shape");
    }
    if ((kind == kI8 || kind == kSI8 || (kind == kI4 && group % kQGroup == 0)) && with_tiles &&
        g_vnni)
      make_tiles();
  }

  // Drop the row layout once tiles exist: the weight then serves the VNNI kernels' calls
  // that keep every channel, and `dequantize`, from one copy in RAM.
  void release_rows() {
    TORCH_CHECK(w.tiles, "no tiles: release_rows needs a weight built with tiles on VNNI");
    values = mask = offsets = units = torch::Tensor();
    w.values = nullptr;
    w.mask = nullptr;
    w.offsets = nullptr;
  }
};

float* ptr_or_null(const torch::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

// y (b, out) = x (b, in) W^T with inputs below the threshold skipped; (y, kept pairs).
std::tuple<torch::Tensor, int64_t> gemv(const torch::Tensor& x, const PackedWeight& pw,
                                        const torch::Tensor& act_scale, double threshold,
                                        const torch::Tensor& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "x (b, in) fp32 expected");
  TORCH_CHECK(x.size(1) == pw.w.in, "x has ", x.size(1), " inputs, the weight ", pw.w.in);
  const auto xc = x.contiguous();
  const int64_t b = xc.size(0);
  auto y = torch::empty({b, pw.w.out}, xc.options());
  Scratch s;
  const int64_t kept = gemv_into(xc.data_ptr<float>(), b, pw.w, ptr_or_null(act_scale),
                                 static_cast<float>(threshold), ptr_or_null(bias),
                                 y.data_ptr<float>(), s);
  return {y, kept};
}

// W^T (in, out) in fp32: every row through the same kernels with x = 1 (prompts run as
// matmuls over this, "load sparse, compute dense"; the tensor lives for one call).
torch::Tensor dequantize(const PackedWeight& pw) {
  const Weight& w = pw.w;
  auto t = torch::zeros({w.in, w.out}, torch::TensorOptions().dtype(torch::kFloat));
  float* tp = t.data_ptr<float>();
#if SPARSELLM_X86
  if (!w.values) {  // rows released: read the tiles (they exist only where VNNI does)
    at::parallel_for(0, (w.in + kQGroup - 1) / kQGroup, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) dequantize_tile_group(w, g, tp);
    });
    return t;
  }
#endif
  at::parallel_for(0, w.in, 16, [&](int64_t i0, int64_t i1) {
    const float one = 1.0f;
    for (int64_t i = i0; i < i1; ++i) {
      float* row = tp + i * w.out;
      rows(w, row, &i, &one, 0, 1, 0, w.out);
      if (row_scaled(w.kind))
        for (int64_t o = 0; o < w.out; ++o) row[o] *= w.scale[o];
    }
  });
  return t;
}

// Rows `ids` of W (out, in), i.e. columns of W^T, fp32 times their scales, read from a
// weight's tiles: a tied LM head whose row layout was released is still the embedding.
torch::Tensor tile_rows(const PackedWeight& pw, const torch::Tensor& ids) {
  const Weight& w = pw.w;
  TORCH_CHECK(w.tiles, "a weight with tiles expected");
  const auto idc = ids.contiguous();
  TORCH_CHECK(idc.scalar_type() == torch::kLong, "int64 ids expected");
  const int64_t n = idc.numel(), chunks = (w.out + 15) / 16;
  const int64_t* id = idc.data_ptr<int64_t>();
  for (int64_t k = 0; k < n; ++k) TORCH_CHECK(id[k] >= 0 && id[k] < w.out, "id out of range");
  auto out = torch::empty({n, w.in}, torch::TensorOptions().dtype(torch::kFloat));
  float* y = out.data_ptr<float>();
  for (int64_t k = 0; k < n; ++k) {
    const int64_t c = id[k] / 16, l = id[k] % 16;
    const float s = w.scale[id[k]];
    for (int64_t i = 0; i < w.in; ++i) {
      const int64_t tile = i / kQGroup * chunks + c, st = (i % kQGroup) / 4, b = 4 * l + i % 4;
      int byte = 128;  // a clear mask bit: weight 0
      const uint8_t* p = tile_start(w, tile);
      if (w.kind == kI4) {  // the row's nibble, times the weight group's scale
        const int64_t at = i % kQGroup;
        const int nib = (p[i4_tile_byte(at) + 4 * l] >> i4_tile_shift(at)) & 15;
        y[k * w.in + i] = static_cast<float>(nib - 8) * w.scale[i / w.group * w.out + id[k]];
        continue;
      }
      if (w.kind == kSI8) {
        const auto* mk = reinterpret_cast<const uint64_t*>(p);
        const uint8_t* vals = p + 64;
        for (int64_t t = 0; t < st; ++t) vals += __builtin_popcountll(mk[t]);
        if ((mk[st] >> b) & 1) byte = vals[__builtin_popcountll(mk[st] & ((1ull << b) - 1))];
      } else {
        byte = p[64 * st + b];
      }
      y[k * w.in + i] = static_cast<float>(byte - 128) * s;
    }
  }
  return out;
}

std::string isa_in_use() {
  return g_vnni ? "avx512vnni" : g_avx512 ? "avx512" : g_avx2 ? "avx2" : "portable";
}

// "auto" (the widest the CPU has), "avx512vnni" (int8 kinds on int8 activations),
// "avx512", "avx2" or "portable"; returns the ISA in use.
std::string set_isa(const std::string& isa) {
  if (isa == "portable") {
    g_avx2 = g_avx512 = g_vbmi2 = g_vnni = false;
  } else if (isa == "auto" || isa == "avx2" || isa == "avx512" || isa == "avx512vnni") {
    g_avx2 = cpu_has_avx2();
    g_avx512 = isa != "avx2" && cpu_has_avx512();
    g_vbmi2 = g_avx512 && cpu_has_vbmi2();
    g_vnni = (isa == "auto" || isa == "avx512vnni") && g_vbmi2 && cpu_has_vnni();
    TORCH_CHECK(isa != "avx2" || g_avx2, "this CPU has no AVX2+FMA");
    TORCH_CHECK(isa != "avx512" || g_avx512, "this CPU has no AVX-512 (F, BW)");
    TORCH_CHECK(isa != "avx512vnni" || g_vnni, "this CPU has no AVX-512 VNNI and VBMI2");
  } else {
    TORCH_CHECK(false, "unknown ISA '", isa, "' (auto, avx512vnni, avx512, avx2, portable)");
  }
  return isa_in_use();
}

// One decode step (one new token per row) through every block of a llama-style model in
// a single call. Why: per token the Python runtime issues ~25 small ATen ops per layer
// around the four projections (norms, RoPE, cache writes, reshapes, SiLU, residuals), at
// ~5-10 us of Python + dispatch each: ~20% of a 135M model's decode step, paid equally
// by dense and sparse, so it dilutes the speedup of skipping. Here they are plain loops
// over buffers the Decoder owns, attention and the final norm included, so a step
// allocates no tensors but its output (attention keeps a score row and an accumulator
// per call). Measured on the default model (every channel
// skipped, so only this overhead is left): 2.3 ms a step when it still called ATen's
// SDPA and allocated its intermediates (perf: SDPA's GEMV, malloc and autograd view
// bookkeeping), 1.1 ms now, against ~11 ms for a 50%-sparse step. Supports what the
// runtime's fast path needs: SiLU- or ReLU-gated MLP, TEAL/WINA thresholds (optionally scaled),
// biases, GQA; everything else (CATS, R-Sparse, CoreInfer) stays on the Python path.
#if SPARSELLM_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
// exp(x) in 16 lanes, for softmax arguments (x <= 0 after the max is subtracted): n =
// round(x / ln 2), r = x - n ln 2 in two parts (Cody-Waite), e^r by Cephes' degree-6
// polynomial, times 2^n (vscalefps); within 2 ulp of expf. Lanes below ln(FLT_MIN), -inf
// (hidden slots) included, give exactly 0. Why: std::exp one slot at a time was the
// largest part of a decode step's attention at 600 slots (perf).
inline __m512 exp16(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_GE_OQ);
  x = _mm512_maskz_mov_ps(live, x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

// The 16 lane sums of a[0..15], lane s holding a[s]'s, each summed with the pairing of
// _mm512_reduce_add_ps (lanes i + 8, then + 4, + 2, + 1; float addition commutes), so a
// score is the same bits as one reduced alone, for a quarter of the shuffles. The
// butterfly leaves slot q + 4p in lane 4q + p; the inputs are read in that order.
inline __m512 reduce16(const __m512* a) {
  __m512 w[8], x[4], z[2];
  auto at = [&](int s) { return a[4 * (s % 4) + s / 4]; };  // input position s: slot
  for (int k = 0; k < 8; ++k) {
    const __m512 u = at(2 * k), v = at(2 * k + 1);
    w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(u, v, 0x44), _mm512_shuffle_f32x4(u, v, 0xEE));
  }
  for (int k = 0; k < 4; ++k) {
    const __m512 u = w[2 * k], v = w[2 * k + 1];
    x[k] = _mm512_add_ps(_mm512_shuffle_f32x4(u, v, 0x88), _mm512_shuffle_f32x4(u, v, 0xDD));
  }
  for (int k = 0; k < 2; ++k) {
    const __m512 u = x[2 * k], v = x[2 * k + 1];
    z[k] = _mm512_add_ps(_mm512_shuffle_ps(u, v, 0x44), _mm512_shuffle_ps(u, v, 0xEE));
  }
  return _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x88), _mm512_shuffle_ps(z[0], z[1], 0xDD));
}

// One (row, head) of Decoder::attend with 16-lane FMAs (d = 16 NV): q . k per visible
// slot, softmax, the weighted sum of v. Scores go 16 slots at a time (reduce16), exp and
// the softmax sum 16 at a time, and v is summed into two interleaved accumulators (even
// and odd slots) so consecutive FMAs do not wait on each other. Why: the portable loops
// compile to 4-lane SSE (the file has no -march), and with one reduction and one scalar
// exp per slot, attention took 2.3 ms of a 6.7 ms int8 decode step at 600 slots on the
// default model, and most of a verification pass's growth with its rows. Rows stay
// batch-invariant: a (row, head) is computed the same way whatever shares the pass.
template <int NV>
void attend_head16(const float* q, const float* K, const float* V, int64_t n,
                   const uint8_t* vis, float scale, float* sc, float* o) {
  constexpr int64_t d = 16 * NV;
  __m512 qv[NV];
  for (int i = 0; i < NV; ++i) qv[i] = _mm512_loadu_ps(q + 16 * i);
  auto dot = [&](const float* kj) {
    __m512 a = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kj));
    for (int i = 1; i < NV; ++i) a = _mm512_fmadd_ps(qv[i], _mm512_loadu_ps(kj + 16 * i), a);
    return a;
  };
  const __m512 vscale = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY);
  __m512 vmax = ninf;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m512 a[16];
    for (int s = 0; s < 16; ++s) a[s] = dot(K + (j + s) * d);
    __m512 s16 = _mm512_mul_ps(reduce16(a), vscale);
    if (vis) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(vis + j));
      const __m512i b = _mm512_cvtepu8_epi32(bytes);
      s16 = _mm512_mask_mov_ps(ninf, _mm512_test_epi32_mask(b, b), s16);
    }
    _mm512_storeu_ps(sc + j, s16);
    vmax = _mm512_max_ps(vmax, s16);
  }
  float m = _mm512_reduce_max_ps(vmax);
  for (; j < n; ++j) {
    sc[j] = vis && !vis[j] ? -INFINITY : _mm512_reduce_add_ps(dot(K + j * d)) * scale;
    m = std::max(m, sc[j]);
  }
  const __m512 vm = _mm512_set1_ps(m);
  __m512 vsum = _mm512_setzero_ps();
  for (j = 0; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_mask_loadu_ps(ninf, k, sc + j), vm));
    _mm512_mask_storeu_ps(sc + j, k, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  // named arrays of compile-time size: registers up to d = 128 (not a runtime-indexed
  // acc[j & 1], which the compiler kept on the stack)
  __m512 even[NV], odd[NV];
  for (int i = 0; i < NV; ++i) even[i] = odd[i] = _mm512_setzero_ps();
  auto add = [&](__m512* acc, int64_t j) {
    if (sc[j] == 0.0f) return;  // a hidden slot (exp(-inf)): its v may be stale
    const __m512 w = _mm512_set1_ps(sc[j]);
    const float* vj = V + j * d;
    for (int i = 0; i < NV; ++i)
      acc[i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vj + 16 * i), acc[i]);
  };
  for (j = 0; j + 1 < n; j += 2) {
    add(even, j);
    add(odd, j + 1);
  }
  if (j < n) add(even, j);
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
  for (int i = 0; i < NV; ++i)
    _mm512_storeu_ps(o + 16 * i, _mm512_mul_ps(_mm512_add_ps(even[i], odd[i]), inv));
}

// attend_head16 for a head dimension d that is a multiple of 16 up to 256; false for
// others (the portable loops).
bool attend_one_avx512(const float* q, const float* K, const float* V, int64_t n, int64_t d,
                       const uint8_t* vis, float scale, float* sc, float* o) {
  switch (d / 16 * (d % 16 == 0)) {
#define SPARSELLM_HEAD(NV)                          \
  case NV:                                          \
    attend_head16<NV>(q, K, V, n, vis, scale, sc, o); \
    return true;
    SPARSELLM_HEAD(1) SPARSELLM_HEAD(2) SPARSELLM_HEAD(3) SPARSELLM_HEAD(4)
    SPARSELLM_HEAD(5) SPARSELLM_HEAD(6) SPARSELLM_HEAD(7) SPARSELLM_HEAD(8)
    SPARSELLM_HEAD(9) SPARSELLM_HEAD(10) SPARSELLM_HEAD(11) SPARSELLM_HEAD(12)
    SPARSELLM_HEAD(13) SPARSELLM_HEAD(14) SPARSELLM_HEAD(15) SPARSELLM_HEAD(16)
#undef SPARSELLM_HEAD
    default:
      return false;
  }
}
#pragma GCC pop_options
#endif  // SPARSELLM_X86

class Decoder {
 public:
  // Per layer, `tensors` holds 10 entries: attn_norm, mlp_norm, then for qkv, o, gate|up
  // and down: bias, act_scale (empty tensors when absent); `weights` the 4 packed
  // projections per layer. `thresholds` has 4 per layer (<= 0: no rule), `eps` 2 per layer. `final_norm` (with `final_eps`) is applied to
  // the step's output.
  Decoder(std::vector<torch::Tensor> tensors, std::vector<PackedWeight> weights,
          std::vector<double> thresholds, std::vector<double> eps, int64_t hq, int64_t hk, int64_t d,
          torch::Tensor final_norm, double final_eps, bool relu)
      : t_(std::move(tensors)), pw_(std::move(weights)), thr_(std::move(thresholds)),
        eps_(std::move(eps)), final_norm_(std::move(final_norm)), final_eps_(final_eps),
        hq_(hq), hk_(hk), d_(d), relu_(relu) {
    TORCH_CHECK(t_.size() % kPerLayer == 0, "10 tensors per layer expected");
    layers_ = static_cast<int64_t>(t_.size()) / kPerLayer;
    TORCH_CHECK(static_cast<int64_t>(pw_.size()) == 4 * layers_ &&
                    static_cast<int64_t>(thr_.size()) == 4 * layers_ &&
                    static_cast<int64_t>(eps_.size()) == 2 * layers_,
                "per-layer lists disagree");
    TORCH_CHECK(hk_ > 0 && hq_ % hk_ == 0, "query heads must be a multiple of kv heads");
    for (const auto& w : t_)
      TORCH_CHECK(!w.numel() || (w.is_contiguous() && w.scalar_type() == torch::kFloat),
                  "contiguous fp32 tensors expected");
  }

  void set_caches(std::vector<torch::Tensor> caches) {
    TORCH_CHECK(static_cast<int64_t>(caches.size()) == 2 * layers_, "2 caches per layer");
    for (const auto& c : caches) TORCH_CHECK(c.is_contiguous(), "contiguous caches expected");
    caches_ = std::move(caches);
  }

  // One token per row of x (b, hidden). Row r reads and writes cache row seq[r]: its k, v
  // go to slot at[r], and it attends to slots 0..at[r], or, when `visible` (b, n) uint8
  // is given, to the slots j < n with visible[r, j] set (a tree of draft tokens). Rows may
  // share a cache row (the tokens of one verification pass: all are written before any
  // attends) or not (a batch of requests at their own positions). cos, sin (b, d) are
  // each row's rotary rows (sin sign-folded, see DecodeRuntime._rope). counts
  // (4 * layers, 2) int64 gets kept / seen channels of the thresholded projections added.
  // Returns the final-normed hidden state after the last block.
  torch::Tensor step(torch::Tensor x, const torch::Tensor& seq, const torch::Tensor& at,
                     const torch::Tensor& visible, bool sparse, const torch::Tensor& cos,
                     const torch::Tensor& sin, torch::Tensor counts) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "x (b, hidden) fp32");
    TORCH_CHECK(static_cast<int64_t>(caches_.size()) == 2 * layers_, "set_caches first");
    x = x.contiguous().clone();
    const int64_t b = x.size(0), hid = x.size(1);
    const auto seq_c = seq.contiguous(), at_c = at.contiguous();
    TORCH_CHECK(seq_c.scalar_type() == torch::kLong && seq_c.numel() == b &&
                    at_c.scalar_type() == torch::kLong && at_c.numel() == b,
                "seq, at (b,) int64 expected");
    const int64_t* sq = seq_c.data_ptr<int64_t>();
    const int64_t* ap = at_c.data_ptr<int64_t>();
    const int64_t rows = caches_[0].size(0), max_len = caches_[0].size(2);
    for (int64_t r = 0; r < b; ++r)
      TORCH_CHECK(sq[r] >= 0 && sq[r] < rows && ap[r] >= 0 && ap[r] < max_len,
                  "a row's cache row or slot is beyond the cache");
    const auto vis = visible.contiguous();
    TORCH_CHECK(!vis.numel() || (vis.scalar_type() == torch::kByte && vis.dim() == 2 &&
                                 vis.size(0) == b && vis.size(1) <= max_len),
                "visible (b, n <= max_len) uint8 expected");
    TORCH_CHECK(cos.dim() == 2 && cos.size(0) == b && cos.size(1) == d_ &&
                    sin.sizes() == cos.sizes(),
                "cos, sin (b, head_dim) expected");
    float* xp = x.data_ptr<float>();
    int64_t* cnt = counts.data_ptr<int64_t>();
    const auto cos_c = cos.contiguous(), sin_c = sin.contiguous();  // alive for the step
    const float* c = cos_c.data_ptr<float>();
    const float* sn = sin_c.data_ptr<float>();
    const Rows where{sq, ap, vis.numel() ? vis.data_ptr<uint8_t>() : nullptr,
                     vis.numel() ? vis.size(1) : 0};
    for (int64_t l = 0; l < layers_; ++l) {
      const torch::Tensor* t = t_.data() + l * kPerLayer;
      rms_norm(xp, b, hid, t[0].data_ptr<float>(), eps_[2 * l], buf(h_, b * hid));
      const int64_t nqkv = (hq_ + 2 * hk_) * d_;
      float* qkv = buf(qkv_, b * nqkv);
      proj(l, 0, h_.data(), b, hid, qkv, sparse, cnt);
      rope_and_cache(qkv, b, l, where, c, sn);
      float* att = buf(att_, b * hq_ * d_);
      attend(qkv, b, l, where, att);
      float* y = buf(y_, b * hid);
      proj(l, 1, att, b, hq_ * d_, y, sparse, cnt);
      for (int64_t i = 0; i < b * hid; ++i) xp[i] += y[i];
      rms_norm(xp, b, hid, t[1].data_ptr<float>(), eps_[2 * l + 1], h_.data());
      const int64_t inter = pw_[4 * l + 3].w.in;  // down's input width
      float* gu = buf(gu_, b * 2 * inter);
      proj(l, 2, h_.data(), b, hid, gu, sparse, cnt);  // (b, 2 inter): gate | up
      float* a = buf(a_, b * inter);
      for (int64_t r = 0; r < b; ++r)
        for (int64_t i = 0; i < inter; ++i) {
          const float g = gu[r * 2 * inter + i];
          const float act = relu_ ? (g > 0.0f ? g : 0.0f) : g / (1.0f + std::exp(-g));
          a[r * inter + i] = act * gu[r * 2 * inter + inter + i];
        }
      proj(l, 3, a, b, inter, y, sparse, cnt);
      for (int64_t i = 0; i < b * hid; ++i) xp[i] += y[i];
    }
    auto out = torch::empty_like(x);
    rms_norm(xp, b, hid, final_norm_.data_ptr<float>(), final_eps_, out.data_ptr<float>());
    return out;
  }

 private:
  static constexpr int64_t kPerLayer = 10;
  // Where each row of a step lives in the caches (see `step`).
  struct Rows {
    const int64_t* seq;
    const int64_t* at;
    const uint8_t* visible;  // null: row r sees slots 0..at[r]
    int64_t n_visible;
  };
  // Rows times cache length from which attention splits its (row, head) pairs over
  // threads (below, waking the other thread costs about what it saves). Where the cache
  // streams from DRAM (an AMD EPYC, 32 MB L3), one row over 300 slots on one thread was
  // 8% of an int8 step while the other thread spun; split, the step ran ~5% faster.
  static constexpr int64_t kParallelAttention = 128;

  // Size a reusable buffer (grows once, then stays) and return its data.
  static float* buf(std::vector<float>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
    return v.data();
  }

  // y (b, out) = projection p of layer l applied to h (b, in).
  void proj(int64_t l, int p, const float* h, int64_t b, int64_t in, float* y, bool sparse,
            int64_t* cnt) {
    const torch::Tensor* t = t_.data() + l * kPerLayer + 2 + 2 * p;  // bias, act_scale
    const int64_t k = 4 * l + p;
    const Weight& w = pw_[k].w;
    const float* bias = ptr_or_null(t[0]);
    const double thr = thr_[k];
    if (sparse && thr > 0) {
      cnt[2 * k] += gemv_into(h, b, w, ptr_or_null(t[1]), static_cast<float>(thr), bias, y,
                              scratch_);
      cnt[2 * k + 1] += b * in;
      return;
    }
    gemv_into(h, b, w, nullptr, -1.0f, bias, y, scratch_);
  }

  // Rotate q and k heads in place (x cos + rotate_half(x) sin, row r with its own cos
  // and sin) and write k, v at each row's cache row and slot.
  void rope_and_cache(float* p, int64_t b, int64_t l, const Rows& where, const float* cos,
                      const float* sin) {
    const int64_t heads = hq_ + 2 * hk_, half = d_ / 2;
    float* tmp = buf(tmp_, d_);
    auto& kc = caches_[2 * l];
    auto& vc = caches_[2 * l + 1];
    const int64_t max_len = kc.size(2);
    float* kp = kc.data_ptr<float>();
    float* vp = vc.data_ptr<float>();
    for (int64_t r = 0; r < b; ++r) {
      float* row = p + r * heads * d_;
      const float* c = cos + r * d_;
      const float* s = sin + r * d_;
      for (int64_t hd = 0; hd < hq_ + hk_; ++hd) {
        float* e = row + hd * d_;
        std::copy_n(e, d_, tmp);
        for (int64_t i = 0; i < d_; ++i) {
          const float rolled = i < half ? tmp[i + half] : tmp[i - half];
          e[i] = tmp[i] * c[i] + rolled * s[i];
        }
      }
      for (int64_t g = 0; g < hk_; ++g) {
        const int64_t at_pos = ((where.seq[r] * hk_ + g) * max_len + where.at[r]) * d_;
        std::copy_n(row + (hq_ + g) * d_, d_, kp + at_pos);
        std::copy_n(row + (hq_ + hk_ + g) * d_, d_, vp + at_pos);
      }
    }
  }

  // att (b, hq * d): softmax(q k^T / sqrt(d)) v for each query head over the slots its
  // row sees (see `step`), query head h reading kv head h / (hq / hk) (GQA, as HF's
  // repeat_kv). Short contexts run on this thread; long ones split the heads over threads.
  void attend(const float* qkv, int64_t b, int64_t l, const Rows& where, float* att) {
    const int64_t d = d_;
    const int64_t heads = hq_ + 2 * hk_, grp = hq_ / hk_;
    int64_t longest = where.n_visible;
    for (int64_t r = 0; r < b && !where.visible; ++r) longest = std::max(longest, where.at[r] + 1);
    const int64_t max_len = caches_[2 * l].size(2);
    const float* kp = caches_[2 * l].data_ptr<float>();
    const float* vp = caches_[2 * l + 1].data_ptr<float>();
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    constexpr int kLanes = 16;  // fixed-width partial sums vectorise without -ffast-math
#if SPARSELLM_X86
    const bool vec = g_avx512;
#endif
    auto body = [&](int64_t u0, int64_t u1) {
      std::vector<float> sc(static_cast<size_t>(longest));
      std::vector<float> acc(static_cast<size_t>(d));
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t r = u / hq_, h = u % hq_, g = h / grp;
        const uint8_t* vis = where.visible ? where.visible + r * where.n_visible : nullptr;
        const int64_t n = vis ? where.n_visible : where.at[r] + 1;
        const float* q = qkv + r * heads * d + h * d;
        const float* K = kp + (where.seq[r] * hk_ + g) * max_len * d;
        const float* V = vp + (where.seq[r] * hk_ + g) * max_len * d;
        float* o = att + (r * hq_ + h) * d;
#if SPARSELLM_X86
        if (vec && attend_one_avx512(q, K, V, n, d, vis, scale, sc.data(), o)) continue;
#endif
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < n; ++j) {
          if (vis && !vis[j]) {
            sc[j] = -std::numeric_limits<float>::infinity();
            continue;
          }
          const float* kj = K + j * d;
          float lanes[kLanes] = {};
          int64_t i = 0;
          for (; i + kLanes <= d; i += kLanes)
            for (int k = 0; k < kLanes; ++k) lanes[k] += q[i + k] * kj[i + k];
          float dot = 0.0f;
          for (; i < d; ++i) dot += q[i] * kj[i];
          for (int k = 0; k < kLanes; ++k) dot += lanes[k];
          sc[j] = dot * scale;
          m = std::max(m, sc[j]);
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < n; ++j) {
          sc[j] = std::exp(sc[j] - m);
          sum += sc[j];
        }
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t j = 0; j < n; ++j) {
          const float w = sc[j];
          if (w == 0.0f) continue;  // a hidden slot (exp(-inf)): its v may be stale
          const float* vj = V + j * d;
          for (int64_t i = 0; i < d; ++i) acc[i] += w * vj[i];
        }
        const float inv = 1.0f / sum;
        for (int64_t i = 0; i < d; ++i) o[i] = acc[i] * inv;
      }
    };
    // threads when the step's attention is long enough in total: a long cache, or a
    // verification pass / batch of many rows (16 rows over 300 slots ran on one thread
    // for 15% of the pass while the other spun); each (row, head) is computed the same
    // way on any thread, so rows stay batch-invariant
    const int64_t units = b * hq_;
    if (b * longest < kParallelAttention) body(0, units);
    else at::parallel_for(0, units, 1, body);
  }

  std::vector<torch::Tensor> t_;
  std::vector<PackedWeight> pw_;
  std::vector<double> thr_;
  std::vector<double> eps_;
  torch::Tensor final_norm_;
  double final_eps_;
  std::vector<torch::Tensor> caches_;
  int64_t hq_, hk_, d_;
  bool relu_;  // ReLU-gated MLP (ProSparse) instead of SiLU
  int64_t layers_ = 0;
  Scratch scratch_;
  std::vector<float> h_, qkv_, att_, y_, gu_, a_, tmp_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#if SPARSELLM_X86
  build_luts();
#endif
  set_isa("auto");
  py::class_<PackedWeight>(m, "PackedWeight")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, torch::Tensor, torch::Tensor,
                    torch::Tensor, torch::Tensor, bool>())
      .def_property_readonly("extra_bytes", [](const PackedWeight& pw) {
                               return (pw.tiles.defined() ? pw.tiles.numel() : 0) +
                                      (pw.tile_at.defined() ? 8 * pw.tile_at.numel() : 0);
                             },
                             "bytes held beside the packed tensors (int8 / int4 tiles)")
      .def("release_rows", &PackedWeight::release_rows,
           "drop the row layout, keeping the tiles (dense VNNI calls and dequantize only)");
  m.def("gemv", &gemv, "thresholded input-skipping GEMV over a packed weight (CPU)");
  m.def("dequantize", &dequantize, "a packed weight as W^T (in, out) fp32");
  m.def("tile_rows", &tile_rows, "rows ids of W (columns of W^T) fp32, from a weight's tiles");
  m.def("isa", &isa_in_use, "the kernels in use: avx512vnni, avx512, avx2 or portable");
  m.def("set_isa", &set_isa, "choose the kernels: auto, avx512vnni, avx512, avx2 or portable");
  py::class_<Decoder>(m, "Decoder")
      .def(py::init<std::vector<torch::Tensor>, std::vector<PackedWeight>,
                    std::vector<double>, std::vector<double>, int64_t,
                    int64_t, int64_t, torch::Tensor, double, bool>())
      .def("set_caches", &Decoder::set_caches)
      .def("step", &Decoder::step);
}

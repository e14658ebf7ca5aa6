// AMX-BF16 CPU kernel for float16 and bfloat16 inputs (Sapphire Rapids and later): the two matrix
// products of every block run on the tile unit, the online softmax stays on AVX-512 (the shared
// flash_attention_cpu_kernel_common.h). float32 inputs keep the AVX-512 FMA path: their exact
// split needs three bfloat16 parts a side, and six partial products cost more tile loads than
// the FMA path spends. This TU alone is compiled with AMX flags (build.py picks them by the
// suffix) and only runs after the dispatcher saw the CPU features and Linux granted the tile
// state.
//
// Precision: every operand is split by truncation into bfloat16 parts that add up to it exactly
// (a float16 in two: 8 + 3 significand bits; a bfloat16 is one). The logits S = K Q^T take all
// part products, each exact in float32, accumulated in float32: the same as float32 FMA
// arithmetic on the same inputs; the scale is applied to S afterwards. The probabilities P are
// float32 in [0, 1]; they are cut to two parts (16 significand bits, relative error < 2^-15),
// far below float16's rounding of the output (2^-11).
//
// Layout, per item (b, h, query block of bq = 96 rows) and key block of kBc = 64 keys:
//   S^T (keys, bq)   = K_blk (keys, D) . Qt (D, bq)      A = packed K parts, B = query parts
//   O^T (D, bq)     += V^T_blk (D, keys) . P^T (keys, bq) A = packed V^T parts, B = P parts
// B operands are in the tile unit's pair layout: row r holds, per column, the elements of rows
// 2r and 2r+1 side by side. The transposed S is what the shared softmax expects; O^T is
// transposed back when the rows are written out.
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

#include "flash_attention_cpu_internal.h"

namespace flash_export {
namespace cpu {
namespace amx {
namespace {

#include "flash_attention_cpu_avx512_vec.h"  // NOLINT(build/include): V, inside this namespace

}  // namespace
}  // namespace amx
}  // namespace cpu
}  // namespace flash_export

#define FLASH_EXPORT_ISA_NAMESPACE amx
#include "flash_attention_cpu_kernel_common.h"

namespace flash_export {
namespace cpu {
namespace amx {
namespace {

constexpr int64_t kMaxHeadDim = 256;  // larger heads run on the AVX-512 FMA path
constexpr int64_t kBq = 96;           // query rows per item: two groups of three 16-column tiles
constexpr int64_t kBc = 64;           // keys per online-softmax block
constexpr int kPParts = 2;            // parts of the probabilities

// Tile registers: 0-2 accumulate a 16x48 float32 block (three 16x16 tiles), 3-4 hold A's parts,
// 5-6 B's parts for one column tile at a time. Every tile is configured as 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

TileConfig tile_config() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  return c;
}

int parts_of(DType d) { return d == DType::kFloat16 ? 2 : 1; }

// The first n parts of x by truncation, each a bfloat16 value (a float32 whose low 16 bits are
// zero): x = out[0] + out[1] exactly when x has at most 16 significand bits (float16, bfloat16),
// else out[0] + out[1] is x cut to 16 bits. A NaN or infinite x is carried by out[0] alone (a
// NaN as a quiet NaN: truncating a NaN with payload only in its low bits would make it
// infinite).
inline void split(__m512 x, int n, __m512i out[2]) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __mmask16 special = _mm512_fpclass_ps_mask(x, 0x99);  // NaN or +-inf
  const __m512i bits = _mm512_castps_si512(x);
  out[0] = _mm512_mask_mov_epi32(_mm512_and_si512(bits, high), nan,
                                 _mm512_set1_epi32(0x7FC00000));
  if (n == 1) return;
  const __m512 r1 = _mm512_maskz_sub_ps(static_cast<__mmask16>(~special), x,
                                        _mm512_castsi512_ps(out[0]));
  out[1] = _mm512_and_si512(_mm512_castps_si512(r1), high);
}

// The bfloat16 halves of 16 parts, packed to 16 uint16.
inline __m256i to_bf16(__m512i part) {
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(part, 16));
}

// Pair layout of two float32 rows: lane c = bf16(lo[c]) | bf16(hi[c]) << 16, per part.
inline void store_pairs(__m512 lo, __m512 hi, int n, uint32_t* dst, size_t part_stride) {
  __m512i a[2], b[2];
  split(lo, n, a);
  split(hi, n, b);
  for (int j = 0; j < n; ++j) {
    _mm512_storeu_si512(dst + j * part_stride,
                        _mm512_or_si512(_mm512_srli_epi32(a[j], 16), b[j]));
  }
}

// C[16 x 48] (three 16x16 float32 tiles, row stride ldc bytes) = (load_c ? C : 0) + sum over
// `chunks` steps of 32 along k of sum_{i < NA, j < NB} A_i (16 rows x 32 bf16) . B_j (16 pair
// rows x 48 columns). A part i starts a_part elements after part 0, B part j b_part pairs after
// part 0. Each step loads A's parts once for the three column tiles.
template <int NA, int NB>
void tile_product(float* c, int64_t ldc, bool load_c, const uint16_t* a, int64_t lda,
                  size_t a_part, const uint32_t* b, int64_t ldb, size_t b_part, int64_t chunks) {
  if (load_c) {
    _tile_loadd(0, c, ldc);
    _tile_loadd(1, c + 16, ldc);
    _tile_loadd(2, c + 32, ldc);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
  }
  const int64_t b_chunk = 16 * (ldb / 4);  // 16 pair rows = 32 steps of k
  for (int64_t kc = 0; kc < chunks; ++kc) {
    const uint16_t* ak = a + kc * 32;
    const uint32_t* bk = b + kc * b_chunk;
    _tile_loadd(3, ak, lda);
    if (NA > 1) _tile_loadd(4, ak + a_part, lda);
    // Column tile T: B's parts into tiles 5-6, then the part products into accumulator T, the
    // small cross terms first. (The tile intrinsics take literal register numbers.)
#define FLASH_EXPORT_COLUMN_STEP(T)                                \
  _tile_loadd(5, bk + 16 * (T), ldb);                              \
  if (NB > 1) _tile_loadd(6, bk + b_part + 16 * (T), ldb);         \
  if (NA > 1 && NB > 1) _tile_dpbf16ps(T, 4, 6);                   \
  if (NA > 1) _tile_dpbf16ps(T, 4, 5);                             \
  if (NB > 1) _tile_dpbf16ps(T, 3, 6);                             \
  _tile_dpbf16ps(T, 3, 5);
    FLASH_EXPORT_COLUMN_STEP(0)
    FLASH_EXPORT_COLUMN_STEP(1)
    FLASH_EXPORT_COLUMN_STEP(2)
#undef FLASH_EXPORT_COLUMN_STEP
  }
  _tile_stored(0, c, ldc);
  _tile_stored(1, c + 16, ldc);
  _tile_stored(2, c + 32, ldc);
}

using TileProductFn = void (*)(float*, int64_t, bool, const uint16_t*, int64_t, size_t,
                               const uint32_t*, int64_t, size_t, int64_t);

// Whether a (B, L, H, D) tensor of 16-bit elements holds an infinity (exponent all ones, mantissa
// zero: the mask picks the exponent and mantissa bits of float16 or bfloat16).
bool holds_infinity(const void* data, DType dtype, const AttentionParams& p, int64_t rows,
                    int64_t batch_stride, int64_t row_stride, int64_t head_stride) {
  const uint16_t magnitude = 0x7FFF;
  const uint16_t infinity = dtype == DType::kFloat16 ? 0x7C00 : 0x7F80;
  const __m512i mag = _mm512_set1_epi16(static_cast<int16_t>(magnitude));
  const __m512i inf = _mm512_set1_epi16(static_cast<int16_t>(infinity));
  const uint16_t* base = static_cast<const uint16_t*>(data);
  const int64_t dim = p.head_dim;
  __mmask32 found = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t h = 0; h < p.heads; ++h) {
        const uint16_t* x = base + b * batch_stride + r * row_stride + h * head_stride;
        int64_t d = 0;
        for (; d + 32 <= dim; d += 32) {
          const __m512i v = _mm512_and_si512(_mm512_loadu_si512(x + d), mag);
          found |= _mm512_cmpeq_epi16_mask(v, inf);
        }
        for (; d < dim; ++d)
          if ((x[d] & magnitude) == infinity) return true;
      }
      if (found != 0) return true;
    }
  }
  return false;
}

// float16 and bfloat16 heads of up to kMaxHeadDim whose inputs hold no infinity; the rest goes
// to the AVX-512 FMA path. (A part product pairs an infinite part with the other operand's
// other part, often zero: inf * 0 would make NaN of a logit or output the FMA path gets right.)
bool accepts(const AttentionParams& p) {
  if (p.dtype == DType::kFloat32 || p.head_dim > kMaxHeadDim) return false;
  return !holds_infinity(p.q, p.dtype, p, p.seq_q, p.q_batch_stride, p.q_row_stride,
                         p.q_head_stride) &&
         !holds_infinity(p.k, p.dtype, p, p.seq_k, p.k_batch_stride, p.k_row_stride,
                         p.k_head_stride) &&
         !holds_infinity(p.v, p.dtype, p, p.seq_k, p.v_batch_stride, p.v_row_stride,
                         p.v_head_stride);
}

bool plan_amx(const AttentionParams& p, Plan* out) {
  Plan& plan = *out;
  plan.parts = parts_of(p.dtype);
  plan.bq = kBq;
  plan.bq_pad = kBq;
  plan.bc = kBc;
  plan.d_k = static_cast<int64_t>(round_up(static_cast<size_t>(p.head_dim), 32));
  plan.d_v = static_cast<int64_t>(round_up(static_cast<size_t>(p.head_dim), 16));
  plan.d_pad = plan.d_v;
  plan.q_blocks = (p.seq_q + kBq - 1) / kBq;
  const size_t d_k = static_cast<size_t>(plan.d_k), d_v = static_cast<size_t>(plan.d_v);
  const size_t bq = static_cast<size_t>(kBq), bc = static_cast<size_t>(kBc);
  Regions region;
  plan.off_qt = region.take(d_k * bq);
  plan.off_qv = region.take(static_cast<size_t>(plan.parts) * (d_k / 2) * bq);
  plan.off_s = region.take(bc * bq);
  plan.off_pv = region.take(kPParts * (bc / 2) * bq);
  plan.off_ot = region.take(d_v * bq);
  plan.off_o = region.take(d_k);  // one output row
  plan.off_m = region.take(bq);
  plan.off_l = region.take(bq);
  plan.off_alpha = region.take(bq);
  plan.off_mx = region.take(bq);
  plan.scratch_floats = region.end;
  // Packed head (bfloat16 elements): parts x k_rows x d_k of K, then parts x d_v x k_rows of V^T.
  const size_t seq_k = static_cast<size_t>(p.seq_k);
  if (seq_k > SIZE_MAX / 64 / static_cast<size_t>(plan.parts) / (d_k + d_v)) return false;
  plan.k_rows = static_cast<int64_t>(round_up(seq_k, 32));
  const size_t k_rows = static_cast<size_t>(plan.k_rows), parts = static_cast<size_t>(plan.parts);
  plan.v_offset = parts * k_rows * d_k / 2;
  plan.head_floats = round_up(plan.v_offset + parts * d_v * k_rows / 2, 16);
  return true;
}

// 16 rows of d_k floats: the first `count` converted from src (row `r` at element offset
// base + r * row_stride, D elements), zero-padded to d_k; the rest zeros.
inline void load_rows(const void* src, int64_t base, int64_t row_stride, int64_t count,
                      const AttentionParams& p, int64_t d_k, float* rows) {
  for (int64_t r = 0; r < 16; ++r) {
    float* row = rows + r * d_k;
    const int64_t filled = r < count ? p.head_dim : 0;
    if (filled > 0) convert_row(src, base + r * row_stride, p.dtype, row, filled);
    std::memset(row + filled, 0, sizeof(float) * static_cast<size_t>(d_k - filled));
  }
}

// Keys and values [j0, j0 + n) of head (b, h) as bfloat16 parts: K row-major (k_rows, d_k) per
// part, V transposed (d_v, k_rows) per part. The chunk holding the last key also zeroes the
// padding keys up to k_rows; the padding dims are zero.
void pack_rows_amx(const AttentionParams& p, const Plan& plan, int64_t b, int64_t h, int64_t j0,
                   int64_t n, float* dst) {
  const int64_t d_k = plan.d_k, d_v = plan.d_v, k_rows = plan.k_rows;
  const int parts = static_cast<int>(plan.parts);
  uint16_t* kp = reinterpret_cast<uint16_t*>(dst);
  uint16_t* vt = reinterpret_cast<uint16_t*>(dst + plan.v_offset);
  const size_t k_part = static_cast<size_t>(k_rows * d_k);
  const size_t v_part = static_cast<size_t>(d_v * k_rows);
  const int64_t end = j0 + n == p.seq_k ? k_rows : j0 + n;
  alignas(64) float rows[16 * kMaxHeadDim];  // 16 keys, row stride d_k
  const __m512i gather_index = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int>(d_k)));
  for (int64_t g = j0; g < end; g += 16) {
    const int64_t count = min64(16, max64(0, p.seq_k - g));
    // Keys: 16 rows as float32, then each row's parts.
    load_rows(p.k, b * p.k_batch_stride + g * p.k_row_stride + h * p.k_head_stride,
              p.k_row_stride, count, p, d_k, rows);
    for (int64_t r = 0; r < 16 && g + r < end; ++r) {
      for (int64_t c = 0; c < d_k; c += 16) {
        __m512i part[2];
        split(_mm512_load_ps(rows + r * d_k + c), parts, part);
        for (int i = 0; i < parts; ++i) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(kp + i * k_part + (g + r) * d_k + c),
                              to_bf16(part[i]));
        }
      }
    }
    // Values: 16 rows as float32, then each dim's column of 16 keys, per part.
    load_rows(p.v, b * p.v_batch_stride + g * p.v_row_stride + h * p.v_head_stride,
              p.v_row_stride, count, p, d_k, rows);
    for (int64_t d = 0; d < d_v; ++d) {
      __m512i part[2];
      split(_mm512_i32gather_ps(gather_index, rows + d, 4), parts, part);
      for (int i = 0; i < parts; ++i) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(vt + i * v_part + d * k_rows + g),
                            to_bf16(part[i]));
      }
    }
  }
}

void run_item_amx(const AttentionParams& p, const Plan& plan, int64_t b, int64_t h,
                  int64_t q_block, PackedHead kv, float* scratch) {
  const int64_t bq = kBq, d_k = plan.d_k, d_v = plan.d_v, k_rows = plan.k_rows;
  const int parts = static_cast<int>(plan.parts);
  const int64_t i0 = q_block * bq;
  const int64_t nq = min64(bq, p.seq_q - i0);
  const int64_t ldb = bq * 4;  // bytes per row of S^T, O^T and the pair layouts

  float* qt = scratch + plan.off_qt;
  uint32_t* qv = reinterpret_cast<uint32_t*>(scratch + plan.off_qv);
  float* s = scratch + plan.off_s;
  uint32_t* pv = reinterpret_cast<uint32_t*>(scratch + plan.off_pv);
  float* ot = scratch + plan.off_ot;
  float* row = scratch + plan.off_o;
  float* m = scratch + plan.off_m;
  float* l = scratch + plan.off_l;
  float* alpha = scratch + plan.off_alpha;
  float* m_blk = scratch + plan.off_mx;
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(kv.k);
  const uint16_t* vt = reinterpret_cast<const uint16_t*>(kv.v);
  const size_t k_part = static_cast<size_t>(k_rows * d_k);
  const size_t v_part = static_cast<size_t>(d_v * k_rows);
  const size_t q_part = static_cast<size_t>(d_k / 2 * bq);
  const size_t p_part = static_cast<size_t>(kBc / 2 * bq);
  const TileProductFn qk = parts == 2 ? &tile_product<2, 2> : &tile_product<1, 1>;
  const TileProductFn pv_product = parts == 2 ? &tile_product<2, kPParts>
                                              : &tile_product<1, kPParts>;
  const __m512 qscale = _mm512_set1_ps(p.scale * kLog2e);

  // The query as it came (its parts are then exact), transposed; its parts in pair layout.
  load_query(p, plan, b, h, i0, nq, d_k, 1.0f, qt, row);
  for (int64_t r = 0; r < d_k / 2; ++r)
    for (int64_t c = 0; c < bq; c += 16)
      store_pairs(_mm512_load_ps(qt + 2 * r * bq + c), _mm512_load_ps(qt + (2 * r + 1) * bq + c),
                  parts, qv + r * bq + c, q_part);
  std::memset(ot, 0, sizeof(float) * static_cast<size_t>(d_v * bq));
  init_softmax_state(bq, m, l);

  static const TileConfig config = tile_config();
  _tile_loadconfig(&config);
  const int64_t k_end = visible_keys_end(p, i0, nq);
  for (int64_t j0 = 0; j0 < k_end; j0 += kBc) {
    const int64_t nk = min64(kBc, k_end - j0);
    const int64_t nk16 = (nk + 15) / 16 * 16, nk32 = (nk + 31) / 32 * 32;

    // S^T = K_blk Qt, 16 keys x 48 queries at a time.
    for (int64_t kt = 0; kt < nk16; kt += 16)
      for (int64_t c = 0; c < bq; c += 48)
        qk(s + kt * bq + c, ldb, false, kp + (j0 + kt) * d_k, d_k * 2, k_part, qv + c, ldb,
           q_part, d_k / 32);
    // Scaled into the log2 domain, the block max taken on the way; again if keys were hidden.
    {
      constexpr int kVecs = kBq / 16;  // a row of S^T in registers: independent max chains
      __m512 mx[kVecs];
      for (int v = 0; v < kVecs; ++v) mx[v] = _mm512_load_ps(m + 16 * v);
      for (int64_t jj = 0; jj < nk; ++jj) {
        for (int v = 0; v < kVecs; ++v) {
          const __m512 x = _mm512_mul_ps(_mm512_load_ps(s + jj * bq + 16 * v), qscale);
          _mm512_store_ps(s + jj * bq + 16 * v, x);
          mx[v] = _mm512_max_ps(x, mx[v]);
        }
      }
      for (int v = 0; v < kVecs; ++v) _mm512_store_ps(m_blk + 16 * v, mx[v]);
    }
    if (hide_keys(p, plan, b, h, i0, nq, j0, nk, s)) block_max(s, bq, nk, m, m_blk);

    // The softmax writes P^T's parts straight into pair layout over keys (an odd last key is
    // paired with zero); the pair rows up to nk32 are zero.
    const __m512 zero = _mm512_setzero_ps();
    __m512 even = zero;
    softmax_block(s, bq, nk, m, l, alpha, m_blk, [&](int64_t jj, int64_t c, __m512 pj) {
      if ((jj & 1) == 0) {
        even = pj;
        if (jj + 1 == nk) store_pairs(pj, zero, kPParts, pv + jj / 2 * bq + c, p_part);
      } else {
        store_pairs(even, pj, kPParts, pv + jj / 2 * bq + c, p_part);
      }
    });
    for (int64_t r = (nk + 1) / 2; r < nk32 / 2; ++r)
      for (int j = 0; j < kPParts; ++j)
        std::memset(pv + j * p_part + r * bq, 0, sizeof(uint32_t) * static_cast<size_t>(bq));

    // O^T = O^T * alpha + V^T_blk P^T, 16 dims x 48 queries at a time. The rescale is skipped
    // while O^T is still zero and when no row's max moved (every alpha is 1).
    __mmask16 moved = 0;
    for (int64_t c = 0; c < bq; c += 16)
      moved |= _mm512_cmp_ps_mask(_mm512_load_ps(alpha + c), _mm512_set1_ps(1.0f), _CMP_NEQ_UQ);
    if (j0 > 0 && moved != 0) {
      for (int64_t d = 0; d < d_v; ++d)
        for (int64_t c = 0; c < bq; c += 16)
          _mm512_store_ps(ot + d * bq + c, _mm512_mul_ps(_mm512_load_ps(ot + d * bq + c),
                                                         _mm512_load_ps(alpha + c)));
    }
    for (int64_t dt = 0; dt < d_v; dt += 16)
      for (int64_t c = 0; c < bq; c += 48)
        pv_product(ot + dt * bq + c, ldb, true, vt + dt * k_rows + j0, k_rows * 2, v_part,
                   pv + c, ldb, p_part, nk32 / 32);
  }
  _tile_release();

  for (int64_t r = 0; r < nq; ++r) {
    for (int64_t d = 0; d < p.head_dim; ++d) row[d] = ot[d * bq + r];
    store_output(p, b, h, i0 + r, row, l[r]);
  }
}

}  // namespace
}  // namespace amx

bool amx_usable() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr long kReqXcompPerm = 0x1023;  // ARCH_REQ_XCOMP_PERM
  constexpr long kXtileData = 18;         // XFEATURE_XTILEDATA
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
#else
  return false;
#endif
}

Kernel kernel_amx() {
  return Kernel{"amx",          amx::V::kW,     amx::kBq, &amx::pack_rows_amx,
                &amx::run_item_amx, &amx::plan_amx, &amx::accepts};
}

}  // namespace cpu
}  // namespace flash_export
#endif

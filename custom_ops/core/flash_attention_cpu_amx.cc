// AMX-BF16 CPU kernel for float16 inputs (Sapphire Rapids and later): the two matrix products of
// every block run on the tile unit, the online softmax stays on AVX-512 (the shared
// flash_attention_cpu_kernel_common.h). Everything else keeps the AVX-512 FMA path: float32
// (an exact split takes three bfloat16 parts a side and six of the nine part products, whose tile
// loads cost more than the FMA path spends), bfloat16 (its logits could overflow float32 before
// the scale is applied, which the FMA path applies first), heads over 256, and calls whose
// inputs hold an infinity (a part product pairs an infinite part with the other operand's other
// part, often zero, and inf * 0 would make NaN of a logit the FMA path gets right: packing looks
// for them and hands the call back). This TU alone is compiled with AMX flags (build.py picks them
// by the suffix) and only runs after amx_usable() saw the CPU features and Linux granted the tile
// state.
//
// Precision: every input element is split by truncation into two bfloat16 parts that add up to
// it exactly (8 + 3 significand bits). The logits S = K Q^T take all four part products, each
// exact in float32, summed in float32 in another order than the FMA path; the scale is applied
// to S afterwards. The probabilities P are float32 in [0, 1]; they are cut to two parts (16
// significand bits, relative error < 2^-15), far below float16's rounding of the output (2^-11).
// The tile unit treats bfloat16 subnormals (below 2^-126) as zero: only probabilities that small
// are affected, against a largest probability of 1.
//
// Layout, per item (b, h, query block of bq = 96 rows) and key block of kBc = 64 keys (the AMX
// path blocks keys by 64 whatever chunk_size says):
//   S^T (keys, bq)   = K_blk (keys, D) . Qt (D, bq)      A = packed K parts, B = query parts
//   O^T (D, bq)     += V^T_blk (D, keys) . P^T (keys, bq) A = packed V^T parts, B = P parts
// B operands are in the tile unit's pair layout: row r holds, per column, the elements of rows
// 2r and 2r+1 side by side. The transposed S is what the shared softmax expects; O^T is
// transposed back when the rows are written out.
#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

#define FLASH_EXPORT_ISA_NAMESPACE amx
#include "flash_attention_cpu_avx512_vec.h"
#include "flash_attention_cpu_kernel_common.h"

namespace flash_export {
namespace cpu {
namespace amx {
namespace {

constexpr int64_t kMaxHeadDim = 256;  // larger heads run on the AVX-512 FMA path
constexpr int64_t kBq = 96;           // query rows per item: two groups of three 16-column tiles
constexpr int64_t kBc = 64;           // keys per online-softmax block
constexpr int kParts = 2;             // bfloat16 parts of an input element and of a probability
static_assert(kPackRows % 32 == 0, "packing chunks must start on whole 32-key tile columns");

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

// x = out[0] + out[1] by truncation, each part a bfloat16 value (a float32 whose low 16 bits are
// zero): exact when x has at most 16 significand bits (a float16), else x cut to 16 bits. A NaN or
// infinite x is carried by out[0] alone (a NaN as a quiet NaN: truncating a NaN with payload only
// in its low bits would make it infinite).
inline void split(__m512 x, __m512i out[2]) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __mmask16 special = _mm512_fpclass_ps_mask(x, 0x99);  // NaN or +-inf
  const __m512i bits = _mm512_castps_si512(x);
  out[0] = _mm512_mask_mov_epi32(_mm512_and_si512(bits, high), nan, _mm512_set1_epi32(0x7FC00000));
  const __m512 rest =
      _mm512_maskz_sub_ps(static_cast<__mmask16>(~special), x, _mm512_castsi512_ps(out[0]));
  out[1] = _mm512_and_si512(_mm512_castps_si512(rest), high);
}

// The bfloat16 halves of 16 parts, packed to 16 uint16.
inline __m256i to_bf16(__m512i part) { return _mm512_cvtepi32_epi16(_mm512_srli_epi32(part, 16)); }

// Pair layout of two float32 rows: lane c = bf16(lo[c]) | bf16(hi[c]) << 16, per part.
inline void store_pairs(__m512 lo, __m512 hi, uint32_t* dst, size_t part_stride) {
  __m512i a[2], b[2];
  split(lo, a);
  split(hi, b);
  for (int j = 0; j < kParts; ++j) {
    _mm512_storeu_si512(dst + j * part_stride, _mm512_or_si512(_mm512_srli_epi32(a[j], 16), b[j]));
  }
}

// C[16 x 48] (three 16x16 float32 tiles, row stride ldc bytes) = (load_c ? C : 0) + sum over
// `chunks` steps of 32 along k of sum_{i, j < 2} A_i (16 rows x 32 bf16) . B_j (16 pair rows x 48
// columns). A part i starts a_part elements after part 0, B part j b_part pairs after part 0.
// Each step loads A's parts once for the three column tiles.
void tile_product(float* c, int64_t ldc, bool load_c, const uint16_t* a, int64_t lda, size_t a_part,
                  const uint32_t* b, int64_t ldb, size_t b_part, int64_t chunks) {
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
    _tile_loadd(4, ak + a_part, lda);
    // Column tile T: B's parts into tiles 5-6, then the part products into accumulator T, the
    // small cross term first. (The tile intrinsics take literal register numbers.)
#define FLASH_EXPORT_COLUMN_STEP(T)            \
  _tile_loadd(5, bk + 16 * (T), ldb);          \
  _tile_loadd(6, bk + b_part + 16 * (T), ldb); \
  _tile_dpbf16ps(T, 4, 6);                     \
  _tile_dpbf16ps(T, 4, 5);                     \
  _tile_dpbf16ps(T, 3, 6);                     \
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

// Whether rows [r0, r1) of head h of batch b of a (B, L, H, D) float16 tensor hold an infinity
// (exponent all ones, mantissa zero).
bool holds_infinity(const void* data, int64_t base, int64_t row_stride, int64_t r0, int64_t r1,
                    int64_t dim) {
  const __m512i magnitude = _mm512_set1_epi16(0x7FFF);
  const __m512i infinity = _mm512_set1_epi16(0x7C00);
  const uint16_t* x0 = static_cast<const uint16_t*>(data) + base;
  const __mmask32 tail = static_cast<__mmask32>((uint64_t{1} << (dim % 32)) - 1);
  __mmask32 found = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* x = x0 + r * row_stride;
    int64_t d = 0;
    for (; d + 32 <= dim; d += 32) {
      const __m512i v = _mm512_and_si512(_mm512_loadu_si512(x + d), magnitude);
      found |= _mm512_cmpeq_epi16_mask(v, infinity);
    }
    if (d < dim) {
      const __m512i v = _mm512_and_si512(_mm512_maskz_loadu_epi16(tail, x + d), magnitude);
      found |= _mm512_cmpeq_epi16_mask(v, infinity);
    }
  }
  return found != 0;
}

// float16 heads of up to kMaxHeadDim, more query rows than the rows regime takes (decode runs on
// the AVX-512 FMA path: no query block to fill the tiles), and none of contract v2's features
// but its layouts (grouped heads, seqlens_k, windows, bias, softcap and Dv != D run on the AVX-512
// FMA path, which implements them); the rest goes to the AVX-512 FMA path.
bool accepts(const AttentionParams& p) {
  return p.dtype == DType::kFloat16 && p.head_dim <= kMaxHeadDim && p.seq_q > kRowsMaxQueries &&
         is_v1_call(p);
}

bool plan_amx(const AttentionParams& p, Plan* out) {
  Plan& plan = *out;
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
  plan.off_qv = region.take(kParts * (d_k / 2) * bq);
  plan.off_s = region.take(bc * bq);
  plan.off_pv = region.take(kParts * (bc / 2) * bq);
  plan.off_vtail = region.take(kParts * d_v * 16);  // 32 keys of bfloat16 per dim and part
  plan.off_ot = region.take(d_v * bq);
  plan.off_o = region.take(d_k);  // one output row
  plan.off_m = region.take(bq);
  plan.off_l = region.take(bq);
  plan.off_alpha = region.take(bq);
  plan.off_mx = region.take(bq);
  plan.off_rows = region.take(4 * bq);  // (2, bq) int64 row offsets
  plan.scratch_floats = region.end;
  // Packed head (bfloat16 elements): parts x k_rows x d_k of K, then parts x d_v x k_rows of V^T.
  const size_t seq_k = static_cast<size_t>(p.seq_k);
  if (seq_k > SIZE_MAX / 64 / kParts / (d_k + d_v)) return false;
  plan.k_rows = static_cast<int64_t>(round_up(seq_k, 32));
  const size_t k_rows = static_cast<size_t>(plan.k_rows);
  plan.v_offset = kParts * k_rows * d_k / 2;
  plan.head_floats = round_up(plan.v_offset + kParts * d_v * k_rows / 2, 16);
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
// padding keys up to k_rows; the padding dims are zero. Returns false, handing the call back to
// the FMA path, when these keys or values, or the same rows of the query (the last chunk takes
// the query rows past Lk too), hold an infinity.
bool pack_rows_amx(const AttentionParams& p, const Plan& plan, int64_t b, int64_t h, int64_t j0,
                   int64_t n, float* dst) {
  const int64_t dim = p.head_dim, d_k = plan.d_k, d_v = plan.d_v, k_rows = plan.k_rows;
  const int64_t k_base = b * p.k_batch_stride + h * p.k_head_stride;
  const int64_t v_base = b * p.v_batch_stride + h * p.v_head_stride;
  const int64_t q_base = b * p.q_batch_stride + h * p.q_head_stride;
  const int64_t end = j0 + n == p.seq_k ? k_rows : j0 + n;
  const int64_t q_end = j0 + n == p.seq_k ? p.seq_q : min64(p.seq_q, j0 + n);
  if (holds_infinity(p.k, k_base, p.k_row_stride, j0, j0 + n, dim) ||
      holds_infinity(p.v, v_base, p.v_row_stride, j0, j0 + n, dim) ||
      holds_infinity(p.q, q_base, p.q_row_stride, min64(j0, q_end), q_end, dim)) {
    return false;
  }
  uint16_t* kp = reinterpret_cast<uint16_t*>(dst);
  uint16_t* vt = reinterpret_cast<uint16_t*>(dst + plan.v_offset);
  const size_t k_part = static_cast<size_t>(k_rows * d_k);
  const size_t v_part = static_cast<size_t>(d_v * k_rows);
  alignas(64) float rows[16 * kMaxHeadDim];  // 16 keys, row stride d_k
  const __m512i gather_index =
      _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                         _mm512_set1_epi32(static_cast<int>(d_k)));
  for (int64_t g = j0; g < end; g += 16) {
    const int64_t count = min64(16, max64(0, p.seq_k - g));
    // Keys: 16 rows as float32, then each row's parts.
    load_rows(p.k, k_base + g * p.k_row_stride, p.k_row_stride, count, p, d_k, rows);
    for (int64_t r = 0; r < 16 && g + r < end; ++r) {
      for (int64_t c = 0; c < d_k; c += 16) {
        __m512i part[2];
        split(_mm512_load_ps(rows + r * d_k + c), part);
        for (int i = 0; i < kParts; ++i) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(kp + i * k_part + (g + r) * d_k + c),
                              to_bf16(part[i]));
        }
      }
    }
    // Values: 16 rows as float32, then each dim's column of 16 keys, per part.
    load_rows(p.v, v_base + g * p.v_row_stride, p.v_row_stride, count, p, d_k, rows);
    for (int64_t d = 0; d < d_v; ++d) {
      __m512i part[2];
      split(_mm512_i32gather_ps(gather_index, rows + d, 4), part);
      for (int i = 0; i < kParts; ++i) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(vt + i * v_part + d * k_rows + g),
                            to_bf16(part[i]));
      }
    }
  }
  return true;
}

void run_item_amx(const AttentionParams& p, const Plan& plan, int64_t b, int64_t h, int64_t q_block,
                  PackedHead kv, float* scratch) {
  const int64_t bq = kBq, d_k = plan.d_k, d_v = plan.d_v, k_rows = plan.k_rows;
  const int64_t i0 = q_block * bq;
  // accepts() takes v1 calls only: the rows are head h's query rows [i0, i0 + nq).
  const RowBlock rb = row_block(p, b, h, i0, min64(bq, p.seq_q - i0));
  const int64_t nq = rb.n;
  const int64_t ldb = bq * 4;  // bytes per row of S^T, O^T and the pair layouts

  const auto [qt, row, s, m, l, alpha, m_blk] = item_scratch(plan, scratch);
  int64_t* rows = item_rows(plan, scratch);
  row_offsets(p, plan, rb, rows);
  uint32_t* qv = reinterpret_cast<uint32_t*>(scratch + plan.off_qv);
  uint32_t* pv = reinterpret_cast<uint32_t*>(scratch + plan.off_pv);
  uint16_t* vtail = reinterpret_cast<uint16_t*>(scratch + plan.off_vtail);
  float* ot = scratch + plan.off_ot;
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(kv.k);
  const uint16_t* vt = reinterpret_cast<const uint16_t*>(kv.v);
  const size_t k_part = static_cast<size_t>(k_rows * d_k);
  const size_t v_part = static_cast<size_t>(d_v * k_rows);
  const size_t q_part = static_cast<size_t>(d_k / 2 * bq);
  const size_t p_part = static_cast<size_t>(kBc / 2 * bq);
  const size_t tail_part = static_cast<size_t>(d_v * 32);
  const __m512 qscale = _mm512_set1_ps(p.scale);  // scaled logits: softmax_block adds log2(e)

  // The query as it came (its parts are then exact), transposed; its parts in pair layout.
  load_query(p, plan, rb, d_k, 1.0f, qt, row);
  for (int64_t r = 0; r < d_k / 2; ++r)
    for (int64_t c = 0; c < bq; c += 16)
      store_pairs(_mm512_load_ps(qt + 2 * r * bq + c), _mm512_load_ps(qt + (2 * r + 1) * bq + c),
                  qv + r * bq + c, q_part);
  std::memset(ot, 0, sizeof(float) * static_cast<size_t>(d_v * bq));
  init_softmax_state(bq, m, l);

  static const TileConfig config = tile_config();
  _tile_loadconfig(&config);
  const KeyRange keys = visible_keys(p, rb);  // begins at 0: no window in a v1 call
  for (int64_t j0 = keys.begin; j0 < keys.end; j0 += kBc) {
    const int64_t nk = min64(kBc, keys.end - j0);
    const int64_t nk16 = (nk + 15) / 16 * 16, nk32 = (nk + 31) / 32 * 32;

    // S^T = K_blk Qt, 16 keys x 48 queries at a time.
    for (int64_t kt = 0; kt < nk16; kt += 16)
      for (int64_t c = 0; c < bq; c += 48)
        tile_product(s + kt * bq + c, ldb, false, kp + (j0 + kt) * d_k, d_k * 2, k_part, qv + c,
                     ldb, q_part, d_k / 32);
    // Scaled, the block max taken on the way; again if keys were hidden.
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
    if (hide_keys(p, plan, rb, rows, j0, nk, s)) block_max(s, bq, nk, m, m_blk);

    // The softmax writes P^T's parts straight into pair layout over keys (an odd last key is
    // paired with zero); the pair rows up to nk32 are zero.
    const __m512 zero = _mm512_setzero_ps();
    __m512 even = zero;
    softmax_block(s, bq, nk, m, l, alpha, m_blk, kLog2e, [&](int64_t jj, int64_t c, __m512 pj) {
      if ((jj & 1) == 0) {
        even = pj;
        if (jj + 1 == nk) store_pairs(pj, zero, pv + jj / 2 * bq + c, p_part);
      } else {
        store_pairs(even, pj, pv + jj / 2 * bq + c, p_part);
      }
    });
    for (int64_t r = (nk + 1) / 2; r < nk32 / 2; ++r)
      for (int j = 0; j < kParts; ++j)
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
    // The last 32 keys may reach past nk into real keys (causal blocks end on the diagonal):
    // their probabilities are zero, but a NaN value times zero is NaN, so that chunk reads a copy
    // of its values with the keys past nk zeroed.
    const int64_t whole = nk32 > nk && j0 + nk < p.seq_k ? nk / 32 * 32 : nk32;
    if (whole < nk32) {
      const __mmask32 kept = static_cast<__mmask32>((uint64_t{1} << (nk - whole)) - 1);
      for (int j = 0; j < kParts; ++j)
        for (int64_t d = 0; d < d_v; ++d)
          _mm512_storeu_si512(
              vtail + j * tail_part + d * 32,
              _mm512_maskz_loadu_epi16(kept, vt + j * v_part + d * k_rows + j0 + whole));
    }
    for (int64_t dt = 0; dt < d_v; dt += 16) {
      for (int64_t c = 0; c < bq; c += 48) {
        float* o_tile = ot + dt * bq + c;
        if (whole > 0)
          tile_product(o_tile, ldb, true, vt + dt * k_rows + j0, k_rows * 2, v_part, pv + c, ldb,
                       p_part, whole / 32);
        if (whole < nk32)
          tile_product(o_tile, ldb, true, vtail + dt * 32, 64, tail_part, pv + whole / 2 * bq + c,
                       ldb, p_part, 1);
      }
    }
  }
  _tile_release();

  for (int64_t r = 0; r < nq; ++r) {
    for (int64_t d = 0; d < p.head_dim; ++d) row[d] = ot[d * bq + r];
    store_output(p, rb, rows, r, row, l[r]);
  }
}

}  // namespace
}  // namespace amx

bool amx_usable() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  // CPUID leaf 7: AVX-512 F/DQ/BW in EBX bits 16/17/30, AMX-BF16 and AMX-TILE in EDX bits 22/24
  // (asked here, where the compiler is known to take the AMX flags).
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0) return false;
  const unsigned avx512 = (1u << 16) | (1u << 17) | (1u << 30);
  const unsigned amx = (1u << 22) | (1u << 24);
  if ((ebx & avx512) != avx512 || (edx & amx) != amx) return false;
  constexpr long kReqXcompPerm = 0x1023;  // ARCH_REQ_XCOMP_PERM
  constexpr long kXtileData = 18;         // XFEATURE_XTILEDATA
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
#else
  return false;
#endif
}

Kernel kernel_amx() {
  return Kernel{Isa::kAmx,          amx::V::kW,     amx::kBq,     &amx::pack_rows_amx,
                &amx::run_item_amx, &amx::plan_amx, &amx::accepts};
}

}  // namespace cpu
}  // namespace flash_export
#endif

// What every CPU kernel path shares, written once against a small vector abstraction `V` and
// compiled per ISA by the TUs that include it (through flash_attention_cpu_kernel.h for the FMA
// paths, directly for AMX): dtype conversion, the query block, hidden keys, the online softmax
// over a transposed logits block, and the output rows.
//
// Everything here has internal linkage (anonymous namespace) and uses no std templates: each ISA
// TU is compiled with its own -m flags, and a shared inline symbol could otherwise be merged by the
// linker into a copy that executes AVX-512 on a CPU that lacks it.
//
#ifndef FLASH_EXPORT_CORE_FLASH_ATTENTION_CPU_KERNEL_COMMON_H_
#define FLASH_EXPORT_CORE_FLASH_ATTENTION_CPU_KERNEL_COMMON_H_

#include <cstdint>
#include <cstring>

#include "flash_attention.h"
#include "flash_attention_cpu_internal.h"

#ifndef FLASH_EXPORT_ISA_NAMESPACE
#error "define FLASH_EXPORT_ISA_NAMESPACE before including flash_attention_cpu_kernel_common.h"
#endif

namespace flash_export {
namespace cpu {
namespace FLASH_EXPORT_ISA_NAMESPACE {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    exp = 113;  // subnormal: normalise
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    mant &= 0x3ffu;
    return bits_to_float(sign | (exp << 23) | (mant << 13));
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  return bits_to_float(sign | ((exp + 112) << 23) | (mant << 13));
}

inline uint16_t float_to_half(float f) {  // round to nearest even
  const uint32_t bits = float_to_bits(f);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);
  if (abs < 0x38800000u) {  // half subnormal: scale to units of 2^-24 and round (exact scaling)
    const float units = __builtin_nearbyintf(bits_to_float(abs) * 16777216.0f);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(units));
  }
  abs += 0xfffu + ((abs >> 13) & 1u);
  return static_cast<uint16_t>(sign | ((abs - 0x38000000u) >> 13));
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t bits = float_to_bits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// dst[0..n) = float32(src[0..n)), vectorised where the ISA converts the dtype natively.
inline void convert_row(const void* src, int64_t src_offset, DType dtype, float* dst, int64_t n) {
  int64_t i = 0;
  if (dtype == DType::kFloat32) {
    std::memcpy(dst, static_cast<const float*>(src) + src_offset, static_cast<size_t>(n) * 4);
    return;
  }
  if (dtype == DType::kFloat16) {
    const uint16_t* s = static_cast<const uint16_t*>(src) + src_offset;
    if (V::kW > 1)
      for (; i + V::kW <= n; i += V::kW) V::storeu(dst + i, V::load_half(s + i));
    for (; i < n; ++i) dst[i] = half_to_float(s[i]);
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(src) + src_offset;
  for (; i < n; ++i) dst[i] = bf16_to_float(s[i]);
}

// dst[0..n) = dtype(src[0..n) / divisor). A division, not a multiplication by the reciprocal:
// that rounds twice, up to one more float32 step of the output, a third of PyTorch's own error.
inline void store_row(const float* src, float divisor, void* dst, int64_t dst_offset, DType dtype,
                      int64_t n) {
  int64_t i = 0;
  const typename V::Reg f = V::set1(divisor);
  if (dtype == DType::kFloat32) {
    float* d = static_cast<float*>(dst) + dst_offset;
    for (; i + V::kW <= n; i += V::kW) V::storeu(d + i, V::div(V::load(src + i), f));
    for (; i < n; ++i) d[i] = src[i] / divisor;
    return;
  }
  uint16_t* d = static_cast<uint16_t*>(dst) + dst_offset;
  if (dtype == DType::kFloat16) {
    if (V::kW > 1)
      for (; i + V::kW <= n; i += V::kW) V::store_half(d + i, V::div(V::load(src + i), f));
    for (; i < n; ++i) d[i] = float_to_half(src[i] / divisor);
    return;
  }
  for (; i < n; ++i) d[i] = float_to_bf16(src[i] / divisor);
}

inline void zero_row(void* dst, int64_t dst_offset, DType dtype, int64_t n) {
  const size_t elem = dtype == DType::kFloat32 ? 4 : 2;
  std::memset(static_cast<char*>(dst) + dst_offset * static_cast<int64_t>(elem), 0,
              static_cast<size_t>(n) * elem);
}

// The float32 scratch regions every work item uses, at the Plan's offsets (the Plan documents
// each region's layout on each path).
struct ItemScratch {
  float* qt;     // the query block
  float* o;      // the output accumulator (AMX: one output row)
  float* s;      // logits, then probabilities
  float* m;      // running max
  float* l;      // running sum
  float* alpha;  // the current block's rescale factor
  float* m_blk;  // running max including the current block
};

inline ItemScratch item_scratch(const Plan& plan, float* scratch) {
  return {scratch + plan.off_qt, scratch + plan.off_o, scratch + plan.off_s,
          scratch + plan.off_m,  scratch + plan.off_l, scratch + plan.off_alpha,
          scratch + plan.off_mx};
}

// The rows of one work item: rows [t0, t0 + n) of key/value head (b, kvh), row t being query
// t / G of head kvh * G + t % G (flash_attention_cpu_internal.h). G = 1 makes them the query rows
// of head kvh, as in contract v1.
struct RowBlock {
  int64_t b;       // batch entry
  int64_t kvh;     // key/value head
  int64_t group;   // G: query heads per key/value head
  int64_t t0;      // first row
  int64_t n;       // rows
  int64_t seq_k;   // L_b: keys of this batch entry (past them nothing is read)
  int64_t offset;  // query i sits at position i + offset (bottom-right: L_b - Lq)
  int64_t query(int64_t r) const { return (t0 + r) / group; }
  int64_t head(int64_t r) const { return kvh * group + (t0 + r) % group; }
  // Rows [0, rows_before(x)) sit at positions below x (a prefix: positions grow with the row).
  int64_t rows_before(int64_t x) const { return min64(n, max64(0, (x - offset) * group - t0)); }
};

inline RowBlock row_block(const AttentionParams& p, int64_t b, int64_t kvh, int64_t t0, int64_t n) {
  const int64_t seq_k = keys_of(p, b);
  return {b, kvh, group_of(p), t0, n, seq_k, seq_k - p.seq_q};
}

// Keys [begin, end) that some row of rb may see (L_b, causal, window); no row sees any other.
struct KeyRange {
  int64_t begin, end;
};

inline KeyRange visible_keys(const AttentionParams& p, const RowBlock& rb) {
  if (rb.n <= 0) return {0, 0};
  const int64_t first = rb.offset + rb.query(0), last = rb.offset + rb.query(rb.n - 1);
  const int64_t w = window_of(p);
  int64_t begin = 0, end = rb.seq_k;
  if (p.causal) end = min64(end, last + 1);
  if (w > 0) {
    begin = max64(begin, first - w + 1);
    if (!p.causal) end = min64(end, last + w);
  }
  return {begin, max64(begin, end)};
}

// Each row's element offsets into the mask and the bias at key 0: rows[r] (mask) and
// rows[bq_pad + r] (bias), in the Plan's off_rows region. Filled once per item, only for the
// inputs the call has.
inline void row_offsets(const AttentionParams& p, const Plan& plan, const RowBlock& rb,
                        int64_t* rows) {
  for (int64_t r = 0; r < rb.n; ++r) {
    const int64_t h = rb.head(r), i = rb.query(r);
    if (p.mask != nullptr)
      rows[r] = rb.b * p.mask_batch_stride + h * p.mask_head_stride + i * p.mask_q_stride;
    if (p.bias != nullptr)
      rows[plan.bq_pad + r] =
          rb.b * p.bias_batch_stride + h * p.bias_head_stride + i * p.bias_q_stride;
  }
}

inline int64_t* item_rows(const Plan& plan, float* scratch) {
  return reinterpret_cast<int64_t*>(scratch + plan.off_rows);
}

// Asks for the cache lines of `bytes` bytes at `row`. The caller's rows sit a whole E apart, too
// far for the hardware prefetchers: asking for rows a few ahead overlaps their cache misses
// instead of queueing them one row at a time.
inline void prefetch_row(const char* row, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off);
}

// The element offset of row r's query (b, h, i).
inline int64_t query_offset(const AttentionParams& p, const RowBlock& rb, int64_t r) {
  return rb.b * p.q_batch_stride + rb.query(r) * p.q_row_stride + rb.head(r) * p.q_head_stride;
}

// The rows of rb times qscale, transposed into qt (rows x bq_pad): rows >= D and columns >= n
// are zero. `tmp` holds D floats.
void load_query(const AttentionParams& p, const Plan& plan, const RowBlock& rb, int64_t rows,
                float qscale, float* qt, float* tmp) {
  const int64_t dim = p.head_dim, bq_pad = plan.bq_pad, nq = rb.n;
  const int64_t elem = p.dtype == DType::kFloat32 ? 4 : 2;
  const char* q_bytes = static_cast<const char*>(p.q);
  constexpr int64_t kAhead = 8;
  // Each row is converted with vector loads into tmp, then scattered.
  for (int64_t r = 0; r < nq; ++r) {
    if (r + kAhead < nq) prefetch_row(q_bytes + query_offset(p, rb, r + kAhead) * elem, dim * elem);
    convert_row(p.q, query_offset(p, rb, r), p.dtype, tmp, dim);
    for (int64_t d = 0; d < dim; ++d) qt[d * bq_pad + r] = tmp[d] * qscale;
  }
  for (int64_t d = 0; d < dim; ++d)
    for (int64_t r = nq; r < bq_pad; ++r) qt[d * bq_pad + r] = 0.0f;
  for (int64_t d = dim; d < rows; ++d)
    for (int64_t r = 0; r < bq_pad; ++r) qt[d * bq_pad + r] = 0.0f;
}

// Sets the logits s (keys x bq_pad) of keys [j0, j0 + nk) that rows of rb must not see to -inf:
// causal and window (on blocks crossing their edges) and the mask (`rows`: row_offsets). Returns
// whether any could be.
bool hide_keys(const AttentionParams& p, const Plan& plan, const RowBlock& rb, const int64_t* rows,
               int64_t j0, int64_t nk, float* s) {
  const int64_t bq_pad = plan.bq_pad, nq = rb.n;
  const int64_t first = rb.offset + rb.query(0), last = rb.offset + rb.query(nq - 1);
  const float neg_inf = -__builtin_inff();
  bool any = false;
  // Causal: key j is hidden from the rows at positions below j.
  if (p.causal && j0 + nk - 1 > first) {
    any = true;
    for (int64_t jj = 0; jj < nk; ++jj) {
      const int64_t hidden = rb.rows_before(j0 + jj);
      float* srow = s + jj * bq_pad;
      for (int64_t r = 0; r < hidden; ++r) srow[r] = neg_inf;
    }
  }
  const int64_t w = window_of(p);
  // Window: key j is hidden from the rows at positions j + w and later ...
  if (w > 0 && j0 <= last - w) {
    any = true;
    for (int64_t jj = 0; jj < nk; ++jj) {
      float* srow = s + jj * bq_pad;
      for (int64_t r = rb.rows_before(j0 + jj + w); r < nq; ++r) srow[r] = neg_inf;
    }
  }
  // ... and, without the causal rule, from those at positions j - w and earlier.
  if (w > 0 && !p.causal && j0 + nk - 1 >= first + w) {
    any = true;
    for (int64_t jj = 0; jj < nk; ++jj) {
      const int64_t hidden = rb.rows_before(j0 + jj - w + 1);
      float* srow = s + jj * bq_pad;
      for (int64_t r = 0; r < hidden; ++r) srow[r] = neg_inf;
    }
  }
  if (p.mask != nullptr) {
    any = true;
    const uint8_t* mk = p.mask + j0 * p.mask_k_stride;
    for (int64_t jj = 0; jj < nk; ++jj, mk += p.mask_k_stride) {
      float* srow = s + jj * bq_pad;
      for (int64_t r = 0; r < nq; ++r)
        if (mk[rows[r]] == 0) srow[r] = neg_inf;
    }
  }
  return any;
}

// Makes the block's logits s (keys x bq_pad, holding q . k times logit_scale's query factor) the
// logits of contract v2 for rows [0, n) and keys [j0, j0 + nk): times |scale| (so the softmax
// then takes exponent factor log2(e)), capped by softcap * tanh(x / softcap), plus the bias
// (`rows`: row_offsets; `tmp` holds nk floats). Runs before hide_keys, whose -inf must not be
// capped.
inline void shape_logits(const AttentionParams& p, const Plan& plan, const int64_t* rows,
                         int64_t nq, int64_t j0, int64_t nk, float* s, float* tmp) {
  const int64_t bq_pad = plan.bq_pad;
  const float scale = p.scale < 0.0f ? -p.scale : p.scale;
  const float cap = p.softcap;
  for (int64_t jj = 0; jj < nk; ++jj) {
    float* srow = s + jj * bq_pad;
    if (cap > 0.0f) {
      for (int64_t r = 0; r < nq; ++r) srow[r] = cap * __builtin_tanhf(srow[r] * scale / cap);
    } else {
      for (int64_t r = 0; r < nq; ++r) srow[r] *= scale;
    }
  }
  if (p.bias == nullptr) return;
  const int64_t* bias_rows = rows + bq_pad;
  for (int64_t r = 0; r < nq; ++r) {
    const int64_t base = bias_rows[r] + j0 * p.bias_k_stride;
    if (p.bias_k_stride == 1) {
      convert_row(p.bias, base, p.dtype, tmp, nk);
    } else {
      for (int64_t jj = 0; jj < nk; ++jj)
        convert_row(p.bias, base + jj * p.bias_k_stride, p.dtype, tmp + jj, 1);
    }
    for (int64_t jj = 0; jj < nk; ++jj) s[jj * bq_pad + r] += tmp[jj];
  }
}

// m_blk = max(m, max over the nk key rows of s), per query column.
inline void block_max(const float* s, int64_t bq_pad, int64_t nk, const float* m, float* m_blk) {
  for (int64_t c = 0; c < bq_pad; c += V::kW) {
    typename V::Reg mxc = V::load(m + c);
    for (int64_t jj = 0; jj < nk; ++jj) mxc = V::max(V::load(s + jj * bq_pad + c), mxc);
    V::store(m_blk + c, mxc);
  }
}

// How the logits reach the exponent. The FMA paths multiply the query by `query_factor` (1, -1
// or 0: exact) and the softmax takes exp2((s - max) * exponent_factor) with exponent_factor =
// |scale| * log2(e): the scale and the base-2 conversion multiply s - max, after the
// subtraction, so their rounding is relative to that difference, small for the keys that carry
// the weight. Folding scale * log2(e) into the query (as this code once did) rounds every query
// element and then the logits at their own magnitude, |s| * 2^-24 in every exponent. With that,
// the sums split into partials (s_tile, pv_tile) and a division at the output (store_row),
// flash-attention's float32 grid went from 29-31 of 240 cases over 2x PyTorch's own float32
// error (up to 3.75x) to none (tests/test_cpu_kernel_plan.py). A negative scale flips the query's
// sign so that the max is still the max; scale 0 makes every visible logit 0 (the query is zeroed),
// and the exponent then takes plain log2(e). A call with a bias or a softcap needs the logits
// themselves (shape_logits): its exponent factor is log2(e), and its logits round at their own
// magnitude, as PyTorch's do.
struct LogitScale {
  float query_factor;
  float exponent_factor;
};

inline bool shapes_logits(const AttentionParams& p) {
  return p.bias != nullptr || p.softcap > 0.0f;
}

inline LogitScale logit_scale(const AttentionParams& p) {
  const float scale = p.scale;
  const float query_factor = scale > 0.0f ? 1.0f : scale < 0.0f ? -1.0f : 0.0f;
  if (shapes_logits(p) || scale == 0.0f) return {query_factor, kLog2e};
  return {query_factor, (scale < 0.0f ? -scale : scale) * kLog2e};
}

// Online softmax over one key block, one vector of query columns at a time: hands put(jj, c, p)
// the probabilities exp2((s - max) * exponent_factor) of key jj for query columns [c, c + W),
// keys in order within a column; sets alpha (the rescale factor of the earlier blocks) and moves
// l and m on (m in the units of s).
template <typename Put>
inline void softmax_block(const float* s, int64_t bq_pad, int64_t nk, float* m, float* l,
                          float* alpha, const float* m_blk, float exponent_factor, Put put) {
  const typename V::Reg neg_inf = V::set1(-__builtin_inff());
  const typename V::Reg log2e = V::set1(exponent_factor);
  for (int64_t c = 0; c < bq_pad; c += V::kW) {
    const typename V::Reg m_old = V::load(m + c);
    const typename V::Reg mx = V::load(m_blk + c);
    // A row that has seen no key yet keeps max -inf; subtract 0 then so exp2 gives exact zeros.
    const typename V::Reg m_use = V::zero_where_equal(mx, neg_inf);
    typename V::Reg sum = V::zero();
    for (int64_t jj = 0; jj < nk; ++jj) {
      const typename V::Reg pj =
          V::exp2(V::mul(V::sub(V::load(s + jj * bq_pad + c), m_use), log2e));
      put(jj, c, pj);
      sum = V::add(sum, pj);
    }
    const typename V::Reg a = V::exp2(V::mul(V::sub(m_old, m_use), log2e));
    V::store(alpha + c, a);
    V::store(l + c, V::fmadd(V::load(l + c), a, sum));
    V::store(m + c, mx);
  }
}

// Whether row r of rb may attend to any key (L_b, causal, window and mask; `mask_row`: its
// row_offsets entry). Out of line: inlined into every work item's output loop it cost the masked
// paths ~2% (measured), though it runs only for rows whose sum is 0.
__attribute__((noinline)) bool row_sees_keys(const AttentionParams& p, const RowBlock& rb,
                                             int64_t mask_row, int64_t r) {
  const int64_t pos = rb.offset + rb.query(r), w = window_of(p);
  int64_t begin = 0, end = rb.seq_k;
  if (p.causal) end = min64(end, pos + 1);
  if (w > 0) {
    begin = max64(begin, pos - w + 1);
    if (!p.causal) end = min64(end, pos + w);
  }
  if (end <= begin) return false;
  if (p.mask == nullptr) return true;
  for (int64_t j = begin; j < end; ++j)
    if (p.mask[mask_row + j * p.mask_k_stride] != 0) return true;
  return false;
}

// Output row r of rb: row / sum, or zeros for a row that sees no key. A sum of exactly 0 means
// either that, or visible keys whose every logit was -inf (hidden keys add exactly 0, and any
// visible finite or NaN logit makes the sum nonzero): only then is the mask looked up, so the
// rows with a sum pay nothing. The second kind has row 0, and 0 / 0 makes it NaN, the softmax of
// all -inf logits (flash_export.h); a NaN sum stays NaN. `rows`: row_offsets (read only with a
// mask).
inline void store_output(const AttentionParams& p, const RowBlock& rb, const int64_t* rows,
                         int64_t r, const float* row, float sum) {
  const int64_t base =
      rb.b * p.o_batch_stride + rb.query(r) * p.o_row_stride + rb.head(r) * p.o_head_stride;
  const int64_t dim_v = head_dim_v_of(p);
  if (sum == 0.0f && !row_sees_keys(p, rb, p.mask != nullptr ? rows[r] : 0, r)) {
    zero_row(p.out, base, p.dtype, dim_v);
  } else {
    store_row(row, sum, p.out, base, p.dtype, dim_v);
  }
}

inline void init_softmax_state(int64_t bq_pad, float* m, float* l) {
  for (int64_t r = 0; r < bq_pad; ++r) {
    m[r] = -__builtin_inff();
    l[r] = 0.0f;
  }
}

}  // namespace
}  // namespace FLASH_EXPORT_ISA_NAMESPACE
}  // namespace cpu
}  // namespace flash_export

#endif  // FLASH_EXPORT_CORE_FLASH_ATTENTION_CPU_KERNEL_COMMON_H_

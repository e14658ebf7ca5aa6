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

// Asks for the cache lines of `bytes` bytes at `row`. The caller's rows sit a whole E apart, too
// far for the hardware prefetchers: asking for rows a few ahead overlaps their cache misses
// instead of queueing them one row at a time.
inline void prefetch_row(const char* row, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off);
}

// Query rows [i0, i0 + nq) of head (b, h) times qscale, transposed into qt (rows x bq_pad): rows
// >= D and columns >= nq are zero. `tmp` holds D floats.
void load_query(const AttentionParams& p, const Plan& plan, int64_t b, int64_t h, int64_t i0,
                int64_t nq, int64_t rows, float qscale, float* qt, float* tmp) {
  const int64_t dim = p.head_dim, bq_pad = plan.bq_pad;
  const int64_t elem = p.dtype == DType::kFloat32 ? 4 : 2;
  const char* q_bytes = static_cast<const char*>(p.q);
  constexpr int64_t kAhead = 8;
  // Each row is converted with vector loads into tmp, then scattered.
  for (int64_t r = 0; r < nq; ++r) {
    const int64_t base = b * p.q_batch_stride + (i0 + r) * p.q_row_stride + h * p.q_head_stride;
    if (r + kAhead < nq)
      prefetch_row(q_bytes + (base + kAhead * p.q_row_stride) * elem, dim * elem);
    convert_row(p.q, base, p.dtype, tmp, dim);
    for (int64_t d = 0; d < dim; ++d) qt[d * bq_pad + r] = tmp[d] * qscale;
  }
  for (int64_t d = 0; d < dim; ++d)
    for (int64_t r = nq; r < bq_pad; ++r) qt[d * bq_pad + r] = 0.0f;
  for (int64_t d = dim; d < rows; ++d)
    for (int64_t r = 0; r < bq_pad; ++r) qt[d * bq_pad + r] = 0.0f;
}

// Sets the logits s (keys x bq_pad) of keys [j0, j0 + nk) that rows [i0, i0 + nq) must not see
// to -inf: causal (on blocks crossing the diagonal) and the mask. Returns whether any could be.
bool hide_keys(const AttentionParams& p, const Plan& plan, int64_t b, int64_t h, int64_t i0,
               int64_t nq, int64_t j0, int64_t nk, float* s) {
  const int64_t bq_pad = plan.bq_pad;
  const int64_t diag = p.seq_k - p.seq_q;  // query i sees key j iff j <= i + diag (causal)
  // Causal: key j is hidden from rows r < j - diag - i0.
  const bool causal_cut = p.causal && j0 + nk - 1 > i0 + diag;
  if (causal_cut) {
    for (int64_t jj = 0; jj < nk; ++jj) {
      const int64_t hidden = min64(nq, j0 + jj - diag - i0);
      float* srow = s + jj * bq_pad;
      for (int64_t r = 0; r < hidden; ++r) srow[r] = -__builtin_inff();
    }
  }
  if (p.mask != nullptr) {
    const uint8_t* mrow0 = p.mask + b * p.mask_batch_stride + h * p.mask_head_stride +
                           i0 * p.mask_q_stride + j0 * p.mask_k_stride;
    for (int64_t jj = 0; jj < nk; ++jj) {
      const uint8_t* mk = mrow0 + jj * p.mask_k_stride;
      float* srow = s + jj * bq_pad;
      for (int64_t r = 0; r < nq; ++r)
        if (mk[r * p.mask_q_stride] == 0) srow[r] = -__builtin_inff();
    }
  }
  return causal_cut || p.mask != nullptr;
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
// and the exponent then takes plain log2(e).
struct LogitScale {
  float query_factor;
  float exponent_factor;
};

inline LogitScale logit_scale(float scale) {
  if (scale > 0.0f) return {1.0f, scale * kLog2e};
  if (scale < 0.0f) return {-1.0f, -scale * kLog2e};
  return {0.0f, kLog2e};
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

// Whether query row i of head (b, h) may attend to any key (causal rule and mask). Out of line:
// inlined into every work item's output loop it cost the masked paths ~2% (measured), though it
// runs only for rows whose sum is 0.
__attribute__((noinline)) bool row_sees_keys(const AttentionParams& p, int64_t b, int64_t h,
                                             int64_t i) {
  const int64_t end = p.causal ? min64(p.seq_k, i + 1 + p.seq_k - p.seq_q) : p.seq_k;
  if (end <= 0) return false;
  if (p.mask == nullptr) return true;
  const uint8_t* m =
      p.mask + b * p.mask_batch_stride + h * p.mask_head_stride + i * p.mask_q_stride;
  for (int64_t j = 0; j < end; ++j)
    if (m[j * p.mask_k_stride] != 0) return true;
  return false;
}

// Output row i of head (b, h): row / sum, or zeros for a row that sees no key. A sum of exactly
// 0 means either that, or visible keys whose every logit was -inf (hidden keys add exactly 0, and
// any visible finite or NaN logit makes the sum nonzero): only then is the mask looked up, so the
// rows with a sum pay nothing. The second kind has row 0, and 0 / 0 makes it NaN, the softmax of
// all -inf logits (flash_export.h); a NaN sum stays NaN.
inline void store_output(const AttentionParams& p, int64_t b, int64_t h, int64_t i,
                         const float* row, float sum) {
  const int64_t base = b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
  if (sum == 0.0f && !row_sees_keys(p, b, h, i)) {
    zero_row(p.out, base, p.dtype, p.head_dim);
  } else {
    store_row(row, sum, p.out, base, p.dtype, p.head_dim);
  }
}

// First key past the block's visible range: causal blocks above the diagonal are skipped.
inline int64_t visible_keys_end(const AttentionParams& p, int64_t i0, int64_t nq) {
  if (!p.causal) return p.seq_k;
  return max64(0, min64(p.seq_k, i0 + nq + p.seq_k - p.seq_q));
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

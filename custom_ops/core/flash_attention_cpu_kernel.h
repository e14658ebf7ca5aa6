// The CPU FlashAttention work item, written once against a small vector abstraction `V` and
// compiled per ISA (portable, AVX2+FMA, AVX-512) by the TUs that include this header.
//
// Everything here has internal linkage (anonymous namespace) and uses no std templates: each ISA
// TU is compiled with its own -m flags, and a shared inline symbol could otherwise be merged by the
// linker into a copy that executes AVX-512 on a CPU that lacks it.
//
// Layout per item (b, h, query block of bq rows), all float32:
//   Qt (D, bq_pad)   query block * scale * log2(e), transposed so a key row times Qt is a row of S^T
//   S  (bc, bq_pad)  S^T = K_blk Qt: per key a vector of query columns; the online-softmax max and
//                    sum over keys are then vertical vector ops, with no horizontal reductions
//   O  (bq, d_pad)   O = O * alpha + P V_blk
// K_blk and V_blk are rows of the head's keys and values packed once per call by pack_rows.
#ifndef FLASH_EXPORT_CORE_FLASH_ATTENTION_CPU_KERNEL_H_
#define FLASH_EXPORT_CORE_FLASH_ATTENTION_CPU_KERNEL_H_

#include <cstdint>
#include <cstring>

#include "flash_attention.h"
#include "flash_attention_cpu_internal.h"

#ifndef FLASH_EXPORT_ISA_NAMESPACE
#error "define FLASH_EXPORT_ISA_NAMESPACE before including flash_attention_cpu_kernel.h"
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

// dst[0..n) = dtype(src[0..n) * factor).
inline void store_row(const float* src, float factor, void* dst, int64_t dst_offset, DType dtype,
                      int64_t n) {
  int64_t i = 0;
  const typename V::Reg f = V::set1(factor);
  if (dtype == DType::kFloat32) {
    float* d = static_cast<float*>(dst) + dst_offset;
    for (; i + V::kW <= n; i += V::kW) V::storeu(d + i, V::mul(V::load(src + i), f));
    for (; i < n; ++i) d[i] = src[i] * factor;
    return;
  }
  uint16_t* d = static_cast<uint16_t*>(dst) + dst_offset;
  if (dtype == DType::kFloat16) {
    if (V::kW > 1)
      for (; i + V::kW <= n; i += V::kW) V::store_half(d + i, V::mul(V::load(src + i), f));
    for (; i < n; ++i) d[i] = float_to_half(src[i] * factor);
    return;
  }
  for (; i < n; ++i) d[i] = float_to_bf16(src[i] * factor);
}

inline void zero_row(void* dst, int64_t dst_offset, DType dtype, int64_t n) {
  const size_t elem = dtype == DType::kFloat32 ? 4 : 2;
  std::memset(static_cast<char*>(dst) + dst_offset * static_cast<int64_t>(elem), 0,
              static_cast<size_t>(n) * elem);
}

// S[jj, c0 + c*W ...] = sum_d K[jj, d] * Qt[d, ...] for keys jj in [j0, j0 + R), and the running
// column max mx[c0 + c*W ...] taken over those keys while they are still in registers.
template <int R, int C>
inline void s_tile(const float* k, int64_t ldk, const float* qt, int64_t bq_pad, int64_t dim,
                   float* s, float* mx, int64_t j0, int64_t c0) {
  typename V::Reg acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = V::zero();
  const float* krow = k + j0 * ldk;
  for (int64_t d = 0; d < dim; ++d) {
    typename V::Reg q[C];
    for (int c = 0; c < C; ++c) q[c] = V::load(qt + d * bq_pad + c0 + c * V::kW);
    for (int r = 0; r < R; ++r) {
      const typename V::Reg kv = V::set1(krow[r * ldk + d]);
      for (int c = 0; c < C; ++c) acc[r][c] = V::fmadd(kv, q[c], acc[r][c]);
    }
  }
  for (int c = 0; c < C; ++c) {
    typename V::Reg m = V::load(mx + c0 + c * V::kW);
    for (int r = 0; r < R; ++r) {
      V::store(s + (j0 + r) * bq_pad + c0 + c * V::kW, acc[r][c]);
      m = V::max(acc[r][c], m);
    }
    V::store(mx + c0 + c * V::kW, m);
  }
}

// O[r0.., c0..] = O * alpha + sum_jj P^T[jj, r] * V[jj, c0..] for rows r in [r0, r0 + R).
template <int R, int C>
inline void pv_tile(const float* pt, int64_t bq_pad, const float* v, int64_t ldv, int64_t nk,
                    const float* alpha, float* o, int64_t d_pad, int64_t r0, int64_t c0) {
  typename V::Reg acc[R][C];
  for (int r = 0; r < R; ++r) {
    const typename V::Reg a = V::set1(alpha[r0 + r]);
    for (int c = 0; c < C; ++c)
      acc[r][c] = V::mul(V::load(o + (r0 + r) * d_pad + c0 + c * V::kW), a);
  }
  for (int64_t jj = 0; jj < nk; ++jj) {
    typename V::Reg vv[C];
    for (int c = 0; c < C; ++c) vv[c] = V::loadu(v + jj * ldv + c0 + c * V::kW);
    const float* prow = pt + jj * bq_pad + r0;
    for (int r = 0; r < R; ++r) {
      const typename V::Reg pr = V::set1(prow[r]);
      for (int c = 0; c < C; ++c) acc[r][c] = V::fmadd(pr, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) V::store(o + (r0 + r) * d_pad + c0 + c * V::kW, acc[r][c]);
}

inline void prefetch_row(const char* row, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off);
}

// Keys and values [j0, j0 + n) of head (b, h) as float32 rows: K at dst (ld D), V after all Lk
// keys (ld d_pad, padding zeroed).
void pack_rows(const AttentionParams& p, const Plan& plan, int64_t b, int64_t h, int64_t j0,
               int64_t n, float* dst) {
  const int64_t dim = p.head_dim, d_pad = plan.d_pad;
  float* kd = dst + j0 * dim;
  float* vd = dst + p.seq_k * dim + j0 * d_pad;
  const int64_t k_base = b * p.k_batch_stride + j0 * p.k_row_stride + h * p.k_head_stride;
  const int64_t v_base = b * p.v_batch_stride + j0 * p.v_row_stride + h * p.v_head_stride;
  // The source rows are a whole E apart, too far for the hardware prefetchers: ask for the rows a
  // few ahead so their cache misses overlap instead of queueing one row at a time.
  const int64_t elem = p.dtype == DType::kFloat32 ? 4 : 2;
  const int64_t row_bytes = dim * elem;
  constexpr int64_t kAhead = 8;
  const char* k_src = static_cast<const char*>(p.k) + k_base * elem;
  const char* v_src = static_cast<const char*>(p.v) + v_base * elem;
  for (int64_t jj = 0; jj < n; ++jj) {
    if (jj + kAhead < n) prefetch_row(k_src + (jj + kAhead) * p.k_row_stride * elem, row_bytes);
    convert_row(p.k, k_base + jj * p.k_row_stride, p.dtype, kd + jj * dim, dim);
  }
  for (int64_t jj = 0; jj < n; ++jj) {
    if (jj + kAhead < n) prefetch_row(v_src + (jj + kAhead) * p.v_row_stride * elem, row_bytes);
    float* row = vd + jj * d_pad;
    convert_row(p.v, v_base + jj * p.v_row_stride, p.dtype, row, dim);
    for (int64_t d = dim; d < d_pad; ++d) row[d] = 0.0f;
  }
}

void run_item(const AttentionParams& p, const Plan& plan, int64_t b, int64_t h, int64_t q_block,
              PackedHead kv, float* scratch) {
  constexpr int W = V::kW;
  const int64_t dim = p.head_dim;
  const int64_t bq_pad = plan.bq_pad;
  const int64_t d_pad = plan.d_pad;
  const int64_t i0 = q_block * plan.bq;
  const int64_t nq = min64(plan.bq, p.seq_q - i0);
  const int64_t diag = p.seq_k - p.seq_q;  // query i sees key j iff j <= i + diag (causal)

  float* qt = scratch + plan.off_qt;
  float* o = scratch + plan.off_o;
  float* s = scratch + plan.off_s;
  float* m = scratch + plan.off_m;
  float* l = scratch + plan.off_l;
  float* alpha = scratch + plan.off_alpha;
  float* m_blk = scratch + plan.off_mx;

  // Query block, scaled into the log2 domain so the softmax uses exp2, transposed and zero padded.
  const float qscale = p.scale * kLog2e;
  // Each row is converted with vector loads into o (free until it is zeroed below), then scattered.
  for (int64_t r = 0; r < nq; ++r) {
    const int64_t base = b * p.q_batch_stride + (i0 + r) * p.q_row_stride + h * p.q_head_stride;
    convert_row(p.q, base, p.dtype, o, dim);
    for (int64_t d = 0; d < dim; ++d) qt[d * bq_pad + r] = o[d] * qscale;
  }
  for (int64_t d = 0; d < dim; ++d)
    for (int64_t r = nq; r < bq_pad; ++r) qt[d * bq_pad + r] = 0.0f;
  std::memset(o, 0, sizeof(float) * static_cast<size_t>(plan.bq * d_pad));
  for (int64_t r = 0; r < bq_pad; ++r) {
    m[r] = -__builtin_inff();
    l[r] = 0.0f;
  }

  // Keys past k_end are invisible to every row of this block: causal blocks above the diagonal
  // are skipped entirely.
  int64_t k_end = p.seq_k;
  if (p.causal) k_end = max64(0, min64(p.seq_k, i0 + nq + diag));

  const typename V::Reg neg_inf = V::set1(-__builtin_inff());

  for (int64_t j0 = 0; j0 < k_end; j0 += plan.bc) {
    const int64_t nk = min64(plan.bc, k_end - j0);
    const float* kb = kv.k + j0 * dim;
    const int64_t ldk = dim;
    const float* vb = kv.v + j0 * d_pad;
    const int64_t ldv = d_pad;

    // S^T = K_blk Qt, register-blocked; m_blk starts at the running max and takes in the block.
    for (int64_t c = 0; c < bq_pad; c += W) V::store(m_blk + c, V::load(m + c));
    {
      const int64_t nvec = bq_pad / W;
      int64_t jj = 0;
      for (; jj + V::kSR <= nk; jj += V::kSR) {
        int64_t c = 0;
        for (; c + V::kSC <= nvec; c += V::kSC)
          s_tile<V::kSR, V::kSC>(kb, ldk, qt, bq_pad, dim, s, m_blk, jj, c * W);
        for (; c < nvec; ++c) s_tile<V::kSR, 1>(kb, ldk, qt, bq_pad, dim, s, m_blk, jj, c * W);
      }
      for (; jj < nk; ++jj) {
        int64_t c = 0;
        for (; c + V::kSC <= nvec; c += V::kSC)
          s_tile<1, V::kSC>(kb, ldk, qt, bq_pad, dim, s, m_blk, jj, c * W);
        for (; c < nvec; ++c) s_tile<1, 1>(kb, ldk, qt, bq_pad, dim, s, m_blk, jj, c * W);
      }
    }

    // Causal: key j is hidden from rows r < j - diag - i0 (only on blocks crossing the diagonal).
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

    // Masked logits: the max taken during the product may include hidden keys; take it again.
    if (causal_cut || p.mask != nullptr) {
      for (int64_t c = 0; c < bq_pad; c += W) {
        typename V::Reg mxc = V::load(m + c);
        for (int64_t jj = 0; jj < nk; ++jj) mxc = V::max(V::load(s + jj * bq_pad + c), mxc);
        V::store(m_blk + c, mxc);
      }
    }

    // Online softmax, one vector of query rows at a time.
    for (int64_t c = 0; c < bq_pad; c += W) {
      const typename V::Reg m_old = V::load(m + c);
      const typename V::Reg mx = V::load(m_blk + c);
      // A row that has seen no key yet keeps max -inf; subtract 0 then so exp2 gives exact zeros.
      const typename V::Reg m_use = V::zero_where_equal(mx, neg_inf);
      typename V::Reg sum = V::zero();
      for (int64_t jj = 0; jj < nk; ++jj) {
        const typename V::Reg pj = V::exp2(V::sub(V::load(s + jj * bq_pad + c), m_use));
        V::store(s + jj * bq_pad + c, pj);
        sum = V::add(sum, pj);
      }
      const typename V::Reg a = V::exp2(V::sub(m_old, m_use));
      V::store(alpha + c, a);
      V::store(l + c, V::fmadd(V::load(l + c), a, sum));
      V::store(m + c, mx);
    }

    // O = O * alpha + P V_blk, register-blocked over valid rows only.
    {
      const int64_t nvec = d_pad / W;
      int64_t r = 0;
      for (; r + V::kOR <= nq; r += V::kOR) {
        int64_t c = 0;
        for (; c + V::kOC <= nvec; c += V::kOC)
          pv_tile<V::kOR, V::kOC>(s, bq_pad, vb, ldv, nk, alpha, o, d_pad, r, c * W);
        for (; c < nvec; ++c) pv_tile<V::kOR, 1>(s, bq_pad, vb, ldv, nk, alpha, o, d_pad, r, c * W);
      }
      for (; r < nq; ++r) {
        int64_t c = 0;
        for (; c + V::kOC <= nvec; c += V::kOC)
          pv_tile<1, V::kOC>(s, bq_pad, vb, ldv, nk, alpha, o, d_pad, r, c * W);
        for (; c < nvec; ++c) pv_tile<1, 1>(s, bq_pad, vb, ldv, nk, alpha, o, d_pad, r, c * W);
      }
    }
  }

  // Normalise. A row that saw no key (sum exactly 0) is zeros; a NaN sum stays NaN.
  for (int64_t r = 0; r < nq; ++r) {
    const int64_t base = b * p.o_batch_stride + (i0 + r) * p.o_row_stride + h * p.o_head_stride;
    if (l[r] == 0.0f) {
      zero_row(p.out, base, p.dtype, dim);
    } else {
      store_row(o + r * d_pad, 1.0f / l[r], p.out, base, p.dtype, dim);
    }
  }
}

}  // namespace
}  // namespace FLASH_EXPORT_ISA_NAMESPACE
}  // namespace cpu
}  // namespace flash_export

#endif  // FLASH_EXPORT_CORE_FLASH_ATTENTION_CPU_KERNEL_H_

// The FMA CPU FlashAttention work item (portable, AVX2+FMA, AVX-512), written once against the
// vector abstraction `V` and compiled per ISA by the TUs that include this header; the pieces
// shared with the AMX path are in flash_attention_cpu_kernel_common.h.
//
// Everything here has internal linkage (anonymous namespace) and uses no std templates: each ISA
// TU is compiled with its own -m flags, and a shared inline symbol could otherwise be merged by the
// linker into a copy that executes AVX-512 on a CPU that lacks it.
//
// Layout per item (b, h, query block of bq rows), all float32:
//   Qt (D, bq_pad)   query block * scale * log2(e), transposed so a key row times Qt is a row of
//   S^T S  (bc, bq_pad)  S^T = K_blk Qt: per key a vector of query columns; the online-softmax max
//   and
//                    sum over keys are then vertical vector ops, with no horizontal reductions
//   O  (bq, d_pad)   O = O * alpha + P V_blk
// K_blk and V_blk are rows of the head's keys and values packed once per call by pack_rows.
#ifndef FLASH_EXPORT_CORE_FLASH_ATTENTION_CPU_KERNEL_H_
#define FLASH_EXPORT_CORE_FLASH_ATTENTION_CPU_KERNEL_H_

#include <cstdint>
#include <cstring>

#include "flash_attention_cpu_kernel_common.h"

namespace flash_export {
namespace cpu {
namespace FLASH_EXPORT_ISA_NAMESPACE {
namespace {

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
// keys (ld d_pad, padding zeroed). The FMA paths take every call: always true.
bool pack_rows(const AttentionParams& p, const Plan& plan, int64_t b, int64_t h, int64_t j0,
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
  return true;
}

void run_item(const AttentionParams& p, const Plan& plan, int64_t b, int64_t h, int64_t q_block,
              PackedHead kv, float* scratch) {
  constexpr int W = V::kW;
  const int64_t dim = p.head_dim;
  const int64_t bq_pad = plan.bq_pad;
  const int64_t d_pad = plan.d_pad;
  const int64_t i0 = q_block * plan.bq;
  const int64_t nq = min64(plan.bq, p.seq_q - i0);

  float* qt = scratch + plan.off_qt;
  float* o = scratch + plan.off_o;
  float* s = scratch + plan.off_s;
  float* m = scratch + plan.off_m;
  float* l = scratch + plan.off_l;
  float* alpha = scratch + plan.off_alpha;
  float* m_blk = scratch + plan.off_mx;

  // The query in the log2 domain, so the softmax uses exp2; o is free until it is zeroed below.
  load_query(p, plan, b, h, i0, nq, dim, p.scale * kLog2e, qt, o);
  std::memset(o, 0, sizeof(float) * static_cast<size_t>(plan.bq * d_pad));
  init_softmax_state(bq_pad, m, l);

  const int64_t k_end = visible_keys_end(p, i0, nq);
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
    // Masked logits: the max taken during the product may include hidden keys; take it again.
    if (hide_keys(p, plan, b, h, i0, nq, j0, nk, s)) block_max(s, bq_pad, nk, m, m_blk);
    softmax_block(s, bq_pad, nk, m, l, alpha, m_blk,  // P^T in place of S^T
                  [s, bq_pad](int64_t jj, int64_t c, typename V::Reg pj) {
                    V::store(s + jj * bq_pad + c, pj);
                  });

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

  for (int64_t r = 0; r < nq; ++r) store_output(p, b, h, i0 + r, o + r * d_pad, l[r]);
}

}  // namespace
}  // namespace FLASH_EXPORT_ISA_NAMESPACE
}  // namespace cpu
}  // namespace flash_export

#endif  // FLASH_EXPORT_CORE_FLASH_ATTENTION_CPU_KERNEL_H_

// The FMA CPU FlashAttention work item (portable, AVX2+FMA, AVX-512), written once against the
// vector abstraction `V` and compiled per ISA by the TUs that include this header; the pieces
// shared with the AMX path are in flash_attention_cpu_kernel_common.h.
//
// Everything here has internal linkage (anonymous namespace) and uses no std templates: each ISA
// TU is compiled with its own -m flags, and a shared inline symbol could otherwise be merged by the
// linker into a copy that executes AVX-512 on a CPU that lacks it.
//
// Layout per item (b, h, query block of bq rows), all float32:
//   Qt (D, bq_pad)   query block (times logit_scale's factor), transposed so a key row times Qt is
//   a row of S^T S  (bc, bq_pad)  S^T = K_blk Qt: per key a vector of query columns; the
//   online-softmax max and
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

// Head dims per partial dot product: longer dot products are summed as partials of this many
// terms (each a running FMA sum from zero) added together, which roughly halves the float32
// error of the logits at D = 128-256 (the part of the gap to PyTorch's own error that remained
// at D = 224 and 256 on flash-attention's grid).
constexpr int64_t kDotChunk = 16;

// S[jj, c0 + c*W ...] = sum_d K[jj, d] * Qt[d, ...] for keys jj in [j0, j0 + R), and the running
// column max mx[c0 + c*W ...] taken over those keys while they are still in registers.
template <int R, int C>
inline void s_tile(const float* k, int64_t ldk, const float* qt, int64_t bq_pad, int64_t dim,
                   float* s, float* mx, int64_t j0, int64_t c0) {
  typename V::Reg acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = V::zero();
  const float* krow = k + j0 * ldk;
  for (int64_t d0 = 0; d0 < dim; d0 += kDotChunk) {
    if (d0 > 0)
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = V::zero();
    const int64_t d1 = min64(dim, d0 + kDotChunk);
    for (int64_t d = d0; d < d1; ++d) {
      typename V::Reg q[C];
      for (int c = 0; c < C; ++c) q[c] = V::load(qt + d * bq_pad + c0 + c * V::kW);
      for (int r = 0; r < R; ++r) {
        const typename V::Reg kv = V::set1(krow[r * ldk + d]);
        for (int c = 0; c < C; ++c) acc[r][c] = V::fmadd(kv, q[c], acc[r][c]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) {
        float* out = s + (j0 + r) * bq_pad + c0 + c * V::kW;
        if (d0 > 0) acc[r][c] = V::add(V::load(out), acc[r][c]);
        V::store(out, acc[r][c]);
      }
  }
  for (int c = 0; c < C; ++c) {
    typename V::Reg m = V::load(mx + c0 + c * V::kW);
    for (int r = 0; r < R; ++r) m = V::max(acc[r][c], m);
    V::store(mx + c0 + c * V::kW, m);
  }
}

// O[r0.., c0..] = O * alpha + sum_jj P^T[jj, r] * V[jj, c0..] for rows r in [r0, r0 + R). The
// block's sum starts from zero and joins O at the end: float32 sums of one block of keys, then of
// one term per block, err less than one running sum over every key (at Lk = 2048 that was most
// of the gap to PyTorch's own float32 error).
template <int R, int C>
inline void pv_tile(const float* pt, int64_t bq_pad, const float* v, int64_t ldv, int64_t nk,
                    const float* alpha, float* o, int64_t d_pad, int64_t r0, int64_t c0) {
  typename V::Reg acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = V::zero();
  for (int64_t jj = 0; jj < nk; ++jj) {
    typename V::Reg vv[C];
    for (int c = 0; c < C; ++c) vv[c] = V::loadu(v + jj * ldv + c0 + c * V::kW);
    const float* prow = pt + jj * bq_pad + r0;
    for (int r = 0; r < R; ++r) {
      const typename V::Reg pr = V::set1(prow[r]);
      for (int c = 0; c < C; ++c) acc[r][c] = V::fmadd(pr, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const typename V::Reg a = V::set1(alpha[r0 + r]);
    for (int c = 0; c < C; ++c) {
      float* out = o + (r0 + r) * d_pad + c0 + c * V::kW;
      V::store(out, V::fmadd(V::load(out), a, acc[r][c]));
    }
  }
}

// Keys and values [j0, j0 + n) of key/value head (b, h) as float32 rows: K at dst (ld D), V after
// all Lk keys (ld d_pad, padding zeroed). The FMA paths take every call: always true.
bool pack_rows(const AttentionParams& p, const Plan& plan, int64_t b, int64_t h, int64_t j0,
               int64_t n, float* dst) {
  const int64_t dim = p.head_dim, dim_v = head_dim_v_of(p), d_pad = plan.d_pad;
  float* kd = dst + j0 * dim;
  float* vd = dst + p.seq_k * dim + j0 * d_pad;
  const int64_t k_base = b * p.k_batch_stride + j0 * p.k_row_stride + h * p.k_head_stride;
  const int64_t v_base = b * p.v_batch_stride + j0 * p.v_row_stride + h * p.v_head_stride;
  // The source rows are a whole E apart, too far for the hardware prefetchers: ask for the rows a
  // few ahead so their cache misses overlap instead of queueing one row at a time.
  const int64_t elem = p.dtype == DType::kFloat32 ? 4 : 2;
  constexpr int64_t kAhead = 8;
  const char* k_src = static_cast<const char*>(p.k) + k_base * elem;
  const char* v_src = static_cast<const char*>(p.v) + v_base * elem;
  for (int64_t jj = 0; jj < n; ++jj) {
    if (jj + kAhead < n) prefetch_row(k_src + (jj + kAhead) * p.k_row_stride * elem, dim * elem);
    convert_row(p.k, k_base + jj * p.k_row_stride, p.dtype, kd + jj * dim, dim);
  }
  for (int64_t jj = 0; jj < n; ++jj) {
    if (jj + kAhead < n) prefetch_row(v_src + (jj + kAhead) * p.v_row_stride * elem, dim_v * elem);
    float* row = vd + jj * d_pad;
    convert_row(p.v, v_base + jj * p.v_row_stride, p.dtype, row, dim_v);
    for (int64_t d = dim_v; d < d_pad; ++d) row[d] = 0.0f;
  }
  return true;
}

// How many keys [0, n) of a block at key j0 rows [0, r1) of rb may see: causal, up to the last
// row's position (past it every row's probability is exactly 0, and skipping those keys changes no
// sum); otherwise all of them.
struct SeenKeys {
  int64_t nk;
  bool causal;
  const RowBlock* rb;
  int64_t j0;
  int64_t operator()(int64_t r1) const {
    if (!causal) return nk;
    return max64(0, min64(nk, rb->offset + rb->query(r1 - 1) + 1 - j0));
  }
};

// O columns [c0, c0 + C vectors) of every query row in [0, nq) by R rows, the last rows one at a
// time; a tile of rows stops at the last key its last row sees (SeenKeys).
template <int R, int C>
inline void pv_rows(const float* pt, int64_t bq_pad, const float* v, int64_t ldv,
                    const float* alpha, float* o, int64_t d_pad, int64_t nq, int64_t c0,
                    const SeenKeys& seen) {
  int64_t r = 0;
  for (; r + R <= nq; r += R)
    pv_tile<R, C>(pt, bq_pad, v, ldv, seen(r + R), alpha, o, d_pad, r, c0);
  for (; r < nq; ++r) pv_tile<1, C>(pt, bq_pad, v, ldv, seen(r + 1), alpha, o, d_pad, r, c0);
}

// Rows per O tile when only C vectors of head dim are left: as many as the accumulators the
// full tile uses (kOR x kOC), at most 12. A head of one or two vectors (D = 16 and 32 on AVX-512)
// then still keeps a dozen FMA chains going instead of kOR.
template <int C>
constexpr int pv_tile_rows() {
  return V::kOR * V::kOC / C < 12 ? V::kOR * V::kOC / C : 12;
}

// O = O * alpha + P V_blk for query rows [0, nq), every column of the head: full tiles of kOC
// vectors, then the rest in one narrower tile of more rows.
inline void pv_block(const float* pt, int64_t bq_pad, const float* v, int64_t ldv,
                     const float* alpha, float* o, int64_t d_pad, int64_t nq,
                     const SeenKeys& seen) {
  constexpr int W = V::kW;
  const int64_t nvec = d_pad / W;
  int64_t c = 0;
  for (; c + V::kOC <= nvec; c += V::kOC)
    pv_rows<V::kOR, V::kOC>(pt, bq_pad, v, ldv, alpha, o, d_pad, nq, c * W, seen);
  switch (nvec - c) {
    case 0:
      break;
    case 1:
      pv_rows<pv_tile_rows<1>(), 1>(pt, bq_pad, v, ldv, alpha, o, d_pad, nq, c * W, seen);
      break;
    case 2:
      pv_rows<pv_tile_rows<2>(), 2>(pt, bq_pad, v, ldv, alpha, o, d_pad, nq, c * W, seen);
      break;
    default:  // kOC is 4 on every path: 3 vectors at most
      for (; c < nvec; ++c)
        pv_rows<pv_tile_rows<1>(), 1>(pt, bq_pad, v, ldv, alpha, o, d_pad, nq, c * W, seen);
  }
}

// The block's logits, made ready for the softmax: contract v2's shaping (bias, softcap), the
// hidden keys at -inf, and m_blk the running max over what is left (s_tile took it over the raw
// products; it is taken again whenever they changed).
inline void finish_logits(const AttentionParams& p, const Plan& plan, const RowBlock& rb,
                          const int64_t* rows, int64_t j0, int64_t nk, float* s, const float* m,
                          float* m_blk, float* tmp) {
  const bool shaped = shapes_logits(p);
  if (shaped) shape_logits(p, plan, rows, rb.n, j0, nk, s, tmp);
  if (hide_keys(p, plan, rb, rows, j0, nk, s) || shaped) block_max(s, plan.bq_pad, nk, m, m_blk);
}

// One (batch, key/value head, block of rows) item. DIM is the head dim when the caller
// specialised it (16, 32, 64, 128: the dot products' trip counts are then constants), 0 for any
// other.
template <int DIM>
void run_item_dim(const AttentionParams& p, const Plan& plan, int64_t b, int64_t h, int64_t q_block,
                  PackedHead kv, float* scratch) {
  constexpr int W = V::kW;
  const int64_t dim = DIM > 0 ? DIM : p.head_dim;
  const int64_t bq_pad = plan.bq_pad;
  const int64_t d_pad = plan.d_pad;
  const int64_t t0 = q_block * plan.bq;
  const RowBlock rb = row_block(p, b, h, t0, min64(plan.bq, rows_per_kv_head(p) - t0));
  const int64_t nq = rb.n;

  // (Lambdas below take s by init-capture: C++17 cannot capture a structured binding.)
  const auto [qt, o, s, m, l, alpha, m_blk] = item_scratch(plan, scratch);
  int64_t* rows = item_rows(plan, scratch);
  float* tmp = scratch + plan.off_btmp;
  row_offsets(p, plan, rb, rows);

  // The query as it came (times 1, -1 or 0: logit_scale says why); o is free until zeroed below.
  const LogitScale ls = logit_scale(p);
  load_query(p, plan, rb, dim, ls.query_factor, qt, o);
  std::memset(o, 0, sizeof(float) * static_cast<size_t>(plan.bq * d_pad));
  init_softmax_state(bq_pad, m, l);

  const KeyRange keys = visible_keys(p, rb);
  for (int64_t j0 = keys.begin; j0 < keys.end; j0 += plan.bc) {
    const int64_t nk = min64(plan.bc, keys.end - j0);
    const float* kb = kv.k + j0 * dim;
    const int64_t ldk = dim;
    const float* vb = kv.v + j0 * d_pad;

    // S^T = K_blk Qt, register-blocked; m_blk starts at the running max and takes in the block.
    for (int64_t c = 0; c < bq_pad; c += W) V::store(m_blk + c, V::load(m + c));
    {
      const int64_t nvec = bq_pad / W;
      int64_t jj = 0;
      for (; jj + V::kSR <= nk; jj += V::kSR) {
        // Vectors of query columns that none of these keys is visible to are left out: hide_keys
        // sets them to -inf and block_max takes the max again (a causal cut).
        int64_t c = p.causal ? min64(nvec, rb.rows_before(j0 + jj) / W) : 0;
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
    finish_logits(p, plan, rb, rows, j0, nk, s, m, m_blk, tmp);
    softmax_block(s, bq_pad, nk, m, l, alpha, m_blk, ls.exponent_factor,  // P^T over S^T
                  [pt = s, bq_pad](int64_t jj, int64_t c, typename V::Reg pj) {
                    V::store(pt + jj * bq_pad + c, pj);
                  });
    // O = O * alpha + P V_blk, register-blocked over valid rows only.
    pv_block(s, bq_pad, vb, d_pad, alpha, o, d_pad, nq, SeenKeys{nk, p.causal, &rb, j0});
  }

  for (int64_t r = 0; r < nq; ++r) store_output(p, rb, rows, r, o + r * d_pad, l[r]);
}

void run_item(const AttentionParams& p, const Plan& plan, int64_t b, int64_t h, int64_t q_block,
              PackedHead kv, float* scratch) {
  switch (p.head_dim) {
    case 16:
      return run_item_dim<16>(p, plan, b, h, q_block, kv, scratch);
    case 32:
      return run_item_dim<32>(p, plan, b, h, q_block, kv, scratch);
    case 64:
      return run_item_dim<64>(p, plan, b, h, q_block, kv, scratch);
    case 128:
      return run_item_dim<128>(p, plan, b, h, q_block, kv, scratch);
    default:
      return run_item_dim<0>(p, plan, b, h, q_block, kv, scratch);
  }
}

// O rows [0, nq) = O * alpha + P V_blk for float16 values read in place (rows ldv elements
// apart, the head dim a whole number of vectors): NV vectors of head dim at a time, per row.
template <int NV>
inline void pv_rows_half(const float* pt, int64_t bq_pad, const uint16_t* v, int64_t ldv,
                         int64_t nk, const float* alpha, float* o, int64_t d_pad, int64_t nq,
                         int64_t c0) {
  for (int64_t r = 0; r < nq; ++r) {
    typename V::Reg acc[NV];
    for (int c = 0; c < NV; ++c) acc[c] = V::zero();
    for (int64_t jj = 0; jj < nk; ++jj) {
      const typename V::Reg pr = V::set1(pt[jj * bq_pad + r]);
      const uint16_t* vrow = v + jj * ldv + c0;
      for (int c = 0; c < NV; ++c) acc[c] = V::fmadd(pr, V::load_half(vrow + c * V::kW), acc[c]);
    }
    const typename V::Reg a = V::set1(alpha[r]);
    for (int c = 0; c < NV; ++c) {
      float* out = o + r * d_pad + c0 + c * V::kW;
      V::store(out, V::fmadd(V::load(out), a, acc[c]));
    }
  }
}

inline void pv_block_half(const float* pt, int64_t bq_pad, const uint16_t* v, int64_t ldv,
                          int64_t nk, const float* alpha, float* o, int64_t d_pad, int64_t nq) {
  constexpr int W = V::kW;
  int64_t c0 = 0;
  for (; c0 + 4 * W <= d_pad; c0 += 4 * W)
    pv_rows_half<4>(pt, bq_pad, v, ldv, nk, alpha, o, d_pad, nq, c0);
  for (; c0 < d_pad; c0 += W) pv_rows_half<1>(pt, bq_pad, v, ldv, nk, alpha, o, d_pad, nq, c0);
}

// Rows regime: all G x Lq (<= kRowsMaxQueries) rows of key/value head (b, h) against its keys,
// read from the caller's tensors: in place when they are float32 rows of whole vectors, else
// converted a block at a time into scratch. Per (row, key) one dot product along the head dim (Lq
// lanes of a transposed query block would leave the rest of every vector idle); S^T then has the
// tiled path's layout, so the mask, the softmax and P V are shared with it. The G query heads of
// a key/value head read each key and value row once, together.
void run_rows(const AttentionParams& p, const Plan& plan, int64_t b, int64_t h, float* scratch) {
  constexpr int W = V::kW;
  const int64_t dim = p.head_dim, dim_v = head_dim_v_of(p);
  const int64_t d_pad = plan.d_pad, dk_pad = plan.dk_pad, bq_pad = plan.bq_pad;
  const RowBlock rb = row_block(p, b, h, 0, rows_per_kv_head(p));
  const int64_t nq = rb.n;
  // q (nq, dk_pad), padding zero; o (nq, d_pad); s (bc, bq_pad)
  const auto [q, o, s, m, l, alpha, m_blk] = item_scratch(plan, scratch);
  float* kbuf = scratch + plan.off_kb;
  float* vbuf = scratch + plan.off_vb;
  int64_t* rows = item_rows(plan, scratch);
  float* tmp = scratch + plan.off_btmp;
  row_offsets(p, plan, rb, rows);

  const LogitScale ls = logit_scale(p);
  for (int64_t r = 0; r < nq; ++r) {
    float* row = q + r * dk_pad;
    convert_row(p.q, query_offset(p, rb, r), p.dtype, row, dim);
    for (int64_t d = 0; d < dim; ++d) row[d] *= ls.query_factor;
    for (int64_t d = dim; d < dk_pad; ++d) row[d] = 0.0f;
  }
  std::memset(o, 0, sizeof(float) * static_cast<size_t>(nq * d_pad));
  init_softmax_state(bq_pad, m, l);

  const bool whole = dim == dk_pad && dim_v == d_pad;
  const bool in_place = p.dtype == DType::kFloat32 && whole;
  // float16 rows of whole vectors are read in place too, converted as they are loaded: a copy per
  // block made float16 decode 1.8x slower than float32 (compare_attention, 2026-11-30).
  const bool half_in_place = V::kW > 1 && p.dtype == DType::kFloat16 && whole;
  const uint16_t* k_half = static_cast<const uint16_t*>(p.k);
  const uint16_t* v_half = static_cast<const uint16_t*>(p.v);
  const int64_t k_base = b * p.k_batch_stride + h * p.k_head_stride;
  const int64_t v_base = b * p.v_batch_stride + h * p.v_head_stride;
  const KeyRange keys = visible_keys(p, rb);
  for (int64_t j0 = keys.begin; j0 < keys.end; j0 += plan.bc) {
    const int64_t nk = min64(plan.bc, keys.end - j0);
    const float* kb = kbuf;
    const float* vb = vbuf;
    int64_t ldk = dk_pad, ldv = d_pad;
    if (in_place) {
      kb = static_cast<const float*>(p.k) + k_base + j0 * p.k_row_stride;
      vb = static_cast<const float*>(p.v) + v_base + j0 * p.v_row_stride;
      ldk = p.k_row_stride;
      ldv = p.v_row_stride;
    } else if (!half_in_place) {
      for (int64_t jj = 0; jj < nk; ++jj) {
        float* krow = kbuf + jj * dk_pad;
        float* vrow = vbuf + jj * d_pad;
        convert_row(p.k, k_base + (j0 + jj) * p.k_row_stride, p.dtype, krow, dim);
        convert_row(p.v, v_base + (j0 + jj) * p.v_row_stride, p.dtype, vrow, dim_v);
        for (int64_t d = dim; d < dk_pad; ++d) krow[d] = 0.0f;
        for (int64_t d = dim_v; d < d_pad; ++d) vrow[d] = 0.0f;
      }
    }
    // S^T: a dot product per (key, query row); the padding columns are zero. Rows read in place
    // sit H*D apart: ask for the keys and values a few rows ahead (pack_rows says why).
    constexpr int64_t kAhead = 8;
    for (int64_t jj = 0; jj < nk; ++jj) {
      if (in_place && jj + kAhead < nk) {
        prefetch_row(reinterpret_cast<const char*>(kb + (jj + kAhead) * ldk), dim * 4);
        prefetch_row(reinterpret_cast<const char*>(vb + (jj + kAhead) * ldv), dim_v * 4);
      } else if (half_in_place && jj + kAhead < nk) {
        const int64_t row = j0 + jj + kAhead;
        prefetch_row(reinterpret_cast<const char*>(k_half + k_base + row * p.k_row_stride),
                     dim * 2);
        prefetch_row(reinterpret_cast<const char*>(v_half + v_base + row * p.v_row_stride),
                     dim_v * 2);
      }
      const float* krow = kb + jj * ldk;
      const uint16_t* krow_half = k_half + k_base + (j0 + jj) * p.k_row_stride;
      float* srow = s + jj * bq_pad;
      for (int64_t r = 0; r < bq_pad; r += W) V::store(srow + r, V::zero());
      for (int64_t r = 0; r < nq; ++r) {
        const float* qrow = q + r * dk_pad;
        float dot = 0.0f;
        for (int64_t d0 = 0; d0 < dk_pad; d0 += kDotChunk) {  // partials: s_tile says why
          const int64_t d1 = min64(dk_pad, d0 + kDotChunk);
          typename V::Reg acc = V::zero();
          if (half_in_place) {
            for (int64_t d = d0; d < d1; d += W)
              acc = V::fmadd(V::load_half(krow_half + d), V::load(qrow + d), acc);
          } else {
            for (int64_t d = d0; d < d1; d += W)
              acc = V::fmadd(V::loadu(krow + d), V::load(qrow + d), acc);
          }
          dot += V::reduce_add(acc);
        }
        srow[r] = dot;
      }
    }
    const bool shaped = shapes_logits(p);
    if (shaped) shape_logits(p, plan, rows, nq, j0, nk, s, tmp);
    hide_keys(p, plan, rb, rows, j0, nk, s);
    block_max(s, bq_pad, nk, m, m_blk);
    softmax_block(s, bq_pad, nk, m, l, alpha, m_blk, ls.exponent_factor,
                  [pt = s, bq_pad](int64_t jj, int64_t c, typename V::Reg pj) {
                    V::store(pt + jj * bq_pad + c, pj);
                  });
    if (half_in_place) {
      pv_block_half(s, bq_pad, v_half + v_base + j0 * p.v_row_stride, p.v_row_stride, nk, alpha, o,
                    d_pad, nq);
    } else {
      pv_block(s, bq_pad, vb, ldv, alpha, o, d_pad, nq, SeenKeys{nk, false, &rb, j0});
    }
  }
  for (int64_t r = 0; r < nq; ++r) store_output(p, rb, rows, r, o + r * d_pad, l[r]);
}

}  // namespace
}  // namespace FLASH_EXPORT_ISA_NAMESPACE
}  // namespace cpu
}  // namespace flash_export

#endif  // FLASH_EXPORT_CORE_FLASH_ATTENTION_CPU_KERNEL_H_

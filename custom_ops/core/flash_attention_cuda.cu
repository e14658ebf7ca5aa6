// CUDA forward of FlashAttention (flash_export.h states the params' contract).
//
// Two kernels behind one launcher:
//   * flash_fwd_mma_kernel: float16/bfloat16, head_dim 64 or 128, 16-byte aligned rows. One CTA of
//     8 warps per (query tile of 128 rows, head, batch); each warp owns 16 query rows. Key/value
//     tiles of 64 rows stream through double-buffered shared memory with cp.async; S = Q K^T and
//     O += P V run on the tensor cores (mma.sync m16n8k16, float32 accumulators); the online
//     softmax keeps its running max and sum in registers. Key tiles wholly above the causal
//     diagonal are never loaded.
//   * flash_fwd_simple_kernel: every other case (float32, other head dims up to 512, unaligned
//     strides, pre-sm_80 devices). One warp per query row, lane j scores key j of a 32-key block.
// Both read grouped-query heads (query head h reads key/value head h / (H / H_kv)) and any layout
// through the strides; contract v2's seqlens_k, bias, window, softcap and Dv != D are refused
// (Status::kUnsupported; the params filler names them first).
// Lk == 0 goes to zero_output_kernel. Every kernel launches on the caller's stream only.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "flash_attention.h"
#include "flash_attention_cuda_primitives.cuh"

namespace flash_export {
namespace cuda_detail {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

// ---------------------------------------------------------------------------------------------
// Tensor-core kernel.
// ---------------------------------------------------------------------------------------------

constexpr int kMmaWarps = 8;
constexpr int kMmaThreads = kMmaWarps * 32;
constexpr int kBlockM = 16 * kMmaWarps;  // query rows per CTA
constexpr int kBlockN = 64;              // keys per pipeline stage

template <int kHeadDim>
struct MmaTile {
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  static_assert(kChunks >= 8 && kChunks % 8 == 0, "the swizzle needs rows of 8k chunks");
  // Q (kBlockM rows) + two stages of K and of V (kBlockN rows each).
  static constexpr int kSmemElems = (kBlockM + 4 * kBlockN) * kHeadDim;
  // ptxas (sm_80, sm_90) fits D = 64 in 128 registers without spilling, so two CTAs share an SM;
  // D = 128 needs ~210 (64 output + 32 score accumulators, prefetched fragments) and runs one CTA
  // per SM, 8 warps, the occupancy FlashAttention-2 has at this head dim. Q fragments are re-read
  // from shared memory on every key tile: holding them in registers spilled at both head dims.
  static constexpr int kMinBlocksPerSm = kHeadDim <= 64 ? 2 : 1;

  // Element offset of 16-byte chunk `chunk` of tile row `row`. Rows are 128-byte multiples, so
  // without the XOR the 8 row addresses of one ldmatrix would all hit the same banks.
  static __device__ __forceinline__ int offset(int row, int chunk) {
    return row * kHeadDim + ((chunk ^ (row & 7)) << 3);
  }
};

// Issues cp.async for rows [row0, row0 + kRows) of a (rows, kHeadDim) tensor slice into a swizzled
// tile; rows at or past `row_end` are zero-filled.
template <typename T, int kRows, int kHeadDim>
__device__ __forceinline__ void load_tile_async(T* tile, const T* gmem, int64_t row_stride,
                                                int row0, int row_end) {
  using Tile = MmaTile<kHeadDim>;
  constexpr int kPerThread = kRows * Tile::kChunks / kMmaThreads;
  static_assert(kRows * Tile::kChunks % kMmaThreads == 0, "tile must split evenly over threads");
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int idx = static_cast<int>(threadIdx.x) + i * kMmaThreads;
    const int row = idx / Tile::kChunks;
    const int chunk = idx % Tile::kChunks;
    const bool valid = row0 + row < row_end;
    const T* src = valid ? gmem + static_cast<int64_t>(row0 + row) * row_stride + chunk * 8 : gmem;
    cp_async_16(tile + Tile::offset(row, chunk), src, valid);
  }
}

// Query rows [m0, m0 + kBlockM) of one (batch, head) that see no key at all.
template <typename T, int kHeadDim>
__device__ void store_zero_tile(T* o, int64_t row_stride, int m0, int seq_q) {
  constexpr int kChunks = kHeadDim / 8;
  for (int idx = static_cast<int>(threadIdx.x); idx < kBlockM * kChunks; idx += kMmaThreads) {
    const int row = m0 + idx / kChunks;
    if (row < seq_q) {
      *reinterpret_cast<uint4*>(o + static_cast<int64_t>(row) * row_stride + (idx % kChunks) * 8) =
          make_uint4(0, 0, 0, 0);
    }
  }
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kMmaThreads, MmaTile<kHeadDim>::kMinBlocksPerSm)
    flash_fwd_mma_kernel(const AttentionParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Tile = MmaTile<kHeadDim>;
  using Cvt = Convert<T>;
  constexpr int kKSteps = kHeadDim / 16;  // k-steps of S = Q K^T
  constexpr int kNTiles = kBlockN / 8;    // 8-key column tiles of S
  constexpr int kDTiles = kHeadDim / 8;   // 8-wide column tiles of O

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const s_q = reinterpret_cast<T*>(smem_raw);  // (kBlockM, D)
  T* const s_k = s_q + kBlockM * kHeadDim;        // 2 x (kBlockN, D)
  T* const s_v = s_k + 2 * kBlockN * kHeadDim;    // 2 x (kBlockN, D)

  const int seq_q = static_cast<int>(p.seq_q);
  const int seq_k = static_cast<int>(p.seq_k);
  const int m0 = static_cast<int>(blockIdx.x) * kBlockM;
  const int64_t h = blockIdx.y;
  const int64_t b = blockIdx.z;
  const T* const q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  // Grouped-query: its key/value head, in unsigned 32-bit arithmetic (the head count is the
  // grid's y size, under 65536): a 64-bit division made the sm_90 kernels spill registers.
  const unsigned kv_h = static_cast<unsigned>(h) /
                        (static_cast<unsigned>(p.heads) / static_cast<unsigned>(kv_heads_of(p)));
  const T* const k = static_cast<const T*>(p.k) + b * p.k_batch_stride + kv_h * p.k_head_stride;
  const T* const v = static_cast<const T*>(p.v) + b * p.v_batch_stride + kv_h * p.v_head_stride;
  T* const o = static_cast<T*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride;
  const uint8_t* const mask =
      p.mask == nullptr ? nullptr : p.mask + b * p.mask_batch_stride + h * p.mask_head_stride;

  // Bottom-right causal: row i sees keys j <= i + diag. The tile's last live row bounds the keys.
  const int diag = seq_k - seq_q;
  int key_end = seq_k;
  if (p.causal) key_end = min(seq_k, min(m0 + kBlockM, seq_q) + diag);
  const int num_tiles = key_end > 0 ? (key_end + kBlockN - 1) / kBlockN : 0;
  if (num_tiles == 0) {
    store_zero_tile<T, kHeadDim>(o, p.o_row_stride, m0, seq_q);
    return;
  }

  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int group = lane / 4;  // fragment row within an 8-row half
  const int quad = lane % 4;   // fragment column pair
  const int warp_row0 = warp * 16;
  // This thread's two query rows (accumulator elements 0,1 and 2,3).
  const int rows[2] = {m0 + warp_row0 + group, m0 + warp_row0 + group + 8};
  const float scale_log2 = p.scale * kLog2e;

  load_tile_async<T, kBlockM, kHeadDim>(s_q, q, p.q_row_stride, m0, seq_q);
  load_tile_async<T, kBlockN, kHeadDim>(s_k, k, p.k_row_stride, 0, seq_k);
  load_tile_async<T, kBlockN, kHeadDim>(s_v, v, p.v_row_stride, 0, seq_k);
  cp_async_commit();

  float acc_o[kDTiles][4];
#pragma unroll
  for (int d = 0; d < kDTiles; ++d) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_o[d][e] = 0.0f;
  }
  float row_max[2] = {-INFINITY, -INFINITY};  // running max of the log2-scaled logits
  float row_sum[2] = {0.0f, 0.0f};            // this thread's share of the running denominator
  // Whether each row has met a visible key among this thread's columns: a row that did, but whose
  // every logit was -inf, is NaN (flash_export.h); one that did not is zeros.
  bool row_seen[2] = {false, false};

  for (int tile = 0; tile < num_tiles; ++tile) {
    const int stage = tile & 1;
    // Prefetch the next K/V tile into the other stage while this one is consumed.
    if (tile + 1 < num_tiles) {
      const int next = (tile + 1) * kBlockN;
      load_tile_async<T, kBlockN, kHeadDim>(s_k + (stage ^ 1) * kBlockN * kHeadDim, k,
                                            p.k_row_stride, next, seq_k);
      load_tile_async<T, kBlockN, kHeadDim>(s_v + (stage ^ 1) * kBlockN * kHeadDim, v,
                                            p.v_row_stride, next, seq_k);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    const T* const tile_k = s_k + stage * kBlockN * kHeadDim;
    const T* const tile_v = s_v + stage * kBlockN * kHeadDim;

    // S = Q K^T for this warp's 16 rows x kBlockN keys. A (Q) fragment: lanes 0-15 address rows
    // 0-15 at column 0, lanes 16-31 rows 0-15 at column 8. B (K^T) fragments for two 8-key tiles
    // per ldmatrix: matrices (keys 0-7, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 0-7),
    // (keys 8-15, d 8-15).
    float acc_s[kNTiles][4];
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_s[n][e] = 0.0f;
    }
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      uint32_t a_reg[4];
      ldmatrix_x4(a_reg, s_q + Tile::offset(warp_row0 + (lane & 15), 2 * kk + lane / 16));
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        uint32_t b_reg[4];
        ldmatrix_x4(b_reg, tile_k + Tile::offset(np * 16 + (lane & 7) + (lane / 16) * 8,
                                                 2 * kk + ((lane / 8) & 1)));
        mma_m16n8k16<T>(acc_s[2 * np], a_reg, b_reg[0], b_reg[1]);
        mma_m16n8k16<T>(acc_s[2 * np + 1], a_reg, b_reg[2], b_reg[3]);
      }
    }

    // Scale into the log2 domain; mask only tiles that can hold an invisible key.
    const int n0 = tile * kBlockN;
    const bool needs_mask =
        mask != nullptr || n0 + kBlockN > seq_k || (p.causal && n0 + kBlockN - 1 > m0 + diag);
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_s[n][e] *= scale_log2;
    }
    if (needs_mask) {
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = rows[e / 2];
          const int col = n0 + n * 8 + quad * 2 + (e & 1);
          bool visible = col < seq_k && row < seq_q && (!p.causal || col <= row + diag);
          if (visible && mask != nullptr) {
            visible = __ldg(mask + row * p.mask_q_stride + col * p.mask_k_stride) != 0;
          }
          if (visible) {
            row_seen[e / 2] = true;
          } else {
            acc_s[n][e] = -INFINITY;
          }
        }
      }
    } else {
      row_seen[0] = row_seen[1] = true;  // every key of the tile is visible to every row
    }

    // Online softmax. A quad of lanes shares each row, so row maxima reduce over lanes ^1, ^2.
    float base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
        tile_max = fmaxf(tile_max, fmaxf(acc_s[n][2 * r], acc_s[n][2 * r + 1]));
      }
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      const float new_max = fmaxf(row_max[r], tile_max);
      // A row with nothing visible yet keeps max -inf; subtracting 0 then gives exp2(-inf) = 0
      // instead of exp2(-inf - -inf) = NaN.
      base[r] = new_max == -INFINITY ? 0.0f : new_max;
      const float correction = exp2f(row_max[r] - base[r]);
      row_max[r] = new_max;
      row_sum[r] *= correction;
#pragma unroll
      for (int d = 0; d < kDTiles; ++d) {
        acc_o[d][2 * r] *= correction;
        acc_o[d][2 * r + 1] *= correction;
      }
    }
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc_s[n][e] = exp2f(acc_s[n][e] - base[e / 2]);
        row_sum[e / 2] += acc_s[n][e];
      }
    }

    // O += P V. The S accumulators of 8-key tiles 2kk and 2kk+1 are exactly the A fragment of
    // k-step kk; V (keys x d, row-major) becomes the column-major B operand via ldmatrix.trans:
    // matrices (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 8-15).
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a_reg[4];
      a_reg[0] = Cvt::pack2(acc_s[2 * kk][0], acc_s[2 * kk][1]);
      a_reg[1] = Cvt::pack2(acc_s[2 * kk][2], acc_s[2 * kk][3]);
      a_reg[2] = Cvt::pack2(acc_s[2 * kk + 1][0], acc_s[2 * kk + 1][1]);
      a_reg[3] = Cvt::pack2(acc_s[2 * kk + 1][2], acc_s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < kDTiles / 2; ++dp) {
        uint32_t b_reg[4];
        ldmatrix_x4_trans(b_reg, tile_v + Tile::offset(kk * 16 + (lane & 7) + ((lane / 8) & 1) * 8,
                                                       2 * dp + lane / 16));
        mma_m16n8k16<T>(acc_o[2 * dp], a_reg, b_reg[0], b_reg[1]);
        mma_m16n8k16<T>(acc_o[2 * dp + 1], a_reg, b_reg[2], b_reg[3]);
      }
    }
    // Every warp must be done with this stage before the next iteration refills it.
    __syncthreads();
  }

  // Normalise, stage the warp's 16 rows in its own (already consumed) rows of s_q, then write
  // them out with coalesced 16-byte stores.
  float inv_sum[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float total = row_sum[r];
    total += __shfl_xor_sync(0xffffffffu, total, 1);
    total += __shfl_xor_sync(0xffffffffu, total, 2);
    int seen = row_seen[r] ? 1 : 0;
    seen |= __shfl_xor_sync(0xffffffffu, seen, 1);
    seen |= __shfl_xor_sync(0xffffffffu, seen, 2);
    // No visible key: zeros. Visible keys whose logits were all -inf: total 0, and 0 * inf = NaN.
    inv_sum[r] = seen != 0 ? 1.0f / total : 0.0f;
  }
#pragma unroll
  for (int d = 0; d < kDTiles; ++d) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp_row0 + group + 8 * r;
      const int col = d * 8 + quad * 2;
      *reinterpret_cast<uint32_t*>(s_q + Tile::offset(row, col / 8) + col % 8) =
          Cvt::pack2(acc_o[d][2 * r] * inv_sum[r], acc_o[d][2 * r + 1] * inv_sum[r]);
    }
  }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < 16 * Tile::kChunks / 32; ++i) {
    const int idx = lane + 32 * i;
    const int row = idx / Tile::kChunks;
    const int chunk = idx % Tile::kChunks;
    const int64_t out_row = m0 + warp_row0 + row;
    if (out_row < seq_q) {
      *reinterpret_cast<uint4*>(o + out_row * p.o_row_stride + chunk * 8) =
          *reinterpret_cast<const uint4*>(s_q + Tile::offset(warp_row0 + row, chunk));
    }
  }
#else
  // Never launched below sm_80: the launcher routes such devices to the simple kernel.
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------------
// Simple kernel: any dtype, head_dim <= 32 * kPerLane, any strides.
// ---------------------------------------------------------------------------------------------

constexpr int kSimpleWarps = 4;
constexpr int kMaxSimpleHeadDim = 512;
static_assert(kMaxSimpleHeadDim == kCudaMaxHeadDim, "flash_attention.h states this limit");

template <typename T, int kPerLane>
__global__ void __launch_bounds__(kSimpleWarps * 32)
    flash_fwd_simple_kernel(const AttentionParams p) {
  using Cvt = Convert<T>;
  extern __shared__ float s_query[];  // (kSimpleWarps, D), log2-scaled

  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kSimpleWarps + warp;
  if (row >= p.seq_q) return;  // whole warp leaves together; no block-wide barrier follows
  const int64_t h = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int head_dim = static_cast<int>(p.head_dim);
  const T* const q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                     row * p.q_row_stride;
  // Grouped-query: its key/value head, in unsigned 32-bit arithmetic (the head count is the
  // grid's y size, under 65536): a 64-bit division made the sm_90 kernels spill registers.
  const unsigned kv_h = static_cast<unsigned>(h) /
                        (static_cast<unsigned>(p.heads) / static_cast<unsigned>(kv_heads_of(p)));
  const T* const k = static_cast<const T*>(p.k) + b * p.k_batch_stride + kv_h * p.k_head_stride;
  const T* const v = static_cast<const T*>(p.v) + b * p.v_batch_stride + kv_h * p.v_head_stride;
  T* const o =
      static_cast<T*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride + row * p.o_row_stride;
  const uint8_t* const mask =
      p.mask == nullptr
          ? nullptr
          : p.mask + b * p.mask_batch_stride + h * p.mask_head_stride + row * p.mask_q_stride;

  float* const s_q = s_query + warp * head_dim;
  const float scale_log2 = p.scale * kLog2e;
  for (int d = lane; d < head_dim; d += 32) s_q[d] = Cvt::to_float(q[d]) * scale_log2;
  __syncwarp();

  int64_t key_end = p.seq_k;
  if (p.causal) key_end = min(p.seq_k, row + 1 + (p.seq_k - p.seq_q));

  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = 0.0f;
  float run_max = -INFINITY;
  float run_sum = 0.0f;  // this lane's share; the correction factor is warp-uniform
  for (int64_t n0 = 0; n0 < key_end; n0 += 32) {
    const int64_t key = n0 + lane;
    float logit = -INFINITY;
    if (key < key_end && (mask == nullptr || mask[key * p.mask_k_stride] != 0)) {
      const T* const k_row = k + key * p.k_row_stride;
      float dot = 0.0f;
      for (int d = 0; d < head_dim; ++d) dot += s_q[d] * Cvt::to_float(k_row[d]);
      logit = dot;
    }
    const float new_max = fmaxf(run_max, warp_max(logit));
    const float base = new_max == -INFINITY ? 0.0f : new_max;
    const float correction = exp2f(run_max - base);
    run_max = new_max;
    const float prob = exp2f(logit - base);
    run_sum = run_sum * correction + prob;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[i] *= correction;
    const int count = static_cast<int>(min(static_cast<int64_t>(32), key_end - n0));
    for (int j = 0; j < count; ++j) {
      const float pj = __shfl_sync(0xffffffffu, prob, j);
      if (pj == 0.0f) continue;  // warp-uniform: pj is a broadcast
      const T* const v_row = v + (n0 + j) * p.v_row_stride;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int d = lane + 32 * i;
        if (d < head_dim) acc[i] += pj * Cvt::to_float(v_row[d]);
      }
    }
  }
  const float total = warp_sum(run_sum);
  // No visible key: zeros. Visible keys whose logits were all -inf: total 0, and 0 * inf = NaN
  // (flash_export.h). Only a row without a positive sum looks its keys' visibility up again,
  // after the loop: a flag carried through it spills registers.
  bool seen = total > 0.0f;
  if (!seen) {
    bool lane_seen = false;
    for (int64_t key = lane; key < key_end && !lane_seen; key += 32) {
      lane_seen = mask == nullptr || mask[key * p.mask_k_stride] != 0;
    }
    seen = __any_sync(0xffffffffu, lane_seen);
  }
  const float inv = seen ? 1.0f / total : 0.0f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < head_dim) o[d] = Cvt::from_float(acc[i] * inv);
  }
}

// Lk == 0: every output element is zero. One thread per element, grid-stride.
template <typename T>
__global__ void zero_output_kernel(const AttentionParams p) {
  const int64_t per_row = p.heads * p.head_dim;
  const int64_t total = p.batch * p.seq_q * per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = i % p.head_dim;
    const int64_t h = (i / p.head_dim) % p.heads;
    const int64_t l = (i / per_row) % p.seq_q;
    const int64_t b = i / (per_row * p.seq_q);
    static_cast<T*>(p.out)[b * p.o_batch_stride + l * p.o_row_stride + h * p.o_head_stride + d] =
        Convert<T>::from_float(0.0f);
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers.
// ---------------------------------------------------------------------------------------------

Status check_launch() {
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kDeviceError;
}

template <typename T>
Status launch_zero(const AttentionParams& p, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t total = p.batch * p.seq_q * p.heads * p.head_dim;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 65536);
  zero_output_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return check_launch();
}

template <typename T, int kHeadDim>
Status launch_mma(const AttentionParams& p, cudaStream_t stream) {
  auto kernel = flash_fwd_mma_kernel<T, kHeadDim>;
  constexpr size_t kSmemBytes = MmaTile<kHeadDim>::kSmemElems * sizeof(T);
  if (kSmemBytes > 48 * 1024 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(kSmemBytes)) != cudaSuccess) {
    return Status::kDeviceError;
  }
  const dim3 grid(static_cast<unsigned>((p.seq_q + kBlockM - 1) / kBlockM),
                  static_cast<unsigned>(p.heads), static_cast<unsigned>(p.batch));
  kernel<<<grid, kMmaThreads, kSmemBytes, stream>>>(p);
  return check_launch();
}

template <typename T, int kPerLane>
Status launch_simple_for(const AttentionParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.seq_q + kSimpleWarps - 1) / kSimpleWarps),
                  static_cast<unsigned>(p.heads), static_cast<unsigned>(p.batch));
  const size_t smem = kSimpleWarps * static_cast<size_t>(p.head_dim) * sizeof(float);
  flash_fwd_simple_kernel<T, kPerLane><<<grid, kSimpleWarps * 32, smem, stream>>>(p);
  return check_launch();
}

template <typename T>
Status launch_simple(const AttentionParams& p, cudaStream_t stream) {
  if (p.head_dim <= 32) return launch_simple_for<T, 1>(p, stream);
  if (p.head_dim <= 64) return launch_simple_for<T, 2>(p, stream);
  if (p.head_dim <= 128) return launch_simple_for<T, 4>(p, stream);
  if (p.head_dim <= 256) return launch_simple_for<T, 8>(p, stream);
  return launch_simple_for<T, 16>(p, stream);
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// The tensor-core path moves 16-byte row chunks: every pointer and stride must keep them
// aligned, and the device needs cp.async, ldmatrix and bf16 mma (sm_80+).
bool mma_path_applies(const AttentionParams& p, int device_major) {
  if (device_major < 8) return false;
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return false;
  if (p.head_dim != 64 && p.head_dim != 128) return false;
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.out)) return false;
  const int64_t strides[] = {p.q_batch_stride, p.q_row_stride,   p.q_head_stride,  p.k_batch_stride,
                             p.k_row_stride,   p.k_head_stride,  p.v_batch_stride, p.v_row_stride,
                             p.v_head_stride,  p.o_batch_stride, p.o_row_stride,   p.o_head_stride};
  for (int64_t s : strides) {
    if (s % 8 != 0) return false;
  }
  return true;
}

template <typename T>
Status dispatch(const AttentionParams& p, cudaStream_t stream, int device_major) {
  if (p.seq_k == 0) return launch_zero<T>(p, stream);
  if constexpr (!std::is_same<T, float>::value) {
    if (mma_path_applies(p, device_major)) {
      return p.head_dim == 64 ? launch_mma<T, 64>(p, stream) : launch_mma<T, 128>(p, stream);
    }
  }
  if (p.head_dim > kMaxSimpleHeadDim) return Status::kUnsupported;
  return launch_simple<T>(p, stream);
}

Status validate(const AttentionParams& p) {
  // Kernels index rows with int and put heads / batch on grid.y / grid.z.
  constexpr int64_t kMaxSeq = std::numeric_limits<int32_t>::max() - 2 * kBlockM;
  constexpr int64_t kMaxGridYZ = 65535;
  static_assert(kMaxSeq == kCudaMaxSeqLen && kMaxGridYZ == kCudaMaxGridDim,
                "flash_attention.h states these limits");
  if (p.batch < 0 || p.heads < 0 || p.head_dim <= 0 || p.seq_q < 0 || p.seq_k < 0) {
    return Status::kInvalidArgument;
  }
  if (p.seq_q > kMaxSeq || p.seq_k > kMaxSeq || p.heads > kMaxGridYZ || p.batch > kMaxGridYZ) {
    return Status::kInvalidArgument;
  }
  if (p.chunk_size < 1) return Status::kInvalidArgument;
  if (p.kv_heads < 0 || (p.heads > 0 && p.heads % kv_heads_of(p) != 0)) {
    return Status::kInvalidArgument;
  }
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) {
    return Status::kUnsupported;
  }
  // Of contract v2 these kernels take grouped-query heads and every layout (strides); the params
  // filler refuses the rest by name on a CUDA forward (flash_attention.h).
  if (p.seqlens_k != nullptr || p.bias != nullptr || p.window_size > 0 || p.softcap > 0.0f ||
      head_dim_v_of(p) != p.head_dim) {
    return Status::kUnsupported;
  }
  return Status::kOk;
}

}  // namespace
}  // namespace cuda_detail

Status attention_forward_cuda(const AttentionParams& params, void* stream) {
  using namespace cuda_detail;
  const Status valid = validate(params);
  if (valid != Status::kOk) return valid;
  if (params.batch == 0 || params.heads == 0 || params.seq_q == 0) return Status::kOk;
  if (params.out == nullptr || params.q == nullptr) return Status::kInvalidArgument;
  if (params.seq_k > 0 && (params.k == nullptr || params.v == nullptr)) {
    return Status::kInvalidArgument;
  }

  int device = 0;
  int major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    return Status::kDeviceError;
  }
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (params.dtype) {
    case DType::kFloat32:
      return dispatch<float>(params, s, major);
    case DType::kFloat16:
      return dispatch<__half>(params, s, major);
    case DType::kBFloat16:
      return dispatch<__nv_bfloat16>(params, s, major);
  }
  return Status::kUnsupported;
}

}  // namespace flash_export

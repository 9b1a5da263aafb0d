// RoPE + KV-cache write, and attention over a paged KV cache.
//
// The cache of one layer is a pool of pages, K and V each [pages][page_size][kv_heads * head_dim] of
// BF16, FP8 E4M3 or INT8 codes (value = code * scale[kv_head] for the quantized types). A sequence's
// positions live in the pages its row of the block table names: position p of sequence s is slot
// block_table[s * pages_per_seq + p / page_size] * page_size + p % page_size.
//
// Attention reads (seq, pos) of each token from device memory, so one launch configuration serves every
// decode step (CUDA graphs). With splits > 1 (flash-decoding) each block covers `chunk` positions and
// writes an unnormalized partial result; the last block of each (token, head group) to finish, found with a
// counter, merges them in the same launch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/prep.cuh"

namespace llmq::cuda {

enum class KvType : int { BF16, FP8, I8 };

struct KvCacheView {
  KvType type = KvType::BF16;
  int64_t page_size = 16, pages_per_seq = 0;
  const int32_t* block_table = nullptr;  // [n_seq, pages_per_seq]
  int64_t kv_heads = 0, head_dim = 0;
  void* k = nullptr;                     // this layer's pages
  void* v = nullptr;
  const float* k_scale = nullptr;        // [kv_heads] (FP8/I8)
  const float* v_scale = nullptr;
};

// qkv: FP32 [T, ld] with q at columns [0, heads*hd), k next, v after. Rotates q and k in place (rotate-half
// convention, cos/sin tables FP32 [positions, hd/2]) and stores k, v of every token into the cache.
// With raw (a W8A8 qkv GEMM's raw accumulators, RawAcc): the values are read from raw instead, as gemm_epilogue
// would have written them (the same bits), and rotated q and k are written into qkv (v is not).
void rope_kv(float* qkv, int64_t ld, int64_t T, const int32_t* pos, const int32_t* seq, const float* cos_tab,
             const float* sin_tab, int64_t heads, const KvCacheView& kv, cudaStream_t s, const RawAcc* raw = nullptr);

struct AttentionArgs {
  const float* q = nullptr;  // [T, ldq], heads * head_dim used, already rotated
  int64_t ldq = 0;
  int64_t T = 0, heads = 0;
  const int32_t* pos = nullptr;  // [T]
  const int32_t* seq = nullptr;  // [T]
  int64_t window = 0;            // sliding window (0: none)
  float* out = nullptr;          // [T, heads * head_dim]
  // If out_prep.out is set, the output goes there instead, as the next matmul's input (out_prep.ld >= heads *
  // head_dim): BF16 values (kind None), or codes of a static scale (I8Tensor, Fp8Tensor; row_scale[t] set to
  // it), exactly as act_prep would write them. Not I8Token: a row's absmax spans blocks.
  PrepOut out_prep;
  int64_t splits = 1, chunk = 0; // splits > 1: positions [lo + i*chunk, lo + (i+1)*chunk) per split
  float* partial = nullptr;      // splits > 1: [T, heads, splits, head_dim + 2]
  int32_t* counters = nullptr;   // splits > 1: attention_counters(...) zeros on the device; left zero again
  // Prefill (splits == 1): tiles of up to kFlashTile consecutive tokens of one sequence, [n_tiles][2] =
  // (first token, count) on the device (attention_tiles builds them). With tiles, head dims that are
  // multiples of 16 up to 128 take the tensor-core kernel (flash attention: FP16 operands, FP32 softmax and
  // accumulation); other shapes, or no tiles, the per-token kernel.
  const int32_t* tiles = nullptr;
  int64_t n_tiles = 0;
  // RoPE and the KV write inside the decode kernel (attention_rope_supports: steps of one token per sequence):
  // q is read unrotated and rotated on load; k and v of token t are read from row t of q's buffer (k at column
  // kv_col, v at kv_col + kv_heads * head_dim), k rotated, and both stored into the cache by the block whose
  // range holds the token's position, before it reads the cache. rope_kv is not run for such a step.
  const float* rope_cos = nullptr;  // [positions, head_dim / 2]; set: fused
  const float* rope_sin = nullptr;
  int64_t kv_col = 0;
  // With fused RoPE: the first positions of each block's range (all but the token's own) are read from the
  // cache before the kernel waits for the previous one (PDL), overlapping its tail. false: after (comparisons).
  bool prewait = true;
  // With fused RoPE, where attention_decode_raw_q says the launch's kernel takes them: q, k and v of token t are
  // read from a W8A8 qkv GEMM's raw accumulators with their scales (RawAcc: the values gemm_epilogue would have
  // written into q's buffer, the same bits; no bias), so that the epilogue pass goes. q is then not read.
  RawAcc q_raw;
  // Decode: attention_decode_tc_kernel (query heads on the tensor cores' rows) where attention_decode_tc_supports
  // says it runs the shape; false: the CUDA-core kernels. LLMQ_ATTN_TC=1 takes it wherever supported, =0 never.
  bool tensor_cores = false;
};

constexpr int64_t kFlashTile = 64;
constexpr int64_t kMaxAttentionSplits = 256;  // AttentionArgs::splits at most

// Cuts a batch into prefill tiles: runs of consecutive tokens of the same sequence, at most kFlashTile each.
// seq: [T] (host); tiles: room for 2 * T values (host). Returns the number of tiles.
int64_t attention_tiles(const int32_t* seq, int64_t T, int32_t* tiles);
// Whether the tensor-core prefill kernel takes this head dim (with tiles).
bool attention_flash_supports(int64_t head_dim);

// The number of counters a split launch of T tokens needs (AttentionArgs::counters).
int64_t attention_counters(int64_t T, int64_t heads, int64_t kv_heads);

// Whether attention() fuses RoPE and the KV write (AttentionArgs::rope_cos) for this shape: head dims 64 and
// 128, at most 8 query heads per KV head (one block per KV head and split writes its K/V), splits or not.
// Only for steps where every sequence has one token (no token reads another's K/V of the same step).
bool attention_rope_supports(const KvCacheView& kv, int64_t heads);

// Whether the attention kernels run this shape (head_dim <= 256).
bool attention_supports(const KvCacheView& kv, int64_t heads);
void attention(const AttentionArgs& a, const KvCacheView& kv, cudaStream_t s);
// Blocks of the head-split decode kernel (several warps per position range, for 2 or more query heads per KV
// head) resident on the card at once for this cache's type and shape: a decode launch of at most this many
// blocks (tokens x KV heads x splits) takes it. 0 where it does not apply (head dims other than 64 and 128,
// one query head per KV head, LLMQ_ATTN_V1, LLMQ_ATTN_NO_HEADSPLIT).
int64_t attention_decode_wave(const KvCacheView& kv, int64_t heads);
// Whether a fused-RoPE decode launch of T tokens in `splits` splits takes a kernel that reads raw qkv
// accumulators (AttentionArgs::q_raw): the two-step instance with its cp.async ring (batch 64 of
// llama-3-8b). kv's type, kv_heads and head_dim are what counts.
bool attention_decode_raw_q(const KvCacheView& kv, int64_t heads, int64_t T, int64_t splits);
// Whether the tensor-core decode kernel (AttentionArgs::tensor_cores) runs this shape: a BF16 cache, head dim 64
// or 128, two or more query heads per KV head.
bool attention_decode_tc_supports(const KvCacheView& kv, int64_t heads);

}  // namespace llmq::cuda

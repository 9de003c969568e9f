// Torch-free interface of the DFlash kernels (tree build, the tree verify's inputs, verify, commit, the drafter's
// context K/V, the chain step's block and acceptance): parameter structs (raw pointers, plain sizes) and launchers.
// The bindings (dflash_binding.cpp) check every tensor, fill these structs and call the launchers on the current
// stream. Node indices are per request: node 0 is the root, nodes [1, n) are draft tokens. "-1" pads every
// index output. No launcher synchronizes with the host.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dflash {

// Tree build keeps its heap, per-node records and ancestor bitsets in shared memory sized for this budget.
constexpr int kMaxTreeBudget = 256;
// Tree build stages the [depth, topk] log-prob table in shared memory; depth and topk share 10-bit heap fields.
constexpr int kMaxTopkTable = 4096;
constexpr int kMaxTreeDepth = 1023;
constexpr int kMaxTreeTopk = 1023;
// Verify and commit stage per-request node arrays in shared memory.
constexpr int kMaxVerifyNodes = 1024;
// The context K/V kernel keeps a head's rotation pairs in registers, at most 8 per lane of a 32-lane group.
constexpr int kMaxContextHeadDim = 512;

enum class ElementType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct BuildTreeParams {
  const int64_t* root_tokens;      // [bs]
  const float* topk_logprobs;      // [bs, depth, topk], ranks in descending order
  const int64_t* topk_ids;         // [bs, depth, topk]
  const int64_t* start_positions;  // [bs] position of the root
  int64_t* tokens;                 // [bs, n]
  int32_t* parents;                // [bs, n], -1 for the root
  int32_t* depths;                 // [bs, n]
  int64_t* positions;              // [bs, n] = start + depth
  int32_t* first_child;            // [bs, n], -1 for a leaf
  int32_t* next_sibling;           // [bs, n], -1 for the last child (and the root)
  bool* ancestor_mask;             // [bs, n, n]: [b, i, j] iff j is i or an ancestor of i
  int bs, depth, topk, budget;     // n = budget + 1
};

struct VerifyGreedyParams {
  const int64_t* tokens;          // [bs, n]
  const int32_t* first_child;     // [bs, n]
  const int32_t* next_sibling;    // [bs, n]
  const int64_t* target_predict;  // [bs, n] target argmax after each node
  int32_t* path;                  // [bs, D+1] accepted root path, root first, -1 padded
  int32_t* accept_len;            // [bs] accepted non-root nodes
  int64_t* bonus;                 // [bs]
  int64_t* emitted;               // [bs, D+1] accepted draft tokens, bonus, -1 padded
  int bs, num_nodes, max_depth;
};

struct VerifySamplingParams {
  const int64_t* tokens;        // [bs, n]
  const int32_t* first_child;   // [bs, n]
  const int32_t* next_sibling;  // [bs, n]
  const float* target_probs;    // [bs, n, V] target sampling distribution after each node (rows sum to 1)
  const float* coins;           // [bs, n] uniform [0, 1): coins[b, c] decides child c when it is tried
  const float* race;            // [bs, V] Exp(1) variates for the bonus race
  int32_t* path;
  int32_t* accept_len;
  int64_t* bonus;
  int64_t* emitted;
  unsigned long long* best_keys;  // [bs] workspace, zeroed: race winner key, max-reduced across CTAs
  unsigned int* arrivals;         // [bs] workspace, zeroed: CTAs done, so the last one writes the outputs
  int bs, num_nodes, max_depth;
  int64_t vocab;
  int64_t chunk;  // vocabulary entries raced by one CTA (a multiple of 4)
  int num_chunks;
};

struct VerifyInputsParams {
  const bool* ancestor_mask;        // [bs, W, W]: [b, i, j] iff node j is node i or one of its ancestors
  const int64_t* seq_lens;          // [bs] committed lengths; the verify slots sit at [seq_len, seq_len + W)
  const int64_t* req_pool_indices;  // [bs]
  const int32_t* req_to_token;      // [R, row_stride] slot table
  int64_t row_stride;
  int64_t* verify_slots;  // [bs, W]
  bool* mask;             // [mask_size]: request b's W rows of (seq_len + W) after the rows of the requests before it
  int64_t mask_size;      // >= sum_b W * (seq_len_b + W); the tail is set to 1
  int bs, width;
};

struct CommitTreeParams {
  int32_t* req_to_token;  // [R, row_stride] slot table, its verify columns permuted in place
  int64_t row_stride;
  const int64_t* req_pool_indices;  // [bs]
  const int64_t* seq_lens;          // [bs] committed lengths; verify slots sit at [seq_len, seq_len + n)
  const int32_t* path;              // [bs, D+1] from a verifier
  const int32_t* accept_len;        // [bs]
  const int64_t* verified_emitted;  // [bs, D+1] from the verifier: accepted drafts, bonus, -1 padded
  int32_t* commit_lens;             // [bs] accept_len + 1
  int64_t* new_seq_lens;            // [bs] seq_len + accept_len + 1
  int64_t* emitted;                 // [bs, D+1] verified_emitted with 0 for -1 (SGLang's spec-v2 layout)
  int bs, num_nodes, max_depth;
};

struct ContextKVParams {
  const void* kv;              // [N, L, 2, H, D] of `dtype`: token n's layer-l keys at [n, l, 0], values at [n, l, 1]
  const float* k_norm_scale;   // [L, D] each layer's key RMSNorm scale (Gemma's 1 + w already applied)
  const int64_t* positions;    // [N]
  const void* cos_sin_cache;   // [max_position, cache_row_stride] of `cache_dtype`: cos in [0, D/2), sin in [D/2, D)
  void* keys;                  // [L, N, H, D] of `dtype`: normed, then neox-rotated at positions[n]
  void* values;                // [L, N, H, D] of `dtype`: copied
  // Pool mode (key_layers != nullptr; keys and values unused): row (l, n, h) goes straight into the KV pool, at
  // key_layers[l] + slots[n] * slot_stride + h * D (values alike): the store SGLang's pool makes per layer.
  const int64_t* key_layers;   // [L] base addresses of each layer's [S, H, D] key buffer
  const int64_t* value_layers; // [L] the same for values
  const int64_t* slots;        // [N] pool slot of token n
  int64_t slot_stride;         // elements between consecutive slots of a layer buffer (H * D when contiguous)
  int64_t pool_alignment;      // bytes every base address and slot_stride * sizeof(dtype) are a multiple of
  float eps;
  int64_t num_tokens;          // N
  int num_layers, num_heads, head_dim;  // L, H, D (D even, <= kMaxContextHeadDim)
  int64_t max_position;        // cache rows; positions are clamped into [0, max_position)
  int64_t cache_row_stride;    // elements
  ElementType dtype;           // of kv, keys and values
  ElementType cache_dtype;     // kFloat32 or `dtype`
};

struct ChainBlockParams {
  const int64_t* bonus;             // [bs] last step's bonus token: the block's anchor
  const int64_t* seq_lens;          // [bs] committed lengths: the anchor's position
  const int64_t* req_pool_indices;  // [bs]
  const int32_t* req_to_token;      // [R, row_stride] slot table
  int64_t row_stride;
  int64_t mask_token_id;
  int64_t* block_ids;  // [bs, B] anchor, then mask ids
  int64_t* positions;  // [bs, B] seq_len + j
  int64_t* slots;      // [bs, B] req_to_token[row, seq_len + j]
  int bs, block_size;
};

struct ChainAcceptParams {
  const int64_t* candidates;  // [bs, B] anchor and drafts, as verified
  const int64_t* predicted;   // [bs, B] the target's argmax at each verify row
  const int64_t* seq_lens;    // [bs]
  int32_t* accept_len;        // [bs] leading drafts kept
  int32_t* commit_lens;       // [bs] accept_len + 1 (the anchor and the kept drafts)
  int64_t* bonus;             // [bs] predicted[accept_len]
  int64_t* new_seq_lens;      // [bs] seq_len + accept_len + 1
  int64_t* emitted;           // [bs, B] kept drafts, the bonus at accept_len, zeros after
  int bs, block_size;
};

cudaError_t launch_build_tree(const BuildTreeParams& params, cudaStream_t stream);
size_t build_tree_smem_bytes(int depth, int topk, int budget);
cudaError_t launch_verify_greedy(const VerifyGreedyParams& params, cudaStream_t stream);
cudaError_t launch_verify_sampling(const VerifySamplingParams& params, cudaStream_t stream);
cudaError_t launch_verify_inputs(const VerifyInputsParams& params, cudaStream_t stream);
cudaError_t launch_commit_tree(const CommitTreeParams& params, cudaStream_t stream);
cudaError_t launch_context_kv(const ContextKVParams& params, cudaStream_t stream);
cudaError_t launch_chain_block(const ChainBlockParams& params, cudaStream_t stream);
cudaError_t launch_chain_accept(const ChainAcceptParams& params, cudaStream_t stream);

}  // namespace dflash
